"""Immutable typed results passed between stages.

An image reference past the build is always an :class:`ImageRef`: pinned by digest, never a
tag. Every model is frozen so a stage cannot quietly change what an earlier stage decided.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from portcullis.errors import PolicyRefusal

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def _check_digest(value: str) -> str:
    if not _DIGEST_RE.fullmatch(value):
        raise ValueError(f"not a sha256 digest: {value!r}")
    return value


def _check_commit(value: str) -> str:
    if not _COMMIT_RE.fullmatch(value):
        raise ValueError(f"not a full 40-hex git commit id: {value!r}")
    return value


Digest = Annotated[str, AfterValidator(_check_digest)]
CommitSha = Annotated[str, AfterValidator(_check_commit)]


class Frozen(BaseModel):
    """Base for every stage result: immutable, and no unknown fields accepted."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class ImageRef(Frozen):
    """A container image pinned by digest: ``registry/repository@sha256:...``."""

    registry: str = Field(description="registry host[:port], e.g. 127.0.0.1:5000")
    repository: str = Field(description="repository path inside the registry, e.g. portcullis/hello")
    digest: Digest = Field(description="manifest digest, sha256:<64 hex>")

    @property
    def name(self) -> str:
        """``registry/repository`` without the digest."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        return f"{self.name}@{self.digest}"

    @classmethod
    def parse(cls, ref: str) -> ImageRef:
        """Parse ``registry/repo@sha256:...``; a tag-only reference is refused."""
        name, sep, digest = ref.partition("@")
        if not sep:
            raise PolicyRefusal(
                f"image reference {ref!r} is not pinned by digest",
                hint="past the build every image must be referenced as name@sha256:<digest>",
            )
        if ":" in name.rsplit("/", 1)[-1]:
            name = name.rsplit(":", 1)[0]  # name:tag@digest -> the digest wins, the tag is dropped
        registry, slash, repository = name.partition("/")
        if not slash or ("." not in registry and ":" not in registry and registry != "localhost"):
            raise PolicyRefusal(f"image reference {ref!r} does not name a registry host")
        try:
            return cls(registry=registry, repository=repository, digest=digest)
        except ValueError as exc:
            raise PolicyRefusal(f"image reference {ref!r} is invalid: {exc}") from None


class SourceRef(Frozen):
    """Exactly what was built: a repository at one commit."""

    repo_url: str = Field(description="where the source lives (path or URL), recorded in labels")
    commit: CommitSha = Field(description="the full commit id that was built")
    ref: str = Field(description="branch or tag the commit was reached from, e.g. main")
    author: str = Field(description="commit author as 'Name <email>'")
    context_path: str = Field(default=".", description="directory inside the repo with the Dockerfile")


class BuildResult(Frozen):
    """The output of the build stage."""

    app: str
    image: ImageRef
    source: SourceRef
    base_image: str | None = Field(
        default=None, description="the base image as name@<image id>; a new base, a new digest"
    )
    flow_run_id: str | None = None
    started_at: datetime
    finished_at: datetime


class Deployment(Frozen):
    """What runs in an environment after a deploy."""

    app: str
    environment: str
    image: ImageRef
    container_id: str
    container_name: str
    url: str = Field(description="where the app answers")
    previous_digest: Digest | None = Field(
        default=None, description="the digest that ran before: the rollback target"
    )
    commit: CommitSha
    deployed_at: datetime


class ReusedBuild(Frozen):
    """A digest built before from the same commit on the same base, taken instead of a build.

    Builds are reproducible, so building again would give this very digest; its evidence is
    verified again on the deploy side before it is used.
    """

    app: str
    image: ImageRef
    commit: CommitSha
    base_image: str = Field(description="the base image (name@id) both builds started from")
    record_seq: int = Field(ge=0, description="the audit record of the original build")
    built_at: datetime = Field(description="when the original build was recorded")
