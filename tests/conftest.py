"""Shared fixtures: a real Docker engine, a real registry, and a throwaway app repository.

The engine is the one that answers (DOCKER_HOST) or a private dockerd this session starts and
stops. Everything the tests create carries the app-name prefix ``t-`` and is removed afterwards.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import docker
import pytest

from blocks.credentials import BuildCredentials, DeployCredentials
from infra.base_image import ensure_base_image
from infra.docker_engine import DockerEngine, ensure_engine, stop_private_engine
from infra.registry import RunningRegistry, start_registry, stop_registry
from tasks.deploy import LABEL_APP
from tests.support.names import unique_app_name

if TYPE_CHECKING:
    from tests.support.shared_production import SharedProduction

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_APP = REPO_ROOT / "examples" / "hello"


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    """A Docker engine that answers, started privately when none does."""
    state = tmp_path_factory.mktemp("docker")
    engine = ensure_engine(state)
    client = docker.DockerClient(base_url=engine.host, version="auto")
    ensure_base_image(client)
    client.close()
    yield engine
    if engine.private:
        stop_private_engine(state)


@pytest.fixture(scope="session")
def docker_client(docker_engine: DockerEngine) -> Iterator[docker.DockerClient]:
    """A client for the test engine; removes every container the tests labelled."""
    client = docker.DockerClient(base_url=docker_engine.host, version="auto")
    yield client
    for c in client.containers.list(all=True, filters={"label": LABEL_APP}):
        if c.labels.get(LABEL_APP, "").startswith("t-"):
            c.remove(force=True)
    client.close()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """A real registry with a build (push), a deploy (pull) and a promoter account."""
    state = tmp_path_factory.mktemp("registry")
    users = {"builder": secrets.token_urlsafe(12), "deployer": secrets.token_urlsafe(12),
             "promoter": secrets.token_urlsafe(12)}
    reg = start_registry(state, users=users)
    yield reg
    stop_registry(state)


@pytest.fixture()
def build_creds(registry: RunningRegistry, docker_engine: DockerEngine) -> BuildCredentials:
    """Build credentials for the test registry and engine."""
    acct = registry.account("builder")
    return BuildCredentials(
        registry=registry.address,
        registry_username=acct.username,
        registry_password=acct.password,
        docker_host=docker_engine.host,
    )


@pytest.fixture()
def deploy_creds(registry: RunningRegistry, docker_engine: DockerEngine) -> DeployCredentials:
    """Deploy credentials for the test registry and engine."""
    acct = registry.account("deployer")
    return DeployCredentials(
        registry=registry.address,
        registry_username=acct.username,
        registry_password=acct.password,
        docker_host=docker_engine.host,
    )


@dataclass
class AppRepo:
    """A git repository holding a copy of the example app, on branch main."""

    path: Path

    def git(self, *args: str) -> str:
        """Run git in the repository and return its stdout."""
        return subprocess.run(
            ["git", "-C", str(self.path), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    def commit_config(self, message: str, **settings: str) -> str:
        """Rewrite app.conf with ``settings`` over the defaults, commit, return the commit id."""
        conf = self.path / "app.conf"
        lines = []
        for line in (EXAMPLE_APP / "app.conf").read_text().splitlines():
            key = line.split("=", 1)[0]
            lines.append(f"{key}={settings.pop(key)}" if key in settings else line)
        lines += [f"{k}={v}" for k, v in settings.items()]
        conf.write_text("\n".join(lines) + "\n")
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD")


@pytest.fixture()
def app_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AppRepo:
    """A fresh repository with the example app committed once on main."""
    path = tmp_path / "app"
    shutil.copytree(EXAMPLE_APP, path)
    env = {
        "GIT_AUTHOR_NAME": "Ada Author",
        "GIT_AUTHOR_EMAIL": "ada@example.com",
        "GIT_COMMITTER_NAME": "Ada Author",
        "GIT_COMMITTER_EMAIL": "ada@example.com",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    repo = AppRepo(path)
    repo.git("init", "-q", "-b", "main")
    repo.git("add", "-A")
    repo.git("commit", "-q", "-m", "hello v1")
    return repo


@pytest.fixture()
def app_name() -> str:
    """A unique app name on ports no other app of the session uses; the ``t-`` prefix marks
    what teardown removes."""
    return unique_app_name()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server (and database) for every flow test in the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def production_stack(docker_engine: DockerEngine,
                     registry: RunningRegistry) -> Iterator[SharedProduction]:
    """One production-like stack (PostgreSQL, Prefect server, Portcullis workers, the shipped
    deployments) for every module that drives one: see tests/support/shared_production.py."""
    from tests.support.shared_production import shared_production

    with shared_production(docker_engine, registry) as shared:
        yield shared


def without_canary(policy_text: str) -> str:
    """A policy file's text with its ``[canary]`` tables removed.

    Flow tests that run no router or Prometheus use this; a canary policy there is (rightly)
    refused with "no Prometheus is configured". tests/test_rollback.py and
    tests/test_canary_rollout.py exercise the real canary.
    """
    kept, skipping = [], False
    for line in policy_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            skipping = stripped.strip("[]").split(".")[0].strip() == "canary"
        if not skipping:
            kept.append(line)
    return "\n".join(kept) + "\n"


@dataclass(frozen=True)
class PipelineEnv:
    """What a promote flow run needs: credentials, keys, trivy DB, state, all for tests."""

    home: Path
    public_key_pem: str


@pytest.fixture()
def pipeline_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, build_creds: BuildCredentials,
    deploy_creds: DeployCredentials, registry: RunningRegistry,
) -> PipelineEnv:
    """Point the flow's PORTCULLIS_* settings at the test engine, registry and a fresh home."""
    from infra.demo_data import (
        ensure_promotion_keys,
        ensure_signing_keys,
        ensure_trivy_db,
        promotion_env,
        trusted_keys_env,
    )

    home = tmp_path / "home"
    policies = tmp_path / "policies-without-canary"
    policies.mkdir()
    for policy in (REPO_ROOT / "policies").glob("*.toml"):
        (policies / policy.name).write_text(without_canary(policy.read_text()))
    private_pem, password, public_pem = ensure_signing_keys(home)
    ensure_trivy_db(home / "trivy")
    env = {
        "PORTCULLIS_HOME": str(home),
        "PORTCULLIS_POLICY_DIR": str(policies),
        "PORTCULLIS_BUILD_REGISTRY": build_creds.registry,
        "PORTCULLIS_BUILD_REGISTRY_USERNAME": build_creds.registry_username,
        "PORTCULLIS_BUILD_REGISTRY_PASSWORD": build_creds.registry_password.get_secret_value(),
        "PORTCULLIS_BUILD_DOCKER_HOST": build_creds.docker_host or "",
        "PORTCULLIS_BUILD_SIGNING_MODE": "key",
        "PORTCULLIS_BUILD_COSIGN_PRIVATE_KEY": private_pem,
        "PORTCULLIS_BUILD_COSIGN_PASSWORD": password,
        "PORTCULLIS_DEPLOY_REGISTRY": deploy_creds.registry,
        "PORTCULLIS_DEPLOY_REGISTRY_USERNAME": deploy_creds.registry_username,
        "PORTCULLIS_DEPLOY_REGISTRY_PASSWORD": deploy_creds.registry_password.get_secret_value(),
        "PORTCULLIS_DEPLOY_DOCKER_HOST": deploy_creds.docker_host or "",
        "PORTCULLIS_DEPLOY_TRUSTED_PUBLIC_KEYS": trusted_keys_env(public_pem),
        "PORTCULLIS_DEPLOY_PROMOTER_USERNAME": "promoter",
        "PORTCULLIS_DEPLOY_PROMOTER_PASSWORD": registry.account("promoter").password,
        **promotion_env(ensure_promotion_keys(home)),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return PipelineEnv(home=home, public_key_pem=public_pem)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the modules that use ``production_stack`` last, one after the other.

    The stack (PostgreSQL, a Prefect server, three polling workers) then runs only while its
    users do and is taken down as the session ends, instead of idling beside the rest of the
    suite on a 2-core machine. The order within and among those modules is kept; each still
    passes alone and in any order.
    """
    users = {item.module for item in items
             if "production_stack" in getattr(item, "fixturenames", ())}
    items.sort(key=lambda item: getattr(item, "module", None) in users)  # stable


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skipped test is a test that did not run: the suite fails when any was skipped.

    Everything the tests need is installed by ``infra/bootstrap.sh --tests``; a skip means a
    missing install step that a green run would otherwise hide.
    """
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter is not None else 0
    if skipped and exitstatus == pytest.ExitCode.OK:
        print(f"\n{skipped} test(s) were skipped: failing the run (nothing may be skipped in CI)")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
