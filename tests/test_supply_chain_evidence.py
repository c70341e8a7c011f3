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

import pytest

from portcullis.attestations import CYCLONEDX_BOM, SLSA_PROVENANCE_V1, slsa_provenance
from portcullis.errors import VerificationFailed
from portcullis.evidence import (
    KeylessEvidenceSigner,
    KeylessEvidenceVerifier,
    KeyPairSigner,
    KeyPairVerifier,
)
from portcullis.models import BuildResult, ImageRef, SourceRef
from portcullis.oci import RegistryClient
from portcullis.signing.cosign_format import attestation_tag, generate_key_pair
from portcullis.signing.keyless import KeylessSigner, KeylessVerifier, SignerIdentity
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
