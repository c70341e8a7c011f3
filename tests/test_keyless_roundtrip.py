"""Keyless signing round trip against a Sigstore-protocol instance on loopback.

Given an OIDC issuer, a Fulcio-style CA and a Rekor-style log with real keys, when the
pipeline signs an image signature payload and an in-toto statement, then sigstore-python's
unchanged verification accepts them for the exact signer and refuses everything else.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from portcullis.errors import ConfigurationError, PolicyRefusal, TransientError, VerificationFailed
from portcullis.models import ImageRef
from portcullis.signing import (
    BUNDLE_MEDIA_TYPE,
    BundleContent,
    KeylessSigner,
    KeylessVerifier,
    SignerIdentity,
    simple_signing_payload,
)
from tests.support.sigstore_instance import SigstoreInstance, running_sigstore

ALICE = "alice@portcullis.test"
IMAGE = ImageRef.parse("127.0.0.1:5000/portcullis/hello@sha256:" + "ab" * 32)
OTHER_DIGEST = "sha256:" + "cd" * 32
PROVENANCE = "https://slsa.dev/provenance/v1"

_AMBIENT_ENV = (
    "GITHUB_ACTIONS",
    "ACTIONS_ID_TOKEN_REQUEST_URL",
    "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
    "GOOGLE_SERVICE_ACCOUNT_NAME",
    "BUILDKITE",
    "GITLAB_CI",
    "CIRCLECI",
)


@pytest.fixture(scope="module")
def sigstore() -> Iterator[SigstoreInstance]:
    with running_sigstore() as instance:
        yield instance


@pytest.fixture(scope="module")
def trusted_root(sigstore: SigstoreInstance, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return sigstore.write_trusted_root(tmp_path_factory.mktemp("sigstore") / "trusted_root.json")


@pytest.fixture
def no_ambient_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _AMBIENT_ENV:
        monkeypatch.delenv(name, raising=False)


def _signer(sigstore: SigstoreInstance, email: str = ALICE) -> KeylessSigner:
    token = sigstore.oidc.mint("https://ci.portcullis.test/users/1", email=email)
    return KeylessSigner(sigstore.client_trust_config_json(), identity_token=token)


def _verifier(
    trusted_root: Path, sigstore: SigstoreInstance, identity: str = ALICE
) -> KeylessVerifier:
    return KeylessVerifier(
        trusted_root, SignerIdentity(identity=identity, issuer=sigstore.oidc.url)
    )


# ---- round trips ---------------------------------------------------------------------------


def test_image_signature_round_trip(sigstore: SigstoreInstance, trusted_root: Path) -> None:
    payload = simple_signing_payload(IMAGE)

    signed = _signer(sigstore).sign_image_signature(payload)
    verified = _verifier(trusted_root, sigstore).verify_image_signature(
        signed.bundle_bytes(), payload, digest=IMAGE.digest
    )

    assert signed.content is BundleContent.MESSAGE_SIGNATURE
    assert signed.digest == IMAGE.digest
    assert signed.signer == SignerIdentity(identity=ALICE, issuer=sigstore.oidc.url)
    document = json.loads(signed.bundle_json)
    assert document["mediaType"] == BUNDLE_MEDIA_TYPE == signed.media_type
    assert document["verificationMaterial"]["tlogEntries"][0]["kindVersion"]["kind"] == (
        "hashedrekord"
    )
    assert verified.payload == payload
    assert verified.docker_reference == IMAGE.name
    assert verified.signer == signed.signer
    assert verified.log_index == signed.log_index
    assert verified.integrated_time is not None


def test_statement_round_trip(sigstore: SigstoreInstance, trusted_root: Path) -> None:
    predicate = {"buildDefinition": {"buildType": "https://portcullis.test/build/v1"}}

    signed = _signer(sigstore).sign_statement(
        digest=IMAGE.digest, subject_name=IMAGE.name, predicate_type=PROVENANCE, predicate=predicate
    )
    verified = _verifier(trusted_root, sigstore).verify_statement(
        signed.bundle_json, digest=IMAGE.digest, predicate_type=PROVENANCE
    )

    assert signed.content is BundleContent.DSSE
    assert json.loads(signed.bundle_json)["dsseEnvelope"]["payloadType"] == (
        "application/vnd.in-toto+json"
    )
    assert verified.predicate == predicate
    assert verified.statement["_type"] == "https://in-toto.io/Statement/v1"
    assert verified.statement["subject"] == [
        {"name": IMAGE.name, "digest": {"sha256": IMAGE.digest.removeprefix("sha256:")}}
    ]


def test_ci_workflow_identity_from_the_ambient_credential(
    sigstore: SigstoreInstance,
    trusted_root: Path,
    no_ambient_credential: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GitHub Actions' token protocol, served by the loopback issuer: no token is handed in.
    for name, value in sigstore.oidc.github_actions_env().items():
        monkeypatch.setenv(name, value)
    signer = KeylessSigner(sigstore.client_trust_config_json())

    signed = signer.sign_image_signature(simple_signing_payload(IMAGE))

    workflow = sigstore.oidc.ambient_subject
    assert signed.signer.identity == workflow  # a URI SAN, as for a CI workflow
    verifier = _verifier(trusted_root, sigstore, identity=workflow)
    verifier.verify_image_signature(
        signed.bundle_json, simple_signing_payload(IMAGE), digest=IMAGE.digest
    )
    assert ALICE not in repr(signer) and "eyJ" not in repr(signer)


# ---- verification refusals -----------------------------------------------------------------


def test_untrusted_identity_is_refused(sigstore: SigstoreInstance, trusted_root: Path) -> None:
    payload = simple_signing_payload(IMAGE)
    signed = _signer(sigstore, email="mallory@portcullis.test").sign_image_signature(payload)

    with pytest.raises(VerificationFailed) as refused:
        _verifier(trusted_root, sigstore).verify_image_signature(
            signed.bundle_json, payload, digest=IMAGE.digest
        )

    assert refused.value.check == "signature"
    assert refused.value.digest == IMAGE.digest
    assert "mallory@portcullis.test" in refused.value.reason
    assert f"policy requires '{ALICE}'" in refused.value.reason


def test_same_identity_from_another_issuer_is_refused(
    sigstore: SigstoreInstance, trusted_root: Path
) -> None:
    # The CA trusts both issuers, so the certificate is genuine: only the policy says no.
    other_issuer = sigstore.add_issuer()
    token = other_issuer.mint("https://other.portcullis.test/u/1", email=ALICE)
    signer = KeylessSigner(sigstore.client_trust_config_json(), identity_token=token)
    payload = simple_signing_payload(IMAGE)
    signed = signer.sign_image_signature(payload)
    assert signed.signer == SignerIdentity(identity=ALICE, issuer=other_issuer.url)

    with pytest.raises(VerificationFailed) as refused:
        _verifier(trusted_root, sigstore).verify_image_signature(
            signed.bundle_json, payload, digest=IMAGE.digest
        )

    assert other_issuer.url in refused.value.reason
    assert "OIDC issuer" in refused.value.reason


def test_policy_naming_another_issuer_is_refused(
    sigstore: SigstoreInstance, trusted_root: Path
) -> None:
    payload = simple_signing_payload(IMAGE)
    signed = _signer(sigstore).sign_image_signature(payload)
    verifier = KeylessVerifier(
        trusted_root, SignerIdentity(identity=ALICE, issuer="https://token.actions.example.com")
    )

    with pytest.raises(VerificationFailed) as refused:
        verifier.verify_image_signature(signed.bundle_json, payload, digest=IMAGE.digest)

    assert "https://token.actions.example.com" in refused.value.reason


def test_tampered_payload_is_refused(sigstore: SigstoreInstance, trusted_root: Path) -> None:
    payload = simple_signing_payload(IMAGE)
    signed = _signer(sigstore).sign_image_signature(payload)
    tampered = payload.replace(b"portcullis/hello", b"portcullis/hellO")

    with pytest.raises(VerificationFailed) as refused:
        _verifier(trusted_root, sigstore).verify_image_signature(
            signed.bundle_json, tampered, digest=IMAGE.digest
        )

    assert "changed after signing" in refused.value.reason


def test_tampered_signature_in_bundle_is_refused(
    sigstore: SigstoreInstance, trusted_root: Path
) -> None:
    payload = simple_signing_payload(IMAGE)
    document = json.loads(_signer(sigstore).sign_image_signature(payload).bundle_json)
    signature = bytearray(base64.b64decode(document["messageSignature"]["signature"]))
    signature[-1] ^= 0x01
    document["messageSignature"]["signature"] = base64.b64encode(bytes(signature)).decode()

    with pytest.raises(VerificationFailed):
        _verifier(trusted_root, sigstore).verify_image_signature(
            json.dumps(document), payload, digest=IMAGE.digest
        )


def test_signature_for_another_image_is_refused(
    sigstore: SigstoreInstance, trusted_root: Path
) -> None:
    # A valid signature, but over the payload of another digest: it must not carry over.
    other = IMAGE.model_copy(update={"digest": OTHER_DIGEST})
    payload = simple_signing_payload(other)
    signed = _signer(sigstore).sign_image_signature(payload)

    with pytest.raises(VerificationFailed) as refused:
        _verifier(trusted_root, sigstore).verify_image_signature(
            signed.bundle_json, payload, digest=IMAGE.digest
        )

    assert OTHER_DIGEST in refused.value.reason


def test_statement_about_another_digest_is_refused(
    sigstore: SigstoreInstance, trusted_root: Path
) -> None:
    signed = _signer(sigstore).sign_statement(
        digest=OTHER_DIGEST, subject_name=IMAGE.name, predicate_type=PROVENANCE, predicate={}
    )

    with pytest.raises(VerificationFailed) as refused:
        _verifier(trusted_root, sigstore).verify_statement(signed.bundle_json, digest=IMAGE.digest)

    assert refused.value.check == "attestation"
    assert OTHER_DIGEST in refused.value.reason


def test_statement_with_edited_subject_is_refused(
    sigstore: SigstoreInstance, trusted_root: Path
) -> None:
    # Rewriting the subject inside the envelope breaks the DSSE signature.
    signed = _signer(sigstore).sign_statement(
        digest=OTHER_DIGEST, subject_name=IMAGE.name, predicate_type=PROVENANCE, predicate={}
    )
    document = json.loads(signed.bundle_json)
    envelope = document["dsseEnvelope"]
    statement = base64.b64decode(envelope["payload"]).replace(
        OTHER_DIGEST.removeprefix("sha256:").encode(), IMAGE.digest.removeprefix("sha256:").encode()
    )
    envelope["payload"] = base64.b64encode(statement).decode()

    with pytest.raises(VerificationFailed) as refused:
        _verifier(trusted_root, sigstore).verify_statement(
            json.dumps(document), digest=IMAGE.digest
        )

    assert "signature" in refused.value.reason.lower()


def test_statement_with_other_predicate_type_is_refused(
    sigstore: SigstoreInstance, trusted_root: Path
) -> None:
    signed = _signer(sigstore).sign_statement(
        digest=IMAGE.digest,
        subject_name=IMAGE.name,
        predicate_type="https://cyclonedx.org/bom",
        predicate={},
    )

    with pytest.raises(VerificationFailed, match="predicate type"):
        _verifier(trusted_root, sigstore).verify_statement(
            signed.bundle_json, digest=IMAGE.digest, predicate_type=PROVENANCE
        )


def test_bundle_kinds_are_not_interchangeable(
    sigstore: SigstoreInstance, trusted_root: Path
) -> None:
    payload = simple_signing_payload(IMAGE)
    signer = _signer(sigstore)
    signature = signer.sign_image_signature(payload)
    attestation = signer.sign_statement(
        digest=IMAGE.digest, subject_name=IMAGE.name, predicate_type=PROVENANCE, predicate={}
    )
    verifier = _verifier(trusted_root, sigstore)

    with pytest.raises(VerificationFailed, match="no message signature"):
        verifier.verify_image_signature(attestation.bundle_json, payload, digest=IMAGE.digest)
    with pytest.raises(VerificationFailed, match="DSSE"):
        verifier.verify_statement(signature.bundle_json, digest=IMAGE.digest)


def test_bundle_from_another_sigstore_instance_is_refused(
    sigstore: SigstoreInstance, trusted_root: Path
) -> None:
    # Same identity and a genuine log entry, but a CA and log this trusted root never heard of.
    payload = simple_signing_payload(IMAGE)
    with running_sigstore() as stranger:
        token = stranger.oidc.mint("https://ci.portcullis.test/users/1", email=ALICE)
        signed = KeylessSigner(
            stranger.client_trust_config_json(), identity_token=token
        ).sign_image_signature(payload)
        verifier = KeylessVerifier(
            trusted_root, SignerIdentity(identity=ALICE, issuer=stranger.oidc.url)
        )

        with pytest.raises(VerificationFailed) as refused:
            verifier.verify_image_signature(signed.bundle_json, payload, digest=IMAGE.digest)

    assert "certificate" in refused.value.reason


def test_garbage_bundle_is_refused(sigstore: SigstoreInstance, trusted_root: Path) -> None:
    with pytest.raises(VerificationFailed, match="not a valid Sigstore bundle"):
        _verifier(trusted_root, sigstore).verify_statement(b"{}", digest=IMAGE.digest)


# ---- signing refusals ----------------------------------------------------------------------


def test_token_from_an_issuer_the_ca_does_not_trust_is_refused(
    sigstore: SigstoreInstance,
) -> None:
    rogue = sigstore.add_issuer(trusted=False)
    token = rogue.mint("https://rogue.portcullis.test/u/1", email=ALICE)
    signer = KeylessSigner(sigstore.client_trust_config_json(), identity_token=token)

    with pytest.raises(PolicyRefusal, match="HTTP 401"):
        signer.sign_image_signature(simple_signing_payload(IMAGE))


def test_expired_token_is_refused_before_any_request(sigstore: SigstoreInstance) -> None:
    token = sigstore.oidc.mint(
        "https://ci.portcullis.test/users/1",
        email=ALICE,
        issued_at=sigstore.fulcio.created - timedelta(hours=1),
        lifetime=timedelta(minutes=5),
    )
    log_size = sigstore.rekor.size
    signer = KeylessSigner(sigstore.client_trust_config_json(), identity_token=token)

    with pytest.raises(PolicyRefusal, match="identity token"):
        signer.sign_image_signature(simple_signing_payload(IMAGE))
    assert sigstore.rekor.size == log_size


def test_missing_credential_is_a_configuration_error(
    sigstore: SigstoreInstance, no_ambient_credential: None
) -> None:
    signer = KeylessSigner(sigstore.client_trust_config_json())

    with pytest.raises(ConfigurationError, match="OIDC"):
        signer.sign_image_signature(simple_signing_payload(IMAGE))


def test_payload_that_names_no_digest_is_not_signed(sigstore: SigstoreInstance) -> None:
    with pytest.raises(PolicyRefusal, match="refusing to sign"):
        _signer(sigstore).sign_image_signature(b'{"hello": "world"}')


def test_unreachable_log_is_transient() -> None:
    with running_sigstore() as instance:
        config = instance.client_trust_config_json()
        token = instance.oidc.mint("https://ci.portcullis.test/users/1", email=ALICE)
        instance.rekor.stop()
        signer = KeylessSigner(config, identity_token=token)

        with pytest.raises(TransientError, match="transparency log|Sigstore service"):
            signer.sign_image_signature(simple_signing_payload(IMAGE))


def test_malformed_trust_config_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="trust config"):
        KeylessSigner('{"mediaType": "nope"}', identity_token="x")


def test_sigstore_errors_it_does_not_export_are_found_without_importing_its_internals() -> None:
    """The CA/log error types are looked up, not imported: a sigstore upgrade that moves them
    leaves errors classified by URL instead of breaking the import of the signing module."""
    from portcullis.signing import keyless

    assert keyless.FulcioClientError.__module__.startswith("sigstore.")
    assert keyless.RekorClientError.__module__.startswith("sigstore.")
    assert keyless.ExpiredCertificate.__module__.startswith("sigstore.")
    moved = keyless._sigstore_error("sigstore._internal.moved_away", "FulcioClientError")
    assert moved is keyless._NotRaised
    assert keyless._sigstore_error("sigstore.errors", "no_such_error") is keyless._NotRaised
