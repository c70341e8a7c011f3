"""What a platform team sees and asks, on the local stack (real engine, registry, Prefect server).

Given a two-app catalog where one app is frozen by its own catalog window, when the catalog is
promoted to dev, then the frozen app is refused and the other promoted. Then ``plan`` answers
for a digest that would pass, one that never passed staging (chain), one during a freeze and
one whose author is an approver (and the requester); ``approve`` answers a waiting promotion
through the Prefect API as the UI does (the author refused, then another approver accepted);
after a rollback, ``status`` and the board artifact show it rolled back and pinned; ``history``
and ``dora`` read the same audit trail.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prometheus_client.parser import text_string_to_metric_families

from flows.catalog import promote_catalog
from flows.promote import promote
from portcullis.__main__ import main
from portcullis.board import BOARD_ARTIFACT_KEY
from portcullis.results import PromotionResult
from tasks.board import current_board
from tests.conftest import EXAMPLE_APP, AppRepo, PipelineEnv
from tests.test_gated_promotions import SECRETS, code, gated

pytestmark = [pytest.mark.docker, pytest.mark.prefect_server, pytest.mark.slow,
              pytest.mark.timeout(900)]
__all__ = ["gated"]  # the fixture, imported for its side effects on the environment

FOREVER = ('[[app.freeze]]\nkind = "once"\nname = "{name}"\nreason = "{reason}"\ntz = "UTC"\n'
           'start = "2020-01-01T00:00:00"\nend = "2099-01-01T00:00:00"\n')


def _catalog(path: Path, repo: Path, a: str, b: str, *, a_frozen: bool = True, b_frozen: bool = False) -> None:
    def entry(name: str, context: str, frozen: str) -> str:
        return (f'[[app]]\nname = "{name}"\nrepository = "{repo}"\ncontext = "{context}"\n'
                f'environments = ["dev", "staging", "prod"]\nowners = ["bob"]\n' + frozen + "\n")

    # The example app's paths, as the repository's catalog gives them.
    defaults = 'health_path = "/cgi-bin/healthz"\nload_path = "/cgi-bin/hello"\n\n'
    path.write_text(
        defaults
        + entry(a, ".", FOREVER.format(name="a-launch", reason="a's launch week") if a_frozen else "")
        + entry(b, "greeter", FOREVER.format(name="b-migration", reason="b's data migration") if b_frozen else ""))


def _board_artifact() -> str:
    """The newest version of the published board."""
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[BOARD_ARTIFACT_KEY])))
    return str(max(artifacts, key=lambda art: str(art.created)).data)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(argv))
    captured = capsys.readouterr()
    with capsys.disabled():  # shown with -s: what an operator would see
        print(f"\n$ python -m portcullis {' '.join(argv)}\n{captured.out}{captured.err}")
    return rc, captured.out + captured.err


def test_a_two_app_catalog_seen_planned_approved_and_rolled_back(
    prefect_harness: None, gated: Path, pipeline_env: PipelineEnv, app_repo: AppRepo, app_name: str,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    # The second app lives in the same repository, answering with another message.
    shutil.copytree(EXAMPLE_APP, app_repo.path / "greeter")
    conf = app_repo.path / "greeter" / "app.conf"
    conf.write_text(conf.read_text().replace("hello from portcullis", "greetings"))
    app_repo.git("add", "-A")
    app_repo.git("commit", "-q", "-m", "greeter")
    a, b = f"{app_name}-a", f"{app_name}-b"
    catalog = tmp_path / "apps.toml"
    _catalog(catalog, app_repo.path, a, b)
    monkeypatch.setenv("PORTCULLIS_CATALOG", str(catalog))

    # Given the catalog promoted to dev: a is frozen by its own window, b is not held by it.
    outcome = promote_catalog(requested_by="trent")
    assert outcome[a].startswith("refused") and "a-launch" in outcome[a] and "2099" in outcome[a]
    assert outcome[b].startswith("promoted"), outcome[b]
    image = outcome[b].removeprefix("promoted ")
    digest = image.split("@")[1]
    board = current_board()
    assert board.cell(b, "dev").digest == digest
    assert board.cell(a, "dev").digest is None
    assert "a-launch" in (board.cell(a, "dev").last_refusal or "")

    # plan: a digest that would pass staging; the author (ada) and the requester (trent) are
    # shown as unable to approve.
    rc, out = _cli(capsys, "plan", "--app", b, "--environment", "staging", "--image", image,
                   "--requested-by", "trent")
    assert rc == 0, out
    for gate in ("signature", "provenance", "sbom", "scan", "chain", "freeze", "approval"):
        assert f"PASS   {gate}" in out
    assert "ada (wrote the promoted commit)" in out and "trent (requests this promotion)" in out
    assert "every gate would pass" in out

    # plan: prod takes only what passed staging: the chain refuses, and the exit code says so.
    rc, out = _cli(capsys, "plan", "--app", b, "--environment", "prod", "--image", image)
    assert rc == 3 and "REFUSE chain" in out and "never passed staging" in out
    assert "would REFUSE at: chain" in out

    # plan: during a freeze (b's own catalog window), naming the window and when it ends.
    _catalog(catalog, app_repo.path, a, b, b_frozen=True)
    rc, out = _cli(capsys, "plan", "--app", b, "--environment", "staging", "--image", image)
    assert rc == 3 and "REFUSE freeze" in out and "b-migration" in out and "2099" in out
    _catalog(catalog, app_repo.path, a, b)

    # plan: when the only approvers are the author and the requester, approval cannot be met.
    only = tmp_path / "only-authors"
    only.mkdir(mode=0o700)
    (only / "approvers.toml").write_text("".join(
        f'[[approver]]\nname = "{n}"\ngroups = ["platform"]\naliases = ["{n}@example.com"]\n'
        f'totp_secret = "{SECRETS[n]}"\n\n' for n in ("ada", "trent")))
    (only / "approvers.toml").chmod(0o600)
    with monkeypatch.context() as m:
        m.setenv("PORTCULLIS_APPROVERS_FILE", str(only / "approvers.toml"))
        rc, out = _cli(capsys, "plan", "--app", b, "--environment", "staging", "--image", image,
                       "--requested-by", "trent")
    assert rc == 3 and "REFUSE approval" in out and "cannot be met" in out and "may approve: nobody" in out

    # approve: nothing waits yet.
    rc, out = _cli(capsys, "approve", "--app", b, "--environment", "staging", "--approver", "carol",
                   "--code", "123456", "--digest-prefix", digest[7:19])
    assert rc == 2 and "waits for an answer" in out

    # A staging promotion waits; the board shows for whom; `approve` answers it as the UI does.
    staged: list[PromotionResult | BaseException] = []

    def stage() -> None:
        try:
            staged.append(promote.with_options(flow_run_name=f"{b}-staging")(
                app=b, environment="staging", image=image, requested_by="trent",
                requester_code=code("trent")))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            staged.append(exc)

    runner = threading.Thread(target=stage, daemon=True)
    runner.start()

    def answer(who: str) -> tuple[int, str]:
        return _cli(capsys, "approve", "--app", b, "--environment", "staging", "--approver", who,
                    "--code", code(who), "--digest-prefix", digest[7:19], "--comment", "via the CLI",
                    "--wait", "120")

    rc, out = answer("ada")  # the author: the ledger refuses her, the run asks again
    assert rc == 0 and "asks:" in out and digest in out
    assert "waits again: Refused: ada wrote commit" in out
    (waiting,) = current_board().cell(b, "staging").waiting
    assert (waiting.requested_by, waiting.needed, waiting.digest) == ("trent", 1, digest)
    # The published board shows it too: it is republished when a person is asked or answers.
    assert "WAITING" in _board_artifact() and "by trent needs 1 approval" in _board_artifact()
    # carol's code comes through a pipe, as `code carol | approve ...` sends it: not on argv.
    monkeypatch.setattr("sys.stdin", io.StringIO(code("carol") + "\n"))
    rc, out = _cli(capsys, "approve", "--app", b, "--environment", "staging", "--approver", "carol",
                   "--digest-prefix", digest[7:19], "--wait", "120")
    assert rc == 0 and "waits again" not in out
    runner.join(300)
    (result,) = staged
    assert isinstance(result, PromotionResult), result
    assert result.approved_by == ("carol",)
    assert current_board().cell(b, "staging").waiting == ()

    # A second version in dev, then a rollback from the CLI: status shows it rolled back and pinned.
    (app_repo.path / "greeter" / "app.conf").write_text(conf.read_text().replace("greetings", "greetings v2"))
    app_repo.git("commit", "-q", "-am", "greeter v2")
    v2 = promote(app=b, environment="dev", source_repo=str(app_repo.path), commit="HEAD", ref="main",
                 context_path="greeter")
    rc, out = _cli(capsys, "rollback", "--app", b, "--environment", "dev", "--reason", "v2 broke greetings",
                   "--requested-by", "olga")
    assert rc == 0, out
    rc, status = _cli(capsys, "status")
    assert rc == 0
    rows = status.split(b, 1)[1]
    assert f"{digest[7:19]} @" in rows and "rolled back by olga" in rows and "PINNED by olga" in rows
    assert "approved: carol" in rows
    text = _board_artifact()
    assert f"**{b}**" in text and "rolled back by olga" in text and "PINNED by olga" in text
    assert f"**{a}**" in text

    rc, out = _cli(capsys, "history", "--app", b)
    assert rc == 0
    dev_part, staging_part = out.split(f"{b} in staging:")
    assert "rollback.completed" in dev_part and v2.image.digest[7:19] in dev_part
    assert "promotion.completed" in staging_part and "approved carol" in staging_part

    # DORA from the same trail: two deploys to dev and one rollback; lead times from git.
    textfile = tmp_path / "dora.prom"
    rc, out = _cli(capsys, "dora", "--prometheus-textfile", str(textfile))
    assert rc == 0 and f"| {b} | dev | 2 |" in out and "50% (1/2)" in out
    samples: dict[tuple[str, str], Any] = {
        (s.name, s.labels["environment"]): s.value
        for family in text_string_to_metric_families(textfile.read_text()) for s in family.samples
        if s.labels.get("app") == b}
    assert samples[("portcullis_dora_deployments", "dev")] == 2
    assert samples[("portcullis_dora_change_failure_rate", "dev")] == 0.5
    assert samples[("portcullis_dora_lead_time_seconds", "dev")] > 0
    assert json.loads(json.dumps(samples[("portcullis_dora_deployments", "staging")])) == 1
