"""Registry permissions: the build side can push and sign, the deploy side can only pull.

The policy and the token format are tested without processes first; then a real
``docker-registry`` in ``auth: token`` mode with the real token service (infra.registry_auth)
is driven through both clients the pipeline uses: portcullis.oci.RegistryClient and the Docker
engine (which fetches tokens from the realm itself).
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import docker
import docker.errors
import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from infra.base_image import BASE_IMAGE
from infra.docker_engine import DockerEngine
from infra.registry import RunningRegistry, start_registry, stop_registry
from infra.registry_auth import (
    DEFAULT_SERVICE,
    SIGNING_KEY_FILE,
    VERIFIED_CREDENTIALS_TTL,
    AccountConfig,
    AuthServiceConfig,
    Grant,
    Role,
    Scope,
    TokenService,
    TokenSigner,
    decide,
    ensure_signing_material,
    hash_password,
    libtrust_key_id,
    load_signing_key,
    parse_scopes,
)
from portcullis.errors import ConfigurationError, PolicyRefusal, is_retryable
from portcullis.oci import (
    NotFoundInRegistry,
    RegistryAuthError,
    RegistryClient,
    digest_of,
)
from portcullis.promotion_record import (
    PromotionPredicate,
    record_repository,
    sign_promotion,
    verify_promotion,
)
from portcullis.signing.cosign_format import (
    attestation_tag,
    generate_key_pair,
    sign_image,
    signature_tag,
)
from tests.support.registry_fixture import push_tiny_image

PASSWORDS = {"builder": "build-pw-1", "deployer": "deploy-pw-2", "auditor": "audit-pw-3",
             "promoter": "promote-pw-4"}
_names = itertools.count()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def _jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    header, claims, signature = token.split(".")
    return (
        json.loads(_b64url_decode(header)),
        json.loads(_b64url_decode(claims)),
        _b64url_decode(signature),
    )


def _resign(token: str, key: ec.EllipticCurvePrivateKey, **header: Any) -> str:
    """The same claims signed again by ``key`` with ``header`` fields changed."""
    old_header, claims, _ = _jwt_parts(token)

    def enc(obj: dict[str, Any]) -> str:
        raw = json.dumps(obj, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    signing_input = enc({**old_header, **header}) + "." + enc(claims)
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    sig = base64.urlsafe_b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
    return signing_input + "." + sig.decode().rstrip("=")


# -- the policy, without processes -----------------------------------------------------------


def test_push_role_gets_pull_and_push_only_under_its_prefix() -> None:
    grant = Grant(Role.PUSH, prefix="portcullis/")
    asked = parse_scopes(
        [
            "repository:portcullis/app:pull,push,delete",
            "repository:portcullis:pull",
            "repository:portcullis-evil/app:pull,push",
            "repository:other/app:pull",
            "registry:catalog:*",
        ]
    )

    granted = decide(grant, asked)

    assert [str(s) for s in granted] == [
        "repository:portcullis/app:pull,push",
        "repository:portcullis:pull",
    ]
    assert grant.prefix == "portcullis"


def test_pull_role_never_gets_push_and_unknown_roles_get_nothing() -> None:
    asked = parse_scopes(["repository:team/app:pull,push", "repository:team/app:delete"])

    assert [str(s) for s in asked] == ["repository:team/app:pull,push,delete"]
    assert [str(s) for s in decide(Grant(Role.PULL), asked)] == ["repository:team/app:pull"]
    assert decide(Grant(Role.parse("admin")), asked) == []
    assert decide(Grant(Role.NONE), asked) == []
    # Nothing is granted on a name the registry would not accept as a repository.
    assert decide(Grant(Role.PUSH), parse_scopes(["repository:../etc:pull"])) == []


def test_scopes_parse_space_separated_values_and_names_with_ports() -> None:
    scopes = parse_scopes(["repository:a/b:pull repository:c:push", "garbage", "x::pull"])

    assert scopes == [
        Scope("repository", "a/b", ("pull",)),
        Scope("repository", "c", ("push",)),
    ]
    assert Scope.parse("repository:host:5000/app:pull") == Scope(
        "repository", "host:5000/app", ("pull",)
    )


def test_a_grant_prefix_must_be_a_repository_path() -> None:
    with pytest.raises(ConfigurationError, match="not a repository path"):
        Grant(Role.PUSH, prefix="Team/../x")


def test_promote_role_pulls_images_and_pushes_only_its_promotion_records() -> None:
    grant = Grant(Role.PROMOTE, prefix="portcullis", records="promotions/staging")
    asked = parse_scopes([
        "repository:portcullis/hello:pull,push",
        "repository:promotions/staging/portcullis/hello:pull,push",
        "repository:promotions/prod/portcullis/hello:pull,push",
        "repository:promotions-evil/x:pull,push",
        "repository:other/app:pull,push",
    ])
    assert [str(s) for s in decide(grant, asked)] == [
        "repository:portcullis/hello:pull",  # the image: read, never write
        "repository:promotions/staging/portcullis/hello:pull,push",  # its own records
        "repository:promotions/prod/portcullis/hello:pull",  # another environment's: read only
    ]
    for bad in ("", "portcullis", "promotions-evil", "../promotions"):
        with pytest.raises(ConfigurationError):
            Grant(Role.PROMOTE, records=bad)
    with pytest.raises(ConfigurationError, match="only a promote grant"):
        Grant(Role.PUSH, records="promotions")


def test_libtrust_key_id_is_twelve_base32_groups_of_the_spki_hash() -> None:
    key = ec.generate_private_key(ec.SECP256R1())

    kid = libtrust_key_id(key.public_key())

    groups = kid.split(":")
    assert len(groups) == 12 and all(len(g) == 4 for g in groups)
    assert set(kid.replace(":", "")) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
    other = libtrust_key_id(ec.generate_private_key(ec.SECP256R1()).public_key())
    assert other != kid


@pytest.fixture(name="service")
def service_fixture(tmp_path: Any) -> TokenService:
    material = ensure_signing_material(tmp_path)
    config = AuthServiceConfig(
        port=1,
        signing_key=material.key_path,
        accounts={
            "builder": AccountConfig(
                password_bcrypt=hash_password("bpw", rounds=4), role="push", prefix="team"
            ),
            "deployer": AccountConfig(password_bcrypt=hash_password("dpw", rounds=4), role="pull"),
        },
    )
    return TokenService.from_config(config)


def test_token_is_es256_signed_for_the_registry_with_only_the_granted_access(
    service: TokenService, tmp_path: Any
) -> None:
    key = load_signing_key(tmp_path / SIGNING_KEY_FILE)
    before = int(time.time())

    answer = service.handle(
        _basic("deployer", "dpw"), DEFAULT_SERVICE, ["repository:team/app:pull,push"]
    )

    assert answer.status == 200 and answer.token is not None
    assert answer.body["token"] == answer.body["access_token"] == answer.token.token
    assert answer.body["expires_in"] == 300
    header, claims, signature = _jwt_parts(answer.token.token)
    assert header == {"typ": "JWT", "alg": "ES256", "kid": libtrust_key_id(key.public_key())}
    assert claims["sub"] == "deployer" and claims["aud"] == DEFAULT_SERVICE
    assert claims["access"] == [{"type": "repository", "name": "team/app", "actions": ["pull"]}]
    assert before <= claims["iat"] == claims["nbf"] <= claims["exp"] - 300 <= int(time.time())
    signing_input = answer.token.token.rsplit(".", 1)[0].encode()
    der = encode_dss_signature(
        int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    )
    key.public_key().verify(der, signing_input, ec.ECDSA(hashes.SHA256()))  # raises if bad


def test_wrong_missing_or_unknown_credentials_get_no_token(
    service: TokenService, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="portcullis.registry_auth")
    scope = ["repository:team/app:pull"]

    wrong = service.handle(_basic("builder", "not-bpw"), None, scope)
    missing = service.handle(None, None, scope)
    unknown = service.handle(_basic("mallory", "bpw"), None, scope)
    garbled = service.handle("Basic !!!", None, scope)
    other_service = service.handle(_basic("builder", "bpw"), "someone-else", scope)
    good = service.handle(_basic("builder", "bpw"), None, scope)

    assert [a.status for a in (wrong, missing, unknown, garbled)] == [401] * 4
    assert all(a.token is None and "token" not in a.body for a in (wrong, missing, unknown))
    assert other_service.status == 400 and other_service.token is None
    assert good.status == 200 and good.token is not None
    logged = caplog.text
    assert "decision=deny reason=bad-credentials" in logged
    assert "decision=deny reason=no-credentials" in logged
    assert "decision=grant user=builder" in logged
    for secret in ("not-bpw", "dpw", good.token.token, good.token.token.split(".")[2]):
        assert secret not in logged


def test_remembered_credentials_never_let_a_wrong_password_in(tmp_path: Any) -> None:
    material = ensure_signing_material(tmp_path)
    config = AuthServiceConfig(
        port=1,
        signing_key=material.key_path,
        accounts={"builder": AccountConfig(password_bcrypt=hash_password("bpw", 4), role="push")},
    )
    signer = TokenSigner(
        load_signing_key(material.key_path), issuer=config.issuer, service=config.service
    )
    now = [1000.0]
    service = TokenService(config, signer, clock=lambda: now[0])
    scope = ["repository:team/app:pull"]

    first = service.handle(_basic("builder", "bpw"), None, scope)
    wrong_while_remembered = service.handle(_basic("builder", "bpw-but-longer"), None, scope)
    other_name = service.handle(_basic("builder2", "bpw"), None, scope)
    now[0] += VERIFIED_CREDENTIALS_TTL + 1
    after_expiry = service.handle(_basic("builder", "bpw"), None, scope)
    wrong_after_expiry = service.handle(_basic("builder", "nope"), None, scope)

    assert first.status == after_expiry.status == 200
    assert wrong_while_remembered.status == other_name.status == wrong_after_expiry.status == 401


# -- a real registry in token mode -----------------------------------------------------------


@pytest.fixture(scope="module", name="token_registry")
def token_registry_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    """A registry with the default roles: builder pushes, deployer and auditor only pull."""
    if shutil.which("docker-registry") is None:
        pytest.skip("docker-registry is not installed (apt-get install -y docker-registry)")
    state = tmp_path_factory.mktemp("authz-registry")
    reg = start_registry(state, users=PASSWORDS)
    try:
        yield reg
    finally:
        stop_registry(state)


def _client(reg: RunningRegistry, user: str, password: str | None = None) -> RegistryClient:
    return RegistryClient(
        reg.address, username=user, password=password if password else PASSWORDS[user]
    )


def _repo() -> str:
    return f"test/authz-{next(_names)}"


def _token(reg: RunningRegistry, user: str, password: str, scope: str) -> httpx.Response:
    assert reg.token_realm is not None
    return httpx.get(
        reg.token_realm,
        params={"service": DEFAULT_SERVICE, "scope": scope},
        headers={"Authorization": _basic(user, password)},
        timeout=10,
    )


def _get_manifest(reg: RunningRegistry, repo: str, ref: str, token: str) -> httpx.Response:
    return httpx.get(
        f"{reg.url}/v2/{repo}/manifests/{ref}",
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/vnd.oci.image.manifest.v1+json",
        },
        timeout=10,
    )


pytestmark_registry = pytest.mark.docker


@pytestmark_registry
def test_default_roles_and_processes(token_registry: RunningRegistry) -> None:
    assert token_registry.grants == {
        "builder": Grant(Role.PUSH),
        "deployer": Grant(Role.PULL),
        "auditor": Grant(Role.PULL),
        "promoter": Grant(Role.PROMOTE, records="promotions"),
    }
    assert token_registry.token_realm is not None
    assert token_registry.token_realm.startswith("http://127.0.0.1:")
    assert token_registry.auth_pid is not None and token_registry.auth_pid != token_registry.pid
    config = (token_registry.state_dir / "config.yml").read_text()
    assert '"token"' in config and '"htpasswd"' not in config
    for secret in PASSWORDS.values():
        assert secret not in (token_registry.state_dir / "registry-auth.json").read_text()


@pytestmark_registry
def test_builder_pushes_and_deployer_pulls_by_digest(token_registry: RunningRegistry) -> None:
    repo = _repo()
    with _client(token_registry, "builder") as builder:
        image = push_tiny_image(builder, repo, "v1", b"built by the build side")
        assert builder.get_manifest(repo, "v1").digest == image.digest

    with _client(token_registry, "deployer") as deployer:
        manifest = deployer.get_manifest(repo, image.digest)
        [layer] = manifest.layers()
        assert deployer.get_blob(repo, layer.digest) == b"built by the build side"


@pytestmark_registry
def test_deployer_cannot_push_manifests_blobs_or_signatures(
    token_registry: RunningRegistry,
) -> None:
    repo = _repo()
    with _client(token_registry, "builder") as builder:
        image = push_tiny_image(builder, repo, "v1")
    tags_before = ["v1"]

    with _client(token_registry, "deployer") as deployer:
        manifest = deployer.get_manifest(repo, image.digest)
        # Every blob exists, so only the manifest PUT itself is being refused here.
        with pytest.raises(RegistryAuthError, match="not allowed to push manifest") as put:
            deployer.put_manifest(repo, "latest", manifest.raw, manifest.media_type)
        with pytest.raises(RegistryAuthError, match="not allowed to upload blob"):
            deployer.upload_blob(repo, b"a layer the deploy side made up")
        with pytest.raises(RegistryAuthError, match="not allowed to"):
            sign_image(deployer, image, generate_key_pair())

    message = str(put.value)
    assert f"registry refused credentials for deployer at {token_registry.address}" in message
    assert PASSWORDS["deployer"] not in message
    assert isinstance(put.value, PolicyRefusal) and not is_retryable(put.value)
    with _client(token_registry, "builder") as builder:
        assert builder.list_tags(repo) == tags_before  # no "latest", no sha256-<hex>.sig
        assert signature_tag(image.digest) not in builder.list_tags(repo)
        assert not builder.blob_exists(repo, digest_of(b"a layer the deploy side made up"))


@pytestmark_registry
def test_promoter_attaches_a_promotion_record_but_cannot_push_an_image_tag(
    token_registry: RunningRegistry,
) -> None:
    repo = _repo()
    with _client(token_registry, "builder") as builder:
        image = push_tiny_image(builder, repo, "v1")
    record_repo = record_repository(image, "staging")
    predicate = PromotionPredicate(
        kind="promotion", app="authz", environment="staging", image=str(image),
        digest=image.digest, policy_sha256="0" * 64, run_id="run-1",
        completed_at=datetime.now(UTC),
    )
    key = generate_key_pair()

    with _client(token_registry, "promoter") as promoter:
        manifest = promoter.get_manifest(repo, image.digest)  # pull: yes
        with pytest.raises(RegistryAuthError, match="not allowed to push manifest"):
            promoter.put_manifest(repo, "latest", manifest.raw, manifest.media_type)
        with pytest.raises(RegistryAuthError, match="not allowed to"):
            promoter.put_manifest(repo, attestation_tag(image.digest), manifest.raw,
                                  manifest.media_type)
        with pytest.raises(RegistryAuthError, match="not allowed to"):
            push_tiny_image(promoter, repo, "v2", b"an image the deploy side made up")
        with pytest.raises(RegistryAuthError, match="not allowed to"):
            sign_image(promoter, image, key)
        signed = sign_promotion(promoter, image, predicate, key)

    assert signed.location.endswith(f"{record_repo}:{attestation_tag(image.digest)}")
    with _client(token_registry, "builder") as builder:
        assert builder.list_tags(repo) == ["v1"]  # no latest, v2, .sig or .att in the image repo
    with _client(token_registry, "deployer") as deployer:
        found = verify_promotion(deployer, image, "staging", [key.public_key()])
    assert found.predicate == predicate


@pytestmark_registry
def test_builder_can_sign(token_registry: RunningRegistry) -> None:
    repo = _repo()
    with _client(token_registry, "builder") as builder:
        image = push_tiny_image(builder, repo, "v1")
        pushed = sign_image(builder, image, generate_key_pair())
        assert pushed.tag in builder.list_tags(repo)


@pytestmark_registry
def test_wrong_password_gets_nothing(token_registry: RunningRegistry) -> None:
    repo = _repo()
    with _client(token_registry, "builder") as builder:
        image = push_tiny_image(builder, repo, "v1")

    refused = _token(token_registry, "builder", "not-the-password", f"repository:{repo}:pull")
    with _client(token_registry, "deployer", "not-the-password") as wrong:
        with pytest.raises(RegistryAuthError, match="credentials for deployer"):
            wrong.get_manifest(repo, image.digest)
        with pytest.raises(RegistryAuthError, match="credentials for deployer"):
            push_tiny_image(wrong, repo, "v2", b"x")

    assert refused.status_code == 401
    assert "token" not in refused.json() and "access_token" not in refused.json()
    log = (token_registry.state_dir / "registry-auth.log").read_text()
    assert "decision=deny reason=bad-credentials" in log
    assert "not-the-password" not in log


@pytestmark_registry
def test_unknown_role_gets_an_empty_token_the_registry_refuses(tmp_path: Any) -> None:
    reg = start_registry(
        tmp_path / "reg",
        users={"builder": "b", "deployer": "d", "contractor": "c"},
        roles={"builder": Grant(Role.PUSH, prefix="team"), "deployer": Role.PULL},
    )
    try:
        with RegistryClient(reg.address, username="builder", password="b") as builder:
            image = push_tiny_image(builder, "team/app", "v1")
            with pytest.raises(RegistryAuthError, match="not allowed to"):
                push_tiny_image(builder, "elsewhere/app", "v1")
        response = _token(reg, "contractor", "c", "repository:team/app:pull")
        token = response.json()["token"]
        contractor = _get_manifest(reg, "team/app", image.digest, token)
    finally:
        stop_registry(tmp_path / "reg")

    assert reg.grants["contractor"] == Grant(Role.NONE)
    assert response.status_code == 200
    assert _jwt_parts(token)[1]["access"] == []
    assert contractor.status_code == 401
    assert 'error="insufficient_scope"' in contractor.headers["www-authenticate"]


@pytestmark_registry
def test_expired_forged_and_misnamed_tokens_are_refused(token_registry: RunningRegistry) -> None:
    repo = _repo()
    with _client(token_registry, "builder") as builder:
        image = push_tiny_image(builder, repo, "v1")
    key = load_signing_key(token_registry.state_dir / SIGNING_KEY_FILE)
    access = [Scope("repository", repo, ("pull",))]

    def signer(clock: float) -> TokenSigner:
        return TokenSigner(
            key,
            issuer="portcullis-registry-auth",
            service=DEFAULT_SERVICE,
            ttl_seconds=300,
            clock=lambda: clock,
        )

    fresh = signer(time.time()).issue("deployer", access).token
    # Past its expiry by more than distribution's 60 s leeway.
    expired = signer(time.time() - 300 - 120).issue("deployer", access).token
    stranger = ec.generate_private_key(ec.SECP256R1())
    # An untrusted key under its own name, and one posing under the trusted key's name.
    forged = _resign(fresh, stranger, kid=libtrust_key_id(stranger.public_key()))
    forged_kid = _resign(fresh, stranger, kid=libtrust_key_id(key.public_key()))
    misnamed = _resign(
        fresh, key, kid="AAAA:BBBB:CCCC:DDDD:EEEE:FFFF:GGGG:HHHH:IIII:JJJJ:KKKK:LLLL"
    )

    # Control: re-signing by the trusted key under its own name keeps the token good, so the
    # refusals below come from what was changed, not from the re-signing.
    resigned = _resign(fresh, key)

    answers = {
        name: _get_manifest(token_registry, repo, image.digest, tok)
        for name, tok in {
            "fresh": fresh,
            "resigned": resigned,
            "expired": expired,
            "forged": forged,
            "forged_kid": forged_kid,
            "misnamed": misnamed,
        }.items()
    }

    assert answers["fresh"].status_code == answers["resigned"].status_code == 200
    assert digest_of(answers["fresh"].content) == image.digest
    for name in ("expired", "forged", "forged_kid", "misnamed"):
        assert answers[name].status_code == 401, name
        assert 'error="invalid_token"' in answers[name].headers["www-authenticate"], name


@pytestmark_registry
def test_tokens_are_short_lived_and_scoped_to_what_was_asked(
    token_registry: RunningRegistry,
) -> None:
    repo = _repo()
    response = _token(token_registry, "builder", PASSWORDS["builder"], f"repository:{repo}:pull")
    body = response.json()
    _, claims, _ = _jwt_parts(body["token"])

    assert response.status_code == 200
    assert body["expires_in"] == claims["exp"] - claims["iat"] == 300
    assert claims["access"] == [{"type": "repository", "name": repo, "actions": ["pull"]}]
    with _client(token_registry, "builder") as builder:
        push_tiny_image(builder, repo, "v1")
    # A pull token does not become a push token: a blob upload with it is refused.
    upload = httpx.post(
        f"{token_registry.url}/v2/{repo}/blobs/uploads/",
        headers={"Authorization": f"Bearer {body['token']}"},
        timeout=10,
    )
    assert upload.status_code == 401
    assert 'error="insufficient_scope"' in upload.headers["www-authenticate"]


# -- the Docker engine as client -------------------------------------------------------------


def _push_with_engine(
    client: docker.DockerClient, name: str, auth: dict[str, str]
) -> tuple[str | None, str | None]:
    """(digest, error) of ``docker push name:v1`` through the SDK."""
    digest = error = None
    for line in client.images.push(name, tag="v1", auth_config=auth, stream=True, decode=True):
        if "error" in line:
            error = str(line["error"])
        aux = line.get("aux")
        if isinstance(aux, dict) and aux.get("Digest"):
            digest = str(aux["Digest"])
    return digest, error


def _auth(reg: RunningRegistry, user: str, password: str | None = None) -> dict[str, str]:
    return {
        "username": user,
        "password": password or PASSWORDS[user],
        "serveraddress": reg.address,
    }


@pytestmark_registry
def test_docker_engine_pushes_as_builder_and_pulls_as_deployer_only(
    token_registry: RunningRegistry,
    docker_engine: DockerEngine,
    docker_client: docker.DockerClient,
) -> None:
    repo = _repo()
    name = f"{token_registry.address}/{repo}"
    stolen = f"{token_registry.address}/{_repo()}"
    docker_client.images.get(BASE_IMAGE).tag(name, "v1")
    docker_client.images.get(BASE_IMAGE).tag(stolen, "v1")
    try:
        digest, error = _push_with_engine(docker_client, name, _auth(token_registry, "builder"))
        assert error is None and digest is not None

        # The wrong password first: once the engine has pulled a digest it answers later
        # pulls of it from its own store without asking the registry.
        with pytest.raises(docker.errors.APIError, match="(?i)unauthorized|denied"):
            docker_client.images.pull(
                name, tag=digest, auth_config=_auth(token_registry, "deployer", "wrong")
            )
        pulled = docker_client.images.pull(
            name, tag=digest, auth_config=_auth(token_registry, "deployer")
        )
        assert f"{name}@{digest}" in pulled.attrs["RepoDigests"]

        no_digest, refused = _push_with_engine(
            docker_client, stolen, _auth(token_registry, "deployer")
        )
        assert no_digest is None
        assert refused is not None and any(
            w in refused.lower() for w in ("denied", "unauthorized", "authentication required")
        )
        _, wrong = _push_with_engine(
            docker_client, stolen, _auth(token_registry, "builder", "wrong")
        )
        assert wrong is not None
    finally:
        for ref in (f"{name}:v1", f"{stolen}:v1"):
            docker_client.images.remove(ref, noprune=True)

    with _client(token_registry, "builder") as builder:
        assert builder.list_tags(repo) == ["v1"]
        assert builder.head_manifest(repo, "v1") is not None
        assert builder.list_tags(stolen.split("/", 1)[1]) == []
        with pytest.raises(NotFoundInRegistry):
            builder.get_manifest(stolen.split("/", 1)[1], "v1")
    # The engine asked for push and the token service granted pull only.
    log = (token_registry.state_dir / "registry-auth.log").read_text()
    stolen_repo = re.escape(stolen.split("/", 1)[1])
    assert re.search(
        rf"decision=partial user=deployer .* requested='repository:{stolen_repo}:"
        rf"(push,pull|pull,push)' granted='repository:{stolen_repo}:pull'",
        log,
    )
