"""Where the emergency path reads incident tickets, as a Prefect block.

The block holds the incident system's address and read-only credentials and builds the
client (:meth:`IncidentSystemBlock.get_client`); the rules about tickets live in
:mod:`portcullis.incidents`. Save it on the Prefect server (``prefect block register -m
blocks.incidents``), or, where no block is wanted, set ``PORTCULLIS_INCIDENTS_*`` variables
(``PORTCULLIS_INCIDENTS_BASE_URL``, ``..._USERNAME``, ``..._PASSWORD`` or ``..._TOKEN``).
It is deploy-side configuration: only the deploy worker needs it.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Self, assert_never

from pydantic import Field, SecretStr, model_validator

from blocks.base import EnvBlock
from portcullis.incidents import IncidentSystem, ServiceNowIncidents


class IncidentSystemBlock(EnvBlock):
    """The incident system emergency tickets are checked against, and how to log in to it."""

    _block_type_name = "Portcullis Incident System"
    _block_type_slug = "portcullis-incident-system"
    _description = "Incident system (ServiceNow Table API) that emergency tickets are read from."
    _env_prefix: ClassVar[str] = "PORTCULLIS_INCIDENTS_"
    _env_hint: ClassVar[str] = (
        "set PORTCULLIS_INCIDENTS_BASE_URL and credentials, or name a saved block"
    )

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

