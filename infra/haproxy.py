"""The local stack's HAProxy process: start it, reload it with new ports, stop it.

What routes traffic (the configuration, the runtime API, the routes and the canary's weights)
is the product's :class:`portcullis.router_haproxy.HaproxyRouter`; this module adds only what
the local stack does to the process itself: pick the stats port, start or reload HAProxy in
the router's state directory, and stop it.
"""

from __future__ import annotations

import os
import signal
import time

from infra.prometheus import free_tcp_port
from portcullis.router_haproxy import HaproxyRouter, RouterSettings


class Router(HaproxyRouter):
    """The router in one state directory, with its HAProxy process started and stopped here."""

    def start(self, *, syslog_port: int, stats_port: int | None = None) -> RouterSettings:
        """Start HAProxy (or reload it with new ports), keeping every configured route.

        Args:
            syslog_port: UDP port of the latency exporter on 127.0.0.1.
            stats_port: port of ``/metrics``; kept from before, or a free one, when None.

        Returns:
            The settings now in force.
        """
        with self._locked():
            previous = self.settings() if self._settings_path.exists() else None
            port = stats_port or (previous.stats_port if previous else free_tcp_port())
            settings = RouterSettings(
                stats_port=port,
                syslog_port=syslog_port,
                routes=previous.routes if previous else (),
            )
            if settings != previous or not self.running():
                self._apply(settings)
            return settings

    def stop(self, timeout: float = 10.0) -> None:
        """Stop HAProxy (the routes stay in ``router.json`` for the next start)."""
        with self._locked():
            pid = self.pid()
            if pid is None:
                return
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.pid() is not None:
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    break
                time.sleep(0.05)
            self._pid_path.unlink(missing_ok=True)
