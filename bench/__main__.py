"""``python -m bench`` (``make bench``): run every benchmark, then print one table of figures.

Each benchmark runs as its own process with its detailed output shown as it goes; the lines it
marks with :func:`bench.report.figure` are gathered into the table at the end, with the goal
and the figure each replaces beside them. Figures are measured, not asserted: a benchmark
never fails a build.
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench.report import PREFIX

#: (module, arguments): the benchmarks, cheapest first.
BENCHES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bench.audit_verify", ()),
    ("bench.state_store", ()),
    ("bench.board", ()),
    ("bench.build_reuse", ()),
    ("bench.canary_sim", ()),
    ("bench.worker_start", ("5",)),
    ("bench.fast_starts", ()),
)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks named in ``argv`` (default: all) and print the table."""
    wanted = set(argv or sys.argv[1:])
    rows: list[tuple[str, ...]] = []
    for module, args in BENCHES:
        if wanted and module.removeprefix("bench.") not in wanted:
            continue
        print(f"\n===== {module} {' '.join(args)}", flush=True)
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.PIPE,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(PREFIX):
                rows.append((module.removeprefix("bench."), *line[len(PREFIX):].rstrip("\n").split("\t")))
            else:
                print(line, end="", flush=True)
        code = proc.wait()
        rows.append((module.removeprefix("bench."), "(run)",
                     f"{time.monotonic() - started:.0f} s" + ("" if code == 0 else f", exit {code}"),
                     "", ""))
    header = ("bench", "figure", "measured", "goal", "before")
    widths = [max(len(r[i]) if i < len(r) else 0 for r in [header, *rows]) for i in range(5)]
    print()
    for row in [header, tuple("-" * w for w in widths), *rows]:
        cells = [*row, "", "", ""][:5]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
