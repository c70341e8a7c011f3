"""A bounded load generator for canary windows: Debian's ``wrk`` against a loopback URL.

Canary analysis needs traffic in every window; in tests and in the local demo nothing else
sends any. :func:`run_load` runs ``wrk`` through the one tool wrapper for a fixed time, with
a fixed number of connections and optionally a request-rate cap, and returns the totals and
latency percentiles that wrk measured on the client side. It only ever targets loopback.
"""

from __future__ import annotations

import ipaddress
import json
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field

from portcullis.errors import PolicyRefusal, ToolError
from portcullis.models import Frozen
from portcullis.toolrun import run_tool

MAX_DURATION_SECONDS = 300.0
"""Upper bound on one run: a load generator must never be left running by mistake."""

_RESULT_MARK = "PORTCULLIS-WRK-RESULT "

# wrk runs one Lua state per thread plus one for done(); delay() spaces the requests of each
# connection so that all connections together stay near the requested rate.
_SCRIPT = """
local delay_ms = 0
function init(args)
  delay_ms = tonumber(args[1]) or 0
end
function delay()
  return delay_ms
end
function done(summary, latency, requests)
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"mean_us":%f}\\n',
    "__MARK__", summary.requests, summary.duration,
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


class LoadResult(Frozen):
    """What one wrk run measured from the client side."""

    requests: int = Field(ge=0, description="completed requests")
    duration_seconds: float = Field(ge=0)
    http_errors: int = Field(ge=0, description="responses with status >= 400")
    socket_errors: int = Field(ge=0, description="connect, read, write errors and timeouts")
    latency_p50_seconds: float = Field(ge=0)
    latency_p90_seconds: float = Field(ge=0)
    latency_p99_seconds: float = Field(ge=0)
    latency_max_seconds: float = Field(ge=0)
    latency_mean_seconds: float = Field(ge=0)

    @property
    def requests_per_second(self) -> float:
        """Achieved request rate."""
        return self.requests / self.duration_seconds if self.duration_seconds else 0.0


def _require_loopback(url: str) -> None:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme not in ("http", "https") or not loopback:
        raise PolicyRefusal(
            f"refusing to generate load against {url!r}: only http(s) URLs on loopback "
            "(127.0.0.1, ::1, localhost) are allowed",
            hint="point the load generator at the router's frontend on 127.0.0.1",
        )


def run_load(
    url: str,
    *,
    duration_seconds: float,
    connections: int = 4,
    threads: int = 1,
    rate_per_second: float | None = None,
    request_timeout_seconds: float = 2.0,
) -> LoadResult:
    """Send HTTP GET requests to ``url`` for a bounded time.

    Args:
        url: target on loopback.
        duration_seconds: how long to run (at most :data:`MAX_DURATION_SECONDS`).
        connections: concurrent keep-alive connections (at least ``threads``).
        threads: wrk threads.
        rate_per_second: approximate cap on the total request rate; None runs flat out.
            wrk has no rate control of its own; each connection pauses ``connections / rate``
            seconds between requests, so the achieved rate is at most this and lower when
            responses are slow.
        request_timeout_seconds: a request slower than this counts as a timeout error.

    Returns:
        Totals and client-side latency percentiles.

    Raises:
        PolicyRefusal: the URL is not on loopback, or the run would exceed the bounds.
        ToolError: wrk failed or printed no result.
    """
    _require_loopback(url)
    if not 0 < duration_seconds <= MAX_DURATION_SECONDS:
        raise PolicyRefusal(
            f"load duration {duration_seconds}s is outside (0, {MAX_DURATION_SECONDS:g}]s"
        )
    if threads < 1 or connections < threads:
        raise PolicyRefusal(
            f"wrk needs at least one thread and one connection per thread "
            f"(threads={threads}, connections={connections})"
        )
    if rate_per_second is not None and rate_per_second <= 0:
        raise PolicyRefusal(f"request rate must be positive, got {rate_per_second}")
    delay_ms = 0 if rate_per_second is None else max(0, round(connections * 1000 / rate_per_second))
    with tempfile.TemporaryDirectory(prefix="portcullis-wrk-") as tmp:
        script = Path(tmp) / "report.lua"
        script.write_text(_SCRIPT.replace("__MARK__", _RESULT_MARK))
        argv = [
            "wrk",
            f"--threads={threads}",
            f"--connections={connections}",
            f"--duration={max(1, round(duration_seconds))}s",
            f"--timeout={request_timeout_seconds:g}s",
            f"--script={script}",
            url,
            "--",
            str(delay_ms),
        ]
        result = run_tool(argv, timeout=duration_seconds + request_timeout_seconds + 15)
    stdout = result.stdout.decode(errors="replace")
    line = next((ln for ln in stdout.splitlines() if ln.startswith(_RESULT_MARK)), None)
    if line is None:
        raise ToolError("wrk", result.returncode, f"no result line in wrk output: {stdout[-500:]}")
    raw = json.loads(line[len(_RESULT_MARK) :])
    return LoadResult(
        requests=raw["requests"],
        duration_seconds=raw["duration_us"] / 1e6,
        http_errors=raw["status"],
        socket_errors=raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
        latency_p50_seconds=raw["p50_us"] / 1e6,
        latency_p90_seconds=raw["p90_us"] / 1e6,
        latency_p99_seconds=raw["p99_us"] / 1e6,
        latency_max_seconds=raw["max_us"] / 1e6,
        latency_mean_seconds=raw["mean_us"] / 1e6,
    )
