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
from datetime import timedelta
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from portcullis.approval import ApprovalPolicy
from portcullis.canary.analysis import CanaryPolicy
from portcullis.errors import ConfigurationError, PolicyRefusal
from portcullis.freeze import FreezePolicy
from portcullis.incidents import DEFAULT_MAX_TICKET_AGE
from portcullis.models import Frozen
from portcullis.scan import ScanPolicy, Severity


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
    freeze: FreezePolicy
    approval: ApprovalPolicy | None = Field(
        default=None, description="human approval rules; None only where no person must approve"
    )
    emergency_approval: ApprovalPolicy | None = Field(
        default=None,
        description="the shorter rule for the emergency path (e.g. one on-call approver); "
        "None: this environment has no emergency path",
    )
    emergency_ticket_max_age: timedelta = Field(
        default=DEFAULT_MAX_TICKET_AGE,
        description="how long after it was opened an incident ticket may still justify an "
        "emergency promotion",
    )
    target: Literal["docker", "gitops"] = Field(
        default="docker",
        description="'docker': Portcullis runs the digest on the environment's Docker host; "
        "'gitops': it commits the digest to the environment's overlay and Argo CD/Flux applies it",
    )
    canary: CanaryPolicy | None = Field(
        default=None,
        description="canary steps and limits; None deploys blue/green behind the health check only",
    )
    change_calendar_url: str | None = Field(
        default=None, description="external change calendar (token in the deploy credentials)"
    )
    policy_sha256: str = Field(default="", description="SHA-256 of the file this came from")

    @model_validator(mode="before")
    @classmethod
    def _name_sub_policies(cls, data: Any) -> Any:
        # Sub-policies carry their environment's name; fill it in so a file states it once.
        if isinstance(data, dict) and "environment" in data:
            for key in ("freeze", "approval", "emergency_approval"):
                if isinstance(data.get(key), dict):
                    data[key] = {"environment": data["environment"], **data[key]}
            data.setdefault("freeze", {"environment": data["environment"]})
        return data

    @model_validator(mode="after")
    def _prod_needs_people(self) -> EnvironmentPolicy:
        if self.environment == "prod" and (self.approval is None or self.approval.required_approvals < 2):
            raise ValueError("prod must require at least two approvals")
        for sub in (self.freeze, self.approval):
            if sub is not None and sub.environment != self.environment:
                raise ValueError(f"a sub-policy names environment {sub.environment!r}")
        return self

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


def emergency_policy(policy: EnvironmentPolicy) -> EnvironmentPolicy:
    """The policy the emergency path runs under: the shorter approval rule, a CRITICAL-only
    scan gate, and the digest must have passed dev. Signature, provenance and SBOM checks are
    unchanged; freeze windows are bypassed by ``flows.promote.deploy_side``, with the ticket in the
    audit trail; the requester is verified and can never approve, so two people are involved.
    """
    if policy.emergency_approval is None:
        raise PolicyRefusal(f"{policy.environment} has no emergency path in its policy")
    scan = policy.scan
    if scan.threshold.rank < Severity.CRITICAL.rank:
        # A HIGH finding may ride along with a hotfix; a CRITICAL one never does.
        scan = scan.model_copy(update={"threshold": Severity.CRITICAL})
    # Expedited, never bypassed: the digest must still have been built and verified by
    # Portcullis and passed dev; skipping staging is stated in the post-incident review.
    return policy.model_copy(update={"approval": policy.emergency_approval, "scan": scan,
                                     "promote_from": "dev"})
