"""The app catalog: which services Portcullis promotes, from where, to which environments.

One TOML file in the repository (``apps.toml``) with an ``[[app]]`` table per service::

    [[app]]
    name = "hello"
    repository = "."                 # a git URL, or a path relative to the catalog file
    context = "examples/hello"       # the directory holding the Dockerfile
    health_path = "/healthz"         # optional: default the catalog's top-level health_path
    environments = ["dev", "staging", "prod"]
    owners = ["bob"]

    [[app.freeze]]                   # optional: the app's own windows, on top of the
    kind = "once"                    # environment policy's (they can only add freezes)
    ...

Top-level ``health_path`` and ``load_path`` are the defaults for every entry, and for an app
promoted without one (:func:`probe_paths`); with no catalog file both are ``/``.

The catalog says *what* to promote; it grants nothing. Every gate still comes from the
deploy side's environment policy, and an app's own freeze windows only add to the
environment's. Entries are validated at load; an error names the entry and the field.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from portcullis.environments import port_block, port_plan
from portcullis.errors import ConfigurationError
from portcullis.freeze import FreezePolicy, FreezeWindow
from portcullis.models import Frozen
from portcullis.policy import EnvironmentPolicy
from portcullis.settings import REPO_ROOT

EnvironmentName = Literal["dev", "staging", "prod"]
ENVIRONMENTS: tuple[EnvironmentName, ...] = ("dev", "staging", "prod")
_APP_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DEFAULT_PROBE_PATH = "/"
"""Health and load path when neither the app's entry nor the catalog names one."""


def _url_path(value: str | None) -> str | None:
    if value is not None and (not value.startswith("/") or any(c.isspace() for c in value)):
        raise ValueError(f"must be an absolute URL path such as /healthz, not {value!r}")
    return value


class AppEntry(Frozen):
    """One service in the catalog."""

    name: str = Field(description="app name: registry repository, container and route names")
    repository: str = Field(min_length=1, description="git URL, or a path relative to the catalog")
    context: str = Field(default=".", description="directory in the repository holding the Dockerfile")
    health_path: str | None = Field(
        default=None, description="HTTP path that answers 200 when healthy (default: the catalog's)")
    load_path: str | None = Field(
        default=None, description="HTTP path the local stack's users ask for (infra/loadgen.py) "
        "(default: the catalog's, else the health path)")
    environments: tuple[EnvironmentName, ...] = Field(min_length=1, description="where it is promoted, in order")
    owners: tuple[str, ...] = Field(min_length=1, description="who answers for it (directory ids or teams)")
    freeze: tuple[FreezeWindow, ...] = Field(default=(), description="the app's own freeze windows")

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _APP_RE.fullmatch(value):
            raise ValueError("must be lower case letters, digits and '-', starting with a letter or digit")
        return value

    @field_validator("health_path", "load_path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return _url_path(value)

    @field_validator("context")
    @classmethod
    def _inside(cls, value: str) -> str:
        if value.startswith("/") or ".." in Path(value).parts:
            raise ValueError(f"must be a relative path inside the repository, not {value!r}")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> AppEntry:
        if len(set(self.environments)) != len(self.environments):
            raise ValueError("environments lists an environment twice")
        # Staging and prod take digests that passed the environment before: a gap cannot work.
        wanted = [e for e in ENVIRONMENTS if e in self.environments]
        if list(self.environments) != wanted or tuple(wanted) != ENVIRONMENTS[:len(wanted)]:
            raise ValueError(f"environments must be a prefix of {list(ENVIRONMENTS)} in that order "
                             f"(each promotes what passed the one before), not {list(self.environments)}")
        return self

    def source_repo(self, base: Path) -> str:
        """The repository as a URL or absolute path; relative paths are relative to ``base``."""
        return repository_location(self.repository, base)

    def freeze_policy(self, policy: FreezePolicy) -> FreezePolicy:
        """The environment's freeze policy with this app's windows added (never removed)."""
        if not self.freeze:
            return policy
        return policy.model_copy(update={"windows": (*policy.windows, *self.freeze)})


class ProbePaths(Frozen):
    """Where the router checks an app's health and where the local stack's users send requests."""

    health: str
    load: str


class Catalog(Frozen):
    """Every app, by name, and where the catalog file lives (relative paths start there)."""

    apps: tuple[AppEntry, ...]
    base: Path = Field(description="directory relative repository paths are resolved against")
    health_path: str = Field(default=DEFAULT_PROBE_PATH, description="default health path")
    load_path: str | None = Field(default=None, description="default path for the local stack's users")

    @field_validator("health_path", "load_path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        return _url_path(value)

    @model_validator(mode="after")
    def _unique(self) -> Catalog:
        seen: set[str] = set()
        blocks: dict[int, str] = {}
        for app in self.apps:
            if app.name in seen:
                raise ValueError(f"app {app.name!r} is listed twice")
            seen.add(app.name)
            # Ports come from a hash of the name: a clash would fail the second app's deploys
            # with "address already in use" long after the catalog was accepted.
            other = blocks.setdefault(port_block(app.name), app.name)
            if other != app.name:
                plan = port_plan(app.name, "dev")
                raise ValueError(
                    f"apps {other!r} and {app.name!r} would listen on the same ports (dev "
                    f"{plan.front}-{plan.stats}, and the same block in every environment); "
                    "rename one of them")
        return self

    @property
    def names(self) -> tuple[str, ...]:
        """App names in catalog order."""
        return tuple(a.name for a in self.apps)

    def get(self, name: str) -> AppEntry | None:
        """The app called ``name``, or None."""
        return next((a for a in self.apps if a.name == name), None)

    def require(self, name: str) -> AppEntry:
        """The app called ``name``; refuses an unknown name, listing the known ones."""
        app = self.get(name)
        if app is None:
            raise ConfigurationError(f"app {name!r} is not in the catalog (known: {', '.join(self.names)})",
                                     hint="add an [[app]] entry to apps.toml")
        return app

    def source_refusal(self, name: str, source_repo: str, context_path: str) -> str | None:
        """Why app ``name`` may not be built from ``source_repo`` at ``context_path`` (None: it may).

        An app in the catalog is built only from its entry's repository and directory. A run's
        parameters are whatever the caller of the Prefect API typed: another repository, or
        another app's directory in the same one, would ship other code under this app's name,
        signed by the build side. An app the catalog does not list (a test's, a one-off) is
        built from where its run says.
        """
        app = self.get(name)
        if app is None:
            return None
        wanted = app.source_repo(self.base)
        problems = []
        if repository_location(source_repo, Path.cwd()) != wanted:
            problems.append(f"repository {source_repo!r} (the catalog's is {wanted!r})")
        if _directory(context_path) != _directory(app.context):
            problems.append(f"directory {context_path!r} (the catalog's is {app.context!r})")
        if not problems:
            return None
        return f"{name} is built only as the catalog gives it, not from " + " and ".join(problems)

    def probe_paths(self, name: str) -> ProbePaths:
        """The app's health and load paths: its entry's, else the catalog's defaults."""
        app = self.get(name)
        health = (app.health_path if app else None) or self.health_path
        load = (app.load_path if app else None) or self.load_path or health
        return ProbePaths(health=health, load=load)

    def for_environment(self, environment: str) -> tuple[AppEntry, ...]:
        """The apps promoted to ``environment``."""
        return tuple(a for a in self.apps if environment in a.environments)


def repository_location(repository: str, base: Path) -> str:
    """``repository`` as a URL, or as an absolute path with ``base`` for a relative one."""
    if urlsplit(repository).scheme:
        return repository
    return str((base / repository).resolve())


def _directory(context: str) -> PurePosixPath:
    """A context directory as one spelling: ``./a/b/``, ``a/b`` and ``a//b`` are the same."""
    return PurePosixPath(context.strip("/") or ".")


def _entry_label(index: int, raw: Any) -> str:
    name = raw.get("name") if isinstance(raw, dict) else None
    return f"app #{index + 1}" + (f" ({name!r})" if isinstance(name, str) else "")


def parse_catalog(text: str, base: Path, source: str = "apps.toml") -> Catalog:
    """Validate catalog TOML text.

    Raises:
        ConfigurationError: naming the file, the entry (position and name) and the field.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"catalog {source} is not valid TOML: {exc}") from None
    unknown = set(data) - {"app", "health_path", "load_path"}
    if unknown:
        raise ConfigurationError(f"catalog {source} has unknown top-level keys {sorted(unknown)}; "
                                 "only health_path, load_path and [[app]] tables belong there")
    raw_apps = data.get("app", [])
    if not isinstance(raw_apps, list) or not raw_apps:
        raise ConfigurationError(f"catalog {source} lists no [[app]] entries")
    apps = []
    for index, raw in enumerate(raw_apps):
        try:
            apps.append(AppEntry.model_validate(raw))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'entry'}: {err['msg']}" for err in exc.errors())
            raise ConfigurationError(f"catalog {source}: {_entry_label(index, raw)} is invalid: {problems}",
                                     hint="fix that entry; no app is promoted from an invalid catalog") from None
    defaults = {k: data[k] for k in ("health_path", "load_path") if k in data}
    try:
        return Catalog(apps=tuple(apps), base=base, **defaults)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigurationError(f"catalog {source}: {where + ': ' if where else ''}{err['msg']}") from None


class CatalogSettings(BaseSettings):
    """Where the catalog is: ``PORTCULLIS_CATALOG`` (default: the repository's apps.toml)."""

    model_config = SettingsConfigDict(env_prefix="PORTCULLIS_", extra="ignore")

    catalog: Path = Field(default=REPO_ROOT / "apps.toml")


def load_catalog(path: Path | None = None) -> Catalog:
    """Read and validate the catalog (``PORTCULLIS_CATALOG`` or the repository's apps.toml).

    Raises:
        ConfigurationError: the file is missing or an entry is invalid.
    """
    path = path or CatalogSettings().catalog
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigurationError(f"no app catalog at {path}: {exc.strerror}",
                                 hint="create apps.toml or set PORTCULLIS_CATALOG") from None
    return parse_catalog(text, path.parent, str(path))


def probe_paths(app: str, path: Path | None = None) -> ProbePaths:
    """Where ``app`` answers health checks and where the local stack's users ask, from the catalog.

    No catalog file gives ``/`` for both; an app outside the catalog gets the catalog's
    defaults. An invalid catalog is refused (:class:`ConfigurationError`).
    """
    path = path or CatalogSettings().catalog
    if not path.exists():
        return ProbePaths(health=DEFAULT_PROBE_PATH, load=DEFAULT_PROBE_PATH)
    return load_catalog(path).probe_paths(app)


def catalog_freeze(policy: EnvironmentPolicy, app: str, path: Path | None = None) -> EnvironmentPolicy:
    """The environment's policy with ``app``'s own catalog freeze windows added.

    No catalog file, or an app outside it, leaves the policy unchanged. An invalid catalog is
    refused: its windows could not be known, and a freeze that cannot be read must not pass.
    """
    path = path or CatalogSettings().catalog
    if not path.exists():
        return policy
    entry = load_catalog(path).get(app)
    if entry is None or not entry.freeze:
        return policy
    return policy.model_copy(update={"freeze": entry.freeze_policy(policy.freeze)})
