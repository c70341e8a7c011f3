"""Build-side and deploy-side credentials, kept apart on purpose.

The build side can push and sign but not deploy; the deploy side can pull, verify and deploy
but not push or sign. Each block can be saved on the Prefect server (``prefect block
register -m blocks``) or, where a block is not wanted (CI, the local demo), read from
environment variables through pydantic-settings: ``PORTCULLIS_BUILD_*`` and
``PORTCULLIS_DEPLOY_*``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import docker
from pydantic import Field, SecretStr

from blocks.base import EnvBlock
from portcullis.errors import ConfigurationError
from portcullis.evidence import (
    AnyVerifier,
    EvidenceSigner,
    EvidenceVerifier,
    KeylessEvidenceSigner,
    KeylessEvidenceVerifier,
    KeyPairSigner,
    KeyPairVerifier,
)
from portcullis.models import Frozen
from portcullis.oci import RegistryClient

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec


class _CredentialsBlock(EnvBlock):
    """Registry and Docker helpers shared by both sides; every field lives on the subclasses."""

    _env_hint: ClassVar[str] = (
        "run `python -m infra.stack up` and `source .stack/env`, or name a saved block"
    )

    def registry_auth(self) -> dict[str, str]:
        """Auth config for the Docker SDK (push or pull against ``registry``)."""
        return {
            "username": self.registry_username,  # type: ignore[attr-defined]
            "password": self.registry_password.get_secret_value(),  # type: ignore[attr-defined]
            "serveraddress": self.registry,  # type: ignore[attr-defined]
        }

    def registry_client(self) -> RegistryClient:
        """An OCI registry client logged in with this side's account."""
        return RegistryClient(
            self.registry,  # type: ignore[attr-defined]
            username=self.registry_username,  # type: ignore[attr-defined]
            password=self.registry_password.get_secret_value(),  # type: ignore[attr-defined]
        )

    def docker_client(self) -> docker.DockerClient:
        """A Docker SDK client for this side's engine (``ssh://`` hosts use the ssh client)."""
        host: str | None = self.docker_host  # type: ignore[attr-defined]
        if host and host.startswith("ssh://"):
            return docker.DockerClient(base_url=host, version="auto", use_ssh_client=True)
        if host:
            return docker.DockerClient(base_url=host, version="auto")
        return docker.from_env(version="auto")


class TrustedIdentity(Frozen):
    """A keyless signer the deploy side trusts (cosign's --certificate-identity / -oidc-issuer)."""

    identity: str = Field(description="Exact certificate identity (e-mail or URI).")
    issuer: str = Field(description="Exact OIDC issuer URL.")


class BuildCredentials(_CredentialsBlock):
    """What the build side holds: registry push credentials and the build engine.

    Never loaded by a deploy task.
    """

    _block_type_name = "Portcullis Build Credentials"
    _block_type_slug = "portcullis-build-credentials"
    _description = "Registry push credentials and the Docker engine used to build images."
    _env_prefix: ClassVar[str] = "PORTCULLIS_BUILD_"

    registry: str = Field(description="Registry host[:port] images are pushed to, e.g. 127.0.0.1:5000.")
    registry_username: str = Field(description="Registry account with push rights.")
    registry_password: SecretStr = Field(description="Password or token of the push account.")
    docker_host: str | None = Field(
        default=None,
        description="Docker engine that builds images (unix://, tcp:// or ssh://); default: DOCKER_HOST.",
    )
    repository_prefix: str = Field(
        default="portcullis", description="Path prefix for app repositories in the registry."
    )
    signing_mode: Literal["key", "keyless"] = Field(
        default="key",
        description="'key': a cosign-format key pair; 'keyless': Sigstore with the CI's OIDC identity.",
    )
    cosign_private_key: SecretStr | None = Field(
        default=None, description="cosign.key (PEM, ENCRYPTED SIGSTORE PRIVATE KEY) for key mode."
    )
    cosign_password: SecretStr | None = Field(
        default=None, description="Password of cosign_private_key."
    )
    sigstore_trust_config: str | None = Field(
        default=None,
        description="Sigstore ClientTrustConfig JSON (Fulcio, Rekor, roots) for keyless mode.",
    )
    sigstore_identity_token: SecretStr | None = Field(
        default=None,
        description="OIDC token for keyless mode; empty means the CI's ambient credential.",
    )

    def evidence_signer(self, client: RegistryClient) -> EvidenceSigner:
        """The signer this build side is configured for, pushing through ``client``."""
        from portcullis.signing.cosign_format import decrypt_private_key
        from portcullis.signing.keyless import KeylessSigner

        if self.signing_mode == "key":
            if self.cosign_private_key is None or self.cosign_password is None:
                raise ConfigurationError(
                    "key signing needs cosign_private_key and cosign_password in the build credentials"
                )
            key = decrypt_private_key(
                self.cosign_private_key.get_secret_value().encode(),
                self.cosign_password.get_secret_value(),
            )
            return KeyPairSigner(client, key)
        if not self.sigstore_trust_config:
            raise ConfigurationError("keyless signing needs sigstore_trust_config in the build credentials")
        token = self.sigstore_identity_token.get_secret_value() if self.sigstore_identity_token else None
        return KeylessEvidenceSigner(client, KeylessSigner(self.sigstore_trust_config, identity_token=token))


class DeployCredentials(_CredentialsBlock):
    """What the deploy side holds: registry pull credentials and the environment's Docker host.

    Never loaded by a build task.
    """

    _block_type_name = "Portcullis Deploy Credentials"
    _block_type_slug = "portcullis-deploy-credentials"
    _description = "Registry pull credentials and the Docker host of one environment."
    _env_prefix: ClassVar[str] = "PORTCULLIS_DEPLOY_"

    registry: str = Field(description="Registry host[:port] images are pulled from.")
    registry_username: str = Field(description="Registry account with pull rights.")
    registry_password: SecretStr = Field(description="Password or token of the pull account.")
    docker_host: str | None = Field(
        default=None,
        description="Docker host of the environment (unix://, tcp:// or ssh://user@host); default: DOCKER_HOST.",
    )
    public_host: str = Field(
        default="127.0.0.1", description="Host name or address where deployed apps answer."
    )
    trusted_public_keys: list[str] = Field(
        default_factory=list, description="PEM public keys (cosign.pub) whose signatures count."
    )
    trusted_identities: list[TrustedIdentity] = Field(
        default_factory=list,
        description="Keyless signers that count: exact certificate identity and OIDC issuer.",
    )
    sigstore_trusted_root: str | None = Field(
        default=None, description="Sigstore trusted_root.json content for keyless verification."
    )
    change_calendar_token: SecretStr | None = Field(
        default=None, description="Bearer token for the environment's external change calendar."
    )
    promotion_signing_keys: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Per environment: this deploy side's cosign.key (PEM, ENCRYPTED SIGSTORE "
        "PRIVATE KEY) that signs its promotion records. Never the build key.",
    )
    promotion_key_passwords: dict[str, SecretStr] = Field(
        default_factory=dict, description="Per environment: the password of its promotion key."
    )
    promotion_trust_roots: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per environment: PEM public keys of that environment's deploy side; the "
        "next environment takes a digest only with a record signed by one of them.",
    )
    promoter_username: str | None = Field(
        default=None, description="Registry account that may push promotion records only."
    )
    promoter_password: SecretStr | None = Field(
        default=None, description="Password or token of the promoter account."
    )

    def evidence_verifier(self, client: RegistryClient) -> EvidenceVerifier:
        """Verifier over every trust anchor configured here (key pairs and/or identities)."""
        import tempfile
        from pathlib import Path

        from portcullis.signing.cosign_format import load_public_key
        from portcullis.signing.keyless import KeylessVerifier, SignerIdentity

        verifiers: list[EvidenceVerifier] = []
        if self.trusted_public_keys:
            keys = [load_public_key(pem.encode()) for pem in self.trusted_public_keys]
            verifiers.append(KeyPairVerifier(client, keys))
        if self.trusted_identities:
            if not self.sigstore_trusted_root:
                raise ConfigurationError("trusted_identities need sigstore_trusted_root")
            root = Path(tempfile.mkdtemp(prefix="portcullis-root-")) / "trusted_root.json"
            root.write_text(self.sigstore_trusted_root)
            verifiers.append(KeylessEvidenceVerifier(client, [
                KeylessVerifier(root, SignerIdentity(identity=t.identity, issuer=t.issuer))
                for t in self.trusted_identities
            ]))
        if not verifiers:
            raise ConfigurationError(
                "the deploy credentials trust no signer (no trusted_public_keys or trusted_identities)",
                hint="nothing can be deployed until a trust policy is configured",
            )
        return verifiers[0] if len(verifiers) == 1 else AnyVerifier(verifiers)

    def _build_key_ids(self) -> set[str]:
        from portcullis.signing.cosign_format import key_id, load_public_key

        return {key_id(load_public_key(pem.encode())) for pem in self.trusted_public_keys}

    def promotion_signing_key(self, environment: str) -> ec.EllipticCurvePrivateKey:
        """The key this deploy side signs ``environment``'s promotion records with.

        Raises:
            ConfigurationError: none is configured, or it is a build key.
        """
        from portcullis.signing.cosign_format import decrypt_private_key, key_id

        pem = self.promotion_signing_keys.get(environment)
        password = self.promotion_key_passwords.get(environment)
        if pem is None or password is None:
            raise ConfigurationError(
                f"the deploy credentials hold no promotion signing key for {environment}",
                hint=f"set promotion_signing_keys[{environment!r}] and promotion_key_passwords"
                f"[{environment!r}] (PORTCULLIS_DEPLOY_PROMOTION_SIGNING_KEYS / _KEY_PASSWORDS)",
            )
        key = decrypt_private_key(pem.get_secret_value().encode(), password.get_secret_value())
        if key_id(key.public_key()) in self._build_key_ids():
            # A build key vouching for promotions would let the build side skip environments.
            raise ConfigurationError(
                f"the promotion key for {environment} is a build signing key",
                hint="give each environment's deploy side a key pair of its own",
            )
        return key

    def promotion_trust_root(self, environment: str) -> list[ec.EllipticCurvePublicKey]:
        """Public keys of ``environment``'s deploy side, whose promotion records count.

        Raises:
            ConfigurationError: none are configured, or one of them is a build key.
        """
        from portcullis.signing.cosign_format import key_id, load_public_key

        pems = self.promotion_trust_roots.get(environment) or []
        if not pems:
            raise ConfigurationError(
                f"no promotion trust root for {environment}: nothing can be taken from it",
                hint=f"set promotion_trust_roots[{environment!r}] (PORTCULLIS_DEPLOY_PROMOTION_TRUST_ROOTS) "
                f"to the public key of {environment}'s deploy side",
            )
        keys = [load_public_key(pem.encode()) for pem in pems]
        if {key_id(k) for k in keys} & self._build_key_ids():
            raise ConfigurationError(
                f"the promotion trust root for {environment} holds a build signing key",
                hint="trust only the public keys of that environment's deploy side",
            )
        return keys

    def promoter_client(self) -> RegistryClient:
        """A registry client logged in as the promoter (pull images, push records only)."""
        if not self.promoter_username or self.promoter_password is None:
            raise ConfigurationError(
                "the deploy credentials name no promoter registry account",
                hint="set promoter_username and promoter_password (PORTCULLIS_DEPLOY_PROMOTER_*)",
            )
        return RegistryClient(self.registry, username=self.promoter_username,
                              password=self.promoter_password.get_secret_value())
