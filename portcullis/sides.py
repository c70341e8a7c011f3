"""A worker's own configuration, and the check that a flow run executes under it.

Authority over what a flow run may do comes from the worker host, never from the Prefect API:
the API's one auth string can change job variables, pools and deployments. Each worker
(``portcullis.worker``) therefore reads a TOML file on its host that fixes its side, its pool,
the flows it may run (deployment -> entrypoint) and the exact environment of their processes.
The same file, named to the flow process by the worker in :data:`WORKER_CONFIG_VAR`, is what
:func:`require_worker_run` checks the process against.

This module is light on purpose (no Prefect worker imports): every deployed flow imports it.
"""

from __future__ import annotations

import json
import os
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from portcullis.audit import AuditEntry
from portcullis.errors import ConfigurationError, PortcullisError
from portcullis.models import Frozen
from portcullis.settings import Settings

Side = Literal["build", "deploy"]

#: Set by the worker (and only by it) in each flow process: the configuration file it runs under.
WORKER_CONFIG_VAR = "PORTCULLIS_WORKER_CONFIG"

#: Which flows each side may run (a deployment is ``flow-name/deployment-name``, as in
#: deployments.yaml; one flow may have several deployments, e.g. one per catalog app).
SIDE_FLOWS: dict[Side, frozenset[str]] = {
    "build": frozenset({"build-release"}),
    "deploy": frozenset({
        "promote-dev", "promote-staging", "promote-prod", "emergency-promote",
        "post-incident-reviews", "dora-report", "rollback", "clear-pin",
    }),
}

#: Variable prefixes that hold the other side's credentials: never in a side's environment.
FORBIDDEN_PREFIXES: dict[Side, tuple[str, ...]] = {
    "build": ("PORTCULLIS_DEPLOY_", "PORTCULLIS_INCIDENTS_", "PORTCULLIS_APPROVERS_FILE"),
    "deploy": ("PORTCULLIS_BUILD_",),
}


class WorkerConfig(Frozen):
    """What one worker runs and with which environment; read from a file on the worker host."""

    side: Side
    pool: str = Field(min_length=1, description="the work pool this worker polls")
    name: str = Field(min_length=1, description="the worker's name in the Prefect API")
    checkout: Path = Field(description="the checkout of this repository flows are loaded from")
    deployments: dict[str, str] = Field(
        description="``flow/deployment`` -> the only entrypoint (``path.py:function``) it may run"
    )
    environment: dict[str, str] = Field(
        default_factory=dict, description="the exact PORTCULLIS_* settings of every flow run"
    )
    queues: tuple[str, ...] = Field(
        default=(),
        description="the pool's work queues it polls (empty: all of them); a host-specific "
        "queue lets runs be steered to this host (docs/scaling.md)",
    )
    start: Literal["warm", "cold"] = Field(
        default="warm",
        description="warm: fork each run from a pre-imported parent (portcullis.zygote); "
        "cold: a fresh `python -m portcullis.engine` per run",
    )

    @field_validator("checkout")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError(f"{value} must be an absolute path")
        return value

    @model_validator(mode="after")
    def _fits_side(self) -> WorkerConfig:
        foreign = []
        for key in sorted(self.deployments):
            flow, _, deployment = key.partition("/")  # "flow-name/deployment-name"
            if flow not in SIDE_FLOWS[self.side] or not deployment:
                foreign.append(key)
        if foreign:
            raise ValueError(f"the {self.side} side may not run {', '.join(foreign)}")
        for key, entrypoint in self.deployments.items():
            path, _, function = entrypoint.partition(":")
            if not path.endswith(".py") or not function.isidentifier() or path.startswith("/"):
                raise ValueError(f"{key}: entrypoint {entrypoint!r} is not 'relative/path.py:function'")
        for name in self.environment:
            if not name.startswith("PORTCULLIS_"):
                raise ValueError(f"environment variable {name} is not a PORTCULLIS_* setting")
            if name == WORKER_CONFIG_VAR:
                raise ValueError(f"{WORKER_CONFIG_VAR} is set by the worker, not configured")
            if name.startswith(FORBIDDEN_PREFIXES[self.side]):
                raise ValueError(f"{name} belongs to the other side, not the {self.side} side")
        return self

    def to_toml(self) -> str:
        """The file :func:`load_worker_config` reads back (JSON strings are TOML strings)."""
        lines = [f"{key} = {json.dumps(str(getattr(self, key)))}"
                 for key in ("side", "pool", "name", "checkout", "start")]
        lines.append(f"queues = {json.dumps(list(self.queues))}")
        lines.append("\n[deployments]")
        lines += [f"{json.dumps(k)} = {json.dumps(v)}" for k, v in sorted(self.deployments.items())]
        lines.append("\n[environment]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in sorted(self.environment.items())]
        return "\n".join(lines) + "\n"


def load_worker_config(path: Path, uid: int | None = None) -> WorkerConfig:
    """Read and validate a worker configuration file, refusing one others could have changed.

    Args:
        path: the TOML file.
        uid: the worker's uid (default: this process's).

    Raises:
        ConfigurationError: the file is a symlink, owned by someone other than root or the
            worker, writable by group or others, unreadable, or not a valid configuration.
    """
    me = os.getuid() if uid is None else uid
    try:
        # O_NOFOLLOW, and the checks on the open descriptor: no swap between check and read.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        reason = "it is a symlink" if os.path.islink(path) else exc.strerror
        raise ConfigurationError(
            f"worker configuration {path} refused: {reason}",
            hint="point --config at a regular file owned by root or the worker's account",
        ) from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigurationError(f"worker configuration {path} refused: not a regular file")
        if st.st_uid not in (0, me):
            raise ConfigurationError(
                f"worker configuration {path} refused: owned by uid {st.st_uid}, not by root "
                f"or the worker (uid {me})",
                hint=f"chown root {path}",
            )
        if st.st_mode & 0o022:
            raise ConfigurationError(
                f"worker configuration {path} refused: mode {st.st_mode & 0o777:o} lets "
                "group or others change it",
                hint=f"chmod 600 {path}",
            )
        raw = fh.read()
    try:
        return WorkerConfig.model_validate(tomllib.loads(raw.decode()))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValidationError) as exc:
        raise ConfigurationError(f"worker configuration {path} is invalid: {exc}") from None


def environment_mismatch(config: WorkerConfig, environ: Mapping[str, str]) -> str | None:
    """Why ``environ``'s PORTCULLIS_* variables differ from ``config`` (None: they are equal)."""
    actual = {k: v for k, v in environ.items()
              if k.startswith("PORTCULLIS_") and k != WORKER_CONFIG_VAR}
    extra = sorted(set(actual) - set(config.environment))
    missing = sorted(set(config.environment) - set(actual))
    changed = sorted(k for k in set(actual) & set(config.environment)
                     if actual[k] != config.environment[k])
    problems = [f"{label} {', '.join(names)}" for label, names in
                (("not configured:", extra), ("missing:", missing), ("changed:", changed)) if names]
    return "; ".join(problems) or None


def require_worker_run(
    expected: Side,
    *,
    run_id: str | None = None,
    app: str | None = None,
    environment: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> WorkerConfig:
    """Refuse to go on unless this process runs under its ``expected``-side worker's configuration.

    The worker names its configuration file in :data:`WORKER_CONFIG_VAR`; the file must pass
    :func:`load_worker_config`'s checks, declare ``expected`` and configure exactly this
    process's PORTCULLIS_* variables (none extra, none missing, none different). A refusal is
    recorded as ``promotion.refused`` in the state store the worker's file names
    (:func:`record_refusal`; without a usable file, the one this process's settings name).

    Args:
        expected: "build" or "deploy".
        run_id: the flow run, for the audit record.
        app: the application, for the audit record.
        environment: the target environment, for the audit record.
        environ: the environment to check; default ``os.environ``.

    Returns:
        The worker configuration the run executes under.

    Raises:
        ConfigurationError: the run does not execute under an ``expected``-side worker.
    """
    env = os.environ if environ is None else environ
    named = env.get(WORKER_CONFIG_VAR)
    config: WorkerConfig | None = None
    reason: str | None
    if not named:
        reason = f"{WORKER_CONFIG_VAR} is not set: not started by a Portcullis worker"
    else:
        try:
            config = load_worker_config(Path(named))
        except ConfigurationError as exc:
            reason = exc.message
        else:
            mismatch = environment_mismatch(config, env)
            if config.side != expected:
                reason = f"its worker is on the {config.side} side"
            elif mismatch:
                reason = f"its PORTCULLIS_* variables differ from the worker's configuration ({mismatch})"
            else:
                return config
    message = f"this flow run must run on the {expected} side's Portcullis worker, but {reason}"
    # Without a usable worker file, the process's own settings say where the store is.
    failed = record_refusal(Settings() if config is None else worker_settings(config), AuditEntry(
        event="promotion.refused", actor="portcullis", run_id=run_id, app=app,
        environment=environment, details={"reason": message, "stage": "worker-side"},
    ))
    if failed is not None:
        message += f" (the refusal could not be recorded: {failed})"
    raise ConfigurationError(message, hint=f"run the deployment on the {expected} side's work pool")


def worker_settings(config: WorkerConfig) -> Settings:
    """The settings of the flow runs of the worker ``config`` configures (its file's
    environment, nothing of the worker's own): where their state store is, among others."""
    return Settings.of(config.environment)


def record_refusal(settings: Settings, entry: AuditEntry) -> str | None:
    """Append a refusal to the state store ``settings`` name, the trail flows append to.

    Returns:
        None once recorded; otherwise why it could not be (the store is unreachable or
        refuses): the caller refuses all the same and says so.
    """
    # Imported here: this module stays light for the flows and warm starts that import it.
    import sqlalchemy.exc

    from portcullis.state import open_state

    try:
        open_state(settings).audit_log().append(entry)
    except (PortcullisError, sqlalchemy.exc.SQLAlchemyError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None
