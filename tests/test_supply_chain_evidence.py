"""Deploy-side verification of the evidence attached to a digest, through a real registry.

Given an image signed and attested by the build side, when the deploy side verifies it, then
every check passes; and each attack of the supply-chain adversary is refused with a message
naming the check, the digest and the reason.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from portcullis.attestations import CYCLONEDX_BOM, SLSA_PROVENANCE_V1, slsa_provenance
from portcullis.errors import VerificationFailed
from portcullis.evidence import (
    CONTENT_ANNOTATION,
    CREATED_ANNOTATION,
    PREDICATE_TYPE_ANNOTATION,
    SIGN_PREDICATE_TYPE,
    KeylessEvidenceSigner,
    KeylessEvidenceVerifier,
    KeyPairSigner,
    KeyPairVerifier,
)
from portcullis.models import BuildResult, ImageRef, SourceRef
from portcullis.oci import RegistryClient
from portcullis.signing.cosign_format import attestation_tag, generate_key_pair
from portcullis.signing.keyless import (
    BUNDLE_MEDIA_TYPE,
    KeylessSigner,
    KeylessVerifier,
    SignerIdentity,
)
from portcullis.verification import AllOf, ProvenanceCheck, SignatureCheck, sbom_check
from tests.support.registry_fixture import (  # noqa: F401 - fixtures register by name
    oci_registry_fixture,
    push_tiny_image,
    registry_client_fixture,
    repo_fixture,
)
from tests.support.sigstore_instance import SigstoreInstance, running_sigstore

pytestmark = pytest.mark.docker

SOURCE = "https://git.example.com/shop/hello.git"
SBOM = {"bomFormat": "CycloneDX", "specVersion": "1.6", "components": []}


def _build(image: ImageRef, ref: str = "main") -> BuildResult:
    now = datetime.now(UTC)
    return BuildResult(
        app="hello", image=image,
        source=SourceRef(repo_url=SOURCE, commit="c" * 40, ref=ref, author="Ada <ada@example.com>"),
        flow_run_id="run-1", started_at=now, finished_at=now,
    )


def _prod_policy() -> AllOf:
    return AllOf([SignatureCheck(), ProvenanceCheck((SOURCE,), ("main",)), sbom_check()])


def _sign_everything(signer: KeyPairSigner | KeylessEvidenceSigner, image: ImageRef, ref: str = "main") -> None:
    signer.sign_image(image)
    signer.attest(image, SLSA_PROVENANCE_V1, slsa_provenance(_build(image, ref)))
    signer.attest(image, CYCLONEDX_BOM, SBOM)


# ---- key pair ------------------------------------------------------------------------------


def test_fully_attested_image_passes(registry_client: RegistryClient, repo: str) -> None:
    key = generate_key_pair()
    image = push_tiny_image(registry_client, repo, "v1")
    _sign_everything(KeyPairSigner(registry_client, key), image)
    results = _prod_policy().verify(image, KeyPairVerifier(registry_client, [key.public_key()]))
    assert [r.check for r in results] == ["signature", "provenance", "sbom"]
    assert "main" in results[1].detail


def test_unsigned_image_is_refused(registry_client: RegistryClient, repo: str) -> None:
    image = push_tiny_image(registry_client, repo, "v1")
    with pytest.raises(VerificationFailed) as err:
        _prod_policy().verify(image, KeyPairVerifier(registry_client, [generate_key_pair().public_key()]))
    assert err.value.check == "signature" and err.value.digest == image.digest


def test_image_repushed_under_the_same_tag_is_refused(registry_client: RegistryClient, repo: str) -> None:
    key = generate_key_pair()
    signed = push_tiny_image(registry_client, repo, "v1", content=b"built by CI")
    _sign_everything(KeyPairSigner(registry_client, key), signed)
    evil = push_tiny_image(registry_client, repo, "v1", content=b"pushed by an attacker")
    assert evil.digest != signed.digest
    with pytest.raises(VerificationFailed, match="signature"):
        _prod_policy().verify(evil, KeyPairVerifier(registry_client, [key.public_key()]))


def test_signature_from_an_untrusted_key_is_refused(registry_client: RegistryClient, repo: str) -> None:
    image = push_tiny_image(registry_client, repo, "v1")
    _sign_everything(KeyPairSigner(registry_client, generate_key_pair()), image)
    trusted = generate_key_pair().public_key()
    with pytest.raises(VerificationFailed) as err:
        _prod_policy().verify(image, KeyPairVerifier(registry_client, [trusted]))
    assert err.value.check == "signature"


def test_feature_branch_provenance_is_refused_for_prod(registry_client: RegistryClient, repo: str) -> None:
    key = generate_key_pair()
    image = push_tiny_image(registry_client, repo, "v1")
    _sign_everything(KeyPairSigner(registry_client, key), image, ref="feature/quick-fix")
    verifier = KeyPairVerifier(registry_client, [key.public_key()])
    with pytest.raises(VerificationFailed) as err:
        _prod_policy().verify(image, verifier)
    assert err.value.check == "provenance"
    assert "feature/quick-fix" in err.value.reason and "main" in err.value.reason
    dev = AllOf([SignatureCheck(), ProvenanceCheck((SOURCE,), ("main", "feature/quick-fix"))])
    assert dev.verify(image, verifier)  # the same evidence is fine where feature branches are allowed


def test_attestation_about_another_digest_is_refused(registry_client: RegistryClient, repo: str) -> None:
    key = generate_key_pair()
    signer = KeyPairSigner(registry_client, key)
    image = push_tiny_image(registry_client, repo, "v1", content=b"target")
    other = push_tiny_image(registry_client, repo, "v2", content=b"other")
    signer.sign_image(image)
    signer.attest(other, SLSA_PROVENANCE_V1, slsa_provenance(_build(other)))
    signer.attest(other, CYCLONEDX_BOM, SBOM)
    # Move the other digest's attestations onto ours, as an attacker with push rights could.
    att = registry_client.get_manifest(repo, attestation_tag(other.digest))
    registry_client.put_manifest(repo, attestation_tag(image.digest), att.raw, att.media_type)
    with pytest.raises(VerificationFailed) as err:
        _prod_policy().verify(image, KeyPairVerifier(registry_client, [key.public_key()]))
    assert err.value.check == "provenance" and "no " in err.value.reason


def test_tampered_sbom_is_refused(registry_client: RegistryClient, repo: str) -> None:
    key = generate_key_pair()
    image = push_tiny_image(registry_client, repo, "v1")
    _sign_everything(KeyPairSigner(registry_client, key), image)
    # Rewrite the SBOM inside its DSSE envelope (hide a component) and push the envelope back.
    att = json.loads(registry_client.get_manifest(repo, attestation_tag(image.digest)).raw)
    layers = []
    for layer in att["layers"]:
        envelope = json.loads(registry_client.get_blob(repo, layer["digest"]))
        statement = json.loads(base64.b64decode(envelope["payload"]))
        if statement["predicateType"] == CYCLONEDX_BOM:
            statement["predicate"]["components"] = [{"name": "backdoor", "version": "1"}]
            envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
            new = registry_client.push_blob_descriptor(repo, json.dumps(envelope).encode(),
                                                       layer["mediaType"], layer.get("annotations"))
            layer = {**layer, "digest": new.digest, "size": new.size}
        layers.append(layer)
    att["layers"] = layers
    registry_client.put_manifest(repo, attestation_tag(image.digest), json.dumps(att).encode(),
                                 att["mediaType"])
    with pytest.raises(VerificationFailed) as err:
        _prod_policy().verify(image, KeyPairVerifier(registry_client, [key.public_key()]))
    assert err.value.check == "sbom"


def test_empty_policy_never_passes(registry_client: RegistryClient, repo: str) -> None:
    image = push_tiny_image(registry_client, repo, "v1")
    with pytest.raises(VerificationFailed, match="empty"):
        AllOf([]).verify(image, KeyPairVerifier(registry_client, []))


# ---- keyless -------------------------------------------------------------------------------

ALICE = "release-bot@ci.portcullis.test"


@pytest.fixture(scope="module")
def sigstore() -> Iterator[SigstoreInstance]:
    with running_sigstore() as instance:
        yield instance


def _keyless(sigstore: SigstoreInstance, client: RegistryClient, email: str = ALICE) -> KeylessEvidenceSigner:
    token = sigstore.oidc.mint("https://ci.portcullis.test/users/1", email=email)
    return KeylessEvidenceSigner(client, KeylessSigner(sigstore.client_trust_config_json(), identity_token=token))


def _keyless_verifier(sigstore: SigstoreInstance, client: RegistryClient, root: Path,
                      identity: str = ALICE) -> KeylessEvidenceVerifier:
    return KeylessEvidenceVerifier(
        client, [KeylessVerifier(root, SignerIdentity(identity=identity, issuer=sigstore.oidc.url))]
    )


def test_keyless_evidence_round_trip_through_referrers(
    sigstore: SigstoreInstance, registry_client: RegistryClient, repo: str, tmp_path: Path
) -> None:
    root = sigstore.write_trusted_root(tmp_path / "root.json")
    image = push_tiny_image(registry_client, repo, "v1")
    _sign_everything(_keyless(sigstore, registry_client), image)
    results = _prod_policy().verify(image, _keyless_verifier(sigstore, registry_client, root))
    assert [r.check for r in results] == ["signature", "provenance", "sbom"]
    assert ALICE in results[0].detail


def test_keyless_untrusted_identity_is_refused(
    sigstore: SigstoreInstance, registry_client: RegistryClient, repo: str, tmp_path: Path
) -> None:
    root = sigstore.write_trusted_root(tmp_path / "root.json")
    image = push_tiny_image(registry_client, repo, "v1")
    _sign_everything(_keyless(sigstore, registry_client, email="mallory@ci.portcullis.test"), image)
    with pytest.raises(VerificationFailed) as err:
        _prod_policy().verify(image, _keyless_verifier(sigstore, registry_client, root))
    assert err.value.check == "signature" and "mallory" in err.value.reason


def _referrers(client: RegistryClient, image: ImageRef) -> list[dict[str, Any]]:
    return [json.loads(client.get_manifest(image.repository, ref.digest).raw)
            for ref in client.list_referrers(image.repository, image.digest)]


def test_keyless_evidence_is_stored_as_cosign_v3_stores_it(
    sigstore: SigstoreInstance, registry_client: RegistryClient, repo: str, tmp_path: Path
) -> None:
    """cosign's BUNDLE_SPEC: one referrer per bundle, the empty config, the bundle as the only
    layer, the bundle annotations; the image signature is the DSSE statement cosign v3 signs
    (predicate type https://sigstore.dev/cosign/sign/v1, subject the digest)."""
    image = push_tiny_image(registry_client, repo, "v1")
    _sign_everything(_keyless(sigstore, registry_client), image)
    manifests = _referrers(registry_client, image)
    types = sorted(m["annotations"][PREDICATE_TYPE_ANNOTATION] for m in manifests)
    assert types == sorted([SIGN_PREDICATE_TYPE, SLSA_PROVENANCE_V1, CYCLONEDX_BOM])
    for manifest in manifests:
        assert manifest["artifactType"] == BUNDLE_MEDIA_TYPE
        assert manifest["config"]["mediaType"] == "application/vnd.oci.empty.v1+json"
        assert manifest["subject"]["digest"] == image.digest
        assert manifest["annotations"][CONTENT_ANNOTATION] == "dsse-envelope"
        datetime.fromisoformat(manifest["annotations"][CREATED_ANNOTATION])
        (layer,) = manifest["layers"]
        assert layer["mediaType"] == BUNDLE_MEDIA_TYPE
        bundle = json.loads(registry_client.get_blob(image.repository, layer["digest"]))
        assert bundle["mediaType"] == BUNDLE_MEDIA_TYPE
        envelope = bundle["dsseEnvelope"]
        assert envelope["payloadType"] == "application/vnd.in-toto+json"
        statement = json.loads(base64.b64decode(envelope["payload"]))
        assert statement["predicateType"] == manifest["annotations"][PREDICATE_TYPE_ANNOTATION]
        assert statement["subject"][0]["digest"] == {"sha256": image.digest.removeprefix("sha256:")}
    signature = next(m for m in manifests
                     if m["annotations"][PREDICATE_TYPE_ANNOTATION] == SIGN_PREDICATE_TYPE)
    assert json.loads(base64.b64decode(json.loads(registry_client.get_blob(
        image.repository, signature["layers"][0]["digest"]))["dsseEnvelope"]["payload"]))["predicate"] == {}


def test_an_attestation_relabelled_as_the_image_signature_is_refused(
    sigstore: SigstoreInstance, registry_client: RegistryClient, repo: str, tmp_path: Path
) -> None:
    """The annotations are unsigned hints: a provenance bundle pushed again under the signature's
    predicate-type annotation does not make an unsigned image signed."""
    root = sigstore.write_trusted_root(tmp_path / "root.json")
    image = push_tiny_image(registry_client, repo, "v1")
    _keyless(sigstore, registry_client).attest(image, SLSA_PROVENANCE_V1, slsa_provenance(_build(image)))
    (provenance,) = _referrers(registry_client, image)
    layer = provenance["layers"][0]
    relabelled = registry_client.push_blob_descriptor(
        image.repository, registry_client.get_blob(image.repository, layer["digest"]), BUNDLE_MEDIA_TYPE)
    registry_client.attach_artifact(
        image.repository, registry_client.head_manifest(image.repository, image.digest),  # type: ignore[arg-type]
        artifact_type=BUNDLE_MEDIA_TYPE, layers=[relabelled],
        annotations={CONTENT_ANNOTATION: "dsse-envelope", PREDICATE_TYPE_ANNOTATION: SIGN_PREDICATE_TYPE})
    verifier = _keyless_verifier(sigstore, registry_client, root)
    with pytest.raises(VerificationFailed) as err:
        verifier.verify_signature(image)
    assert err.value.check == "signature"
    assert [s.statement["predicateType"] for s in verifier.statements(image, SLSA_PROVENANCE_V1)] \
        == [SLSA_PROVENANCE_V1]
