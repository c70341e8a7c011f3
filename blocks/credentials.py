"""Build-side and deploy-side credentials, kept apart on purpose.

The build side can push and sign but not deploy; the deploy side can pull, verify and deploy
but not push or sign. Each block can be saved on the Prefect server (``prefect block
register -m blocks``) or, where a block is not wanted (CI, the local demo), read from
environment variables through pydantic-settings: ``PORTCULLIS_BUILD_*`` and
``PORTCULLIS_DEPLOY_*``.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import docker
from prefect.blocks.core import Block
from pydantic import Field, SecretStr, ValidationError, create_model
from pydantic_settings import BaseSettings, SettingsConfigDict

from portcullis.errors import ConfigurationError

_B = TypeVar("_B", bound="_CredentialsBlock")


class _CredentialsBlock(Block):
    """Shared loading logic; every concrete field lives on the subclasses."""

    _env_prefix: ClassVar[str]

    @classmethod
    def from_env(cls: type[_B]) -> _B:
        """Read this block's fields from ``<prefix><FIELD>`` environment variables."""
        fields: dict[str, Any] = {
            name: (info.annotation, info) for name, info in cls.model_fields.items()
        }
        settings_cls = create_model(  # type: ignore[call-overload]
            f"{cls.__name__}Settings",
            __base__=BaseSettings,
            __config__=None,
            **fields,
        )
        settings_cls.model_config = SettingsConfigDict(env_prefix=cls._env_prefix, extra="ignore")
        try:
            values = settings_cls()
        except ValidationError as exc:
            missing = ", ".join(
                f"{cls._env_prefix}{'_'.join(str(p) for p in err['loc']).upper()}"
                for err in exc.errors()
            )
            raise ConfigurationError(
                f"{cls.__name__} not configured: missing or invalid {missing}",
                hint="run `python -m infra.stack up` and `source .stack/env`, or name a saved block",
            ) from None
        return cls(**values.model_dump())

    @classmethod
    def resolve(cls: type[_B], block_name: str | None) -> _B:
        """Load the saved block ``block_name``, or from the environment when it is None."""
        if block_name is None:
            return cls.from_env()
        try:
            loaded = cls.load(block_name)
        except ValueError as exc:
            raise ConfigurationError(
                f"{cls.__name__} block {block_name!r} cannot be loaded: {exc}",
                hint="create it in the Prefect UI (Blocks) or with the Python API",
            ) from None
        return loaded  # type: ignore[no-any-return]

    def registry_auth(self) -> dict[str, str]:
        """Auth config for the Docker SDK (push or pull against ``registry``)."""
        return {
            "username": self.registry_username,  # type: ignore[attr-defined]
            "password": self.registry_password.get_secret_value(),  # type: ignore[attr-defined]
            "serveraddress": self.registry,  # type: ignore[attr-defined]
        }

    def docker_client(self) -> docker.DockerClient:
        """A Docker SDK client for this side's engine (``ssh://`` hosts use the ssh client)."""
        host: str | None = self.docker_host  # type: ignore[attr-defined]
        if host and host.startswith("ssh://"):
            return docker.DockerClient(base_url=host, version="auto", use_ssh_client=True)
        if host:
            return docker.DockerClient(base_url=host, version="auto")
        return docker.from_env(version="auto")


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
