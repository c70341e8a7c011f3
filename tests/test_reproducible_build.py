"""Reproducible builds: one commit, one base, one recipe -> one digest, whenever it is built.

Unit tests take tar streams and configs apart by hand; the live tests build the example app
with the real engine and registry, remove every local trace between builds so no cache can
help, and compare digests.
"""

from __future__ import annotations

import io
import json
import secrets
import tarfile
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from blocks.credentials import BuildCredentials, DeployCredentials
from infra.base_image import BASE_IMAGE, ensure_base_image
from portcullis.audit import AuditEntry, AuditLog
from portcullis.chain import built_before, running_in
from portcullis.errors import PolicyRefusal
from portcullis.oci import digest_of
from portcullis.reproducible import epoch_timestamp, normalise_config, normalise_tar, oci_image
from tasks.build import LABEL_BASE_ID, LABEL_BASE_NAME, build_and_push, dockerfile_base
from tasks.deploy import deploy_image
from tests.conftest import AppRepo

EPOCH = 1_750_000_000


def _tar(entries: list[tuple[str, bytes | None, int]], *, pax_times: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mtime in entries:
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            if pax_times:
                info.pax_headers = {"atime": str(mtime + 0.5), "ctime": str(mtime + 0.25)}
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()


def test_layers_with_other_times_and_order_normalise_to_the_same_bytes() -> None:
    first = _tar([("etc", None, EPOCH + 10), ("etc/app.conf", b"x=1\n", EPOCH + 99),
                  ("bin/old", b"old", EPOCH - 1000)])
    second = _tar([("bin/old", b"old", EPOCH - 1000), ("etc/app.conf", b"x=1\n", EPOCH + 5),
                   ("etc", None, EPOCH + 77)], pax_times=True)
    assert first != second
    assert normalise_tar(first, EPOCH) == normalise_tar(second, EPOCH)
    members = _members(normalise_tar(second, EPOCH))
    assert [m.name for m in members] == ["bin/old", "etc", "etc/app.conf"]
    assert [m.mtime for m in members] == [EPOCH - 1000, EPOCH, EPOCH]  # clamped, older kept
    assert all(not ({"atime", "ctime", "mtime"} & set(m.pax_headers)) for m in members)


def test_other_content_normalises_to_other_bytes() -> None:
    a = normalise_tar(_tar([("etc/app.conf", b"x=1\n", EPOCH)]), EPOCH)
    b = normalise_tar(_tar([("etc/app.conf", b"x=2\n", EPOCH)]), EPOCH)
    assert digest_of(a) != digest_of(b)


def test_hard_links_follow_their_targets() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"payload"
        info = tarfile.TarInfo("z/target")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a/link")
        link.type, link.linkname = tarfile.LNKTYPE, "z/target"
        tar.addfile(link)
    names = [m.name for m in _members(normalise_tar(buf.getvalue(), EPOCH))]
    assert names == ["z/target", "a/link"]


def test_config_loses_build_time_and_builder_fields() -> None:
    config = {
        "architecture": "amd64", "os": "linux", "created": "2026-11-30T19:00:01.123Z",
        "container": "f00", "docker_version": "28.2.2",
        "container_config": {"Hostname": "f00"},
        "config": {"Hostname": "abc", "Image": "sha256:" + "1" * 64, "Env": ["PORT=8080"],
                   "Labels": {"a": "b"}},
        "history": [{"created": "2026-11-30T19:00:00Z", "created_by": "COPY x"},
                    {"created": "2026-11-30T19:00:01Z", "created_by": "ENV", "empty_layer": True}],
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "2" * 64]},
    }
    clean = normalise_config(config, ["sha256:" + "3" * 64], EPOCH)
    stamp = epoch_timestamp(EPOCH)
    assert clean["created"] == stamp and {h["created"] for h in clean["history"]} == {stamp}
    assert not {"container", "container_config", "docker_version"} & set(clean)
    assert clean["config"] == {"Env": ["PORT=8080"], "Labels": {"a": "b"}}
    assert clean["rootfs"]["diff_ids"] == ["sha256:" + "3" * 64]
    assert clean["history"][1]["empty_layer"] is True
    assert oci_image(clean, [b"l"]).digest == oci_image(dict(reversed(clean.items())), [b"l"]).digest
    with pytest.raises(PolicyRefusal, match="lists 1 layers but the archive holds 2"):
        normalise_config(config, ["sha256:" + "3" * 64] * 2, EPOCH)


def test_dockerfile_base_is_the_last_from() -> None:
    def context(text: str) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
        return buf.getvalue()

    assert dockerfile_base(context("FROM portcullis/busybox:base\nCOPY a /a\n")) == BASE_IMAGE
    assert dockerfile_base(context("from --platform=linux/amd64 a AS x\nFROM b:1\n")) == "b:1"
    assert dockerfile_base(context("FROM scratch\n")) is None
    assert dockerfile_base(context("ARG B\nFROM $B\n")) is None


def _record(log: AuditLog, event: str, environment: str, digest: str, commit: str = "a" * 40,
            **details: str) -> None:
    log.append(AuditEntry(event=event, actor="portcullis", run_id="r", app="hello",
                          environment=environment, digest=digest, commit=commit, details=details))


def test_audit_queries_for_reuse(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    d1, d2, d3 = "sha256:" + "1" * 64, "sha256:" + "2" * 64, "sha256:" + "3" * 64
    base9, base8 = "base@sha256:" + "9" * 64, "base@sha256:" + "8" * 64
    where = {"source": "file:///src/apps", "context": "hello"}

    def before(commit: str, base: str | None, source: str = "file:///src/apps",
               context: str = "hello") -> Any:
        return built_before(log, "hello", commit, base, source=source, context=context)

    _record(log, "build.completed", "dev", d1, base_image=base9, **where)
    assert before("a" * 40, base9) is None  # no evidence yet
    _record(log, "scan.verdict", "dev", d1)
    _record(log, "build.completed", "dev", d2, commit="b" * 40, base_image=base9, **where)
    _record(log, "scan.verdict", "dev", d2, commit="b" * 40)
    _record(log, "build.completed", "dev", d2)  # an old record without a base: never reused
    # Another directory of the same commit (e.g. another app's) built under this app's name.
    _record(log, "build.completed", "dev", d3, base_image=base9, source="file:///src/apps",
            context="greeter")
    _record(log, "scan.verdict", "dev", d3)
    assert before("a" * 40, base9).digest == d1
    assert before("a" * 40, base9, context="greeter").digest == d3
    assert before("a" * 40, base9, source="file:///elsewhere") is None
    assert before("a" * 40, base8) is None
    assert before("a" * 40, None) is None
    assert running_in(log, "hello", "dev") is None
    _record(log, "promotion.completed", "dev", d1)
    _record(log, "promotion.completed", "dev", d2)
    assert running_in(log, "hello", "dev").digest == d2  # type: ignore[union-attr]
    _record(log, "rollback.completed", "dev", d1)
    assert running_in(log, "hello", "dev").digest == d1  # type: ignore[union-attr]
    assert running_in(log, "hello", "staging") is None


# -- live: real engine and registry ----------------------------------------------------------


def _forget(client: docker.DockerClient, name: str) -> None:
    """Remove every local image of ``name`` and prune: the next build starts from nothing."""
    for image in client.images.list(name=name):
        client.images.remove(image.id, force=True)
    client.images.prune(filters={"dangling": True})


@pytest.mark.docker
def test_one_commit_built_twice_gives_one_digest_that_runs(
    app_repo: AppRepo, app_name: str, build_creds: BuildCredentials,
    deploy_creds: DeployCredentials, docker_client: docker.DockerClient,
) -> None:
    first = build_and_push(app_name, str(app_repo.path), "HEAD", "main", ".", build_creds)
    _forget(docker_client, first.image.name)
    second = build_and_push(app_name, str(app_repo.path), "HEAD", "main", ".", build_creds)
    assert second.image.digest == first.image.digest
    assert second.started_at > first.finished_at  # really built again, later

    deployment = deploy_image(second.image, app_name, "dev", second.source.commit, deploy_creds)
    assert "hello from portcullis" in httpx.get(deployment.url + "cgi-bin/hello", timeout=5).text
    labels = docker_client.images.get(str(second.image)).labels  # as the deploy pulled it
    base_id = docker_client.images.get(BASE_IMAGE).id
    assert labels[LABEL_BASE_NAME] == BASE_IMAGE and labels[LABEL_BASE_ID] == base_id
    assert second.base_image == f"{BASE_IMAGE}@{base_id}"
    commit_time = int(app_repo.git("show", "-s", "--format=%ct", "HEAD"))
    assert labels["org.opencontainers.image.created"] == epoch_timestamp(commit_time)

    app_repo.commit_config("v2", MESSAGE='"hello v2"')
    changed = build_and_push(app_name, str(app_repo.path), "HEAD", "main", ".", build_creds)
    assert changed.image.digest != first.image.digest


@pytest.mark.docker
def test_a_changed_base_image_gives_a_new_digest(
    app_repo: AppRepo, app_name: str, build_creds: BuildCredentials,
    docker_client: docker.DockerClient,
) -> None:
    base = f"t-base-{secrets.token_hex(3)}:1"
    dockerfile = app_repo.path / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace(BASE_IMAGE, base))
    app_repo.git("commit", "-qam", "own base")
    try:
        old_id = ensure_base_image(docker_client, tag=base)
        assert old_id == docker_client.images.get(BASE_IMAGE).id  # same content, same id
        on_old = build_and_push(app_name, str(app_repo.path), "HEAD", "main", ".", build_creds)
        docker_client.images.remove(base)
        new_id = ensure_base_image(docker_client, tag=base, extra_files={"etc/patched": b"1\n"})
        assert new_id != old_id
        on_new = build_and_push(app_name, str(app_repo.path), "HEAD", "main", ".", build_creds)
        assert on_new.image.digest != on_old.image.digest
        assert on_new.base_image == f"{base}@{new_id}" and on_old.base_image == f"{base}@{old_id}"
        with build_creds.registry_client() as registry:
            manifest = registry.get_manifest(on_new.image.repository, on_new.image.digest)
            config = json.loads(registry.get_blob(on_new.image.repository,
                                                  manifest.json()["config"]["digest"]))
        assert config["config"]["Labels"][LABEL_BASE_ID] == new_id
    finally:
        docker_client.images.remove(base, force=True)
