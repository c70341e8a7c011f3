"""The canary verdict: a pure function of measurements and limits.

A canary runs through the steps of its :class:`CanaryPolicy` (for example 5% -> 20% -> 50% of
the traffic, each for an observation window). After each window one :class:`Measurement` is
taken: request and error counts and the p99 response time of the canary *and* of the stable
baseline over the same window. :func:`assess` judges one measurement against the
:class:`AnalysisLimits`; :func:`decide` turns the whole series into a :class:`Verdict` with the
phases Argo Rollouts uses (Pending / Running / Successful / Failed / Error / Inconclusive) and
its three limits (failures, inconclusive results, consecutive measurement errors).

Two principles shape the checks:

* "Successful" needs evidence: a canary (or a baseline) that served fewer than
  ``min_requests`` in the window cannot pass; it is Inconclusive.
* "Failed" needs evidence too, but sometimes little is enough: 30 errors out of 30 requests
  fail the canary even below ``min_requests`` because the one-sided test already says so.

The canary is compared with the baseline, not only with absolute limits: a canary whose error
rate is three times the baseline's fails even while both are under the absolute limit, as
long as the difference is statistically significant (one-sided Fisher exact test) and larger
than the tolerated ratio.

Nothing here does I/O: the same measurements always give the same verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from itertools import pairwise
from typing import Any, assert_never

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
    """What a canary must show in one observation window to pass."""

    min_requests: int = Field(
        default=100,
        ge=1,
        description="requests the canary and the baseline must each serve for a verdict",
    )
    max_error_rate: float = Field(
        default=0.01, ge=0, le=1, description="absolute limit on the canary's error rate"
    )
    max_error_ratio: float = Field(
        default=1.5,
        ge=1,
        description="tolerated canary/baseline error-rate ratio; a larger ratio fails when "
        "it is also statistically significant",
    )
    significance: float = Field(
        default=0.05,
        gt=0,
        lt=0.5,
        description="one-sided test level: below this p-value a difference counts as real",
    )
    min_latency_samples: int = Field(
        default=500,
        ge=1,
        description="timed requests each server needs before its p99 is judged: with 500 the "
        "p99 rests on the slowest five, with 100 it is the single worst request",
    )
    max_p99_seconds: float = Field(
        default=0.5, gt=0, description="absolute limit on the canary's p99 response time"
    )
    max_p99_ratio: float = Field(
        default=1.5, ge=1, description="tolerated canary/baseline p99 ratio"
    )
    p99_tolerance_seconds: float = Field(
        default=0.005,
        ge=0,
        description="slack added to the baseline comparison: differences below the latency "
        "histogram's resolution are noise, not regressions",
    )


class CanaryPolicy(Frozen):
    """The canary plan of one environment: steps, per-window limits and run limits.

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


def load_policy(data: Mapping[str, Any]) -> CanaryPolicy:
    """Validate a canary policy read from configuration (e.g. one environment's entry).

    Args:
        data: the mapping as parsed from YAML/JSON.

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


class ServerWindow(Frozen):
    """What one server (canary or stable) did during a window."""

    requests: int = Field(ge=0, description="requests answered or attempted")
    errors: int = Field(ge=0, description="5xx answers and failed connections/responses")
    latency_samples: int = Field(ge=0, description="requests behind the p99 figure")
    p99_seconds: float | None = Field(
        default=None, ge=0, description="99th percentile response time; None without data"
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


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _upper_tail(log_pmf: Callable[[int], float], lo: int, hi: int) -> float:
    """Sum ``exp(log_pmf(x))`` for x in [lo, hi] of a unimodal distribution.

    Summed in log space (the terms underflow a float long before the counts get large) and
    stopped once past the mode the terms fall below 1e-17 of the largest one.
    """
    if lo > hi:
        return 0.0
    peak = -math.inf
    scaled = 0.0  # sum of exp(term - peak)
    for x in range(lo, hi + 1):
        term = log_pmf(x)
        if term > peak:
            scaled = scaled * math.exp(peak - term) + 1.0 if peak > -math.inf else 1.0
            peak = term
        else:
            scaled += math.exp(term - peak)
            if term < peak - 40:  # unimodal: after the peak every later term is smaller still
                break
    return min(1.0, math.exp(peak) * scaled)


def binomial_upper_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p).

    Args:
        successes: observed count (here: errors).
        trials: number of trials (here: requests).
        p: probability of one success under the null hypothesis (here: the error-rate limit).

    Returns:
        The one-sided p-value.
    """
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must lie in [0, {trials}], got {successes}")
    if successes == 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)

    def log_pmf(x: int) -> float:
        return _log_comb(trials, x) + x * log_p + (trials - x) * log_q

    return _upper_tail(log_pmf, successes, trials)


def fisher_one_sided(
    canary_errors: int, canary_requests: int, baseline_errors: int, baseline_requests: int
) -> float:
    """One-sided Fisher exact test: is the canary's error rate higher than the baseline's?

    Under the null hypothesis both servers share one error rate; given the table's margins the
    canary's error count is hypergeometric. The p-value is the chance of the canary getting at
    least as many of the errors as it did.

    Returns:
        The p-value; small means the canary is worse than chance explains.
    """
    for name, errors, requests in (
        ("canary", canary_errors, canary_requests),
        ("baseline", baseline_errors, baseline_requests),
    ):
        if not 0 <= errors <= requests:
            raise ValueError(f"{name}: {errors} errors out of {requests} requests")
    total = canary_requests + baseline_requests
    errors = canary_errors + baseline_errors
    if errors == 0 or canary_requests == 0 or baseline_requests == 0:
        return 1.0
    log_denominator = _log_comb(total, canary_requests)

    def log_pmf(x: int) -> float:
        return (
            _log_comb(errors, x) + _log_comb(total - errors, canary_requests - x) - log_denominator
        )

    support_low = max(0, canary_requests - (total - errors))
    return _upper_tail(log_pmf, max(canary_errors, support_low), min(errors, canary_requests))


# ---------------------------------------------------------------------------------------------
# One measurement


class CheckName(StrEnum):
    """The checks applied to every sample."""

    TRAFFIC = "traffic"
    ERROR_RATE = "error-rate"
    ERROR_RATE_VS_BASELINE = "error-rate-vs-baseline"
    P99_LATENCY = "p99-latency"
    P99_LATENCY_VS_BASELINE = "p99-latency-vs-baseline"


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


def _check_traffic(canary: ServerWindow, baseline: ServerWindow, lim: AnalysisLimits) -> Check:
    figures = (
        f"canary {canary.requests}, baseline {baseline.requests} requests "
        f"(at least {lim.min_requests} each needed)"
    )
    enough = canary.requests >= lim.min_requests and baseline.requests >= lim.min_requests
    return Check(
        name=CheckName.TRAFFIC,
        outcome=CheckOutcome.PASS if enough else CheckOutcome.INCONCLUSIVE,
        detail=figures,
    )


def _check_error_rate(canary: ServerWindow, lim: AnalysisLimits) -> Check:
    rate = canary.error_rate
    figures = (
        f"canary {canary.errors}/{canary.requests} = {_pct(rate)}, limit {_pct(lim.max_error_rate)}"
    )
    if rate is not None and canary.requests >= lim.min_requests:
        ok = rate <= lim.max_error_rate
        return Check(
            name=CheckName.ERROR_RATE,
            outcome=CheckOutcome.PASS if ok else CheckOutcome.FAIL,
            detail=figures,
        )
    # Too few requests to pass, but possibly enough to fail: test against the limit.
    p_value = binomial_upper_tail(canary.errors, canary.requests, lim.max_error_rate)
    if rate is not None and rate > lim.max_error_rate and p_value < lim.significance:
        return Check(
            name=CheckName.ERROR_RATE,
            outcome=CheckOutcome.FAIL,
            detail=f"{figures}; above the limit already with few requests (p={p_value:.3g})",
        )
    return Check(
        name=CheckName.ERROR_RATE,
        outcome=CheckOutcome.INCONCLUSIVE,
        detail=f"{figures}; too few requests to judge",
    )


def _check_error_vs_baseline(
    canary: ServerWindow, baseline: ServerWindow, lim: AnalysisLimits
) -> Check:
    name = CheckName.ERROR_RATE_VS_BASELINE
    rc, rb = canary.error_rate, baseline.error_rate
    if rc is None or rb is None:
        return Check(
            name=name,
            outcome=CheckOutcome.INCONCLUSIVE,
            detail=f"no comparison: canary {canary.requests}, baseline {baseline.requests} "
            "requests",
        )
    p_value = fisher_one_sided(canary.errors, canary.requests, baseline.errors, baseline.requests)
    figures = (
        f"canary {_pct(rc)} vs baseline {_pct(rb)} "
        f"(tolerated ratio {lim.max_error_ratio:g}), one-sided Fisher p={p_value:.3g}"
    )
    worse = rc > rb * lim.max_error_ratio if rb > 0 else rc > 0
    if worse and p_value < lim.significance:
        return Check(name=name, outcome=CheckOutcome.FAIL, detail=figures)
    if canary.requests >= lim.min_requests and baseline.requests >= lim.min_requests:
        return Check(name=name, outcome=CheckOutcome.PASS, detail=figures)
    return Check(
        name=name, outcome=CheckOutcome.INCONCLUSIVE, detail=f"{figures}; too few requests"
    )


def _fmt_s(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.1f}ms"


def _check_p99(canary: ServerWindow, lim: AnalysisLimits) -> Check:
    name = CheckName.P99_LATENCY
    figures = (
        f"canary p99 {_fmt_s(canary.p99_seconds)} over {canary.latency_samples} requests, "
        f"limit {_fmt_s(lim.max_p99_seconds)}"
    )
    if canary.p99_seconds is None or canary.latency_samples < lim.min_latency_samples:
        return Check(
            name=name, outcome=CheckOutcome.INCONCLUSIVE, detail=f"{figures}; too few samples"
        )
    ok = canary.p99_seconds <= lim.max_p99_seconds
    return Check(name=name, outcome=CheckOutcome.PASS if ok else CheckOutcome.FAIL, detail=figures)


def _check_p99_vs_baseline(
    canary: ServerWindow, baseline: ServerWindow, lim: AnalysisLimits
) -> Check:
    name = CheckName.P99_LATENCY_VS_BASELINE
    figures = (
        f"canary p99 {_fmt_s(canary.p99_seconds)} ({canary.latency_samples} samples) vs "
        f"baseline {_fmt_s(baseline.p99_seconds)} ({baseline.latency_samples} samples)"
    )
    if (
        canary.p99_seconds is None
        or baseline.p99_seconds is None
        or canary.latency_samples < lim.min_latency_samples
        or baseline.latency_samples < lim.min_latency_samples
    ):
        return Check(
            name=name, outcome=CheckOutcome.INCONCLUSIVE, detail=f"{figures}; too few samples"
        )
    allowed = baseline.p99_seconds * lim.max_p99_ratio + lim.p99_tolerance_seconds
    ok = canary.p99_seconds <= allowed
    return Check(
        name=name,
        outcome=CheckOutcome.PASS if ok else CheckOutcome.FAIL,
        detail=f"{figures}, allowed up to {_fmt_s(allowed)}",
    )


def assess(measurement: Measurement, limits: AnalysisLimits) -> Assessment:
    """Judge one measurement.

    Args:
        measurement: the window's figures for canary and baseline, or the error that
            prevented taking them.
        limits: the policy's limits.

    Returns:
        The assessment: Error when there was no sample; otherwise Failed if any check failed,
        Inconclusive if any check lacked data, Successful only when every check passed.
    """
    sample = measurement.sample
    if sample is None:
        return Assessment(measurement=measurement, phase=MeasurementPhase.ERROR, checks=())
    canary, baseline = sample.canary, sample.baseline
    checks = (
        _check_traffic(canary, baseline, limits),
        _check_error_rate(canary, limits),
        _check_error_vs_baseline(canary, baseline, limits),
        _check_p99(canary, limits),
        _check_p99_vs_baseline(canary, baseline, limits),
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

    A step advances after a Successful measurement; after a Failed, Inconclusive or Error
    measurement that stays within its limit the same step is observed again. The run is
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
    for measurement in measurements:
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
        assessment = assess(measurement, policy.limits)
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
