"""An approver uses the real Prefect UI, in a real browser, to let a paused promotion go on.

Given a real ``prefect server start`` and a flow process that waits for one staging approval,
when the approver opens the run page in Chromium, clicks "Resume" and submits the form with a
wrong code, then the run pauses again and the form comes back with the refusal; when they
submit it with their current TOTP code, the digest prefix and "approve", then the run
completes and the audit chain names them as the approver.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from playwright.sync_api import Locator, Page, expect, sync_playwright

from infra.prefect_server import ensure_server, prefect_env, stop_server
from infra.registry import free_port
from portcullis.audit import AuditLog
from tests.support import ui_flow

CHROMIUM = Path("/usr/bin/chromium")
# Offline, headless, and no background traffic: the browser must only talk to 127.0.0.1.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET = pyotp.random_base32()
APPROVER = "alice"

pytestmark = [
    pytest.mark.prefect_server,
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"{CHROMIUM} is missing: run `bash infra/bootstrap.sh` (installs Debian's "
        "chromium); `playwright install` is not used because it downloads browsers",
    ),
]


@dataclass(frozen=True)
class UiServer:
    """A Prefect server started for this test."""

    port: int
    state_dir: Path
    started_in: float

    @property
    def api(self) -> str:
        """The REST API base URL."""
        return f"http://127.0.0.1:{self.port}/api"

    def run_page(self, run_id: str) -> str:
        """The UI page of one flow run."""
        return f"http://127.0.0.1:{self.port}/runs/flow-run/{run_id}"


@pytest.fixture
def ui_server(tmp_path: Path) -> Iterator[UiServer]:
    """A real ``prefect server start`` (API and UI) on a free port, stopped afterwards."""
    state_dir = tmp_path / "prefect"
    port = free_port()
    started = time.monotonic()
    ensure_server(state_dir, port)
    try:
        yield UiServer(port=port, state_dir=state_dir, started_in=time.monotonic() - started)
    finally:
        stop_server(state_dir)


@pytest.fixture
def approvers_file(tmp_path: Path) -> Path:
    """A deploy-side approver directory with one approver whose TOTP secret the test knows."""
    folder = tmp_path / "deploy-config"
    folder.mkdir(mode=0o700)
    path = folder / "approvers.toml"
    path.write_text(
        f'[[approver]]\nname = "{APPROVER}"\ndisplay_name = "Alice Approver"\n'
        f'groups = ["release"]\ntotp_secret = "{SECRET}"\n',
        encoding="utf-8",
    )
    path.chmod(0o600)
    return path


class Api:
    """The few REST calls the test makes itself; a bare 503 (busy SQLite) is retried."""

    def __init__(self, base: str) -> None:
        self._http = httpx.Client(base_url=base, timeout=10)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _call(self, method: str, path: str, body: Any = None) -> httpx.Response:
        for _ in range(10):
            response = self._http.request(method, path, json=body)
            if response.status_code != 503:
                return response
            time.sleep(0.2)
        return response

    def run_by_name(self, name: str) -> dict[str, Any] | None:
        """The flow run with this name, or None before it exists."""
        response = self._call(
            "POST", "/flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}}
        )
        response.raise_for_status()
        runs: list[dict[str, Any]] = response.json()
        return runs[0] if runs else None

    def run(self, run_id: str) -> dict[str, Any]:
        """One flow run."""
        response = self._call("GET", f"/flow_runs/{run_id}")
        response.raise_for_status()
        run: dict[str, Any] = response.json()
        return run

    def run_input(self, run_id: str, key: str) -> str | None:
        """A saved run input value (JSON text), or None when it is not saved yet."""
        response = self._call("GET", f"/flow_runs/{run_id}/input/{key}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.text


@dataclass(frozen=True)
class Pause:
    """One pause of the run with its form, as the server holds it."""

    run_id: str
    state_id: str
    description: str
    at: float


def wait_for_form(api: Api, run_name: str, flow: subprocess.Popen[str], seen: set[str]) -> Pause:
    """Wait until the run is paused (a pause not seen before) and its form schema is saved.

    The schema is saved after the PAUSED state is set; a resume before it exists would skip
    the server's validation (docs/platform.md), so the test waits for it as a human would
    have to wait for the form.
    """
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        if flow.poll() is not None:
            raise AssertionError(f"the flow process exited early with code {flow.returncode}")
        run = api.run_by_name(run_name)
        state = (run or {}).get("state") or {}
        keyset = (state.get("state_details") or {}).get("run_input_keyset")
        if run and state.get("type") == "PAUSED" and state["id"] not in seen and keyset:
            schema = api.run_input(run["id"], keyset["schema"])
            description = api.run_input(run["id"], keyset["description"])
            if schema is not None and description is not None:
                seen.add(state["id"])
                return Pause(run["id"], state["id"], json.loads(description), time.monotonic())
        time.sleep(0.1)
    raise AssertionError(f"flow run {run_name} did not pause with a form within 45 s")


def wait_for_state(api: Api, run_id: str, *wanted: str, timeout: float = 30) -> float:
    """Wait until the run's state type is one of ``wanted``; return when it was seen."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = (api.run(run_id).get("state") or {}).get("type")
        if last in wanted:
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"flow run {run_id} is {last}, not {wanted}, after {timeout:.0f} s")


def code_not_valid_now() -> str:
    """A 6-digit code that is wrong for every time step the ledger could accept soon."""
    totp = pyotp.TOTP(SECRET)
    now = time.time()
    valid = {totp.at(now + 30 * step) for step in range(-2, 4)}
    return next(c for c in (f"{n:06d}" for n in range(10)) if c not in valid)


class ResumeDialog:
    """The "Resume Flow Run" dialog of the run page, driven like a person would."""

    def __init__(self, page: Page) -> None:
        self.page = page

    def open(self, url: str) -> Locator:
        """Load the run page, click "Resume" and return the dialog."""
        self.page.goto(url)
        self.page.get_by_role("button", name="Resume", exact=True).click()
        dialog = self.page.get_by_role("dialog")
        dialog.get_by_text("Resume Flow Run").wait_for()
        return dialog

    def _row(self, dialog: Locator, label: str) -> Locator:
        # Labels are not bound to their inputs in Prefect's UI: find the row by label text.
        return dialog.locator("div.schema-form-property").filter(
            has=self.page.locator(
                "span.schema-form-property__label", has_text=re.compile(rf"^{re.escape(label)}$")
            )
        )

    def fill(self, dialog: Locator, *, code: str, digest_prefix: str, decision: str) -> None:
        """Type the answer into the form."""
        self._row(dialog, "Approver").locator("textarea").fill(APPROVER)
        self._row(dialog, "Code").locator("textarea").fill(code)
        self._row(dialog, "Digest Prefix").locator("textarea").fill(digest_prefix)
        # A headless click does not open the select; focus it and press space instead.
        self._row(dialog, "Decision").locator("button.p-select-button__control").focus()
        self.page.keyboard.press("Space")
        self.page.get_by_role("option", name=decision, exact=True).click()
        self._row(dialog, "Comment (Optional)").locator("textarea").fill("looked at the scan")

    def submit(self, dialog: Locator) -> dict[str, Any]:
        """Click Submit; return the server's answer to the UI's resume call."""
        with self.page.expect_response(
            lambda r: r.request.method == "POST" and r.url.endswith("/resume")
        ) as answer:
            dialog.get_by_role("button", name="Submit", exact=True).click()
        body: dict[str, Any] = answer.value.json()
        return body


@pytest.fixture
def browser_page(tmp_path: Path) -> Iterator[Page]:
    """A page in Debian's Chromium with a fresh profile; closed afterwards."""
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1400},
        )
        context.set_default_timeout(15_000)
        try:
            yield context.new_page()
        finally:
            context.close()


@pytest.fixture
def flow_process(
    tmp_path: Path, ui_server: UiServer, approvers_file: Path
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """The flow in its own process, talking to the test's server through PREFECT_API_URL."""
    run_name = f"ui-approval-{os.getpid()}-{time.monotonic_ns()}"
    env = dict(os.environ)
    env.update(prefect_env(ui_server.state_dir, ui_server.port))
    log = tmp_path / "flow.log"
    argv = [
        sys.executable, "-m", "tests.support.ui_flow",
        "--run-name", run_name,
        "--audit", str(tmp_path / "audit" / "audit.jsonl"),
        "--approvers", str(approvers_file),
        "--timeout", "150",
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=out, text=True
        )
    try:
        yield run_name, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_an_approver_resumes_the_paused_promotion_in_the_prefect_ui(
    tmp_path: Path,
    ui_server: UiServer,
    flow_process: tuple[str, subprocess.Popen[str]],
    browser_page: Page,
    record_property: Callable[[str, object], None],
) -> None:
    run_name, flow = flow_process
    api = Api(ui_server.api)
    ui = ResumeDialog(browser_page)
    digest_prefix = ui_flow.DIGEST.removeprefix("sha256:")[:12]
    seen: set[str] = set()
    try:
        # Given the promotion is paused and waiting for one staging approval
        first = wait_for_form(api, run_name, flow, seen)
        # The description is Markdown with user-influenced text escaped; the UI renders it.
        assert ui_flow.DIGEST in first.description and "Refused" not in first.description

        # When the approver submits a wrong code through the UI
        dialog = ui.open(ui_server.run_page(first.run_id))
        expect(
            dialog.get_by_text(f"Approve {ui_flow.APP} → {ui_flow.ENVIRONMENT}?")
        ).to_be_visible()
        expect(dialog.get_by_text(ui_flow.DIGEST, exact=True)).to_be_visible()
        ui.fill(dialog, code=code_not_valid_now(), digest_prefix=digest_prefix, decision="approve")
        wrong_submitted = time.monotonic()
        answer = ui.submit(dialog)
        assert answer["status"] == "ACCEPT", answer  # the form passed the server's schema

        # Then the run pauses again and the form is offered again, with the refusal
        second = wait_for_form(api, run_name, flow, seen)
        assert second.run_id == first.run_id
        assert "Refused" in second.description and "wrong or expired" in second.description
        dialog = ui.open(ui_server.run_page(second.run_id))
        expect(
            dialog.get_by_text(re.compile(r"Refused: the code for alice is wrong"))
        ).to_be_visible()
        assert api.run(second.run_id)["state"]["type"] == "PAUSED" and flow.poll() is None

        # When the approver submits the current code, the digest prefix and "approve"
        ui.fill(
            dialog, code=pyotp.TOTP(SECRET).now(), digest_prefix=digest_prefix, decision="approve"
        )
        screenshot = tmp_path / "resume-dialog-filled.png"
        dialog.screenshot(path=str(screenshot))
        submitted = time.monotonic()
        answer = ui.submit(dialog)
        assert answer["status"] == "ACCEPT", answer

        # Then the run leaves the pause, completes, and the audit chain names the approver
        # A fast flow may finish between two polls, so COMPLETED also counts as "left the pause".
        running = wait_for_state(api, second.run_id, "RUNNING", "COMPLETED")
        completed = wait_for_state(api, second.run_id, "COMPLETED")
        out, _ = flow.communicate(timeout=30)
    finally:
        api.close()
    assert flow.returncode == 0, (tmp_path / "flow.log").read_text()[-2000:]
    assert json.loads(out.strip().splitlines()[-1]) == [APPROVER]

    log = AuditLog(tmp_path / "audit" / "audit.jsonl")
    report = log.verify()
    assert report.ok, report.reason
    records = log.records()
    assert [(r.event, r.actor) for r in records] == [
        ("approval.requested", "portcullis"),
        ("approval.refused", "unverified"),
        ("approval.accepted", APPROVER),
        ("approval.granted", "portcullis"),
    ]
    refused, accepted = records[1], records[2]
    assert refused.details["refusal"] == "bad-code"
    assert refused.details["claimed_approver"] == APPROVER
    assert accepted.digest == ui_flow.DIGEST and accepted.run_id == first.run_id
    assert accepted.details["verdict"] == "approve" and accepted.details["totp_step"]

    timings = {
        "server_start_s": round(ui_server.started_in, 1),
        "submit_to_unpaused_s": round(running - submitted, 1),
        "submit_to_completed_s": round(completed - submitted, 1),
        "wrong_code_to_new_form_s": round(second.at - wrong_submitted, 1),
    }
    for key, value in timings.items():
        record_property(key, value)
    print("ui approval timings:", timings)
    assert screenshot.stat().st_size > 0
