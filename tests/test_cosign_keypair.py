"""cosign key-pair format: key files, signatures and attestations through a real registry."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from portcullis.canonical import canonical_json
from portcullis.errors import PolicyRefusal, VerificationFailed
from portcullis.models import ImageRef
from portcullis.oci import MEDIA_OCI_MANIFEST, RegistryClient
from portcullis.signing.cosign_format import (
    DSSE_MEDIA_TYPE,
    SIGNATURE_ANNOTATION,
    SIMPLESIGNING_MEDIA_TYPE,
    attest,
    attestation_tag,
    decrypt_private_key,
    encrypt_private_key,
    generate_key_pair,
    key_id,
    load_private_key,
    load_public_key_file,
    sign_image,
    signature_tag,
    verify_attestations,
    verify_image_signature,
    write_key_pair,
)
from tests.support.registry_fixture import (  # noqa: F401 - fixtures register by name
    copy_manifest,
    oci_registry_fixture,
    push_tiny_image,
    registry_client_fixture,
    repo_fixture,
)

PROVENANCE = "https://slsa.dev/provenance/v1"


@pytest.fixture(scope="module", name="key")
def key_fixture() -> ec.EllipticCurvePrivateKey:
    return generate_key_pair()


@pytest.fixture(scope="module", name="other_key")
def other_key_fixture() -> ec.EllipticCurvePrivateKey:
    return generate_key_pair()


def statement_about(image: ImageRef, predicate_type: str = PROVENANCE) -> dict[str, Any]:
    return {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": image.name, "digest": {"sha256": image.digest.split(":", 1)[1]}}],
        "predicateType": predicate_type,
        "predicate": {"buildDefinition": {"buildType": "https://portcullis.example/build/v1"}},
    }


# -- key files (no registry) ----------------------------------------------------------------


def test_key_pair_files_round_trip(tmp_path: Any) -> None:
    key = generate_key_pair()
    files = write_key_pair(tmp_path, key, "correct horse")

    loaded = load_private_key(files.private_key, "correct horse")
    public = load_public_key_file(files.public_key)

    assert loaded.private_numbers() == key.private_numbers()
    assert key_id(public) == key_id(key.public_key())
    assert files.private_key.stat().st_mode & 0o777 == 0o600
    pem = files.private_key.read_text()
    assert pem.startswith("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
    body = json.loads(base64.b64decode("".join(pem.strip().splitlines()[1:-1])))
    assert body["kdf"]["name"] == "scrypt"
    assert body["kdf"]["params"] == {"N": 32768, "r": 8, "p": 1}
    assert len(base64.b64decode(body["kdf"]["salt"])) == 32
    assert body["cipher"]["name"] == "nacl/secretbox"
    assert len(base64.b64decode(body["cipher"]["nonce"])) == 24
    assert "correct horse" not in pem
    assert files.public_key.read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_wrong_password_is_refused() -> None:
    pem = encrypt_private_key(generate_key_pair(), "right-horse")

    with pytest.raises(PolicyRefusal, match="wrong password") as refused:
        decrypt_private_key(pem, "bad-guess-42")

    assert "right-horse" not in str(refused.value) and "bad-guess-42" not in str(refused.value)


def test_altered_key_file_is_refused() -> None:
    pem = encrypt_private_key(generate_key_pair(), "pw")
    lines = pem.decode().strip().splitlines()
    body = json.loads(base64.b64decode("".join(lines[1:-1])))
    sealed = bytearray(base64.b64decode(body["ciphertext"]))
    sealed[-1] ^= 1
    body["ciphertext"] = base64.b64encode(bytes(sealed)).decode()
    altered = f"{lines[0]}\n{base64.b64encode(json.dumps(body).encode()).decode()}\n{lines[-1]}\n"

    with pytest.raises(PolicyRefusal, match="wrong password"):
        decrypt_private_key(altered.encode(), "pw")


def test_key_file_asking_for_an_expensive_kdf_is_refused() -> None:
    pem = encrypt_private_key(generate_key_pair(), "pw")
    lines = pem.decode().strip().splitlines()
    body = json.loads(base64.b64decode("".join(lines[1:-1])))
    body["kdf"]["params"]["N"] = 2**24
    hostile = f"{lines[0]}\n{base64.b64encode(json.dumps(body).encode()).decode()}\n{lines[-1]}\n"

    with pytest.raises(PolicyRefusal, match="unexpected scrypt parameters"):
        decrypt_private_key(hostile.encode(), "pw")


def test_existing_key_pair_is_not_overwritten(tmp_path: Any) -> None:
    write_key_pair(tmp_path, generate_key_pair(), "pw")

    with pytest.raises(PolicyRefusal, match="refusing to overwrite"):
        write_key_pair(tmp_path, generate_key_pair(), "pw")


# -- signatures through the registry --------------------------------------------------------

pytestmark_registry = pytest.mark.docker


@pytestmark_registry
def test_sign_then_verify_through_the_registry(
    registry_client: RegistryClient, repo: str, key: ec.EllipticCurvePrivateKey
) -> None:
    image = push_tiny_image(registry_client, repo, "v1")

    pushed = sign_image(registry_client, image, key)
    verified = verify_image_signature(registry_client, image, [key.public_key()])

    assert pushed.tag == signature_tag(image.digest) and pushed.appended
    assert verified.key_id == key_id(key.public_key())
    critical = verified.payload["critical"]
    assert critical["image"]["docker-manifest-digest"] == image.digest
    assert critical["identity"]["docker-reference"] == image.name
    assert critical["type"] == "cosign container image signature"
    [layer] = registry_client.get_manifest(repo, pushed.tag).layers()
    assert layer.media_type == SIMPLESIGNING_MEDIA_TYPE
    assert base64.b64decode(layer.annotations[SIGNATURE_ANNOTATION])


@pytestmark_registry
def test_signing_again_appends_and_never_duplicates(
    registry_client: RegistryClient,
    repo: str,
    key: ec.EllipticCurvePrivateKey,
    other_key: ec.EllipticCurvePrivateKey,
) -> None:
    image = push_tiny_image(registry_client, repo, "v1")

    sign_image(registry_client, image, key)
    repeat = sign_image(registry_client, image, key)
    second = sign_image(registry_client, image, other_key)

    assert not repeat.appended and second.appended
    assert len(registry_client.get_manifest(repo, signature_tag(image.digest)).layers()) == 2
    by_other = verify_image_signature(registry_client, image, [other_key.public_key()])
    assert by_other.key_id == key_id(other_key.public_key())


@pytestmark_registry
def test_signature_from_an_untrusted_key_is_refused(
    registry_client: RegistryClient,
    repo: str,
    key: ec.EllipticCurvePrivateKey,
    other_key: ec.EllipticCurvePrivateKey,
) -> None:
    image = push_tiny_image(registry_client, repo, "v1")
    sign_image(registry_client, image, other_key)

    with pytest.raises(VerificationFailed, match="not from a trusted key") as refused:
        verify_image_signature(registry_client, image, [key.public_key()])

    assert refused.value.check == "signature" and refused.value.digest == image.digest


@pytestmark_registry
def test_unsigned_image_and_empty_trust_set_are_refused(
    registry_client: RegistryClient, repo: str, key: ec.EllipticCurvePrivateKey
) -> None:
    image = push_tiny_image(registry_client, repo, "v1")

    with pytest.raises(VerificationFailed, match="no cosign signature"):
        verify_image_signature(registry_client, image, [key.public_key()])
    sign_image(registry_client, image, key)
    with pytest.raises(VerificationFailed, match="no trusted public keys"):
        verify_image_signature(registry_client, image, [])


@pytestmark_registry
def test_repushed_tag_is_not_covered_by_the_old_signature(
    registry_client: RegistryClient, repo: str, key: ec.EllipticCurvePrivateKey
) -> None:
    signed = push_tiny_image(registry_client, repo, "release", b"the reviewed build")
    sign_image(registry_client, signed, key)
    replaced = push_tiny_image(registry_client, repo, "release", b"something else")

    with pytest.raises(VerificationFailed, match="no cosign signature"):
        verify_image_signature(registry_client, replaced, [key.public_key()])
    # Moving the old signature manifest onto the new digest does not help: it names the old one.
    copy_manifest(
        registry_client, repo, signature_tag(signed.digest), signature_tag(replaced.digest)
    )
    with pytest.raises(VerificationFailed, match=f"covers {signed.digest}, not this image"):
        verify_image_signature(registry_client, replaced, [key.public_key()])
    assert verify_image_signature(registry_client, signed, [key.public_key()])


@pytestmark_registry
def test_signature_naming_another_repository_is_refused_unless_allowed(
    registry_client: RegistryClient, repo: str, key: ec.EllipticCurvePrivateKey
) -> None:
    original = push_tiny_image(registry_client, repo, "v1", b"shared content")
    sign_image(registry_client, original, key)
    copy_repo = repo + "-copy"
    copied = push_tiny_image(registry_client, copy_repo, "v1", b"shared content")
    source = registry_client.get_manifest(repo, signature_tag(original.digest))
    for layer in source.layers():
        registry_client.upload_blob(copy_repo, registry_client.get_blob(repo, layer.digest))
    config = source.json()["config"]["digest"]
    registry_client.upload_blob(copy_repo, registry_client.get_blob(repo, config))
    registry_client.put_manifest(
        copy_repo, signature_tag(copied.digest), source.raw, source.media_type
    )

    with pytest.raises(VerificationFailed, match="names repository"):
        verify_image_signature(registry_client, copied, [key.public_key()])
    allowed = verify_image_signature(
        registry_client, copied, [key.public_key()], allowed_references=[original.name]
    )
    assert copied.digest == original.digest and allowed.key_id == key_id(key.public_key())


# -- attestations -------------------------------------------------------------------------------


@pytestmark_registry
def test_attestation_round_trip(
    registry_client: RegistryClient, repo: str, key: ec.EllipticCurvePrivateKey
) -> None:
    image = push_tiny_image(registry_client, repo, "v1")
    statement = statement_about(image)

    pushed = attest(registry_client, image, statement, key)
    attest(registry_client, image, statement_about(image, "https://cyclonedx.org/bom"), key)
    verified = verify_attestations(registry_client, image, [key.public_key()], PROVENANCE)

    assert [v.statement for v in verified] == [statement]
    assert verified[0].key_id == key_id(key.public_key())
    layers = registry_client.get_manifest(repo, attestation_tag(image.digest)).layers()
    assert pushed.tag == attestation_tag(image.digest) and len(layers) == 2
    assert layers[0].media_type == DSSE_MEDIA_TYPE
    assert layers[0].annotations["predicateType"] == PROVENANCE
    envelope = json.loads(registry_client.get_blob(repo, layers[0].digest))
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert json.loads(base64.b64decode(envelope["payload"])) == statement
    with pytest.raises(VerificationFailed, match="no https://example.com/other attestation"):
        verify_attestations(registry_client, image, [key.public_key()], "https://example.com/other")


@pytestmark_registry
def test_attestation_about_another_digest_is_refused(
    registry_client: RegistryClient, repo: str, key: ec.EllipticCurvePrivateKey
) -> None:
    attested = push_tiny_image(registry_client, repo, "good", b"attested build")
    target = push_tiny_image(registry_client, repo, "evil", b"unattested build")
    attest(registry_client, attested, statement_about(attested), key)
    # A genuinely signed statement, moved onto another image's attestation tag.
    copy_manifest(
        registry_client, repo, attestation_tag(attested.digest), attestation_tag(target.digest)
    )

    with pytest.raises(
        VerificationFailed, match=f"is about {attested.digest}, not this image"
    ) as no:
        verify_attestations(registry_client, target, [key.public_key()], PROVENANCE)

    assert no.value.check == "attestation" and no.value.digest == target.digest


@pytestmark_registry
def test_attesting_a_statement_about_something_else_is_refused(
    registry_client: RegistryClient, repo: str, key: ec.EllipticCurvePrivateKey
) -> None:
    image = push_tiny_image(registry_client, repo, "v1")
    other = push_tiny_image(registry_client, repo, "v2", b"other")

    with pytest.raises(PolicyRefusal, match="refusing to attach a statement about"):
        attest(registry_client, image, statement_about(other), key)
    assert attestation_tag(image.digest) not in registry_client.list_tags(repo)


@pytestmark_registry
def test_tampered_attestation_payload_is_refused(
    registry_client: RegistryClient, repo: str, key: ec.EllipticCurvePrivateKey
) -> None:
    image = push_tiny_image(registry_client, repo, "v1")
    attest(registry_client, image, statement_about(image), key)
    tag = attestation_tag(image.digest)
    manifest = registry_client.get_manifest(repo, tag).json()
    layer = manifest["layers"][0]
    envelope = json.loads(registry_client.get_blob(repo, layer["digest"]))
    statement = json.loads(base64.b64decode(envelope["payload"]))
    statement["predicate"]["buildDefinition"]["buildType"] = "https://attacker.example/anything"
    envelope["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    forged = json.dumps(envelope).encode()
    layer["digest"] = registry_client.upload_blob(repo, forged)
    layer["size"] = len(forged)
    registry_client.put_manifest(repo, tag, canonical_json(manifest), MEDIA_OCI_MANIFEST)

    with pytest.raises(VerificationFailed, match="no signature from a trusted key"):
        verify_attestations(registry_client, image, [key.public_key()], PROVENANCE)
