"""Canary analysis on real traffic.

* :mod:`portcullis.canary.analysis` -- the pure part: the canary policy (steps and limits), the
  measurement models, the statistics and the verdict. No I/O.
* :mod:`portcullis.canary.metrics` -- where measurements come from: the
  :class:`~portcullis.canary.metrics.MetricsProvider` interface and the Prometheus provider.

The router that splits traffic is a deploy target (``portcullis/router_haproxy.py``); the
processes behind it and behind the metrics (HAProxy, Prometheus, the latency exporter) live in
``infra/``, and so does the local stack's traffic
(``infra/loadgen.py``): the canary judges whatever traffic the environment's users send.
"""
