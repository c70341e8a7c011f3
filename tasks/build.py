"""Build an image from one commit with the Docker SDK, push it, return it pinned by digest."""

from __future__ import annotations

import io
import tarfile
from datetime import UTC, datetime
from typing import Any

import docker.errors
from prefect import task
from prefect.runtime import flow_run

from blocks.credentials import BuildCredentials
from portcullis.audit import AuditTrail
from portcullis.chain import built_before
from portcullis.errors import ConfigurationError, PolicyRefusal, TransientError
from portcullis.models import BuildResult, ImageRef, ReusedBuild, SourceRef
from portcullis.oci import DEFAULT_CHUNK_SIZE, MEDIA_OCI_MANIFEST, RegistryAuthError
from portcullis.reproducible import OciImage, epoch_timestamp, normalise_archive
from tasks.retry import only_transient
from tasks.source import archive_context, commit_epoch, resolve_source


def _build_log_tail(log: Any, lines: int = 15) -> str:
    out = []
    for chunk in log or []:
        if isinstance(chunk, dict):
            out.append(str(chunk.get("stream") or chunk.get("error") or "").rstrip())
    return "\n".join(x for x in out if x)[-2000:] or "(no build output)"


#: Labels that name the base image, so a change of base is visible in the image itself.
LABEL_BASE_NAME = "org.opencontainers.image.base.name"
#: The base's image id (its config digest): the base never goes through a registry here.
LABEL_BASE_ID = "dev.portcullis.base-image-id"


def dockerfile_base(context: bytes) -> str | None:
    """The image the build context's Dockerfile starts ``FROM`` (its last stage), or None
    for ``FROM scratch`` or a ``FROM`` this cannot resolve without the build (an ``ARG``)."""
    with tarfile.open(fileobj=io.BytesIO(context), mode="r:") as tar:
        member = tar.extractfile("Dockerfile")
        text = member.read().decode("utf-8", "replace") if member is not None else ""
    base = None
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].upper() == "FROM":
            flags = [w for w in words[1:] if not w.startswith("--")]
            base = flags[0] if flags else None
    if base is None or base == "scratch" or "$" in base:
        return None
    return base


def base_image_of(client: docker.DockerClient, context: bytes) -> str | None:
    """``name@<image id>`` of the base image in the build engine, or None (scratch).

    Raises:
        PolicyRefusal: the base image is not in the engine (nothing can be pulled here).
    """
    name = dockerfile_base(context)
    if name is None:
        return None
    try:
        return f"{name}@{client.images.get(name).id}"
    except docker.errors.ImageNotFound:
        raise PolicyRefusal(
            f"the base image {name} is not in the build engine",
            hint="make it first (`python -m infra.stack up` makes portcullis/busybox:base)",
        ) from None


def _engine(credentials: BuildCredentials) -> docker.DockerClient:
    try:
        client = credentials.docker_client()
        client.ping()
    except docker.errors.DockerException as exc:
        raise TransientError(
            f"build Docker engine {credentials.docker_host or '(DOCKER_HOST)'} does not answer: {exc}",
            hint="start the engine (`python -m infra.stack up`) or fix docker_host",
        ) from None
    return client


def build_identity(
    source_repo: str, commit: str, ref: str, context_path: str, credentials: BuildCredentials,
) -> tuple[SourceRef, str | None]:
    """What a build of ``commit`` would start from, without building: the pinned source and
    the base image (see :func:`base_image_of`). With the recipe, they fix the digest."""
    source = resolve_source(source_repo, commit, ref, context_path)
    context = archive_context(source_repo, source)
    client = _engine(credentials)
    try:
        return source, base_image_of(client, context)
    finally:
        client.close()


def _push_reproducible(image: OciImage, name: str, tag: str, creds: BuildCredentials) -> str:
    """Push the normalised image's blobs and manifest; the digest is the one computed here."""
    _, _, repository = name.partition("/")
    try:
        with creds.registry_client() as registry:
            for layer in image.layers:
                registry.upload_blob(repository, layer, chunk_size=DEFAULT_CHUNK_SIZE)
            registry.upload_blob(repository, image.config)
            return registry.put_manifest(repository, tag, image.manifest, MEDIA_OCI_MANIFEST)
    except RegistryAuthError as exc:
        raise ConfigurationError(
            f"registry {creds.registry} refused push credentials for "
            f"{creds.registry_username!r}: {exc}",
            hint="check the build credentials block (registry_username/password)",
        ) from None


def build_and_push(
    app: str,
    source_repo: str,
    commit: str,
    ref: str,
    context_path: str,
    credentials: BuildCredentials,
) -> BuildResult:
    """Build ``app`` from ``commit`` of ``source_repo`` reproducibly and push it.

    The classic builder's output is normalised (:mod:`portcullis.reproducible`) with the
    commit time as ``SOURCE_DATE_EPOCH``, so the same commit, base image and recipe give the
    same digest on any build worker, and the image is pushed by that digest.

    Args:
        app: application name; the image goes to ``<registry>/<prefix>/<app>``.
        source_repo: path of the git repository.
        commit: commit-ish to build; pinned to its full id first.
        ref: branch the commit must be on (recorded for provenance).
        context_path: directory with the Dockerfile inside the repository.
        credentials: the build side's credentials (push rights).

    Returns:
        A :class:`BuildResult` whose image is pinned by the digest the registry stored.
    """
    started = datetime.now(UTC)
    source = resolve_source(source_repo, commit, ref, context_path)
    context = archive_context(source_repo, source)
    epoch = commit_epoch(source_repo, source.commit)
    name = f"{credentials.registry}/{credentials.repository_prefix}/{app}"
    tag = f"git-{source.commit[:12]}"
    client = _engine(credentials)
    try:
        base = base_image_of(client, context)
        labels = {
            "org.opencontainers.image.revision": source.commit,
            "org.opencontainers.image.source": source.repo_url,
            # The commit's time, not the build's: a rebuild must not change the digest.
            "org.opencontainers.image.created": epoch_timestamp(epoch),
            "org.opencontainers.image.title": app,
            "dev.portcullis.ref": source.ref,
        }
        if base is not None:
            labels[LABEL_BASE_NAME], _, labels[LABEL_BASE_ID] = base.rpartition("@")
        try:
            built, _ = client.images.build(
                fileobj=io.BytesIO(context), custom_context=True, tag=f"{name}:{tag}",
                labels=labels, rm=True, forcerm=True, pull=False,
            )
            archive = b"".join(built.save(named=False))
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
        image = normalise_archive(archive, epoch)
        digest = _push_reproducible(image, name, tag, credentials)
    finally:
        client.close()
    registry, _, repository = name.partition("/")
    return BuildResult(
        app=app,
        image=ImageRef(registry=registry, repository=repository, digest=digest),
        source=source,
        base_image=base,
        flow_run_id=flow_run.get_id(),
        started_at=started,
        finished_at=datetime.now(UTC),
    )


def find_reusable_build(
    app: str, source_repo: str, commit: str, ref: str, context_path: str, log: AuditTrail,
    credentials: BuildCredentials,
) -> ReusedBuild | None:
    """A digest already built from ``commit`` on the current base image, or None.

    The audit trail's ``build.completed`` record (with completed evidence) names it; the
    registry must still hold it. Nothing is built: only the commit is pinned and the base
    image looked up in the build engine.
    """
    source, base = build_identity(source_repo, commit, ref, context_path, credentials)
    record = built_before(log, app, source.commit, base, source=source.repo_url,
                          context=source.context_path)
    if record is None or base is None:
        return None
    image = ImageRef.parse(str(record.details.get("image") or ""))
    if image.registry != credentials.registry:
        return None  # built for another registry: this one has to get its own
    with credentials.registry_client() as registry:
        if registry.head_manifest(image.repository, image.digest) is None:
            return None  # deleted from the registry since: build again
    return ReusedBuild(app=app, image=image, commit=source.commit, base_image=base,
                       record_seq=record.seq, built_at=record.at)


@task(name="build", retries=2, retry_delay_seconds=2, retry_condition_fn=only_transient)
def build_image(
    app: str,
    source_repo: str,
    commit: str,
    ref: str,
    context_path: str,
    credentials: BuildCredentials,
) -> BuildResult:
    """Prefect task: build and push with the build side's credentials.

    Args:
        app: application name.
        source_repo: git repository path.
        commit: commit-ish to build.
        ref: branch the commit must be on.
        context_path: Dockerfile directory within the repository.
        credentials: the build side's credentials, resolved once by the flow.

    Returns:
        The digest-pinned :class:`BuildResult`.
    """
    return build_and_push(app, source_repo, commit, ref, context_path, credentials)

