"""Environment policy: what an environment accepts, as code, owned by the deploy side.

A policy is a TOML file per environment in the deploy worker's policy directory
(``PORTCULLIS_POLICY_DIR``; the repository's ``policies/`` for the local stack). The promote
flow takes only an environment *name*: no flow parameter can carry, replace or weaken a policy.
Each promotion records the policy file's SHA-256 in the audit trail, so a changed policy shows.
Who may change the files is decided where they live: in production a directory or repository
that only the platform/security owners can write (see CODEOWNERS for ``policies/``).
"""

from __future__ import annotations

import hashlib
import tomllib
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from portcullis.errors import ConfigurationError
from portcullis.models import Frozen
from portcullis.scan import ScanPolicy


class EnvironmentPolicy(Frozen):
    """Everything one environment requires of a promotion."""

    environment: str
    allowed_branches: tuple[str, ...] = Field(
        min_length=1, description="branches a build may come from (provenance is checked)"
    )
    allowed_repositories: tuple[str, ...] = Field(
        min_length=1, description="source repositories (fnmatch patterns) a build may come from"
    )
    scan: ScanPolicy = Field(default_factory=ScanPolicy)
    promote_from: str | None = Field(
        default=None,
        description="the environment a digest must have passed first (None: builds here)",
    )
    policy_sha256: str = Field(default="", description="SHA-256 of the file this came from")

    def repository_allowed(self, repo_url: str) -> bool:
        """True when ``repo_url`` matches one of the allowed repository patterns."""
        return any(fnmatchcase(repo_url, pattern) for pattern in self.allowed_repositories)


def load_policy(environment: str, policy_dir: Path) -> EnvironmentPolicy:
    """Read and validate ``<policy_dir>/<environment>.toml``.

    Raises:
        ConfigurationError: the file is missing or does not validate; never falls back to a
            default, because a missing policy must not mean "anything goes".
    """
    path = policy_dir / f"{environment}.toml"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"no policy for environment {environment!r} at {path}: {exc.strerror}",
            hint="create the policy file; promotions to an environment without one are refused",
        ) from None
    try:
        data: dict[str, Any] = tomllib.loads(raw.decode())
        data.setdefault("environment", environment)
        if data["environment"] != environment:
            raise ConfigurationError(f"{path} declares environment {data['environment']!r}")
        return EnvironmentPolicy.model_validate(
            {**data, "policy_sha256": hashlib.sha256(raw).hexdigest()}
        )
    except (tomllib.TOMLDecodeError, ValidationError) as exc:
        raise ConfigurationError(f"policy {path} is invalid: {exc}") from None
