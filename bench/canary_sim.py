"""How often the canary judge is right: whole rollouts simulated through the real judge.

Run ``uv run python -m bench.canary_sim`` (``--trials N`` to change the 2,000 trials per case).
Every case plays complete rollouts of the SHIPPED policies (policies/*.toml) through
:func:`portcullis.canary.analysis.decide`, window after window, exactly as tasks/canary.py
asks it: request and error counts drawn from binomials, response times from log-normal
distributions binned into the exporter's buckets. The same cases go through the judge of
``main`` (its analysis module and dev policy, read with ``git show``) when git has them; the
old judge had a canary only in dev. Each rate is printed with its 95% Clopper-Pearson interval.

Traffic: "min" gives the smaller side of each window (canary at weights <= 50%) exactly the
policy's ``min_requests``; a number gives the canary that many requests per window. The last
column is how many rollouts ended Successful: a judge that is never sure is safe and useless.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from scipy import stats

from bench.report import figure as report
from portcullis.canary import analysis as new
from portcullis.canary.metrics import LATENCY_BUCKETS
from portcullis.policy import load_policy

ROOT = Path(__file__).resolve().parent.parent
T0 = datetime(2030, 1, 1, tzinfo=UTC)
OLD_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
               0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
MEDIAN_SECONDS, SIGMA = 0.040, 0.5  # log-normal response times: p99 ~ 128 ms


@dataclass(frozen=True)
class Case:
    """One simulated situation."""

    label: str
    canary_rate: float
    baseline_rate: float
    traffic: int | str  # canary requests per window, or "min"/"half-min"
    slowdown: float = 1.0
    goal: str = ""


@dataclass
class Tally:
    """Outcomes of the trials of one case."""

    trials: int = 0
    failed: int = 0
    failed_first: int = 0
    failed_within_3: int = 0
    successful: int = 0
    inconclusive: int = 0

    def rate(self, count: int) -> str:
        """count/trials with its 95% interval."""
        if self.trials == 0:
            return "-"
        low = stats.beta.ppf(0.025, count, self.trials - count + 1) if count else 0.0
        high = stats.beta.ppf(0.975, count + 1, self.trials - count) if count < self.trials else 1.0
        return f"{count / self.trials:6.1%} [{low:.1%},{high:.1%}]"


def _bucket_probabilities(bounds: tuple[float, ...], slowdown: float) -> np.ndarray:
    edges = np.log(np.asarray(bounds) / (MEDIAN_SECONDS * slowdown)) / SIGMA
    cdf = stats.norm.cdf(edges)
    cdf[-1] = 1.0  # the last bucket takes everything slower
    return np.diff(np.concatenate([[0.0], cdf]))


def _traffic(case: Case, weight: int, min_requests: int) -> tuple[int, int]:
    if isinstance(case.traffic, str):
        small = min_requests if case.traffic == "min" else min_requests // 2
        canary = small if weight <= 50 else round(small * weight / (100 - weight))
    else:
        canary = case.traffic
    baseline = round(canary * (100 - weight) / weight)
    return canary, baseline


class Judge:
    """Plays rollouts through one judge (new or old) for one policy."""

    def __init__(self, module: ModuleType, policy: Any, bounds: tuple[float, ...], old: bool):
        self.m, self.policy, self.bounds, self.old = module, policy, bounds, old
        self.min_requests = policy.limits.min_requests

    def server(self, requests: int, errors: int, counts: np.ndarray) -> Any:
        if self.old:
            return self.m.ServerWindow(requests=requests, errors=errors,
                                       latency_samples=int(counts.sum()),
                                       p99_seconds=_prometheus_quantile(0.99, self.bounds, counts))
        hist = self.m.LatencyHistogram(bounds=self.bounds, counts=tuple(int(c) for c in counts))
        return self.m.ServerWindow(requests=requests, errors=errors, latency=hist)

    def play(self, case: Case, trials: int, rng: np.random.Generator) -> Tally:
        tally = Tally(trials=trials)
        slow_p = _bucket_probabilities(self.bounds, case.slowdown)
        base_p = _bucket_probabilities(self.bounds, 1.0)
        windows = self.policy.failure_limit + self.policy.inconclusive_limit + len(self.policy.steps)
        for _ in range(trials):
            measurements: list[Any] = []
            verdict = self.m.decide(self.policy, measurements)
            while not verdict.phase.terminal:
                weight = verdict.next_weight
                nc, nb = _traffic(case, weight, self.min_requests)
                ec, eb = rng.binomial(nc, case.canary_rate), rng.binomial(nb, case.baseline_rate)
                hc, hb = rng.multinomial(nc - ec, slow_p), rng.multinomial(nb - eb, base_p)
                start = T0 + timedelta(minutes=len(measurements))
                measurements.append(self.m.Measurement(
                    step=verdict.next_step, weight=weight,
                    window=self.m.Window(start=start, end=start + timedelta(seconds=60)),
                    sample=self.m.Sample(canary=self.server(nc, ec, hc),
                                         baseline=self.server(nb, eb, hb))))
                verdict = self.m.decide(self.policy, measurements)
                if len(measurements) > windows + 1:
                    raise RuntimeError("the judge took more windows than its policy allows")
            phase = verdict.phase.value
            if phase == "Failed":
                tally.failed += 1
                tally.failed_first += len(measurements) == 1
                tally.failed_within_3 += len(measurements) <= 3
            elif phase == "Successful":
                tally.successful += 1
            elif phase == "Inconclusive":
                tally.inconclusive += 1
        return tally


def _prometheus_quantile(q: float, bounds: tuple[float, ...], counts: np.ndarray) -> float | None:
    """histogram_quantile() as Prometheus computes it (linear inside the bucket)."""
    total = counts.sum()
    if total == 0:
        return None
    rank = q * total
    cumulative = np.cumsum(counts)
    i = int(np.searchsorted(cumulative, rank))
    if i >= len(bounds) - 1 and cumulative[-2] < rank:
        return bounds[-2]  # the +Inf bucket: Prometheus answers the highest finite bound
    low = bounds[i - 1] if i else 0.0
    below = cumulative[i - 1] if i else 0
    return float(low + (bounds[i] - low) * (rank - below) / counts[i])


def _old_judge() -> Judge | None:
    """main's analysis module and dev policy, or None when git cannot show them."""
    try:
        source = subprocess.run(["git", "show", "main:portcullis/canary/analysis.py"], cwd=ROOT,
                                capture_output=True, check=True, text=True).stdout
        dev = subprocess.run(["git", "show", "main:policies/dev.toml"], cwd=ROOT,
                             capture_output=True, check=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    if "p99_tolerance_seconds" not in source:
        return None  # main already has the new judge: nothing older to compare with
    path = Path(tempfile.mkdtemp()) / "old_analysis.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_canary_analysis", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    policy = module.load_policy(tomllib.loads(dev)["canary"])
    buckets = (*OLD_BUCKETS, float("inf"))
    return Judge(module, policy, buckets, old=True)


def cases(limit: float) -> list[tuple[Case, str]]:
    """The cases for one policy, with the figure that matters for each."""
    out: list[tuple[Case, str]] = []
    for rate in sorted({0.0, 0.001, 0.005, 0.01} | {limit}):
        if rate > limit:
            continue
        for traffic in ("min", 1500, 10000):
            out.append((Case(f"same {rate:.1%} errors, {traffic}/window", rate, rate, traffic,
                             goal="false Failed <=1%"), "failed"))
    out.append((Case("20% errors, min/window", 0.2, 0.001, "min", goal=">=99% first window"),
                "failed_first"))
    out.append((Case("20% errors, 1500/window", 0.2, 0.001, 1500, goal=">=99% first window"),
                "failed_first"))
    out.append((Case("slow burn 0.3% vs 0.1%, 1500/window", 0.003, 0.001, 1500,
                     goal=">=80% within 3 windows"), "failed_within_3"))
    out.append((Case("slow burn 0.3% vs 0.1%, 5000/window", 0.003, 0.001, 5000,
                     goal="(where 80% is reached)"), "failed_within_3"))
    out.append((Case("latency 1.5x, 1500/window", 0.001, 0.001, 1500, slowdown=1.5,
                     goal=">=90% first window"), "failed_first"))
    out.append((Case("same, half the minimum/window", 0.001, 0.001, "half-min",
                     goal="Successful 0%"), "successful"))
    out.append((Case("same, 10 requests/window", 0.0, 0.0, 10, goal="Successful 0%"),
                "successful"))
    return out


_OLD: list[Judge | None] = []


def _run(env: str, index: int, which: str, trials: int, seed: int) -> Tally | None:
    """One case through one judge (in a worker process)."""
    if which == "old":
        if not _OLD:
            _OLD.append(_old_judge())
        judge = _OLD[0]
        if judge is None:
            return None
    else:
        policy = load_policy(env, ROOT / "policies").canary
        assert policy is not None, f"{env} has no canary"
        judge = Judge(new, policy, LATENCY_BUCKETS, old=False)
    limit = load_policy(env, ROOT / "policies").canary.limits.max_error_rate  # type: ignore[union-attr]
    case, _ = cases(limit)[index]
    return judge.play(case, trials, np.random.default_rng(seed))


def slow_burn_bounds(policy: Any, alpha: float, rng: np.random.Generator, *, per_window: int = 1500,
                     windows: int = 3, p0: float = 0.001, p1: float = 0.003) -> tuple[float, float, int]:
    """What no judge can beat on the slow burn with this policy's first ``windows`` steps.

    Returns the power of (1) the most powerful test at level ``alpha`` that knows the
    baseline's error rate exactly (Neyman-Pearson, randomised so that it spends all of
    ``alpha`` on the last window and none earlier), and (2) the exact conditional test that,
    like any real judge, learns the baseline's rate from the baseline's own requests at the
    policy's weights, again spending all of ``alpha`` at the end; and how many windows the
    policy's rollout has to find it in. A sequential judge that may also fail early is below both.
    """
    steps = policy.steps[:windows]
    n = per_window * len(steps)
    null, alt = stats.binom(n, p0), stats.binom(n, p1)
    c = next(k for k in range(n + 1) if null.sf(k - 1) <= alpha)
    gamma = (alpha - null.sf(c - 1)) / null.pmf(c - 1)
    known = float(alt.sf(c - 1) + gamma * alt.pmf(c - 1))
    draws = 200_000
    canary = sum(rng.binomial(per_window, p1, draws) for _ in steps)
    base_n = [round(per_window * (100 - s.weight) / s.weight) for s in steps]
    baseline = sum(rng.binomial(b, p0, draws) for b in base_n)
    share = n / (n + sum(base_n))
    p_value = stats.binom.sf(canary - 1, canary + baseline, share)
    return known, float((p_value <= alpha).mean()), len(steps)


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--trials", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=20261130)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    started = time.monotonic()
    cpu = time.process_time()
    envs = ("dev", "staging", "prod")
    policies = {env: load_policy(env, ROOT / "policies").canary for env in envs}
    jobs: dict[tuple[str, int, str], Future[Tally | None]] = {}
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for env in envs:
            policy = policies[env]
            assert policy is not None, f"{env} has no canary"
            for index, _ in enumerate(cases(policy.limits.max_error_rate)):
                # The old judge had a canary in dev only.
                for which in ("new", "old") if env == "dev" else ("new",):
                    jobs[env, index, which] = pool.submit(_run, env, index, which, args.trials,
                                                          args.seed)
        results = {key: job.result() for key, job in jobs.items()}
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, once they have exited
    has_old = results.get(("dev", 0, "old")) is not None
    print(f"{args.trials} rollouts per case; new judge: shipped policies/*.toml; old judge: "
          f"{'main with its dev policy' if has_old else 'not available'}; rates with 95% CI\n")
    header = (f"{'case':<42} {'goal':<24} {'figure':<16} {'new judge':<22} "
              f"{'old judge (main)':<22} {'Successful new / old'}")
    for env in envs:
        policy = policies[env]
        assert policy is not None
        steps = ", ".join(f"{s.weight}%/{s.window_seconds:g}s" for s in policy.steps)
        print(f"== {env}: steps {steps}; min_requests {policy.limits.min_requests}, "
              f"max_error_rate {policy.limits.max_error_rate:.1%}, "
              f"budget {policy.limits.false_failure_rate:g}")
        print(header)
        for index, (case, figure) in enumerate(cases(policy.limits.max_error_rate)):
            tally = results[env, index, "new"]
            assert tally is not None
            old = results.get((env, index, "old"))
            old_text = "- (no canary on main)" if old is None else old.rate(getattr(old, figure))
            passed = f"{tally.successful / tally.trials:6.1%}"
            if old is not None:
                passed += f" / {old.successful / old.trials:.1%}"
            print(f"{case.label:<42} {case.goal:<24} {figure.replace('_', ' '):<16} "
                  f"{tally.rate(getattr(tally, figure)):<22} {old_text:<22} {passed}")
            report(f"canary {env}: {case.label} ({figure.replace('_', ' ')})",
                   tally.rate(getattr(tally, figure)), case.goal, old_text)
        known, conditional, windows = slow_burn_bounds(
            policy, policy.limits.false_failure_rate, np.random.default_rng(args.seed))
        label = f"bound: slow burn, 1500/window, {windows} windows"
        print(f"{label:<42} {'(no judge does better)':<24} {'failed':<16} "
              f"{conditional:6.1%} learning the baseline, {known:.1%} knowing it exactly")
        report(f"canary {env}: {label} (best possible failed)", f"{conditional:6.1%}",
               "upper bound", f"{known:.1%} if the baseline rate were known exactly")
        print()
    print(f"({time.monotonic() - started:.0f}s wall, "
          f"{time.process_time() - cpu + usage.ru_utime + usage.ru_stime:.0f}s CPU in {args.workers} processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
