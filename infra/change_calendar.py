"""The local stack's change calendar: what an ITSM change calendar answers, on loopback.

prod's policy consults an external change calendar and fails closed when it cannot (see
``portcullis.freeze.ChangeCalendar`` for the protocol). On a developer machine there is no ITSM
system, so the stack runs this one: ``GET /api/v1/freezes?environment=ENV&at=ISO`` with a
bearer token answers the freezes listed in ``<state>/freezes.json`` that are in force at ``at``.
Edit that file (a list of ``{environment, name, reason, starts_at, ends_at}``) to announce a
freeze; an empty list means no freeze. The token lives in ``<state>/token`` (mode 0600) and is
handed to the deploy side as ``PORTCULLIS_DEPLOY_CHANGE_CALENDAR_TOKEN``.

Run: ``python -m infra.change_calendar --port 8470 --state DIR`` (the stack starts it).
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import secrets
import sys
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx

from infra.daemon import start_daemon, stop_daemon

NAME = "change-calendar"


def ensure_token(state_dir: Path) -> str:
    """The calendar's bearer token, generated once (mode 0600)."""
    path = state_dir / "token"
    if not path.exists():
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def freezes_at(entries: list[dict[str, str]], environment: str, at: datetime) -> list[dict[str, str]]:
    """The listed freezes of ``environment`` in force at ``at`` (an open end never ends)."""
    found = []
    for entry in entries:
        if entry.get("environment") != environment:
            continue
        starts = datetime.fromisoformat(entry["starts_at"]) if entry.get("starts_at") else None
        ends = datetime.fromisoformat(entry["ends_at"]) if entry.get("ends_at") else None
        if (starts is None or starts <= at) and (ends is None or at < ends):
            found.append({k: v for k, v in entry.items() if k != "environment"})
    return found


def _handler(state_dir: Path, token: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass  # requests carry tokens in headers only; nothing worth logging

        def _send(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path == "/health":
                self._send(200, {"ok": True})
                return
            if url.path != "/api/v1/freezes":
                self._send(404, {"error": "not found"})
                return
            sent = self.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
                self._send(401, {"error": "bad token"})
                return
            query = parse_qs(url.query)
            try:
                environment = query["environment"][0]
                at = datetime.fromisoformat(query["at"][0])
            except (KeyError, IndexError, ValueError):
                self._send(400, {"error": "environment and at (ISO 8601 with offset) are required"})
                return
            path = state_dir / "freezes.json"
            entries = json.loads(path.read_text()) if path.exists() else []
            self._send(200, {"freezes": freezes_at(entries, environment, at)})

    return Handler


def serve(port: int, state_dir: Path) -> None:
    """Serve until killed."""
    token = ensure_token(state_dir)
    ThreadingHTTPServer(("127.0.0.1", port), _handler(state_dir, token)).serve_forever()


def ensure_calendar(state_dir: Path, port: int) -> tuple[str, str]:
    """Start the calendar (idempotent); return its base URL and token."""
    token = ensure_token(state_dir)
    freezes = state_dir / "freezes.json"
    if not freezes.exists():
        freezes.write_text("[]\n")
    repo = Path(__file__).resolve().parents[1]

    def ready() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    start_daemon(NAME, [sys.executable, "-m", "infra.change_calendar", "--port", str(port),
                        "--state", str(state_dir)],
                 state_dir=state_dir, env={"PYTHONPATH": str(repo)}, ready=ready, timeout=30)
    return f"http://127.0.0.1:{port}/api", token


def stop_calendar(state_dir: Path) -> bool:
    """Stop the calendar if it runs."""
    return stop_daemon(NAME, state_dir=state_dir)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point for the daemon."""
    parser = argparse.ArgumentParser(prog="python -m infra.change_calendar")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state", type=Path, required=True)
    args = parser.parse_args(argv)
    serve(args.port, args.state)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
