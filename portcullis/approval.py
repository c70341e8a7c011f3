"""Human approval: who may approve, how an approval is proven, and when a promotion may go on.

Prefect OSS records nobody for a resume, and a name typed into a form is not identity. Each
approval therefore carries a one-time code from the approver's own TOTP secret. The secrets
live in the :class:`ApproverDirectory`, a file on the deploy side (mode 0600, owned by the
worker's account) that the person triggering a promotion can neither read nor change, and
that is never stored in a Prefect block (any API client can read blocks on OSS).

The :class:`ApprovalLedger` is a plain state machine: ``submit(decision, at)`` accepts or
refuses one decision, and the ledger says whether the environment's
:class:`ApprovalPolicy` is satisfied, rejected or timed out. A refused decision never counts.
A code that verified once is burned in the :class:`ReplayStore` (the approver's last
accepted TOTP time step, kept next to the audit log), so it cannot be replayed in this or any
other run. The approver also types the first characters of the digest, which binds the
decision to the image shown and makes "approve whatever this is" impossible.
"""

from __future__ import annotations

import base64
import binascii
import enum
import errno
import hmac
import json
import os
import re
import stat
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from datetime import datetime, timedelta
from email.utils import parseaddr
from pathlib import Path
from typing import assert_never

import pyotp
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from portcullis.audit import file_lock, write_atomic
from portcullis.errors import ConfigurationError, PolicyRefusal
from portcullis.freeze import FreezeStatus, plain_utc
from portcullis.models import CommitSha, Digest, Frozen

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_CODE_RE = re.compile(r"^[0-9]{6}$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")
# Accepting the neighbouring time steps absorbs clock skew and the pause poll delay
# (the code is checked up to one poll interval after it was typed).
_TOTP_WINDOW = (0, -1, 1)


def _norm(identity: str) -> str:
    return " ".join(identity.strip().lower().split())


def identity_forms(identity: str) -> set[str]:
    """Every normalised form of an identity string: whole, and the name/email parts of
    ``Name <email>``, so "Alice <alice@x>" matches an approver known as "alice@x"."""
    forms = {_norm(identity)}
    name, email = parseaddr(identity)
    forms.update(_norm(part) for part in (name, email) if part)
    forms.discard("")
    return forms


class Approver(Frozen):
    """One person who may approve, with the secret their authenticator app holds."""

    name: str = Field(description="stable id typed into the form, lower case, e.g. 'alice'")
    display_name: str = ""
    aliases: tuple[str, ...] = Field(
        default=(),
        description="other identities of this person (emails, git author names, usernames): "
        "used to stop them approving their own commit or run",
    )
    groups: tuple[str, ...] = ()
    totp_secret: SecretStr = Field(description="base32 TOTP secret enrolled in their app")

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _NAME_RE.fullmatch(value):
            raise ValueError(f"approver name {value!r} must be lower case letters, digits, ._-")
        return value

    @field_validator("totp_secret")
    @classmethod
    def _base32(cls, value: SecretStr) -> SecretStr:
        text = value.get_secret_value().replace(" ", "").upper()
        try:
            raw = base64.b32decode(text + "=" * (-len(text) % 8))
        except (binascii.Error, ValueError):
            raise ValueError("totp_secret is not base32") from None
        if len(raw) < 16:
            raise ValueError("totp_secret must hold at least 128 bits (26+ base32 characters)")
        return SecretStr(text)

    def identities(self) -> set[str]:
        """Normalised identities this person is known by."""
        out = {_norm(self.name)}
        for alias in (self.display_name, *self.aliases):
            if alias:
                out |= identity_forms(alias)
        return out

    def is_known_as(self, identity: str) -> bool:
        """True when ``identity`` (e.g. a commit author) names this person."""
        return bool(self.identities() & identity_forms(identity))

    @property
    def label(self) -> str:
        """Name to show: display name with the id."""
        return f"{self.display_name} ({self.name})" if self.display_name else self.name


class ApproverDirectory(Frozen):
    """Everyone who may approve anywhere. Load it with :meth:`load` from a deploy-side file."""

    approvers: tuple[Approver, ...]

    @model_validator(mode="after")
    def _unique(self) -> ApproverDirectory:
        owner: dict[str, str] = {}
        for approver in self.approvers:
            for identity in approver.identities():
                other = owner.setdefault(identity, approver.name)
                if other != approver.name:
                    raise ValueError(
                        f"identity {identity!r} belongs to both {other!r} and {approver.name!r}"
                    )
        return self

    def get(self, name: str) -> Approver | None:
        """The approver with this id (case-insensitive), or None."""
        wanted = _norm(name)
        return next((a for a in self.approvers if a.name == wanted), None)

    @classmethod
    def load(cls, path: Path) -> ApproverDirectory:
        """Read the directory from a TOML file with ``[[approver]]`` tables.

        The file holds TOTP secrets, so it is refused unless it is owned by this process's
        account (the worker's) or root, has mode 0600 (or stricter), sits in a folder that
        only that owner can write, and is reached through no symlink anywhere on its path.
        It is opened with ``O_NOFOLLOW`` and checked on the open descriptor, so it cannot be
        swapped between the check and the read.

        Raises:
            ConfigurationError: the file is missing, too open, owned by someone else, reached
                through a symlink, or malformed.
        """
        text = read_private_file(path, what="approver directory",
                                 hint="set PORTCULLIS_APPROVERS_FILE to the deploy-side approvers file")
        try:
            data = tomllib.loads(text)
            return cls(approvers=tuple(data.get("approver", ())))
        except (tomllib.TOMLDecodeError, ValidationError) as exc:
            raise ConfigurationError(f"approver directory {path} is malformed: {exc}") from None


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def read_private_file(path: Path, *, what: str, hint: str) -> str:
    """Read a secret-holding file only if nobody but its trusted owner could have written it.

    Args:
        path: absolute or relative path; no component may be a symlink.
        what: what the file is, for error messages ("approver directory").
        hint: what to do when it cannot be read at all.

    Raises:
        ConfigurationError: naming the exact condition that failed.
    """
    absolute = Path(os.path.abspath(path))
    # Every component must be a real directory owned by root or us, writable by nobody else:
    # otherwise someone else could swap the file or a folder above it.
    for parent in reversed(absolute.parents):
        try:
            info = parent.lstat()
        except OSError as exc:
            raise ConfigurationError(f"{what} {path} cannot be read: {exc}", hint=hint) from None
        if stat.S_ISLNK(info.st_mode):
            raise ConfigurationError(
                f"{what} {path} is reached through the symlink {parent}; refused",
                hint="point the setting at the real path, in a folder only the worker's account can write",
            )
    folder = absolute.parent.lstat()
    if not _trusted_owner(folder.st_uid) or folder.st_mode & 0o022:
        raise ConfigurationError(
            f"the folder {absolute.parent} of {what} {path} can be written by someone other "
            f"than its owner, or is owned by uid {folder.st_uid} (mode {stat.filemode(folder.st_mode)})",
            hint=f"chown the folder to the worker's account and chmod 700 {absolute.parent}",
        )
    try:
        fd = os.open(absolute, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigurationError(f"{what} {path} is a symlink; refused",
                                     hint="point the setting at the real file") from None
        raise ConfigurationError(f"{what} {path} cannot be read: {exc.strerror}", hint=hint) from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ConfigurationError(f"{what} {path} is not a regular file")
        if not _trusted_owner(info.st_uid):
            raise ConfigurationError(
                f"{what} {path} is owned by uid {info.st_uid}, not by the worker's account "
                f"(uid {os.geteuid()}) or root",
                hint="chown the file to the worker's account",
            )
        if info.st_mode & 0o077:
            raise ConfigurationError(
                f"{what} {path} is accessible to group/others "
                f"(mode {stat.filemode(info.st_mode)}); it holds secrets",
                hint=f"chmod 600 {path}",
            )
        try:
            return fh.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigurationError(f"{what} {path} is not UTF-8: {exc}") from None


class ApprovalSettings(BaseSettings):
    """Deploy-side settings (environment of the worker, not flow parameters)."""

    model_config = SettingsConfigDict(env_prefix="PORTCULLIS_")

    approvers_file: Path = Field(description="TOML approver directory, mode 0600")

    def load_directory(self) -> ApproverDirectory:
        """Load the directory named by ``PORTCULLIS_APPROVERS_FILE``."""
        return ApproverDirectory.load(self.approvers_file)


class ApprovalPolicy(Frozen):
    """The approval rules of one environment. Loaded from deploy-side config, never parameters."""

    environment: str
    required_approvals: int = Field(default=1, ge=1, description="distinct people (prod: 2)")
    required_groups: tuple[str, ...] = Field(
        default=(), description="one approval from a distinct member of each, e.g. security"
    )
    eligible_groups: tuple[str, ...] = Field(
        default=(),
        description="only members of these groups (or of required_groups) may approve; "
        "empty: anyone in the directory",
    )
    wait_timer: timedelta = Field(
        default=timedelta(0), description="minimum time between trigger and deploy"
    )
    timeout: timedelta = Field(
        default=timedelta(hours=24), description="approvals must be complete within this"
    )
    digest_prefix_length: int = Field(
        default=12, ge=8, le=64, description="hex characters of the digest to confirm"
    )
    max_failed_codes: int = Field(
        default=5, ge=1, description="wrong codes per approver before they are locked out"
    )
    max_invalid_submissions: int = Field(
        default=20, ge=1, description="refused submissions before the promotion is rejected"
    )

    @model_validator(mode="after")
    def _sane(self) -> ApprovalPolicy:
        if self.timeout <= timedelta(0):
            raise ValueError("approval timeout must be positive")
        if self.wait_timer < timedelta(0):
            raise ValueError("wait timer cannot be negative")
        if len(set(self.required_groups)) != len(self.required_groups):
            raise ValueError("required_groups lists a group twice")
        return self

    def may_approve(self, approver: Approver) -> bool:
        """Whether this person is eligible in this environment."""
        allowed = set(self.eligible_groups) | set(self.required_groups)
        return not allowed or bool(allowed & set(approver.groups))


class ApprovalSubject(Frozen):
    """What is being approved, and by whose action. Built by the flow, not typed by a user."""

    run_id: str
    app: str
    environment: str
    digest: Digest
    commit: CommitSha
    author: str = Field(description="commit author, 'Name <email>'")
    change_authors: tuple[str, ...] = Field(
        default=(),
        description="every author and committer ('Name <email>') of every commit in the change: "
        "the commits between what runs in the environment and the promoted commit",
    )
    triggered_by: str = Field(
        description="the verified requester's directory id, or 'scheduler' for a run the "
        "Prefect server's scheduler created"
    )
    triggered_at: datetime = Field(description="when the run started, from the server")

    @field_validator("triggered_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return _aware(value)


class Verdict(enum.StrEnum):
    """An approver's answer."""

    APPROVE = "approve"
    REJECT = "reject"


class ApprovalDecision(Frozen):
    """One submission from the form, unverified."""

    approver: str
    code: str
    verdict: Verdict
    digest_prefix: str
    comment: str = ""


class LedgerState(enum.StrEnum):
    """Where an approval request stands."""

    PENDING = "pending"
    SATISFIED = "satisfied"
    REJECTED = "rejected"
    TIMED_OUT = "timed-out"


class Refusal(enum.StrEnum):
    """Why a submission did not count."""

    CLOSED = "closed"
    TIMED_OUT = "timed-out"
    UNKNOWN_APPROVER = "unknown-approver"
    SELF_APPROVAL = "self-approval"
    NOT_ELIGIBLE = "not-eligible"
    LOCKED_OUT = "locked-out"
    BAD_CODE = "bad-code"
    REPLAYED_CODE = "replayed-code"
    WRONG_DIGEST = "wrong-digest"
    DUPLICATE_APPROVER = "duplicate-approver"
    ALREADY_SATISFIED = "already-satisfied"


class AcceptedDecision(Frozen):
    """A verified decision that counts."""

    approver: str
    label: str
    groups: tuple[str, ...]
    verdict: Verdict
    at: datetime
    totp_step: int
    comment: str = ""


class SubmitResult(Frozen):
    """The ledger's answer to one submission."""

    accepted: bool
    approver: str = Field(description="the approver named in the submission (verified if accepted)")
    verdict: Verdict
    refusal: Refusal | None = None
    message: str
    state: LedgerState
    totp_step: int | None = None
    decision: AcceptedDecision | None = Field(
        default=None, description="what counted, when accepted (kept to restore the ledger)"
    )


class ApprovalOutcome(Frozen):
    """A granted approval, handed to the deploy stage."""

    subject: ApprovalSubject
    approvals: tuple[AcceptedDecision, ...]
    granted_at: datetime
    audit_seq: int = Field(description="sequence number of the 'approval.granted' audit record")


class ReplayStore(ABC):
    """Remembers the last accepted TOTP time step of each approver."""

    @abstractmethod
    def claim(self, approver: str, step: int) -> bool:
        """Burn ``step`` for ``approver``: True if it is newer than any used before."""


class MemoryReplayStore(ReplayStore):
    """A replay store for one process (tests, dry runs)."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def claim(self, approver: str, step: int) -> bool:
        """See :meth:`ReplayStore.claim`."""
        if step <= self._last.get(approver, -1):
            return False
        self._last[approver] = step
        return True


def replay_store_path(audit_path: Path) -> Path:
    """Where the used-code store lives next to an audit log."""
    return audit_path.with_name(audit_path.name + ".totp-used.json")


class FileReplayStore(ReplayStore):
    """A replay store in a JSON file, safe for concurrent runs on one host (file lock).

    Args:
        path: the JSON file; see :func:`replay_store_path`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = path.with_name(path.name + ".lock")

    def claim(self, approver: str, step: int) -> bool:
        """See :meth:`ReplayStore.claim`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(self._lock):
            last: dict[str, int] = {}
            if self.path.exists():
                raw = json.loads(self.path.read_text(encoding="utf-8") or "{}")
                if not isinstance(raw, dict):
                    raise ConfigurationError(f"replay store {self.path} is not a JSON object")
                last = {str(k): int(v) for k, v in raw.items()}
            if step <= last.get(approver, -1):
                return False
            last[approver] = step
            write_atomic(self.path, json.dumps(last, sort_keys=True).encode() + b"\n")
            return True


SCHEDULER = "scheduler"


class RequesterProof(enum.StrEnum):
    """How the person (or system) who started a promotion was established."""

    TOTP = "totp"
    """An enrolled identity's code, verified on the deploy side and burned."""
    SCHEDULE = "schedule"
    """The Prefect server's scheduler created the run (``auto_scheduled``, not settable by clients)."""
    UNVERIFIED = "unverified"
    """A name typed by the caller; accepted only where no person must approve."""


class Requester(Frozen):
    """Who asked for a promotion, and how we know."""

    name: str = Field(description="directory id, 'scheduler', or the typed name if unverified")
    proof: RequesterProof
    totp_step: int | None = None

    @property
    def verified(self) -> bool:
        """True unless the name is only what the caller typed."""
        return self.proof is not RequesterProof.UNVERIFIED


def verify_requester(
    directory: ApproverDirectory, claimed: str, code: str, at: datetime, replay: ReplayStore
) -> Requester:
    """Prove who asks for a promotion with their current code, like an approval.

    The requester can then never approve: the ledger excludes them by every identity the
    directory lists for them. The code is burned, so the same code cannot also approve.

    Raises:
        PolicyRefusal: unknown identity, wrong or expired code, or a code already used.
    """
    person = directory.get(claimed)
    if person is None:
        raise PolicyRefusal(
            f"requester {claimed!r} is not an enrolled identity; a promotion started by a "
            "person must name their directory id",
            hint="pass requested_by=<your id> and requester_code=<your current code>",
        )
    step = verify_totp(person, code, _aware(at))
    if step is None:
        raise PolicyRefusal(
            f"the requester code for {person.name} is wrong or expired",
            hint="pass the current 6-digit code from your authenticator as requester_code",
        )
    if not replay.claim(person.name, step):
        raise PolicyRefusal(
            f"the requester code for {person.name} was already used; wait for the next code",
        )
    return Requester(name=person.name, proof=RequesterProof.TOTP, totp_step=step)


def _match_groups(groups: tuple[str, ...], approvals: Iterable[AcceptedDecision]) -> dict[str, str]:
    """Assign each required group a distinct approver from it (maximum bipartite matching)."""
    members = {g: [a.approver for a in approvals if g in a.groups] for g in groups}
    owner: dict[str, str] = {}  # approver -> group

    def assign(group: str, seen: set[str]) -> bool:
        for person in members[group]:
            if person in seen:
                continue
            seen.add(person)
            if person not in owner or assign(owner[person], seen):
                owner[person] = group
                return True
        return False

    for group in groups:
        assign(group, set())
    return {group: person for person, group in owner.items()}


class ApprovalLedger:
    """The approval state machine for one promotion (one run, one digest).

    Args:
        policy: the environment's rules.
        directory: who exists and their secrets.
        subject: what is being approved.
        replay: where used codes are burned.
        opened_at: when approval was requested; the timeout runs from here.
    """

    def __init__(
        self,
        policy: ApprovalPolicy,
        directory: ApproverDirectory,
        subject: ApprovalSubject,
        replay: ReplayStore,
        opened_at: datetime,
    ) -> None:
        if policy.environment != subject.environment:
            raise ConfigurationError(
                f"approval policy is for {policy.environment!r} "
                f"but the promotion targets {subject.environment!r}"
            )
        self.policy = policy
        self.directory = directory
        self.subject = subject
        self._replay = replay
        self.opened_at = _aware(opened_at)
        self._approvals: list[AcceptedDecision] = []
        self._rejection: AcceptedDecision | None = None
        self._abandoned: str | None = None
        self._failed_codes: dict[str, int] = {}
        self._invalid = 0

    @property
    def deadline(self) -> datetime:
        """After this instant a pending request is timed out."""
        return self.opened_at + self.policy.timeout

    @property
    def ready_at(self) -> datetime:
        """The wait timer: the earliest deploy instant."""
        return _aware(self.subject.triggered_at) + self.policy.wait_timer

    @property
    def approvals(self) -> tuple[AcceptedDecision, ...]:
        """Accepted approvals, in order."""
        return tuple(self._approvals)

    @property
    def rejection(self) -> AcceptedDecision | None:
        """The verified rejection that stopped the promotion, if any."""
        return self._rejection

    @property
    def rejected(self) -> bool:
        """True once an approver rejected, or too many invalid submissions arrived."""
        return self._rejection is not None or self._abandoned is not None

    @property
    def rejection_reason(self) -> str | None:
        """Why the promotion was rejected, in a sentence."""
        if self._rejection is not None:
            why = f": {self._rejection.comment}" if self._rejection.comment else ""
            return f"rejected by {self._rejection.label}{why}"
        return self._abandoned

    @property
    def is_satisfied(self) -> bool:
        """Enough distinct approvers, every required group covered, and no rejection."""
        if self.rejected or len(self._approvals) < self.policy.required_approvals:
            return False
        return not self.missing_groups()

    def missing_groups(self) -> tuple[str, ...]:
        """Required groups that no distinct approver covers yet."""
        matched = _match_groups(self.policy.required_groups, self._approvals)
        return tuple(g for g in self.policy.required_groups if g not in matched)

    def still_needed(self) -> str:
        """What is missing, for the form and logs."""
        count = max(0, self.policy.required_approvals - len(self._approvals))
        groups = self.missing_groups()
        parts = []
        if count:
            parts.append(f"{count} more approval(s) from distinct people")
        if groups:
            parts.append("one from each of: " + ", ".join(groups))
        return "; ".join(parts) or "nothing"

    def state(self, at: datetime) -> LedgerState:
        """Where the request stands at ``at``."""
        if self.rejected:
            return LedgerState.REJECTED
        if self.is_satisfied:
            return LedgerState.SATISFIED
        if _aware(at) >= self.deadline:
            return LedgerState.TIMED_OUT
        return LedgerState.PENDING

    def may_proceed(self, at: datetime) -> bool:
        """Satisfied and the wait timer has run out."""
        return self.state(at) is LedgerState.SATISFIED and _aware(at) >= self.ready_at

    def submit(self, decision: ApprovalDecision, at: datetime) -> SubmitResult:
        """Verify one decision and, if it holds, count it.

        Args:
            decision: what the form sent.
            at: when it arrived (aware); the code is checked against this time.

        Returns:
            accepted, or refused with the reason; a refusal never changes what counts.
        """
        at = _aware(at)
        name = _norm(decision.approver)

        def refuse(kind: Refusal, message: str, *, invalid: bool = True) -> SubmitResult:
            if invalid:
                self._count_invalid()
            return SubmitResult(
                accepted=False,
                approver=name,
                verdict=decision.verdict,
                refusal=kind,
                message=message,
                state=self.state(at),
            )

        state = self.state(at)
        if state is LedgerState.PENDING:
            pass
        elif state is LedgerState.SATISFIED:
            if decision.verdict is Verdict.APPROVE:
                # A rejection still counts after approval: anyone may stop it until it deploys.
                return refuse(
                    Refusal.ALREADY_SATISFIED, "approvals are already complete", invalid=False
                )
        elif state is LedgerState.REJECTED:
            return refuse(Refusal.CLOSED, "this approval request was rejected", invalid=False)
        elif state is LedgerState.TIMED_OUT:
            return refuse(Refusal.TIMED_OUT, "this approval request timed out", invalid=False)
        else:
            assert_never(state)

        approver = self.directory.get(name)
        if approver is None:
            return refuse(
                Refusal.UNKNOWN_APPROVER,
                f"{decision.approver!r} is not an enrolled approver; use your approver id",
            )
        if approver.is_known_as(self.subject.author):
            return refuse(
                Refusal.SELF_APPROVAL,
                f"{approver.name} wrote commit {self.subject.commit[:12]} and cannot approve it",
            )
        wrote = next((a for a in self.subject.change_authors if approver.is_known_as(a)), None)
        if wrote is not None:
            return refuse(
                Refusal.SELF_APPROVAL,
                f"{approver.name} authored a commit in this change (as {wrote}) and cannot "
                "approve it",
            )
        if approver.is_known_as(self.subject.triggered_by):
            return refuse(
                Refusal.SELF_APPROVAL,
                f"{approver.name} triggered this promotion and cannot approve it",
            )
        if not self.policy.may_approve(approver):
            groups = sorted(set(self.policy.eligible_groups) | set(self.policy.required_groups))
            return refuse(
                Refusal.NOT_ELIGIBLE,
                f"{approver.name} is not in a group allowed to approve "
                f"{self.subject.environment} ({', '.join(groups)})",
            )
        if self._failed_codes.get(approver.name, 0) >= self.policy.max_failed_codes:
            return refuse(
                Refusal.LOCKED_OUT,
                f"{approver.name} entered too many wrong codes for this run; "
                "another approver must decide",
            )
        step = verify_totp(approver, decision.code, at)
        if step is None:
            self._failed_codes[approver.name] = self._failed_codes.get(approver.name, 0) + 1
            left = self.policy.max_failed_codes - self._failed_codes[approver.name]
            return refuse(
                Refusal.BAD_CODE,
                f"the code for {approver.name} is wrong or expired ({left} attempt(s) left); "
                "enter the current 6-digit code from your authenticator",
            )
        if not self._replay.claim(approver.name, step):
            return refuse(
                Refusal.REPLAYED_CODE,
                f"this code for {approver.name} was already used; wait for the next code",
            )
        if not self._digest_matches(decision.digest_prefix):
            return refuse(
                Refusal.WRONG_DIGEST,
                f"the digest confirmation does not match: type the first "
                f"{self.policy.digest_prefix_length} hex characters of the digest shown",
            )

        accepted = AcceptedDecision(
            approver=approver.name,
            label=approver.label,
            groups=approver.groups,
            verdict=decision.verdict,
            at=at,
            totp_step=step,
            comment=decision.comment.strip(),
        )
        if decision.verdict is Verdict.REJECT:
            self._rejection = accepted
            message = f"rejected by {approver.label}"
        elif decision.verdict is Verdict.APPROVE:
            if any(a.approver == approver.name for a in self._approvals):
                return refuse(
                    Refusal.DUPLICATE_APPROVER,
                    f"{approver.name} already approved; the next approval must come from "
                    "someone else",
                )
            self._approvals.append(accepted)
            message = f"approval from {approver.label} accepted; still needed: "
            message += self.still_needed()
        else:
            assert_never(decision.verdict)
        return SubmitResult(
            accepted=True,
            approver=approver.name,
            verdict=decision.verdict,
            message=message,
            state=self.state(at),
            totp_step=step,
            decision=accepted,
        )

    def restore(self, accepted: AcceptedDecision | None, refusal: Refusal | None,
                approver: str) -> None:
        """Re-apply a submission this ledger already judged (and recorded) in an earlier
        process of the same run, without checking its code again: the code was verified and
        burned then, and is expired now.

        Args:
            accepted: the decision that counted, or None if it was refused.
            refusal: why it was refused (None if it counted).
            approver: the approver named in the submission.
        """
        if accepted is not None:
            if accepted.verdict is Verdict.REJECT:
                self._rejection = accepted
            else:
                self._approvals.append(accepted)
            return
        if refusal is Refusal.BAD_CODE:
            self._failed_codes[approver] = self._failed_codes.get(approver, 0) + 1
        if refusal not in (Refusal.CLOSED, Refusal.TIMED_OUT, Refusal.ALREADY_SATISFIED):
            self._count_invalid()

    def _count_invalid(self) -> None:
        self._invalid += 1
        if self._invalid >= self.policy.max_invalid_submissions and not self.rejected:
            self._abandoned = (
                f"{self._invalid} invalid approval submissions: "
                "stopped as a precaution against guessing"
            )

    def _digest_matches(self, typed: str) -> bool:
        text = typed.strip().lower().removeprefix("sha256:")
        want = self.subject.digest.removeprefix("sha256:")
        return (
            len(text) >= self.policy.digest_prefix_length
            and bool(_HEX_RE.fullmatch(text))
            and want.startswith(text)
        )


def _aware(at: datetime) -> datetime:
    if at.tzinfo is None or at.utcoffset() is None:
        raise PolicyRefusal(f"time {at.isoformat()} has no time zone", hint="use datetime.now(UTC)")
    return plain_utc(at)


def verify_totp(approver: Approver, code: str, at: datetime) -> int | None:
    """The time step ``code`` belongs to, or None. Constant-time comparison per candidate."""
    code = code.replace(" ", "")
    if not _CODE_RE.fullmatch(code):
        return None
    totp = pyotp.TOTP(approver.totp_secret.get_secret_value())
    base = totp.timecode(at)
    for offset in _TOTP_WINDOW:
        if hmac.compare_digest(totp.generate_otp(base + offset), code):
            return base + offset
    return None


class ScanComparison(Frozen):
    """Vulnerability counts of the candidate next to what runs now, for the approval form."""

    candidate: dict[str, int] = Field(description="severity -> count, e.g. {'CRITICAL': 0}")
    running: dict[str, int] | None = Field(default=None, description="None: nothing runs yet")
    running_digest: str | None = None
    verdict: str = Field(default="", description="the scan gate's verdict, e.g. 'passed'")


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


def md_text(value: str, limit: int = 200) -> str:
    """Untrusted text (author names, comments) made inert for Markdown: no links, no markup."""
    flat = " ".join(value.split())
    if len(flat) > limit:
        flat = flat[: limit - 1] + "…"
    return _MD_SPECIAL.sub(r"\\\1", flat)


_SEVERITIES = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "UNKNOWN")


def render_approval_request(
    ledger: ApprovalLedger,
    at: datetime,
    *,
    freeze: FreezeStatus | None = None,
    scan: ScanComparison | None = None,
    notice: str | None = None,
) -> str:
    """The Markdown shown above the approval form.

    Args:
        ledger: the request (subject, policy and approvals so far).
        at: now, for the time left.
        freeze: the freeze status checked before asking.
        scan: scan counts of the candidate and of what runs now.
        notice: the outcome of the previous submission (e.g. why it was refused).

    Returns:
        Markdown; every value that a user or a commit could influence is escaped.
    """
    s, p = ledger.subject, ledger.policy
    digest_hex = s.digest.removeprefix("sha256:")
    lines = [
        f"## Approve {md_text(s.app)} → {md_text(s.environment)}?",
        "",
    ]
    if notice:
        lines += [f"> **{md_text(notice, 400)}**", ""]
    lines += [
        "| | |",
        "|---|---|",
        f"| Image digest | `{s.digest}` |",
        f"| Commit | `{s.commit}` |",
        f"| Author | {md_text(s.author)} |",
        f"| Triggered by | {md_text(s.triggered_by)} |",
        f"| Flow run | `{s.run_id}` |",
        "",
    ]
    if scan is not None:
        keys = [k for k in _SEVERITIES if k in scan.candidate or (scan.running or {}).get(k)]
        keys += sorted(set(scan.candidate) - set(_SEVERITIES))
        running = "what runs now" + (
            f" (`{md_text(scan.running_digest, 80)}`)" if scan.running_digest else ""
        )
        lines += ["### Scan", "", f"| Severity | candidate | {running} |", "|---|---|---|"]
        for key in keys:
            now = "–" if scan.running is None else str(scan.running.get(key, 0))
            lines.append(f"| {md_text(key)} | {scan.candidate.get(key, 0)} | {now} |")
        if scan.verdict:
            lines += ["", f"Scan gate: **{md_text(scan.verdict)}**"]
        lines.append("")
    if freeze is not None:
        lines += ["### Change freeze", "", md_text(freeze.summary(), 600), ""]
        lines += [f"- warning: {md_text(w, 300)}" for w in freeze.warnings]
        lines.append("")
    lines += ["### Approvals", ""]
    for a in ledger.approvals:
        groups = ", ".join(a.groups) or "no group"
        lines.append(f"- ✅ {md_text(a.label)} [{md_text(groups)}] at {a.at.isoformat()}")
    if not ledger.approvals:
        lines.append("- none yet")
    lines += [
        "",
        f"Rule for {md_text(p.environment)}: {p.required_approvals} distinct approver(s)"
        + (
            f", one from each of {md_text(', '.join(p.required_groups))}"
            if p.required_groups
            else ""
        )
        + "; the commit author and whoever triggered the run cannot approve.",
        f"Still needed: {md_text(ledger.still_needed())}.",
        (
            f"Deadline: {ledger.deadline.isoformat()} "
            f"({max(0, int((ledger.deadline - _aware(at)).total_seconds()))} s left); "
            f"earliest deploy (wait timer): {ledger.ready_at.isoformat()}."
        ),
        "",
        "### How to answer",
        "",
        "- **approver**: your approver id",
        "- **code**: the current 6-digit code from your authenticator app",
        (
            f"- **digest_prefix**: the first {p.digest_prefix_length} hex characters of the "
            f"digest (`{digest_hex[:4]}…`), to confirm what you approve"
        ),
        "- **decision**: approve or reject (a rejection stops the promotion)",
    ]
    return "\n".join(lines)


__all__ = [
    "SCHEDULER",
    "AcceptedDecision",
    "ApprovalDecision",
    "ApprovalLedger",
    "ApprovalOutcome",
    "ApprovalPolicy",
    "ApprovalSettings",
    "ApprovalSubject",
    "Approver",
    "ApproverDirectory",
    "FileReplayStore",
    "LedgerState",
    "MemoryReplayStore",
    "Refusal",
    "ReplayStore",
    "Requester",
    "RequesterProof",
    "ScanComparison",
    "SubmitResult",
    "Verdict",
    "identity_forms",
    "md_text",
    "render_approval_request",
    "replay_store_path",
    "verify_requester",
]
