"""The canary verdict as a pure function: measurements and limits in, phase out."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis.canary.analysis import (
    AnalysisLimits,
    AnalysisPhase,
    CanaryPolicy,
    CanaryStep,
    CheckName,
    CheckOutcome,
    Measurement,
    MeasurementPhase,
    Sample,
    ServerWindow,
    Window,
    assess,
    binomial_upper_tail,
    decide,
    fisher_one_sided,
    load_policy,
)
from portcullis.errors import ConfigurationError

LIMITS = AnalysisLimits(
    min_requests=200,
    min_latency_samples=500,
    max_error_rate=0.01,
    max_error_ratio=1.5,
    significance=0.05,
    max_p99_seconds=0.5,
    max_p99_ratio=1.5,
    p99_tolerance_seconds=0.005,
)
POLICY = CanaryPolicy(
    steps=(
        CanaryStep(weight=5, window_seconds=60),
        CanaryStep(weight=20, window_seconds=60),
        CanaryStep(weight=50, window_seconds=60),
    ),
    limits=LIMITS,
)
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def server(
    requests: int, errors: int = 0, p99: float | None = 0.05, samples: int | None = None
) -> ServerWindow:
    """A server's window; latency samples default to the request count."""
    return ServerWindow(
        requests=requests,
        errors=errors,
        latency_samples=requests if samples is None else samples,
        p99_seconds=p99,
    )


def measurement(
    canary: ServerWindow, baseline: ServerWindow, *, step: int = 0, weight: int | None = None
) -> Measurement:
    """A measurement of ``step`` at the policy's weight for it."""
    start = T0 + timedelta(minutes=step)
    return Measurement(
        step=step,
        weight=POLICY.steps[step].weight if weight is None else weight,
        window=Window(start=start, end=start + timedelta(seconds=60)),
        sample=Sample(canary=canary, baseline=baseline),
    )


def error_measurement(step: int = 0) -> Measurement:
    """A measurement that could not be taken."""
    start = T0 + timedelta(minutes=step)
    return Measurement(
        step=step,
        weight=POLICY.steps[step].weight,
        window=Window(start=start, end=start + timedelta(seconds=60)),
        error="Prometheus at http://127.0.0.1:9 did not answer",
    )


def outcomes(m: Measurement) -> dict[CheckName, CheckOutcome]:
    """Each check's outcome for one measurement under LIMITS."""
    return {check.name: check.outcome for check in assess(m, LIMITS).checks}


GOOD_CANARY = server(1000, 2, p99=0.052)
GOOD_BASELINE = server(19000, 40, p99=0.050)
GOOD = measurement(GOOD_CANARY, GOOD_BASELINE)


# --- single measurements --------------------------------------------------------------------


def test_good_canary_passes_every_check() -> None:
    assessment = assess(GOOD, LIMITS)
    assert assessment.phase is MeasurementPhase.SUCCESSFUL
    assert set(outcomes(GOOD).values()) == {CheckOutcome.PASS}


def test_twenty_percent_errors_fail_absolutely_and_against_baseline() -> None:
    m = measurement(server(1000, 200), server(4000, 4))
    assert assess(m, LIMITS).phase is MeasurementPhase.FAILED
    result = outcomes(m)
    assert result[CheckName.ERROR_RATE] is CheckOutcome.FAIL
    assert result[CheckName.ERROR_RATE_VS_BASELINE] is CheckOutcome.FAIL


def test_slow_burn_three_times_baseline_fails_under_the_absolute_limit() -> None:
    # 0.9% vs 0.3%: both under the 1% limit, but the canary is clearly worse.
    m = measurement(server(2000, 18), server(2000, 6))
    result = outcomes(m)
    assert result[CheckName.ERROR_RATE] is CheckOutcome.PASS
    assert result[CheckName.ERROR_RATE_VS_BASELINE] is CheckOutcome.FAIL
    assert assess(m, LIMITS).phase is MeasurementPhase.FAILED
    detail = next(c.detail for c in assess(m, LIMITS).checks if c.outcome is CheckOutcome.FAIL)
    assert "0.90%" in detail and "0.30%" in detail and "Fisher" in detail


def test_same_ratio_without_significance_is_not_a_failure() -> None:
    # 3 vs 1 errors: the ratio is the same 3x, but chance explains it.
    m = measurement(server(300, 3), server(300, 1))
    assert outcomes(m)[CheckName.ERROR_RATE_VS_BASELINE] is CheckOutcome.PASS
    assert fisher_one_sided(3, 300, 1, 300) > LIMITS.significance


def test_significant_but_tolerated_difference_passes() -> None:
    # 1.2x with huge counts is significant, yet within the tolerated ratio of 1.5.
    m = measurement(server(1_000_000, 6000), server(1_000_000, 5000))
    assert fisher_one_sided(6000, 1_000_000, 5000, 1_000_000) < 0.001
    assert outcomes(m)[CheckName.ERROR_RATE_VS_BASELINE] is CheckOutcome.PASS


def test_too_little_traffic_is_inconclusive_not_successful() -> None:
    m = measurement(server(40, 0), server(4000, 4))
    assessment = assess(m, LIMITS)
    assert assessment.phase is MeasurementPhase.INCONCLUSIVE
    result = outcomes(m)
    assert result[CheckName.TRAFFIC] is CheckOutcome.INCONCLUSIVE
    assert CheckOutcome.FAIL not in result.values()
    assert "40" in assessment.summary()


def test_too_little_baseline_traffic_is_inconclusive_too() -> None:
    m = measurement(server(1000, 0), server(50, 0))
    assert assess(m, LIMITS).phase is MeasurementPhase.INCONCLUSIVE


def test_a_broken_canary_fails_even_with_little_traffic() -> None:
    m = measurement(server(20, 20), server(4000, 4))
    result = outcomes(m)
    assert result[CheckName.TRAFFIC] is CheckOutcome.INCONCLUSIVE
    assert result[CheckName.ERROR_RATE] is CheckOutcome.FAIL
    assert assess(m, LIMITS).phase is MeasurementPhase.FAILED


def test_no_traffic_at_all_is_inconclusive() -> None:
    m = measurement(server(0, 0, p99=None), server(0, 0, p99=None))
    assert assess(m, LIMITS).phase is MeasurementPhase.INCONCLUSIVE


def test_latency_regression_against_baseline_fails() -> None:
    # 300 ms is under the absolute 500 ms, but three times the baseline's 100 ms.
    m = measurement(server(1000, 0, p99=0.300), server(4000, 0, p99=0.100))
    result = outcomes(m)
    assert result[CheckName.P99_LATENCY] is CheckOutcome.PASS
    assert result[CheckName.P99_LATENCY_VS_BASELINE] is CheckOutcome.FAIL
    assert assess(m, LIMITS).phase is MeasurementPhase.FAILED


def test_latency_over_the_absolute_limit_fails_even_when_baseline_is_as_slow() -> None:
    m = measurement(server(1000, 0, p99=0.8), server(4000, 0, p99=0.8))
    result = outcomes(m)
    assert result[CheckName.P99_LATENCY] is CheckOutcome.FAIL
    assert result[CheckName.P99_LATENCY_VS_BASELINE] is CheckOutcome.PASS


def test_latency_differences_below_the_tolerance_pass() -> None:
    # 1 ms vs 4 ms: 4x, but within the histogram's resolution.
    m = measurement(server(1000, 0, p99=0.004), server(4000, 0, p99=0.001))
    assert outcomes(m)[CheckName.P99_LATENCY_VS_BASELINE] is CheckOutcome.PASS


def test_missing_latency_data_is_inconclusive() -> None:
    m = measurement(server(1000, 0, p99=None, samples=0), server(4000, 0))
    result = outcomes(m)
    assert result[CheckName.P99_LATENCY] is CheckOutcome.INCONCLUSIVE
    assert assess(m, LIMITS).phase is MeasurementPhase.INCONCLUSIVE


def test_too_few_timed_requests_leave_latency_inconclusive() -> None:
    # Enough requests to judge errors, too few for a p99 that is more than one outlier.
    m = measurement(server(300, 0, p99=0.05), server(4000, 0, p99=0.05))
    result = outcomes(m)
    assert result[CheckName.ERROR_RATE] is CheckOutcome.PASS
    assert result[CheckName.P99_LATENCY] is CheckOutcome.INCONCLUSIVE
    assert result[CheckName.P99_LATENCY_VS_BASELINE] is CheckOutcome.INCONCLUSIVE
    assert assess(m, LIMITS).phase is MeasurementPhase.INCONCLUSIVE


def test_measurement_error_is_an_error_phase() -> None:
    assessment = assess(error_measurement(), LIMITS)
    assert assessment.phase is MeasurementPhase.ERROR
    assert "did not answer" in assessment.summary()


# --- the run --------------------------------------------------------------------------------


def good(step: int) -> Measurement:
    """A passing measurement of ``step``."""
    return measurement(GOOD_CANARY, GOOD_BASELINE, step=step)


def bad(step: int) -> Measurement:
    """A failing measurement of ``step``."""
    return measurement(server(1000, 200), server(4000, 4), step=step)


def thin(step: int) -> Measurement:
    """An inconclusive measurement of ``step``."""
    return measurement(server(10, 0), server(4000, 4), step=step)


def test_no_measurement_is_pending_and_asks_for_the_first_step() -> None:
    verdict = decide(POLICY, [])
    assert verdict.phase is AnalysisPhase.PENDING
    assert (verdict.next_step, verdict.next_weight) == (0, 5)
    assert not verdict.phase.terminal


def test_steps_advance_to_success() -> None:
    verdict = decide(POLICY, [good(0)])
    assert verdict.phase is AnalysisPhase.RUNNING
    assert (verdict.next_step, verdict.next_weight) == (1, 20)
    verdict = decide(POLICY, [good(0), good(1), good(2)])
    assert verdict.phase is AnalysisPhase.SUCCESSFUL
    assert verdict.next_step is None and verdict.phase.terminal


def test_first_failure_fails_with_default_limit() -> None:
    verdict = decide(POLICY, [good(0), bad(1)])
    assert verdict.phase is AnalysisPhase.FAILED
    assert verdict.failed == 1
    assert "error-rate" in verdict.reason


def test_failure_limit_repeats_the_step() -> None:
    policy = POLICY.model_copy(update={"failure_limit": 1})
    verdict = decide(policy, [good(0), bad(1)])
    assert verdict.phase is AnalysisPhase.RUNNING
    assert verdict.next_step == 1
    assert decide(policy, [good(0), bad(1), good(1), good(2)]).phase is AnalysisPhase.SUCCESSFUL
    assert decide(policy, [good(0), bad(1), bad(1)]).phase is AnalysisPhase.FAILED


def test_inconclusive_limit() -> None:
    assert decide(POLICY, [thin(0)]).phase is AnalysisPhase.INCONCLUSIVE
    policy = POLICY.model_copy(update={"inconclusive_limit": 1})
    verdict = decide(policy, [thin(0)])
    assert verdict.phase is AnalysisPhase.RUNNING and verdict.next_step == 0
    assert decide(policy, [thin(0), thin(0)]).phase is AnalysisPhase.INCONCLUSIVE
    # Inconclusive results add up across steps; they are not reset by a success.
    assert decide(policy, [thin(0), good(0), thin(1)]).phase is AnalysisPhase.INCONCLUSIVE


def test_consecutive_error_limit_counts_only_errors_in_a_row() -> None:
    policy = POLICY.model_copy(update={"consecutive_error_limit": 2})
    errors_then_success = [error_measurement(0), error_measurement(0), good(0)]
    verdict = decide(policy, [*errors_then_success, error_measurement(1)])
    assert verdict.phase is AnalysisPhase.RUNNING
    assert verdict.consecutive_errors == 1
    three = [error_measurement(0)] * 3
    verdict = decide(policy, three)
    assert verdict.phase is AnalysisPhase.ERROR
    assert "3 measurement errors in a row" in verdict.reason


def test_measurements_out_of_turn_are_refused() -> None:
    with pytest.raises(ValueError, match="step 0 at 5% was due"):
        decide(POLICY, [good(1)])
    with pytest.raises(ValueError, match="was due"):
        decide(POLICY, [measurement(GOOD_CANARY, GOOD_BASELINE, weight=50)])
    with pytest.raises(ValueError, match="finished analysis"):
        decide(POLICY, [bad(0), good(0)])


# --- policy ---------------------------------------------------------------------------------


def test_policy_loads_from_configuration() -> None:
    policy = load_policy(
        {
            "steps": [{"weight": 5, "window_seconds": 300}, {"weight": 50, "window_seconds": 600}],
            "limits": {"min_requests": 500, "max_error_rate": 0.005},
            "failure_limit": 1,
        }
    )
    assert [s.weight for s in policy.steps] == [5, 50]
    assert policy.limits.min_requests == 500
    assert policy.limits.max_p99_seconds == AnalysisLimits().max_p99_seconds


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"steps": []}, "steps"),
        (
            {"steps": [{"weight": 20, "window_seconds": 1}, {"weight": 5, "window_seconds": 1}]},
            "strictly increase",
        ),
        ({"steps": [{"weight": 100, "window_seconds": 1}]}, "steps.0.weight"),
        ({"steps": [{"weight": 5, "window_seconds": 0}]}, "window_seconds"),
        ({"steps": [{"weight": 5, "window_seconds": 1}], "extra": 1}, "extra"),
    ],
)
def test_invalid_policy_is_a_configuration_error(data: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment):
        load_policy(data)


def test_models_refuse_impossible_figures() -> None:
    with pytest.raises(ValueError, match="errors out of only"):
        ServerWindow(requests=1, errors=2, latency_samples=0)
    with pytest.raises(ValueError, match="before it starts"):
        Window(start=T0, end=T0)
    with pytest.raises(ValueError, match="either a sample or an error"):
        Measurement(step=0, weight=5, window=Window(start=T0, end=T0 + timedelta(seconds=1)))


# --- statistics -----------------------------------------------------------------------------


def test_fisher_matches_the_tea_tasting_table() -> None:
    # Fisher's lady tasting tea: 3 of 4 right in each row, one-sided p = 17/70.
    assert fisher_one_sided(3, 4, 1, 4) == pytest.approx(17 / 70, rel=1e-12)


def test_binomial_tail_matches_closed_form() -> None:
    assert binomial_upper_tail(1, 10, 0.01) == pytest.approx(1 - 0.99**10, rel=1e-12)
    assert binomial_upper_tail(0, 10, 0.3) == 1.0
    assert binomial_upper_tail(3, 3, 0.0) == 0.0


def _exact_fisher(a: int, n1: int, c: int, n2: int) -> Fraction:
    total, errors = n1 + n2, a + c
    denominator = math.comb(total, n1)
    return sum(
        (
            Fraction(math.comb(errors, x) * math.comb(total - errors, n1 - x), denominator)
            for x in range(a, min(errors, n1) + 1)
        ),
        Fraction(0),
    )


@given(
    n1=st.integers(1, 60),
    n2=st.integers(1, 60),
    data=st.data(),
)
def test_fisher_agrees_with_exact_rational_arithmetic(
    n1: int, n2: int, data: st.DataObject
) -> None:
    a = data.draw(st.integers(0, n1))
    c = data.draw(st.integers(0, n2))
    expected = float(_exact_fisher(a, n1, c, n2)) if a + c else 1.0
    assert fisher_one_sided(a, n1, c, n2) == pytest.approx(expected, rel=1e-9, abs=1e-300)


@given(n=st.integers(1, 3000), base=st.integers(0, 30), extra=st.integers(1, 30))
def test_more_canary_errors_never_look_better(n: int, base: int, extra: int) -> None:
    a = min(base, n)
    b = min(base + extra, n)
    assert fisher_one_sided(b, n, base % (n + 1), n) <= fisher_one_sided(a, n, base % (n + 1), n)


def test_large_counts_are_fast_and_finite() -> None:
    p = fisher_one_sided(60_000, 1_000_000, 50_000, 1_000_000)
    assert 0.0 <= p < 1e-100
