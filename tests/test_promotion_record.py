"""Signed promotion records through a real registry in token mode.

Given a digest whose staging deploy side signed a promotion record, the record verifies with
staging's trust root only; one changed byte, a record about another digest, for another
environment, for another app, or signed with the build key is refused. The layout is cosign's
(``COSIGN_REPOSITORY`` + ``.att`` tag + DSSE) so ``cosign verify-attestation --key`` accepts it.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr

from blocks.credentials import DeployCredentials
from infra.registry import RunningRegistry
from portcullis.attestations import statement
from portcullis.audit import AuditEntry, AuditLog
from portcullis.canonical import canonical_json
from portcullis.chain import passed_in
from portcullis.errors import ConfigurationError, PolicyRefusal, VerificationFailed
from portcullis.models import ImageRef
from portcullis.oci import MEDIA_OCI_MANIFEST, RegistryClient
from portcullis.promotion_record import (
    PROMOTION_V1,
    ApprovalEntry,
    EvidenceEntry,
    PromotionPredicate,
    record_repository,
    sign_promotion,
    verify_promotion,
)
from portcullis.signing.cosign_format import (
    DSSE_MEDIA_TYPE,
    INTOTO_PAYLOAD_TYPE,
    attest,
    attestation_tag,
    dsse_pae,
    encrypt_private_key,
    generate_key_pair,
    public_key_pem,
)
from tasks.promotion import run_facts, run_records
from tests.support.registry_fixture import copy_manifest, push_tiny_image

pytestmark = pytest.mark.docker

STAGING_KEY = generate_key_pair()
DEV_KEY = generate_key_pair()
BUILD_KEY = generate_key_pair()
_count = iter(range(10**6))


def _client(registry: RunningRegistry, user: str) -> RegistryClient:
    acct = registry.account(user)
    return RegistryClient(registry.address, username=acct.username, password=acct.password)


def _image(registry: RunningRegistry, content: bytes = b"app") -> ImageRef:
    with _client(registry, "builder") as builder:
        return push_tiny_image(builder, f"portcullis/rec-{next(_count)}", "v1", content)


def _predicate(image: ImageRef, environment: str = "staging", **kw: Any) -> PromotionPredicate:
    fields: dict[str, Any] = {
        "kind": "promotion", "app": "hello", "environment": environment, "image": str(image),
        "digest": image.digest, "commit": "a" * 40, "policy_sha256": "b" * 64,
        "evidence": (EvidenceEntry(check="signature", detail="signed by key:1234",
                                   signer="key:1234"),),
        "approvals": (ApprovalEntry(approver="carol", at=datetime.now(UTC),
                                    verified_by="TOTP"),),
        "run_id": "run-1", "completed_at": datetime.now(UTC),
    }
    return PromotionPredicate(**(fields | kw))


def _sign(registry: RunningRegistry, image: ImageRef, predicate: PromotionPredicate,
          key: ec.EllipticCurvePrivateKey = STAGING_KEY) -> None:
    with _client(registry, "promoter") as promoter:
        sign_promotion(promoter, image, predicate, key)


def _verify(registry: RunningRegistry, image: ImageRef, environment: str = "staging",
            keys: tuple[ec.EllipticCurvePrivateKey, ...] = (STAGING_KEY,), app: str = "hello") -> Any:
    with _client(registry, "deployer") as deployer:
        return verify_promotion(deployer, image, environment, [k.public_key() for k in keys],
                                app=app)


def test_a_record_verifies_in_cosign_layout(registry: RunningRegistry) -> None:
    image = _image(registry)
    predicate = _predicate(image)
    _sign(registry, image, predicate)

    found = _verify(registry, image)
    assert found.predicate == predicate
    text = found.describe()
    assert "approved by carol" in text and "evidence signature: signed by key:1234" in text

    # The exact layout cosign verify-attestation --key reads with
    # COSIGN_REPOSITORY=<registry>/promotions/staging/<repo>, checked without our verifier.
    repo = record_repository(image, "staging")
    assert repo == f"promotions/staging/{image.repository}"
    with _client(registry, "deployer") as deployer:
        manifest = deployer.get_manifest(repo, attestation_tag(image.digest))
        [layer] = manifest.layers()
        envelope = json.loads(deployer.get_blob(repo, layer.digest))
    assert manifest.media_type == MEDIA_OCI_MANIFEST and layer.media_type == DSSE_MEDIA_TYPE
    assert layer.annotations == {"dev.cosignproject.cosign/signature": "",
                                 "predicateType": PROMOTION_V1}
    assert envelope["payloadType"] == INTOTO_PAYLOAD_TYPE
    payload = base64.b64decode(envelope["payload"])
    [sig] = envelope["signatures"]
    STAGING_KEY.public_key().verify(base64.b64decode(sig["sig"]),
                                    dsse_pae(INTOTO_PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))
    st = json.loads(payload)
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["subject"] == [{"name": image.name,
                              "digest": {"sha256": image.digest.removeprefix("sha256:")}}]
    assert st["predicateType"] == PROMOTION_V1
    assert st["predicate"]["environment"] == "staging" and st["predicate"]["digest"] == image.digest


def test_one_changed_byte_is_refused(registry: RunningRegistry) -> None:
    image = _image(registry)
    _sign(registry, image, _predicate(image))
    repo, tag = record_repository(image, "staging"), attestation_tag(image.digest)
    with _client(registry, "promoter") as promoter:
        manifest = promoter.get_manifest(repo, tag).json()
        layer = manifest["layers"][0]
        envelope = json.loads(promoter.get_blob(repo, layer["digest"]))
        payload = bytearray(base64.b64decode(envelope["payload"]))
        at = payload.index(b'"run-1"') + 5
        payload[at] ^= 0x01  # "run-1" -> "run-0": one byte
        envelope["payload"] = base64.b64encode(bytes(payload)).decode()
        forged = json.dumps(envelope).encode()
        layer["digest"] = promoter.upload_blob(repo, forged)
        layer["size"] = len(forged)
        promoter.put_manifest(repo, tag, canonical_json(manifest), MEDIA_OCI_MANIFEST)

    with pytest.raises(VerificationFailed, match="no signature from a trusted key"):
        _verify(registry, image)


def test_a_record_about_another_digest_is_refused(registry: RunningRegistry) -> None:
    passed = _image(registry, b"passed")
    with _client(registry, "builder") as builder:
        other = push_tiny_image(builder, passed.repository, "v2", b"never promoted")
    _sign(registry, passed, _predicate(passed))
    repo = record_repository(passed, "staging")
    with _client(registry, "promoter") as promoter:
        # A genuine record, moved onto the other digest's tag.
        copy_manifest(promoter, repo, attestation_tag(passed.digest), attestation_tag(other.digest))
    with pytest.raises(VerificationFailed, match=f"is about {passed.digest}, not this image"):
        _verify(registry, other)

    with _client(registry, "promoter") as promoter:
        # A genuinely signed statement about `other` whose signed predicate names `passed`.
        attest(promoter, other, statement(other, PROMOTION_V1,
                                          _predicate(passed).model_dump(mode="json")),
               STAGING_KEY, repository=repo)
    with pytest.raises(VerificationFailed, match=f"record sha256:[0-9a-f]+ is about {passed.digest}"):
        _verify(registry, other)


def _copy_record(client: RegistryClient, image: ImageRef, source: str, target: str) -> None:
    """Copy ``source`` environment's record manifest and blobs to ``target``'s repository."""
    src, dst, tag = record_repository(image, source), record_repository(image, target), \
        attestation_tag(image.digest)
    manifest = client.get_manifest(src, tag)
    for digest in [manifest.json()["config"]["digest"], *[x.digest for x in manifest.layers()]]:
        client.upload_blob(dst, client.get_blob(src, digest))
    client.put_manifest(dst, tag, manifest.raw, manifest.media_type)


def test_a_record_for_another_environment_or_app_is_refused(registry: RunningRegistry) -> None:
    image = _image(registry)
    _sign(registry, image, _predicate(image, "dev"), DEV_KEY)
    with _client(registry, "promoter") as promoter:
        _copy_record(promoter, image, "dev", "staging")  # dev's genuine record, as staging's

    with pytest.raises(VerificationFailed, match="no signature from a trusted key"):
        _verify(registry, image)  # dev's key is not in staging's trust root
    with pytest.raises(VerificationFailed, match="is for dev"):
        # Even a deploy side that (wrongly) shared one key across environments is refused.
        _verify(registry, image, keys=(STAGING_KEY, DEV_KEY))
    assert _verify(registry, image, "dev", keys=(DEV_KEY,)).predicate.environment == "dev"

    _sign(registry, image, _predicate(image, app="billing"))
    with pytest.raises(VerificationFailed, match="is for app billing"):
        _verify(registry, image)


def test_a_record_signed_with_the_build_key_is_refused(registry: RunningRegistry) -> None:
    image = _image(registry)
    _sign(registry, image, _predicate(image), BUILD_KEY)

    with pytest.raises(VerificationFailed, match="no signature from a trusted key"):
        _verify(registry, image)
    with _client(registry, "deployer") as deployer, \
            pytest.raises(PolicyRefusal, match=f"{image.digest} never passed staging"):
        passed_in(deployer, image, "staging", [STAGING_KEY.public_key()], "hello")

    # Configuration that would let the build key vouch for promotions is refused outright.
    creds = DeployCredentials(
        registry=registry.address, registry_username="deployer", registry_password=SecretStr("x"),
        trusted_public_keys=[public_key_pem(BUILD_KEY).decode()],
        promotion_trust_roots={"staging": [public_key_pem(BUILD_KEY).decode()]},
        promotion_signing_keys={"staging": SecretStr(encrypt_private_key(BUILD_KEY, "pw").decode())},
        promotion_key_passwords={"staging": SecretStr("pw")},
    )
    with pytest.raises(ConfigurationError, match="holds a build signing key"):
        creds.promotion_trust_root("staging")
    with pytest.raises(ConfigurationError, match="is a build signing key"):
        creds.promotion_signing_key("staging")
    with pytest.raises(ConfigurationError, match="no promotion trust root for prod"):
        creds.promotion_trust_root("prod")


def test_the_newest_matching_record_wins_and_rollbacks_do_not_count_as_a_pass(
    registry: RunningRegistry,
) -> None:
    image = _image(registry)
    now = datetime.now(UTC)
    _sign(registry, image, _predicate(image, run_id="old", completed_at=now - timedelta(days=1)))
    _sign(registry, image, _predicate(image, run_id="new", completed_at=now))
    assert _verify(registry, image).predicate.run_id == "new"

    rolled = _image(registry, b"rolled back to")
    _sign(registry, rolled, _predicate(rolled, kind="rollback", reason="5xx",
                                       rolled_back_from="sha256:" + "c" * 64))
    with pytest.raises(VerificationFailed, match="records a rollback"):
        _verify(registry, rolled)
    with _client(registry, "deployer") as deployer:
        found = verify_promotion(deployer, rolled, "staging", [STAGING_KEY.public_key()],
                                 kinds=("promotion", "rollback"))
    assert "rolled back from sha256:cccc" in found.describe()


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_run_records_reads_back_to_the_runs_start_across_chunks(tmp_path: Any, chunk: int) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    for run in ("a", "b", "a"):  # run "a" ran before: only its second start counts
        log.append(AuditEntry(event="promotion.started", actor="p", run_id=run))
        log.append(AuditEntry(event="gate.passed", actor="p", run_id=run, details={"x": "é" * 9}))
        log.append(AuditEntry(event="gate.passed", actor="p", run_id="other"))
    log.append(AuditEntry(event="approval.accepted", actor="alice", run_id="a",
                          details={"totp_step": 5}))

    records = run_records(log, "a", chunk=chunk)
    assert [r.seq for r in records] == [6, 7, 9]
    approvals, _, started = run_facts(records, ("alice",))
    assert started == records[0].at and approvals[0].at == records[-1].at
    assert "time step 5" in approvals[0].verified_by
