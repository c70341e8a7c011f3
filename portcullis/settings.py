"""Process-wide settings read from ``PORTCULLIS_*`` environment variables (pydantic-settings).

These are not secrets (those live in blocks); they say where things are on this worker.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

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

    traffic_dir: Path | None = Field(
        default=None, description="the router's state (default: <home>/traffic)"
    )
    prometheus_url: str | None = Field(
        default=None, description="Prometheus that scrapes the router, for canary analysis"
    )
    canary_synthetic_load: bool = Field(
        default=False,
        description="drive load through the front door during canary windows (local stack and "
        "tests only: a real environment has real traffic)",
    )
    approval_poll_seconds: float = Field(
        default=10, description="how often a paused approval checks for a resume (UI latency)"
    )

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
    def audit_path(self) -> Path:
        """The local audit log file."""
        return self.audit_log or self.home / "audit" / "audit.jsonl"
