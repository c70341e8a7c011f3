"""Where the emergency path reads incident tickets, as a Prefect block.

The block holds the incident system's address and read-only credentials and builds the
client (:meth:`IncidentSystemBlock.get_client`); the rules about tickets live in
:mod:`portcullis.incidents`. Save it on the Prefect server (``prefect block register -m
blocks.incidents``), or, where no block is wanted, set ``PORTCULLIS_INCIDENTS_*`` variables
(``PORTCULLIS_INCIDENTS_BASE_URL``, ``..._USERNAME``, ``..._PASSWORD`` or ``..._TOKEN``).
It is deploy-side configuration: only the deploy worker needs it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Self, assert_never

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, ValidationError, create_model, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from portcullis.errors import ConfigurationError
from portcullis.incidents import IncidentSystem, ServiceNowIncidents


class IncidentSystemBlock(Block):
    """The incident system emergency tickets are checked against, and how to log in to it."""

    _block_type_name = "Portcullis Incident System"
    _block_type_slug = "portcullis-incident-system"
    _description = "Incident system (ServiceNow Table API) that emergency tickets are read from."
    _env_prefix: ClassVar[str] = "PORTCULLIS_INCIDENTS_"

    kind: Literal["servicenow"] = Field(
        default="servicenow", description="Which incident API answers at base_url."
    )
    base_url: str = Field(
        description="Instance root, e.g. https://example.service-now.com (https unless loopback)."
    )
    username: str | None = Field(
        default=None, description="Account for basic auth with read access to incidents."
    )
    password: SecretStr | None = Field(default=None, description="Password of that account.")
    token: SecretStr | None = Field(
        default=None, description="OAuth bearer token, instead of username and password."
    )
    timeout_seconds: float = Field(default=10.0, gt=0, description="Seconds per request.")
    ca_bundle: str | None = Field(
        default=None, description="Path of a CA bundle for TLS; default: the system's CAs."
    )

    @model_validator(mode="after")
    def _one_way_to_log_in(self) -> Self:
        basic = self.username is not None or self.password is not None
        if basic and self.token is not None:
            raise ValueError("set either username and password, or token; not both")
        if self.token is None and (not self.username or self.password is None):
            raise ValueError("set username and password (basic auth), or token (bearer)")
        return self

    def get_client(self) -> IncidentSystem:
        """The client for this block's incident system."""
        match self.kind:
            case "servicenow":
                return ServiceNowIncidents(
                    self.base_url,
                    username=self.username,
                    password=self.password,
                    token=self.token,
                    timeout=self.timeout_seconds,
                    verify=self.ca_bundle or True,
                )
            case _:
                assert_never(self.kind)

    @classmethod
    def from_env(cls) -> IncidentSystemBlock:
        """Read this block's fields from ``PORTCULLIS_INCIDENTS_<FIELD>`` variables."""
        fields: dict[str, Any] = {
            name: (info.annotation, info) for name, info in cls.model_fields.items()
        }
        settings_cls = create_model(
            f"{cls.__name__}Settings", __base__=BaseSettings, __config__=None, **fields
        )
        settings_cls.model_config = SettingsConfigDict(env_prefix=cls._env_prefix, extra="ignore")
        try:
            values = settings_cls()
            return cls(**values.model_dump())
        except ValidationError as exc:
            problems = "; ".join(
                f"{cls._env_prefix}{'_'.join(str(p) for p in err['loc']).upper() or '*'}: "
                f"{err['msg']}"
                for err in exc.errors()
            )
            raise ConfigurationError(
                f"{cls.__name__} not configured: {problems}",
                hint="set PORTCULLIS_INCIDENTS_BASE_URL and credentials, or name a saved block",
            ) from None

    @classmethod
    def resolve(cls, block_name: str | None) -> IncidentSystemBlock:
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
        if not isinstance(loaded, cls):  # load() is typed loosely (sync or async callers)
            raise ConfigurationError(f"block {block_name!r} is not an {cls.__name__}")
        return loaded
