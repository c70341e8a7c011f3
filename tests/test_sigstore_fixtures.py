"""Real public Sigstore bundles verify offline; a wrong identity, issuer or byte does not.

The bundles come from sigstore-python's and cosign's own test suites (public data, see
tests/fixtures/sigstore/README.md), kept in the repository so that no run can skip them.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from portcullis.errors import VerificationFailed
from portcullis.signing import KeylessVerifier, SignerIdentity

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sigstore"


WHEEL_SIGNER = SignerIdentity(
    identity="https://github.com/trailofbits/rfc8785.py/.github/workflows/release.yml@refs/tags/v0.1.2",
    issuer="https://token.actions.githubusercontent.com",
)
ATTESTATION_SIGNER = SignerIdentity(
    identity="cody@soyland.com", issuer="https://github.com/login/oauth"
)
ATTESTED_DIGEST = "sha256:732112270d7e59418a8c080b134b24cabd67d250d0d0147a97ed95ba5c280aa4"


def _wheel() -> tuple[bytes, bytes]:
    return (
        (FIXTURES / "bundle_v3_github.whl").read_bytes(),
        (FIXTURES / "bundle_v3_github.whl.sigstore").read_bytes(),
    )


def _attestation() -> bytes:
    return (FIXTURES / "oci-attestation.sigstore.json").read_bytes()


# ---- a GitHub Actions-signed artifact, production trusted root ------------------------------


def test_wheel_signature_verifies_for_the_release_workflow() -> None:
    wheel, bundle = _wheel()
    verifier = KeylessVerifier(FIXTURES / "production_trusted_root.json", WHEEL_SIGNER)

    verified = verifier.verify_artifact(bundle, wheel)

    assert verified.digest == (
        "sha256:c4e92e9ecc828bef2aa7dba1de8ac983511f7532a0df11c770d39099a25cf201"
    )
    assert verified.signer == WHEEL_SIGNER
    assert verified.log_index == 79605083
    assert verified.integrated_time is not None and verified.integrated_time.year == 2024


def test_wheel_refused_for_another_workflow_identity() -> None:
    wheel, bundle = _wheel()
    other = WHEEL_SIGNER.model_copy(
        update={"identity": WHEEL_SIGNER.identity.replace("v0.1.2", "v0.1.3")}
    )
    verifier = KeylessVerifier(FIXTURES / "production_trusted_root.json", other)

    with pytest.raises(VerificationFailed) as refused:
        verifier.verify_artifact(bundle, wheel)

    assert refused.value.check == "signature"
    assert "policy requires" in refused.value.reason
    assert "v0.1.3" in refused.value.reason


def test_wheel_refused_for_another_oidc_issuer() -> None:
    wheel, bundle = _wheel()
    other = WHEEL_SIGNER.model_copy(update={"issuer": "https://token.actions.example.com"})
    verifier = KeylessVerifier(FIXTURES / "production_trusted_root.json", other)

    with pytest.raises(VerificationFailed) as refused:
        verifier.verify_artifact(bundle, wheel)

    assert "OIDC issuer" in refused.value.reason
    assert "https://token.actions.githubusercontent.com" in refused.value.reason


def test_wheel_with_one_changed_byte_is_refused() -> None:
    wheel, bundle = _wheel()
    tampered = bytearray(wheel)
    tampered[len(tampered) // 2] ^= 0x01
    verifier = KeylessVerifier(FIXTURES / "production_trusted_root.json", WHEEL_SIGNER)

    with pytest.raises(VerificationFailed) as refused:
        verifier.verify_artifact(bundle, bytes(tampered))

    assert "changed after signing" in refused.value.reason


# ---- a cosign DSSE attestation about an OCI image digest ------------------------------------


def test_oci_attestation_verifies_for_its_image_digest() -> None:
    verifier = KeylessVerifier(FIXTURES / "trusted_root_pgi.json", ATTESTATION_SIGNER)

    verified = verifier.verify_statement(
        _attestation(),
        digest=ATTESTED_DIGEST,
        predicate_type="https://cosign.sigstore.dev/attestation/v1",
    )

    assert verified.digest == ATTESTED_DIGEST
    assert verified.signer == ATTESTATION_SIGNER
    # cosign still writes the v0.1 statement type; its layout is the same as v1.
    assert verified.statement["_type"] == "https://in-toto.io/Statement/v0.1"


def test_oci_attestation_refused_for_another_digest() -> None:
    verifier = KeylessVerifier(FIXTURES / "trusted_root_pgi.json", ATTESTATION_SIGNER)
    other = "sha256:" + "0" * 64

    with pytest.raises(VerificationFailed) as refused:
        verifier.verify_statement(_attestation(), digest=other)

    assert refused.value.check == "attestation"
    assert refused.value.digest == other
    assert ATTESTED_DIGEST in refused.value.reason


@pytest.mark.parametrize(
    ("signer", "expected_in_reason"),
    [
        (
            ATTESTATION_SIGNER.model_copy(update={"identity": "cody@example.com"}),
            "cody@soyland.com",
        ),
        (ATTESTATION_SIGNER.model_copy(update={"issuer": "https://accounts.google.com"}), "issuer"),
    ],
    ids=["wrong-identity", "wrong-issuer"],
)
def test_oci_attestation_refused_for_another_signer(
    signer: SignerIdentity, expected_in_reason: str
) -> None:
    verifier = KeylessVerifier(FIXTURES / "trusted_root_pgi.json", signer)

    with pytest.raises(VerificationFailed) as refused:
        verifier.verify_statement(_attestation(), digest=ATTESTED_DIGEST)

    assert expected_in_reason in refused.value.reason


def test_oci_attestation_with_one_changed_payload_byte_is_refused() -> None:
    document = json.loads(_attestation())
    payload = bytearray(base64.b64decode(document["dsseEnvelope"]["payload"]))
    payload[-3] ^= 0x01
    document["dsseEnvelope"]["payload"] = base64.b64encode(bytes(payload)).decode()
    verifier = KeylessVerifier(FIXTURES / "trusted_root_pgi.json", ATTESTATION_SIGNER)

    with pytest.raises(VerificationFailed) as refused:
        verifier.verify_statement(json.dumps(document), digest=ATTESTED_DIGEST)

    assert "signature" in refused.value.reason.lower()
