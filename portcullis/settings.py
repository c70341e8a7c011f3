"""Process-wide settings read from ``PORTCULLIS_*`` environment variables (pydantic-settings).

These are not secrets (those live in blocks); they say where things are on this worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url

REPO_ROOT = Path(__file__).resolve().parents[1]


class Settings(BaseSettings):
    """Where this worker keeps its data and reads its policies."""

    model_config = SettingsConfigDict(env_prefix="PORTCULLIS_", extra="ignore")

    home: Path = Field(default=REPO_ROOT / ".stack", description="state of the local stack")
    policy_dir: Path = Field(
        default=REPO_ROOT / "policies",
        description="environment policies; on a deploy worker, a directory the people who "
        "trigger promotions cannot write",
    )
    trivy_cache_dir: Path | None = Field(
        default=None, description="trivy cache with the vulnerability DB (default: <home>/trivy)"
    )
    work_dir: Path | None = Field(
        default=None, description="scratch space for image archives and SBOMs (default: <home>/work)"
    )
    audit_log: Path | None = Field(
        default=None, description="the local audit log (default: <home>/audit/audit.jsonl)"
    )
    state_url: str | None = Field(
        default=None,
        description="the shared state store (audit chain, used codes, pins, reviews, tickets): "
        "sqlite:///PATH or postgresql+psycopg://ROLE@HOST:PORT/DB, without the password "
        "(default: sqlite:///<home>/state.db)",
    )
    state_password: SecretStr | None = Field(
        default=None, description="the state store role's password (deploy side only)"
    )

    traffic_dir: Path | None = Field(
        default=None, description="the router's state (default: <home>/traffic)"
    )
    prometheus_url: str | None = Field(
        default=None, description="Prometheus that scrapes the router, for canary analysis"
    )
    approval_poll_seconds: float = Field(
        default=10, description="how often a paused approval checks for a resume (UI latency)"
    )

    @classmethod
    def of(cls, environment: Mapping[str, str]) -> Settings:
        """The settings ``environment``'s PORTCULLIS_* variables give, and nothing else.

        A worker uses this to reach what its flow runs reach (their environment is its file's,
        see :mod:`portcullis.sides`), whatever its own process environment holds.
        """
        given: dict[str, Any] = {}
        for name, value in environment.items():
            field = name.removeprefix("PORTCULLIS_").lower()
            if name.startswith("PORTCULLIS_") and field in cls.model_fields:
                given[field] = value
        return _GivenSettings(**given)

    @property
    def trivy_cache(self) -> Path:
        """The trivy cache directory."""
        return self.trivy_cache_dir or self.home / "trivy"

    @property
    def router_dir(self) -> Path:
        """The HAProxy router's state directory."""
        return (self.traffic_dir or self.home / "traffic") / "router"

    @property
    def scratch(self) -> Path:
        """The scratch directory."""
        return self.work_dir or self.home / "work"

    @property
    def state_database_url(self) -> URL:
        """The state store's URL, password included (never log it: render with hide_password)."""
        url = make_url(self.state_url or f"sqlite:///{self.home / 'state.db'}")
        if self.state_password is not None:
            url = url.set(password=self.state_password.get_secret_value())
        return url

    @property
    def audit_path(self) -> Path:
        """The local audit log file."""
        return self.audit_log or self.home / "audit" / "audit.jsonl"


class _GivenSettings(Settings):
    """Settings from the constructor's arguments only (no environment): see :meth:`Settings.of`."""

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: Any,
                                   *_other_sources: Any, **_named: Any) -> tuple[Any, ...]:
        return (init_settings,)
