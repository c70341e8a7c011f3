"""Build an image from one commit with the Docker SDK, push it, return it pinned by digest."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from typing import Any

import docker.errors
from prefect import task
from prefect.runtime import flow_run

from blocks.credentials import BuildCredentials
from portcullis.errors import ConfigurationError, PolicyRefusal, TransientError
from portcullis.models import BuildResult, ImageRef
from tasks.retry import only_transient
from tasks.source import archive_context, resolve_source


def _build_log_tail(log: Any, lines: int = 15) -> str:
    out = []
    for chunk in log or []:
        if isinstance(chunk, dict):
            out.append(str(chunk.get("stream") or chunk.get("error") or "").rstrip())
    return "\n".join(x for x in out if x)[-2000:] or "(no build output)"


def _push(client: docker.DockerClient, name: str, tag: str, creds: BuildCredentials) -> str:
    """Push ``name:tag`` and return the manifest digest the registry answered with."""
    digest = None
    try:
        stream = client.images.push(name, tag=tag, auth_config=creds.registry_auth(),
                                    stream=True, decode=True)
        for line in stream:
            if "error" in line:
                err = str(line.get("error"))
                if any(w in err.lower() for w in ("unauthorized", "authentication", "denied")):
                    raise ConfigurationError(
                        f"registry {creds.registry} refused push credentials for "
                        f"{creds.registry_username!r}: {err}",
                        hint="check the build credentials block (registry_username/password)",
                    )
                raise TransientError(f"push of {name}:{tag} to {creds.registry} failed: {err}")
            aux = line.get("aux")
            if isinstance(aux, dict) and aux.get("Digest"):
                digest = str(aux["Digest"])
    except docker.errors.APIError as exc:
        raise TransientError(f"push of {name}:{tag} failed: {exc.explanation or exc}") from None
    if digest is None:
        raise TransientError(f"registry {creds.registry} returned no digest for {name}:{tag}")
    return digest


def build_and_push(
    app: str,
    source_repo: str,
    commit: str,
    ref: str,
    context_path: str,
    credentials: BuildCredentials,
) -> BuildResult:
    """Build ``app`` from ``commit`` of ``source_repo`` and push it with build credentials.

    Args:
        app: application name; the image goes to ``<registry>/<prefix>/<app>``.
        source_repo: path of the git repository.
        commit: commit-ish to build; pinned to its full id first.
        ref: branch the commit must be on (recorded for provenance).
        context_path: directory with the Dockerfile inside the repository.
        credentials: the build side's credentials (push rights).

    Returns:
        A :class:`BuildResult` whose image is pinned by the digest the registry returned.
    """
    started = datetime.now(UTC)
    source = resolve_source(source_repo, commit, ref, context_path)
    context = archive_context(source_repo, source)
    name = f"{credentials.registry}/{credentials.repository_prefix}/{app}"
    tag = f"git-{source.commit[:12]}"
    labels = {
        "org.opencontainers.image.revision": source.commit,
        "org.opencontainers.image.source": source.repo_url,
        "org.opencontainers.image.created": started.isoformat(),
        "org.opencontainers.image.title": app,
        "dev.portcullis.ref": source.ref,
    }
    try:
        client = credentials.docker_client()
        client.ping()
    except docker.errors.DockerException as exc:
        raise TransientError(
            f"build Docker engine {credentials.docker_host or '(DOCKER_HOST)'} does not answer: {exc}",
            hint="start the engine (`python -m infra.stack up`) or fix docker_host",
        ) from None
    try:
        try:
            client.images.build(
                fileobj=io.BytesIO(context), custom_context=True, tag=f"{name}:{tag}",
                labels=labels, rm=True, forcerm=True, pull=False,
            )
        except docker.errors.BuildError as exc:
            raise PolicyRefusal(
                f"build of {app} at {source.commit[:12]} failed: {exc.msg}\n"
                f"{_build_log_tail(exc.build_log)}"
            ) from None
        except docker.errors.APIError as exc:
            raise PolicyRefusal(
                f"build of {app} at {source.commit[:12]} was refused by the engine: "
                f"{exc.explanation or exc}"
            ) from None
        digest = _push(client, name, tag, credentials)
    finally:
        client.close()
    registry, _, repository = name.partition("/")
    return BuildResult(
        app=app,
        image=ImageRef(registry=registry, repository=repository, digest=digest),
        source=source,
        flow_run_id=flow_run.get_id(),
        started_at=started,
        finished_at=datetime.now(UTC),
    )


@task(name="build", retries=2, retry_delay_seconds=2, retry_condition_fn=only_transient)
def build_image(
    app: str,
    source_repo: str,
    commit: str,
    ref: str,
    context_path: str,
    credentials_block: str | None = None,
) -> BuildResult:
    """Prefect task: build and push; loads the build credentials only.

    Args:
        app: application name.
        source_repo: git repository path.
        commit: commit-ish to build.
        ref: branch the commit must be on.
        context_path: Dockerfile directory within the repository.
        credentials_block: saved :class:`BuildCredentials` name; None reads the environment.

    Returns:
        The digest-pinned :class:`BuildResult`.
    """
    creds = BuildCredentials.resolve(credentials_block)
    return build_and_push(app, source_repo, commit, ref, context_path, creds)

