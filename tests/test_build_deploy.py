"""Build and deploy against a real Docker engine and a real registry.

Given the example app in a git repository, when it is built and deployed, then it answers on
its port by digest; bad input of every kind stops with a clear error and leaves the running
version untouched.
"""

from __future__ import annotations

import docker
import httpx
import pytest
from pydantic import SecretStr

from blocks.credentials import BuildCredentials, DeployCredentials
from portcullis.errors import ConfigurationError, PolicyRefusal, TransientError
from portcullis.models import BuildResult, ImageRef
from tasks.build import build_and_push
from tasks.deploy import (
    LABEL_APP,
    LABEL_DEPLOYED_AT,
    LABEL_FLOW_RUN,
    LABEL_PREVIOUS,
    LABEL_REVISION,
    DeployFailed,
    deploy_image,
)
from tests.conftest import AppRepo

pytestmark = pytest.mark.docker


def _build(repo: AppRepo, app: str, creds: BuildCredentials, commit: str = "HEAD") -> BuildResult:
    return build_and_push(app, str(repo.path), commit, "main", ".", creds)


def _containers(client: docker.DockerClient, app: str) -> list:  # type: ignore[type-arg]
    return client.containers.list(all=True, filters={"label": f"{LABEL_APP}={app}"})


def test_build_deploy_replace_and_keep_rollback_target(
    app_repo: AppRepo,
    app_name: str,
    build_creds: BuildCredentials,
    deploy_creds: DeployCredentials,
    docker_client: docker.DockerClient,
) -> None:
    v1 = _build(app_repo, app_name, build_creds)
    assert v1.image.registry == build_creds.registry

    d1 = deploy_image(v1.image, app_name, "dev", v1.source.commit, deploy_creds)
    image = docker_client.images.get(f"{v1.image.name}@{v1.image.digest}")  # as pulled
    labels = image.labels
    assert labels["org.opencontainers.image.revision"] == v1.source.commit
    assert labels["org.opencontainers.image.source"]
    assert labels["org.opencontainers.image.created"]
    assert d1.previous_digest is None
    assert "hello from portcullis" in httpx.get(d1.url + "cgi-bin/hello", timeout=5).text

    app_repo.commit_config("v2", MESSAGE='"hello v2"')
    v2 = _build(app_repo, app_name, build_creds)
    d2 = deploy_image(v2.image, app_name, "dev", v2.source.commit, deploy_creds)
    assert d2.previous_digest == v1.image.digest
    assert d2.url != d1.url  # the other slot
    assert "hello v2" in httpx.get(d2.url + "cgi-bin/hello", timeout=5).text
    live = _containers(docker_client, app_name)
    assert len(live) == 1  # the old version was retired
    c = live[0]
    assert c.attrs["Config"]["Image"] == str(v2.image)  # run by digest, never by tag
    assert c.labels[LABEL_PREVIOUS] == v1.image.digest
    assert c.labels[LABEL_REVISION] == v2.source.commit
    assert c.labels[LABEL_DEPLOYED_AT] and LABEL_FLOW_RUN in c.labels
    with pytest.raises(httpx.ConnectError):
        httpx.get(d1.url, timeout=2)


def test_unhealthy_version_fails_and_previous_keeps_serving(
    app_repo: AppRepo,
    app_name: str,
    build_creds: BuildCredentials,
    deploy_creds: DeployCredentials,
    docker_client: docker.DockerClient,
) -> None:
    good = _build(app_repo, app_name, build_creds)
    running = deploy_image(good.image, app_name, "dev", good.source.commit, deploy_creds)
    app_repo.commit_config("broken", HEALTHY="no")
    bad = _build(app_repo, app_name, build_creds)
    with pytest.raises(DeployFailed, match="did not become healthy: health check failed"):
        deploy_image(bad.image, app_name, "dev", bad.source.commit, deploy_creds, health_timeout=20)
    containers = _containers(docker_client, app_name)
    assert [c.id for c in containers] == [running.container_id]  # nothing half-started left
    assert httpx.get(running.url + "cgi-bin/hello", timeout=5).status_code == 200


def test_build_failure_is_refused_with_the_build_log(
    app_repo: AppRepo, app_name: str, build_creds: BuildCredentials
) -> None:
    dockerfile = app_repo.path / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + 'RUN sh -c "echo compiling; exit 7"\n')
    app_repo.git("commit", "-qam", "break the build")
    with pytest.raises(PolicyRefusal, match="build of .* failed") as err:
        _build(app_repo, app_name, build_creds)
    assert "compiling" in str(err.value)


def test_wrong_build_credential_is_refused(
    app_repo: AppRepo, app_name: str, build_creds: BuildCredentials
) -> None:
    wrong = build_creds.model_copy(update={"registry_password": SecretStr("not-the-password")})
    with pytest.raises(ConfigurationError, match="refused push credentials for 'builder'"):
        _build(app_repo, app_name, wrong)


def test_wrong_deploy_credential_is_refused_and_nothing_changes(
    app_repo: AppRepo,
    app_name: str,
    build_creds: BuildCredentials,
    deploy_creds: DeployCredentials,
    docker_client: docker.DockerClient,
) -> None:
    built = _build(app_repo, app_name, build_creds)
    # The image is already in the engine from the build; the deploy must still ask the
    # registry, with its own credentials, for exactly this digest.
    wrong = deploy_creds.model_copy(update={"registry_password": SecretStr("nope")})
    with pytest.raises(ConfigurationError, match="refused pull credentials for 'deployer'"):
        deploy_image(built.image, app_name, "dev", built.source.commit, wrong)
    assert _containers(docker_client, app_name) == []


def test_digest_missing_from_registry_is_refused(
    app_name: str, deploy_creds: DeployCredentials, docker_client: docker.DockerClient
) -> None:
    ghost = ImageRef(
        registry=deploy_creds.registry,
        repository=f"portcullis/{app_name}",
        digest="sha256:" + "0" * 64,
    )
    with pytest.raises(PolicyRefusal, match="does not exist in the registry"):
        deploy_image(ghost, app_name, "dev", "a" * 40, deploy_creds)
    assert _containers(docker_client, app_name) == []


def test_unreachable_docker_host_is_reported(
    app_name: str,
    deploy_creds: DeployCredentials,
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    gone = deploy_creds.model_copy(update={"docker_host": f"unix://{tmp_path}/no.sock"})
    image = ImageRef(registry=deploy_creds.registry, repository="x", digest="sha256:" + "1" * 64)
    with pytest.raises(TransientError, match="does not answer"):
        deploy_image(image, app_name, "dev", "a" * 40, gone)
