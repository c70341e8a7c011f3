"""Where canary measurements come from.

:class:`MetricsProvider` is the one interface the analysis needs: given a backend and a time
window, return a :class:`~portcullis.canary.analysis.Sample` for the canary and the stable
baseline. :class:`PrometheusProvider` answers it with PromQL over HTTP, from two scrape jobs:

* HAProxy's built-in exporter: per-server response counters by status class, connection and
  response errors;
* the latency exporter (``infra/latency_exporter.py``), which turns HAProxy's per-request log
  lines into a per-server response-time histogram with log-spaced buckets at most 10% wide
  (:data:`LATENCY_BUCKETS`), because HAProxy itself exports no latency histogram. The whole
  histogram of each server over the window goes to the judge, which compares the two
  distributions instead of reading one interpolated p99.

:func:`measure` wraps a provider call into a :class:`~portcullis.canary.analysis.Measurement`,
recording a transient failure as an Error measurement instead of raising, so the verdict can
apply its consecutive-error limit.
"""

from __future__ import annotations

import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import httpx
from pydantic import field_validator

from portcullis.canary.analysis import LatencyHistogram, Measurement, Sample, ServerWindow, Window
from portcullis.errors import ConfigurationError, TransientError
from portcullis.models import Frozen

HAPROXY_JOB = "haproxy"
"""Prometheus job name of HAProxy's exporter (infra/prometheus.py scrapes under this name)."""

LATENCY_JOB = "portcullis-latency"
"""Prometheus job name of the latency exporter."""

RESPONSE_SECONDS_METRIC = "portcullis_haproxy_server_response_seconds"
"""Histogram of server response times (HAProxy's Tr), labelled ``proxy`` and ``server``."""


def _log_buckets(first: float, last: float, ratio: float) -> tuple[float, ...]:
    bounds = [first]
    while bounds[-1] < last:
        # Four significant digits keep the ``le`` labels short; each step stays <= ``ratio``.
        bounds.append(float(f"{bounds[-1] * ratio:.4g}"))
    return tuple(bounds)


LATENCY_BUCKETS = _log_buckets(0.001, 30.0, 1.0995)
"""Upper bounds (seconds) of the response-time histogram: 1 ms to 30 s, each bucket at most
10% wider than the one below, so two distributions can be compared as wholes (Mann-Whitney),
not through one interpolated p99. HAProxy's timers are whole milliseconds, so below 10 ms the
buckets are finer than the data."""

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


class CanaryTarget(Frozen):
    """Which HAProxy backend and servers a canary analysis compares."""

    backend: str
    stable_server: str = "stable"
    canary_server: str = "canary"

    @field_validator("backend", "stable_server", "canary_server")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # These names go into PromQL label matchers: only plain names, so nothing can escape
        # the quotes.
        if not _NAME_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a plain HAProxy name ([A-Za-z0-9_.-])")
        return value


class MetricsUnavailable(TransientError):
    """The metrics source could not answer for a window (down, not scraped yet, no series)."""


class MetricsProvider(ABC):
    """Source of canary and baseline figures for a window."""

    @abstractmethod
    def sample(self, target: CanaryTarget, window: Window) -> Sample:
        """Return what the canary and the stable server did during ``window``.

        Args:
            target: the backend and its two servers.
            window: the observation window; it must have ended.

        Returns:
            The sample for both servers over exactly that window.

        Raises:
            MetricsUnavailable: the figures cannot be obtained right now.
        """


def measure(
    provider: MetricsProvider, target: CanaryTarget, *, step: int, weight: int, window: Window
) -> Measurement:
    """Take the measurement of one canary step.

    Args:
        provider: where the figures come from.
        target: the backend and servers compared.
        step: index of the policy step that was observed.
        weight: the canary weight during the window.
        window: the observation window (already over).

    Returns:
        A measurement with the sample, or with the error when the provider could not answer
        (a transient failure becomes an Error measurement; the verdict decides how many of
        those in a row it tolerates).
    """
    try:
        sample = provider.sample(target, window)
    except TransientError as exc:
        return Measurement(step=step, weight=weight, window=window, error=str(exc))
    return Measurement(step=step, weight=weight, window=window, sample=sample)


class PrometheusProvider(MetricsProvider):
    """A :class:`MetricsProvider` that asks a Prometheus server with PromQL.

    Counters are turned into window totals with ``increase()`` evaluated at the window's end
    over the window's length, which stays right across a counter reset (an HAProxy reload
    starts a new process with fresh counters). ``increase()`` extrapolates to the window
    edges, so totals are rounded; both servers come from the same scrapes, so the
    comparison between them is not skewed by it.

    Args:
        base_url: Prometheus' address, e.g. ``http://127.0.0.1:9090``.
        settle_seconds: how long after the window's end to wait before asking, so that the
            scrape covering the window's last second has landed.
        timeout: HTTP timeout per query.
        client: an httpx client to reuse (one is created otherwise).
        clock: returns the current UNIX time (injectable for tests).
        sleep: waits for the given seconds (injectable for tests).
        haproxy_job: Prometheus job name of HAProxy's exporter.
        latency_job: Prometheus job name of the latency exporter.
    """

    def __init__(
        self,
        base_url: str,
        *,
        settle_seconds: float = 2.0,
        timeout: float = 5.0,
        client: httpx.Client | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        haproxy_job: str = HAPROXY_JOB,
        latency_job: str = LATENCY_JOB,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.settle_seconds = settle_seconds
        self._client = client or httpx.Client(timeout=timeout)
        self._clock = clock
        self._sleep = sleep
        for job in (haproxy_job, latency_job):
            if not _NAME_RE.fullmatch(job):
                raise ValueError(f"job name {job!r} is not a plain name")
        self._jobs = (haproxy_job, latency_job)

    def query(self, promql: str, at: float) -> list[tuple[dict[str, str], float]]:
        """Run an instant query.

        Args:
            promql: the expression.
            at: evaluation time, UNIX seconds.

        Returns:
            (labels, value) for each series of the resulting vector.

        Raises:
            MetricsUnavailable: Prometheus did not answer or could not evaluate the query.
            ConfigurationError: Prometheus rejected the query as malformed.
        """
        url = f"{self.base_url}/api/v1/query"
        try:
            response = self._client.get(url, params={"query": promql, "time": f"{at:.3f}"})
        except httpx.HTTPError as exc:
            raise MetricsUnavailable(
                f"Prometheus at {self.base_url} did not answer: {exc}",
                hint="check that the Prometheus of the canary stack is running",
            ) from exc
        try:
            body: dict[str, Any] = response.json()
        except ValueError:
            body = {}
        if response.status_code in (400, 422):
            # The query itself is wrong: asking again cannot help.
            raise ConfigurationError(
                f"Prometheus rejected query {promql!r} (HTTP {response.status_code}): "
                f"{body.get('error', response.text[:200])}",
                hint="this is a bug in the canary metrics queries; report it",
            )
        if response.status_code != 200 or body.get("status") != "success":
            raise MetricsUnavailable(
                f"Prometheus refused query {promql!r} (HTTP {response.status_code}): "
                f"{body.get('error', response.text[:200])}"
            )
        data = body["data"]
        if data.get("resultType") != "vector":
            raise MetricsUnavailable(f"query {promql!r} returned {data.get('resultType')}")
        return [(series["metric"], float(series["value"][1])) for series in data["result"]]

    def _by_server(self, promql: str, at: float) -> dict[str, float]:
        return {labels.get("server", ""): value for labels, value in self.query(promql, at)}

    def sample(self, target: CanaryTarget, window: Window) -> Sample:
        """Query counts, errors and the latency histograms of both servers over ``window``."""
        end = window.end.timestamp()
        wait = end + self.settle_seconds - self._clock()
        if wait > 0:
            self._sleep(wait)
        self._check_targets_up(end)

        rng = f"{max(1, round(window.seconds * 1000))}ms"
        sel = f'proxy="{target.backend}"'
        weights = self._by_server(f"haproxy_server_weight{{{sel}}}", end)
        missing = {target.stable_server, target.canary_server} - weights.keys()
        if missing:
            raise MetricsUnavailable(
                f"Prometheus has no HAProxy series for server(s) {sorted(missing)} of backend "
                f"{target.backend!r} at the end of the window",
                hint="check the router's configuration for this app and environment",
            )
        responses = self._by_server(
            f"sum by (server) (increase(haproxy_server_http_responses_total{{{sel}}}[{rng}]))",
            end,
        )
        server_errors = self._by_server(
            f'sum by (server) (increase(haproxy_server_http_responses_total{{{sel},code="5xx"}}'
            f"[{rng}]))",
            end,
        )
        # Failed connections and broken responses never became an HTTP response of the
        # server: they count as requests and as errors.
        failures: dict[str, float] = {}
        for counter in ("connection_errors", "response_errors"):
            for server, value in self._by_server(
                f"sum by (server) (increase(haproxy_server_{counter}_total{{{sel}}}[{rng}]))", end
            ).items():
                failures[server] = failures.get(server, 0.0) + value
        cumulative: dict[str, dict[float, float]] = {}
        for labels, value in self.query(
            f"sum by (server, le) (increase({RESPONSE_SECONDS_METRIC}_bucket{{{sel}}}[{rng}]))",
            end,
        ):
            le = float(labels.get("le", "nan"))
            if not math.isnan(le):
                cumulative.setdefault(labels.get("server", ""), {})[le] = value

        def server_window(server: str) -> ServerWindow:
            failed = round(failures.get(server, 0.0))
            return ServerWindow(
                requests=round(responses.get(server, 0.0)) + failed,
                errors=round(server_errors.get(server, 0.0)) + failed,
                latency=histogram_from_buckets(cumulative.get(server, {})),
            )

        return Sample(
            canary=server_window(target.canary_server),
            baseline=server_window(target.stable_server),
        )

    def _check_targets_up(self, at: float) -> None:
        jobs = "|".join(self._jobs)
        up = {
            labels.get("job", ""): value for labels, value in self.query(f'up{{job=~"{jobs}"}}', at)
        }
        down = [job for job in self._jobs if up.get(job) != 1.0]
        if down:
            raise MetricsUnavailable(
                f"Prometheus was not scraping {down} at the end of the window "
                f"(up={ {job: up.get(job) for job in self._jobs} })",
                hint="check that HAProxy's stats frontend and the latency exporter are running",
            )

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()


def histogram_from_buckets(cumulative: dict[float, float]) -> LatencyHistogram | None:
    """Turn Prometheus' cumulative ``le`` buckets over a window into bucket counts.

    ``increase()`` extrapolates to the window's edges, so counts are rounded and a cumulative
    count that dips below the one before it (rounding, or a counter reset inside the window)
    is raised to it: a bucket never gets a negative count.

    Args:
        cumulative: ``le`` bound (seconds, ``inf`` for ``+Inf``) -> requests at or below it.

    Returns:
        The histogram, or None when there is no bucket at all.
    """
    if not cumulative:
        return None
    bounds = sorted(cumulative)
    counts: list[int] = []
    running = 0
    for bound in bounds:
        total = max(running, round(cumulative[bound]))
        counts.append(total - running)
        running = total
    return LatencyHistogram(bounds=tuple(bounds), counts=tuple(counts))
