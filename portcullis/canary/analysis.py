"""The canary verdict: a pure function of measurements and limits, calibrated for a rollout.

A canary runs through the steps of its :class:`CanaryPolicy` (for example 5% -> 20% -> 50% of
the traffic, each for an observation window). After each window one :class:`Measurement` is
taken: request and error counts and a fine latency histogram of the canary *and* of the stable
baseline over the same window. :func:`decide` turns the whole series into a :class:`Verdict`
with the phases Argo Rollouts uses (Pending / Running / Successful / Failed / Error /
Inconclusive) and its three limits (failures, inconclusive results, consecutive errors);
:func:`assess` judges one measurement in the light of the ones before it.

One error budget for the whole rollout
--------------------------------------
``AnalysisLimits.false_failure_rate`` (alpha) bounds the chance that a canary *as good as its
baseline* is ever Failed, over the whole rollout, whatever the number of windows. It is split
once between the four ways to fail (:data:`BUDGET_SHARES`); each way keeps its share as
follows.

* Error rate against the baseline: a sequential likelihood-ratio (mixture SPRT) count test in
  the style of Lindon & Malek's multinomial test. Given the request counts of a window, each
  error of the window lands on the canary with probability
  ``theta(rho) = rho*n_c / (rho*n_c + n_b)``, where ``rho`` is the canary/baseline error-rate
  ratio (errors are rare, so the two counts are close to Poisson and the split of their sum
  is binomial). The null hypothesis is "the canary is no worse than ``max_error_ratio`` times
  the baseline" (``rho <= tau``); the evidence is ``E = sum_k w_k * L(tau*m_k) / L(tau)`` over
  a fixed grid of worse ratios (:data:`RATIO_GRID`, weights summing to one), where ``L`` is
  the likelihood of every window's split so far. **Steps with a different traffic share are
  carried correctly because each window's errors are scored with that window's own share**
  ``n_c/(n_c+n_b)`` (the measured request counts, not the nominal weight): the product of the
  windows' likelihood ratios is a nonnegative supermartingale under the null whatever the
  shares are, so by Ville's inequality ``P(sup E >= 1/a) <= a``. The test is anytime-valid:
  looking after every window, re-observing a step or stopping early costs nothing extra. With
  ``tau = 1`` the exact split of a window is hypergeometric, which is smaller in convex order
  than the binomial used here, so the bound still holds. A baseline with no error at all is
  no special case: the canary's errors are then scored against ``tau`` times its share.
* Absolute error limit: the canary's errors over *all* its windows so far against
  ``max_error_rate``, with an exact binomial (Clopper-Pearson) bound; to fail, the limit must be
  below the lower confidence bound. The share is split evenly over the most windows a rollout
  can take (:attr:`CanaryPolicy.max_samples`: steps + failure limit + inconclusive limit), a
  Bonferroni split that holds for any sequence of looks.
* Absolute latency limit: "the ``latency_quantile`` (p99) is at most ``max_latency_seconds``" is
  the same as "at most 1% of requests are slower than that", so it is the same binomial bound
  on the count of requests in buckets surely above the limit, per window.
* Latency against the baseline: a one-sided Mann-Whitney U test per window on the two whole
  distributions (from histograms with buckets at most ~10% wide), asking whether the canary
  is stochastically slower than ``max_latency_ratio`` times the baseline, the effect-size
  threshold Kayenta applies. Binning is resolved against the canary (its requests count at
  their bucket's lower edge, the baseline's at their upper edge), so the bins never make a
  good canary look slower.

Passing needs evidence too
--------------------------
A step passes only when both servers served ``min_requests`` in its window and the canary is
shown *within* the absolute limits with ``pass_confidence`` (an upper confidence bound below
the limit); with too little traffic the measurement is Inconclusive, never Successful. A canary
above an absolute limit while the baseline is above it too (an incident) is Inconclusive, so a
person decides; it is Failed only when it is also worse than the baseline.

Nothing here does I/O: the same measurements always give the same verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from itertools import pairwise
from typing import Any, assert_never

import numpy as np
from pydantic import Field, ValidationError, model_validator

from portcullis.errors import ConfigurationError
from portcullis.models import Frozen

# ---------------------------------------------------------------------------------------------
# Policy


class CanaryStep(Frozen):
    """One step of a canary: send ``weight`` percent of the traffic to it, then observe."""

    weight: int = Field(
        ge=1,
        le=99,
        description="percent of requests routed to the canary; 100% is the promotion itself",
    )
    window_seconds: float = Field(gt=0, description="how long to observe at this weight")


class AnalysisLimits(Frozen):
    """What a canary must show, and the error budget of the tests that judge it."""

    min_requests: int = Field(
        default=200,
        ge=1,
        description="requests (and timed requests) the canary and the baseline must each serve "
        "in a window before it can pass",
    )
    max_error_rate: float = Field(
        default=0.01, gt=0, lt=1, description="absolute limit on the canary's error rate"
    )
    max_error_ratio: float = Field(
        default=1.0,
        ge=1,
        description="tolerated canary/baseline error-rate ratio; the sequential test fails the "
        "canary once it is shown to be worse than this",
    )
    latency_quantile: float = Field(
        default=0.99, ge=0.5, lt=1, description="the quantile the absolute latency limit is on"
    )
    max_latency_seconds: float = Field(
        default=0.5,
        gt=0,
        description="absolute limit on the canary's latency_quantile (e.g. its p99)",
    )
    max_latency_ratio: float = Field(
        default=1.2,
        ge=1,
        description="tolerated slow-down against the baseline: fail once the canary is shown "
        "to be stochastically slower than this many times the baseline",
    )
    false_failure_rate: float = Field(
        default=0.01,
        gt=0,
        le=0.2,
        description="error budget: chance that a canary as good as its baseline is ever "
        "Failed, over the whole rollout",
    )
    pass_confidence: float = Field(
        default=0.8,
        ge=0.5,
        lt=1,
        description="confidence with which the canary must be shown within the absolute limits "
        "to pass a step",
    )


class CanaryPolicy(Frozen):
    """The canary plan of one environment: steps, limits and run limits.

    A Successful verdict means every step passed; shifting the remaining traffic (100%) is the
    promotion that follows, so it is not a step here.
    """

    steps: tuple[CanaryStep, ...] = Field(min_length=1)
    limits: AnalysisLimits = AnalysisLimits()
    failure_limit: int = Field(
        default=0, ge=0, description="failed measurements tolerated before the run fails"
    )
    inconclusive_limit: int = Field(
        default=0,
        ge=0,
        description="inconclusive measurements tolerated before the run is Inconclusive",
    )
    consecutive_error_limit: int = Field(
        default=4,
        ge=0,
        description="measurement errors in a row tolerated before the run ends in Error",
    )

    @model_validator(mode="after")
    def _weights_increase(self) -> CanaryPolicy:
        weights = [step.weight for step in self.steps]
        if any(later <= earlier for earlier, later in pairwise(weights)):
            raise ValueError(f"canary step weights must strictly increase, got {weights}")
        return self

    @property
    def max_samples(self) -> int:
        """The most windows with a sample a rollout can take before its verdict is final.

        Every sample either advances a step, or counts against the failure or the
        inconclusive limit; the run ends when one of the three is used up.
        """
        return len(self.steps) + self.failure_limit + self.inconclusive_limit


def load_policy(data: Mapping[str, Any]) -> CanaryPolicy:
    """Validate a canary policy read from configuration (e.g. one environment's entry).

    Args:
        data: the mapping as parsed from TOML/YAML/JSON.

    Returns:
        The typed policy.

    Raises:
        ConfigurationError: the mapping is not a valid policy; the message names the fields.
    """
    try:
        return CanaryPolicy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'policy'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigurationError(
            f"canary policy is invalid: {problems}",
            hint="fix the environment's canary section: steps need weights 1-99 in "
            "increasing order and positive windows",
        ) from None


# ---------------------------------------------------------------------------------------------
# Measurements


class Window(Frozen):
    """A closed time interval over which counters are compared."""

    start: datetime
    end: datetime

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("window bounds must be timezone-aware")
        if self.end <= self.start:
            raise ValueError(f"window ends ({self.end}) before it starts ({self.start})")
        return self

    @property
    def seconds(self) -> float:
        """Length of the window in seconds."""
        return (self.end - self.start).total_seconds()


class LatencyHistogram(Frozen):
    """Response times of one server over a window, as bucket counts.

    Bucket ``i`` holds the requests with ``bounds[i-1] < seconds <= bounds[i]`` (Prometheus'
    ``le`` buckets, not cumulative); the first bucket starts at 0, the last bound may be
    infinite.
    """

    bounds: tuple[float, ...] = Field(min_length=1, description="upper bounds in seconds")
    counts: tuple[int, ...] = Field(min_length=1, description="requests per bucket")

    @model_validator(mode="after")
    def _consistent(self) -> LatencyHistogram:
        if len(self.bounds) != len(self.counts):
            raise ValueError(f"{len(self.bounds)} bounds but {len(self.counts)} counts")
        if self.bounds[0] <= 0 or any(b <= a for a, b in pairwise(self.bounds)):
            raise ValueError("bucket bounds must be positive and strictly increasing")
        if any(c < 0 for c in self.counts):
            raise ValueError("bucket counts cannot be negative")
        return self

    @classmethod
    def of(cls, seconds: Sequence[float], bounds: Sequence[float]) -> LatencyHistogram:
        """Bin individual response times (seconds) into ``bounds``; slower ones go in the last."""
        edges = np.asarray(bounds, dtype=float)
        index = np.minimum(np.searchsorted(edges, np.asarray(seconds, dtype=float)), len(edges) - 1)
        counts = np.bincount(index, minlength=len(edges))
        return cls(bounds=tuple(float(b) for b in edges), counts=tuple(int(c) for c in counts))

    @property
    def total(self) -> int:
        """How many timed requests the histogram holds."""
        return sum(self.counts)

    def lower_bounds(self) -> tuple[float, ...]:
        """Each bucket's lower edge (0 for the first)."""
        return (0.0, *self.bounds[:-1])

    def quantile(self, q: float) -> float | None:
        """Upper edge of the bucket holding the ``q`` quantile; None when empty."""
        total = self.total
        if total == 0:
            return None
        rank = math.ceil(q * total)
        seen = 0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            seen += count
            if seen >= rank:
                return bound
        return self.bounds[-1]

    def count_above(self, seconds: float, *, surely: bool) -> int:
        """Requests slower than ``seconds``: surely (whole bucket above) or possibly."""
        edges = self.lower_bounds() if surely else self.bounds
        return sum(
            count
            for edge, count in zip(edges, self.counts, strict=True)
            if (edge >= seconds if surely else edge > seconds)
        )


class ServerWindow(Frozen):
    """What one server (canary or stable) did during a window."""

    requests: int = Field(ge=0, description="requests answered or attempted")
    errors: int = Field(ge=0, description="5xx answers and failed connections/responses")
    latency: LatencyHistogram | None = Field(
        default=None, description="response times of the answered requests; None without data"
    )

    @model_validator(mode="after")
    def _errors_within_requests(self) -> ServerWindow:
        if self.errors > self.requests:
            raise ValueError(f"{self.errors} errors out of only {self.requests} requests")
        return self

    @property
    def error_rate(self) -> float | None:
        """errors / requests, or None when there were no requests."""
        return self.errors / self.requests if self.requests else None

    @property
    def latency_samples(self) -> int:
        """Timed requests in the latency histogram."""
        return self.latency.total if self.latency is not None else 0

    @property
    def p99_seconds(self) -> float | None:
        """Upper edge of the bucket holding the p99 (for display; the judge uses it all)."""
        return self.latency.quantile(0.99) if self.latency is not None else None


class Sample(Frozen):
    """The canary and its baseline over the same window."""

    canary: ServerWindow
    baseline: ServerWindow


class Measurement(Frozen):
    """One observation of one canary step: either a sample or the reason none was taken."""

    step: int = Field(ge=0, description="index into CanaryPolicy.steps")
    weight: int = Field(ge=0, le=100, description="canary weight during the window")
    window: Window
    sample: Sample | None = None
    error: str | None = Field(default=None, description="why no sample could be taken")

    @model_validator(mode="after")
    def _sample_xor_error(self) -> Measurement:
        if (self.sample is None) == (self.error is None):
            raise ValueError("a measurement holds either a sample or an error, not both/neither")
        return self


# ---------------------------------------------------------------------------------------------
# Statistics

BUDGET_SHARES: Mapping[str, float] = {
    "error-rate-vs-baseline": 0.5,
    "error-rate": 1 / 6,
    "latency": 1 / 6,
    "latency-vs-baseline": 1 / 6,
}
"""How the rollout's false-failure budget is split between the four ways to fail."""

RATIO_GRID: Mapping[float, float] = {2.0: 0.3, 3.0: 0.3, 4.0: 0.2, 10.0: 0.1, 1000.0: 0.1}
"""Worse error-rate ratios (multiples of the tolerated one) the sequential test mixes over,
with their weights: most on the 2-4x slow burns that need it; the gross failures (10x and
more) pile up evidence so fast that a small weight costs them nothing."""

_RATIOS = np.asarray(list(RATIO_GRID))
_LOG_WEIGHTS = np.log(np.asarray(list(RATIO_GRID.values())))


def binomial_upper_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p): the one-sided exact p-value."""
    from scipy import special  # lazily: the latency exporter imports this module
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must lie in [0, {trials}], got {successes}")
    if successes == 0:
        return 1.0
    return float(special.bdtrc(successes - 1, trials, p))


def upper_bound(successes: int, trials: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper confidence bound of a binomial proportion."""
    from scipy import special  # lazily: the latency exporter imports this module
    if trials == 0 or successes >= trials:
        return 1.0
    return float(special.betaincinv(successes + 1, trials - successes, confidence))


def lower_bound(successes: int, trials: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower confidence bound of a binomial proportion."""
    from scipy import special  # lazily: the latency exporter imports this module
    if successes == 0:
        return 0.0
    return float(special.betaincinv(successes, trials - successes + 1, 1 - confidence))


def error_ratio_log_evidence(
    windows: Sequence[tuple[int, int, int, int]], tolerated_ratio: float
) -> float:
    """Log of the sequential evidence that the canary's error rate exceeds the tolerated ratio.

    Args:
        windows: per window ``(canary_errors, canary_requests, baseline_errors,
            baseline_requests)``, in any order (the statistic is a product over windows).
        tolerated_ratio: ``tau``; the null hypothesis is canary rate <= tau * baseline rate.

    Returns:
        ``log E``; under the null ``P(E >= 1/a at any window) <= a``. 0 without evidence.
    """
    log_lr = np.zeros(len(_RATIOS))
    rho = tolerated_ratio * _RATIOS
    for xc, nc, xb, nb in windows:
        if nc == 0 or nb == 0 or xc + xb == 0:
            continue
        theta0 = tolerated_ratio * nc / (tolerated_ratio * nc + nb)
        theta = rho * nc / (rho * nc + nb)
        log_lr += xc * np.log(theta / theta0) + xb * (np.log1p(-theta) - math.log1p(-theta0))
    terms = log_lr + _LOG_WEIGHTS
    peak = float(terms.max())
    return peak + math.log(float(np.exp(terms - peak).sum()))


def mann_whitney_slower(
    canary: LatencyHistogram, baseline: LatencyHistogram, ratio: float = 1.0
) -> tuple[float, float]:
    """One-sided Mann-Whitney U test: is the canary slower than ``ratio`` times the baseline?

    Canary requests count at their bucket's lower edge divided by ``ratio``, baseline requests
    at their bucket's upper edge, so binning never makes the canary look slower than it is.
    Normal approximation with tie correction and continuity correction.

    Returns:
        ``(p_value, effect)`` where effect is P(canary/ratio > baseline) + P(tie)/2.
    """
    from scipy import special  # lazily: the latency exporter imports this module
    c_counts = np.asarray(canary.counts, dtype=float)
    b_counts = np.asarray(baseline.counts, dtype=float)
    n_c, n_b = c_counts.sum(), b_counts.sum()
    if n_c == 0 or n_b == 0:
        return 1.0, 0.5
    values = np.concatenate([np.asarray(canary.lower_bounds()) / ratio, np.asarray(baseline.bounds)])
    weights_c = np.concatenate([c_counts, np.zeros_like(b_counts)])
    weights_b = np.concatenate([np.zeros_like(c_counts), b_counts])
    unique, inverse = np.unique(values, return_inverse=True)
    tie_c = np.bincount(inverse, weights=weights_c, minlength=len(unique))
    tie_b = np.bincount(inverse, weights=weights_b, minlength=len(unique))
    ties = tie_c + tie_b
    below = np.cumsum(ties) - ties
    midrank = below + (ties + 1) / 2
    u = float(np.dot(tie_c, midrank)) - n_c * (n_c + 1) / 2
    n = n_c + n_b
    variance = n_c * n_b / 12 * ((n + 1) - float(np.sum(ties**3 - ties)) / (n * (n - 1)))
    effect = u / (n_c * n_b)
    if variance <= 0:
        return 1.0, effect
    z = (u - n_c * n_b / 2 - 0.5) / math.sqrt(variance)
    return float(special.ndtr(-z)), effect


# ---------------------------------------------------------------------------------------------
# One measurement


class CheckName(StrEnum):
    """The checks applied to every sample."""

    TRAFFIC = "traffic"
    ERROR_RATE = "error-rate"
    ERROR_RATE_VS_BASELINE = "error-rate-vs-baseline"
    LATENCY = "latency"
    LATENCY_VS_BASELINE = "latency-vs-baseline"


class CheckOutcome(StrEnum):
    """What one check concluded."""

    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


class Check(Frozen):
    """The result of one check, with the figures behind it."""

    name: CheckName
    outcome: CheckOutcome
    detail: str


class MeasurementPhase(StrEnum):
    """The judgement of one measurement (Argo's measurement phases)."""

    SUCCESSFUL = "Successful"
    FAILED = "Failed"
    INCONCLUSIVE = "Inconclusive"
    ERROR = "Error"


class Assessment(Frozen):
    """One measurement and what the checks made of it."""

    measurement: Measurement
    phase: MeasurementPhase
    checks: tuple[Check, ...]

    def summary(self) -> str:
        """One line naming the checks that decided the phase."""
        m = self.measurement
        head = f"step {m.step} ({m.weight}%): {self.phase.value}"
        if self.phase is MeasurementPhase.ERROR:
            return f"{head}: {m.error}"
        wanted = {
            MeasurementPhase.FAILED: CheckOutcome.FAIL,
            MeasurementPhase.INCONCLUSIVE: CheckOutcome.INCONCLUSIVE,
            MeasurementPhase.SUCCESSFUL: CheckOutcome.PASS,
        }[self.phase]
        details = [f"{c.name.value}: {c.detail}" for c in self.checks if c.outcome is wanted]
        return f"{head}: " + "; ".join(details)


def _pct(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.2%}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.1f}ms"


def _check(name: CheckName, outcome: CheckOutcome, detail: str) -> Check:
    return Check(name=name, outcome=outcome, detail=detail)


def _check_traffic(canary: ServerWindow, baseline: ServerWindow, lim: AnalysisLimits) -> Check:
    enough = canary.requests >= lim.min_requests and baseline.requests >= lim.min_requests
    return _check(
        CheckName.TRAFFIC,
        CheckOutcome.PASS if enough else CheckOutcome.INCONCLUSIVE,
        f"canary {canary.requests}, baseline {baseline.requests} requests "
        f"(at least {lim.min_requests} each needed)",
    )


def _check_error_rate(
    samples: Sequence[Sample], lim: AnalysisLimits, alpha: float, traffic_ok: bool
) -> Check:
    name = CheckName.ERROR_RATE
    errors = sum(s.canary.errors for s in samples)
    requests = sum(s.canary.requests for s in samples)
    b_errors = sum(s.baseline.errors for s in samples)
    b_requests = sum(s.baseline.requests for s in samples)
    limit = lim.max_error_rate
    if requests == 0:
        return _check(name, CheckOutcome.INCONCLUSIVE, "no canary requests")
    low = lower_bound(errors, requests, 1 - alpha)
    high = upper_bound(errors, requests, lim.pass_confidence)
    figures = (
        f"canary {errors}/{requests} = {_pct(errors / requests)} over {len(samples)} window(s), "
        f"limit {_pct(limit)}; bounds {_pct(low)}..{_pct(high)}"
    )
    if low > limit:
        baseline_rate = b_errors / b_requests if b_requests else None
        if baseline_rate is not None and baseline_rate > limit:
            return _check(
                name,
                CheckOutcome.INCONCLUSIVE,
                f"{figures}; the baseline is above the limit too ({_pct(baseline_rate)}): an "
                "incident, a person decides",
            )
        return _check(name, CheckOutcome.FAIL, f"{figures}; above the limit")
    if high <= limit and traffic_ok:
        return _check(name, CheckOutcome.PASS, figures)
    return _check(name, CheckOutcome.INCONCLUSIVE, f"{figures}; not yet shown within the limit")


def _check_error_vs_baseline(
    samples: Sequence[Sample], lim: AnalysisLimits, alpha: float, traffic_ok: bool
) -> Check:
    name = CheckName.ERROR_RATE_VS_BASELINE
    windows = [
        (s.canary.errors, s.canary.requests, s.baseline.errors, s.baseline.requests)
        for s in samples
    ]
    log_e = error_ratio_log_evidence(windows, lim.max_error_ratio)
    threshold = math.log(1 / alpha)
    last = samples[-1]
    figures = (
        f"canary {_pct(last.canary.error_rate)} vs baseline {_pct(last.baseline.error_rate)} "
        f"this window (tolerated ratio {lim.max_error_ratio:g}); sequential evidence "
        f"{math.exp(min(log_e, 700)):.3g} over {len(samples)} window(s), fails at "
        f"{1 / alpha:.3g}"
    )
    if log_e >= threshold:
        return _check(name, CheckOutcome.FAIL, figures)
    if traffic_ok:
        return _check(name, CheckOutcome.PASS, figures)
    return _check(name, CheckOutcome.INCONCLUSIVE, f"{figures}; too few requests")


def _check_latency(
    canary: ServerWindow, baseline: ServerWindow, lim: AnalysisLimits, alpha: float
) -> Check:
    name = CheckName.LATENCY
    hist = canary.latency
    q = lim.latency_quantile
    allowed = 1 - q
    limit_text = f"p{q * 100:g} limit {_ms(lim.max_latency_seconds)}"
    if hist is None or hist.total == 0:
        return _check(name, CheckOutcome.INCONCLUSIVE, f"no canary latency data ({limit_text})")
    n = hist.total
    surely = hist.count_above(lim.max_latency_seconds, surely=True)
    possibly = hist.count_above(lim.max_latency_seconds, surely=False)
    low = lower_bound(surely, n, 1 - alpha)
    high = upper_bound(possibly, n, lim.pass_confidence)
    figures = (
        f"canary p{q * 100:g} {_ms(hist.quantile(q))} over {n} requests, {limit_text}: "
        f"{surely}-{possibly} slower, {_pct(allowed)} allowed (bounds {_pct(low)}..{_pct(high)})"
    )
    if low > allowed:
        other = baseline.latency
        if other is not None and other.total > 0:
            share = other.count_above(lim.max_latency_seconds, surely=False) / other.total
            if share > allowed:
                return _check(
                    name,
                    CheckOutcome.INCONCLUSIVE,
                    f"{figures}; the baseline is over the limit too ({_pct(share)} slower): "
                    "an incident, a person decides",
                )
        return _check(name, CheckOutcome.FAIL, f"{figures}; over the limit")
    if high <= allowed and n >= lim.min_requests:
        return _check(name, CheckOutcome.PASS, figures)
    return _check(name, CheckOutcome.INCONCLUSIVE, f"{figures}; not yet shown within the limit")


def _check_latency_vs_baseline(
    canary: ServerWindow, baseline: ServerWindow, lim: AnalysisLimits, alpha: float
) -> Check:
    name = CheckName.LATENCY_VS_BASELINE
    c, b = canary.latency, baseline.latency
    if c is None or b is None or c.total == 0 or b.total == 0:
        return _check(name, CheckOutcome.INCONCLUSIVE, "no latency data to compare")
    p_value, effect = mann_whitney_slower(c, b, lim.max_latency_ratio)
    figures = (
        f"canary median {_ms(c.quantile(0.5))} p99 {_ms(c.quantile(0.99))} ({c.total}) vs "
        f"baseline median {_ms(b.quantile(0.5))} p99 {_ms(b.quantile(0.99))} ({b.total}); "
        f"P(canary > {lim.max_latency_ratio:g}x baseline) = {effect:.2f}, Mann-Whitney "
        f"p={p_value:.3g}, fails below {alpha:.3g}"
    )
    if p_value <= alpha:
        return _check(name, CheckOutcome.FAIL, figures)
    if c.total >= lim.min_requests and b.total >= lim.min_requests:
        return _check(name, CheckOutcome.PASS, figures)
    return _check(name, CheckOutcome.INCONCLUSIVE, f"{figures}; too few timed requests")


def assess(
    measurement: Measurement,
    limits: AnalysisLimits,
    *,
    earlier: Sequence[Measurement] = (),
    looks: int = 1,
) -> Assessment:
    """Judge one measurement, with the evidence of the rollout's earlier measurements.

    Args:
        measurement: the window's figures for canary and baseline, or the error that
            prevented taking them.
        limits: the policy's limits.
        earlier: the rollout's measurements before this one (the error-rate tests accumulate
            over them; measurements without a sample are skipped).
        looks: over how many windows the per-window tests split their share of the budget
            (:attr:`CanaryPolicy.max_samples`; 1 judges a single window on its own).

    Returns:
        The assessment: Error when there was no sample; otherwise Failed if any check failed,
        Inconclusive if any check lacked evidence, Successful only when every check passed.
    """
    sample = measurement.sample
    if sample is None:
        return Assessment(measurement=measurement, phase=MeasurementPhase.ERROR, checks=())
    samples = [m.sample for m in earlier if m.sample is not None] + [sample]
    alpha = limits.false_failure_rate
    per_look = alpha / max(1, looks)
    canary, baseline = sample.canary, sample.baseline
    traffic = _check_traffic(canary, baseline, limits)
    traffic_ok = traffic.outcome is CheckOutcome.PASS
    checks = (
        traffic,
        _check_error_rate(
            samples, limits, per_look * BUDGET_SHARES["error-rate"], traffic_ok
        ),
        _check_error_vs_baseline(
            samples, limits, alpha * BUDGET_SHARES["error-rate-vs-baseline"], traffic_ok
        ),
        _check_latency(canary, baseline, limits, per_look * BUDGET_SHARES["latency"]),
        _check_latency_vs_baseline(
            canary, baseline, limits, per_look * BUDGET_SHARES["latency-vs-baseline"]
        ),
    )
    outcomes = {c.outcome for c in checks}
    if CheckOutcome.FAIL in outcomes:
        phase = MeasurementPhase.FAILED
    elif CheckOutcome.INCONCLUSIVE in outcomes:
        phase = MeasurementPhase.INCONCLUSIVE
    else:
        phase = MeasurementPhase.SUCCESSFUL
    return Assessment(measurement=measurement, phase=phase, checks=checks)


# ---------------------------------------------------------------------------------------------
# The run


class AnalysisPhase(StrEnum):
    """The phase of a whole canary analysis (Argo Rollouts' AnalysisRun phases)."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCESSFUL = "Successful"
    FAILED = "Failed"
    ERROR = "Error"
    INCONCLUSIVE = "Inconclusive"

    @property
    def terminal(self) -> bool:
        """True when no further measurement will change the outcome."""
        match self:
            case AnalysisPhase.PENDING | AnalysisPhase.RUNNING:
                return False
            case (
                AnalysisPhase.SUCCESSFUL
                | AnalysisPhase.FAILED
                | AnalysisPhase.ERROR
                | AnalysisPhase.INCONCLUSIVE
            ):
                return True
            case _:
                assert_never(self)


class Verdict(Frozen):
    """Where a canary analysis stands, and what to measure next."""

    phase: AnalysisPhase
    reason: str
    assessments: tuple[Assessment, ...]
    failed: int = Field(ge=0, description="Failed measurements so far")
    inconclusive: int = Field(ge=0, description="Inconclusive measurements so far")
    consecutive_errors: int = Field(ge=0, description="Error measurements at the end, in a row")
    next_step: int | None = Field(
        default=None, description="index of the step to observe next; None once terminal"
    )
    next_weight: int | None = Field(
        default=None, description="canary weight for the next window; None once terminal"
    )


def decide(policy: CanaryPolicy, measurements: Sequence[Measurement]) -> Verdict:
    """Compute the verdict of a canary analysis from its measurements so far.

    Each measurement is assessed with the evidence of the ones before it (one error budget
    for the whole rollout). A step advances after a Successful measurement; after a Failed,
    Inconclusive or Error measurement that stays within its limit the same step is observed
    again. The run is
    Failed when failures exceed ``failure_limit``, Error when errors in a row exceed
    ``consecutive_error_limit``, Inconclusive when inconclusive results exceed
    ``inconclusive_limit``, and Successful when the last step passed.

    Args:
        policy: the environment's canary policy.
        measurements: every measurement of this canary, in the order they were taken.

    Returns:
        The verdict, with the next step to observe while the run is Pending or Running.

    Raises:
        ValueError: the measurements do not follow the policy (a step measured out of turn,
            at the wrong weight, or after the run had already ended).
    """
    failed = inconclusive = consecutive_errors = 0
    step = 0
    assessments: list[Assessment] = []
    terminal: tuple[AnalysisPhase, str] | None = None
    for index, measurement in enumerate(measurements):
        if terminal is not None:
            raise ValueError(
                f"measurement of step {measurement.step} follows a finished analysis "
                f"({terminal[0].value})"
            )
        expected = policy.steps[step]
        if measurement.step != step or measurement.weight != expected.weight:
            raise ValueError(
                f"measurement of step {measurement.step} at {measurement.weight}% arrived "
                f"when step {step} at {expected.weight}% was due"
            )
        assessment = assess(
            measurement, policy.limits, earlier=measurements[:index], looks=policy.max_samples
        )
        assessments.append(assessment)
        match assessment.phase:
            case MeasurementPhase.SUCCESSFUL:
                consecutive_errors = 0
                step += 1
                if step == len(policy.steps):
                    terminal = (
                        AnalysisPhase.SUCCESSFUL,
                        f"all {len(policy.steps)} steps passed; last: {assessment.summary()}",
                    )
            case MeasurementPhase.FAILED:
                consecutive_errors = 0
                failed += 1
                if failed > policy.failure_limit:
                    terminal = (
                        AnalysisPhase.FAILED,
                        (
                            f"{failed} failed measurement(s), limit {policy.failure_limit}: "
                            f"{assessment.summary()}"
                        ),
                    )
            case MeasurementPhase.INCONCLUSIVE:
                consecutive_errors = 0
                inconclusive += 1
                if inconclusive > policy.inconclusive_limit:
                    terminal = (
                        AnalysisPhase.INCONCLUSIVE,
                        (
                            f"{inconclusive} inconclusive measurement(s), limit "
                            f"{policy.inconclusive_limit}: {assessment.summary()}"
                        ),
                    )
            case MeasurementPhase.ERROR:
                consecutive_errors += 1
                if consecutive_errors > policy.consecutive_error_limit:
                    terminal = (
                        AnalysisPhase.ERROR,
                        (
                            f"{consecutive_errors} measurement errors in a row, limit "
                            f"{policy.consecutive_error_limit}: {assessment.summary()}"
                        ),
                    )
            case _:
                assert_never(assessment.phase)

    counts: dict[str, Any] = {
        "assessments": tuple(assessments),
        "failed": failed,
        "inconclusive": inconclusive,
        "consecutive_errors": consecutive_errors,
    }
    if terminal is not None:
        return Verdict(phase=terminal[0], reason=terminal[1], **counts)
    next_weight = policy.steps[step].weight
    if not assessments:
        return Verdict(
            phase=AnalysisPhase.PENDING,
            reason=f"no measurement yet; start with step 0 at {next_weight}%",
            next_step=0,
            next_weight=next_weight,
            **counts,
        )
    last = assessments[-1]
    action = "advance to" if last.phase is MeasurementPhase.SUCCESSFUL else "observe again"
    return Verdict(
        phase=AnalysisPhase.RUNNING,
        reason=f"{last.summary()}; {action} step {step} at {next_weight}%",
        next_step=step,
        next_weight=next_weight,
        **counts,
    )
