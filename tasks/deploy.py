"""Run an image by digest on an environment's Docker host, gated on its health check.

The new version starts in the free slot while the old one keeps serving. Only when the new
container reports healthy is the old one stopped; if it never does, the new container is
removed and the environment is exactly as it was.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime

import docker.errors
from docker.models.containers import Container
from prefect import task
from prefect.runtime import flow_run

from blocks.credentials import DeployCredentials
from portcullis.environments import Slot, port_plan
from portcullis.errors import ConfigurationError, PolicyRefusal, TransientError
from portcullis.models import Deployment, ImageRef
from tasks.retry import only_transient

LABEL_APP = "dev.portcullis.app"
LABEL_ENV = "dev.portcullis.environment"
LABEL_SLOT = "dev.portcullis.slot"
LABEL_DIGEST = "dev.portcullis.digest"
LABEL_PREVIOUS = "dev.portcullis.previous-digest"
LABEL_FLOW_RUN = "dev.portcullis.flow-run"
LABEL_DEPLOYED_AT = "dev.portcullis.deployed-at"
LABEL_APPROVED_BY = "dev.portcullis.approved-by"
LABEL_REVISION = "org.opencontainers.image.revision"


class DeployFailed(PolicyRefusal):
    """The new version did not become healthy; the previous version keeps serving."""


@dataclass(frozen=True)
class Live:
    """The container currently serving an app in an environment."""

    container: Container
    slot: Slot
    digest: str


def _containers(client: docker.DockerClient, app: str, env: str) -> list[Container]:
    return list(client.containers.list(
        all=True, filters={"label": [f"{LABEL_APP}={app}", f"{LABEL_ENV}={env}"]}
    ))


def find_live(client: docker.DockerClient, app: str, environment: str) -> Live | None:
    """The serving container: the oldest running one (a younger one is an unfinished deploy)."""
    running = [c for c in _containers(client, app, environment) if c.status == "running"]
    if not running:
        return None
    running.sort(key=lambda c: str(c.attrs["State"]["StartedAt"]))
    live = running[0]
    return Live(live, Slot(live.labels[LABEL_SLOT]), live.labels[LABEL_DIGEST])


def pull_image(client: docker.DockerClient, image: ImageRef, creds: DeployCredentials) -> None:
    try:
        pulled = client.images.pull(image.name, tag=image.digest, auth_config=creds.registry_auth())
    except docker.errors.NotFound:
        raise PolicyRefusal(f"{image} does not exist in the registry") from None
    except docker.errors.APIError as exc:
        text = str(exc.explanation or exc)
        if any(w in text.lower() for w in ("unauthorized", "authentication required", "denied")):
            raise ConfigurationError(
                f"registry {creds.registry} refused pull credentials for "
                f"{creds.registry_username!r}: {text}",
                hint="check the deploy credentials block",
            ) from None
        if "manifest unknown" in text.lower() or "not found" in text.lower():
            raise PolicyRefusal(f"{image} does not exist in the registry: {text}") from None
        raise TransientError(f"pull of {image} failed: {text}") from None
    if not any(d.endswith(image.digest) for d in pulled.attrs.get("RepoDigests", [])):
        raise PolicyRefusal(f"the engine pulled {pulled.id} which is not {image.digest}")
    if not (pulled.attrs.get("Config") or {}).get("Healthcheck"):
        raise PolicyRefusal(
            f"{image} has no HEALTHCHECK, so a deploy cannot tell whether it works",
            hint="add a HEALTHCHECK to the Dockerfile",
        )


def _wait_healthy(container: Container, timeout: float) -> str | None:
    """None when healthy; otherwise why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        state = container.attrs["State"]
        if state["Status"] in ("exited", "dead"):
            return f"container exited with code {state.get('ExitCode')}"
        health = (state.get("Health") or {}).get("Status")
        if health == "healthy":
            return None
        if health == "unhealthy":
            log = (state.get("Health") or {}).get("Log") or []
            last = log[-1].get("Output", "").strip() if log else ""
            return f"health check failed{': ' + last if last else ''}"
        time.sleep(0.3)
    return f"not healthy after {timeout:.0f}s"


def start_candidate(
    client: docker.DockerClient,
    image: ImageRef,
    app: str,
    environment: str,
    slot: Slot,
    *,
    commit: str,
    previous_digest: str | None,
    approved_by: tuple[str, ...] = (),
    health_timeout: float = 60.0,
) -> Container:
    """Start ``image`` in ``slot`` and wait until it is healthy.

    On any failure the candidate is removed before the error is raised, so nothing
    half-started is left behind.
    """
    plan = port_plan(app, environment)
    name = f"portcullis-{app}-{environment}-{slot.value}"
    try:
        stale = client.containers.get(name)
    except docker.errors.NotFound:
        stale = None
    if stale is not None:
        # Left by an interrupted deploy; it never served, because the live slot is the other one.
        stale.remove(force=True)
    labels = {
        LABEL_APP: app,
        LABEL_ENV: environment,
        LABEL_SLOT: slot.value,
        LABEL_DIGEST: image.digest,
        LABEL_PREVIOUS: previous_digest or "",
        LABEL_FLOW_RUN: str(flow_run.get_id() or ""),
        LABEL_DEPLOYED_AT: datetime.now(UTC).isoformat(),
        LABEL_APPROVED_BY: ",".join(approved_by),
        LABEL_REVISION: commit,
    }
    container = client.containers.create(
        str(image), name=name, detach=True, network_mode="host", labels=labels,
        environment={"PORT": str(plan.slot_port(slot))},
        restart_policy={"Name": "unless-stopped"},
        # An init as PID 1 forwards SIGTERM, so retiring the old version is a graceful stop,
        # not a 10 s wait for SIGKILL (busybox httpd as PID 1 ignores SIGTERM).
        init=True,
    )
    try:
        container.start()
        problem = _wait_healthy(container, health_timeout)
        if problem is not None:
            logs = container.logs(tail=20).decode(errors="replace").strip()
            raise DeployFailed(
                f"{app} {image.digest[:19]} in {environment} did not become healthy: {problem}"
                + (f"\ncontainer log tail:\n{logs}" if logs else ""),
                hint="the previous version keeps serving; fix the image and promote again",
            )
    except BaseException:
        container.remove(force=True)
        raise
    return container


def start_in_free_slot(
    client: docker.DockerClient, image: ImageRef, app: str, environment: str, commit: str,
    creds: DeployCredentials, approved_by: tuple[str, ...], health_timeout: float,
) -> tuple[Live | None, Container, int]:
    """Pull exactly the digest and start it, healthy, in the slot the serving version is not in.

    Returns:
        The version serving until now (None on a first deploy), the new container, and the
        port it listens on.
    """
    pull_image(client, image, creds)
    live = find_live(client, app, environment)
    slot = live.slot.other() if live else Slot.BLUE
    candidate = start_candidate(client, image, app, environment, slot, commit=commit,
                                previous_digest=live.digest if live else None,
                                approved_by=approved_by, health_timeout=health_timeout)
    return live, candidate, port_plan(app, environment).slot_port(slot)


def retire_others(client: docker.DockerClient, app: str, environment: str, *, keep: str) -> None:
    """Stop and remove every container of the app in the environment except ``keep``."""
    for old in _containers(client, app, environment):
        if old.id != keep:
            old.stop(timeout=10)
            old.remove(force=True)


def deploy_image(
    image: ImageRef,
    app: str,
    environment: str,
    commit: str,
    credentials: DeployCredentials,
    *,
    approved_by: tuple[str, ...] = (),
    health_timeout: float = 60.0,
) -> Deployment:
    """Replace the running version of ``app`` in ``environment`` with ``image``.

    Args:
        image: the digest-pinned image to run.
        app: application name.
        environment: environment name (dev, staging, prod).
        commit: the commit the image was built from (recorded on the container).
        credentials: the deploy side's credentials (pull rights, the environment's host).
        approved_by: who approved the promotion, recorded on the container.
        health_timeout: seconds the new version has to become healthy.

    Returns:
        The :class:`Deployment`, whose ``previous_digest`` is the rollback target.
    """
    try:
        client = credentials.docker_client()
        client.ping()
    except docker.errors.DockerException as exc:
        raise TransientError(
            f"Docker host {credentials.docker_host or '(DOCKER_HOST)'} of {environment} "
            f"does not answer: {exc}",
            hint="check the deploy credentials' docker_host and that the engine runs",
        ) from None
    try:
        live, container, port = start_in_free_slot(
            client, image, app, environment, commit, credentials, approved_by, health_timeout)
        retire_others(client, app, environment, keep=str(container.id))
        return Deployment(
            app=app, environment=environment, image=image, container_id=str(container.id),
            container_name=str(container.name), url=f"http://{credentials.public_host}:{port}/",
            previous_digest=live.digest if live else None, commit=commit,
            deployed_at=datetime.now(UTC),
        )
    finally:
        client.close()


@task(name="deploy", retries=1, retry_delay_seconds=3, retry_condition_fn=only_transient)
def deploy(
    image: ImageRef,
    app: str,
    environment: str,
    commit: str,
    credentials: DeployCredentials,
    approved_by: tuple[str, ...] = (),
) -> Deployment:
    """Prefect task: deploy by digest with the deploy side's credentials.

    Args:
        image: digest-pinned image.
        app: application name.
        environment: target environment.
        commit: source commit of the image.
        credentials: the deploy side's credentials, resolved once by the flow.
        approved_by: approvers to record on the container.

    Returns:
        The resulting :class:`Deployment`.
    """
    return deploy_image(image, app, environment, commit, credentials, approved_by=approved_by)
