"""Where promotions to a pull-based (GitOps) environment are committed, as a Prefect block.

The block holds the repository, branch, overlay layout, commit author and an optional HTTPS
token, and builds the target (:meth:`GitOpsTargetBlock.get_target`); how a promotion is
written lives in :mod:`portcullis.gitops`. Save it on the Prefect server (``prefect block
register -m blocks.gitops``), or, where no block is wanted, set ``PORTCULLIS_GITOPS_*``
variables (``PORTCULLIS_GITOPS_REPO_URL``, ``..._BRANCH``, ``..._TOKEN``, ...). It is
deploy-side configuration: only the deploy worker needs it, and the cluster itself only ever
needs read access to the repository.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr

from blocks.base import EnvBlock
from portcullis.gitops import DEFAULT_AUTHOR, DEFAULT_OVERLAY_PATH, GitOpsTarget


class GitOpsTargetBlock(EnvBlock):
    """A Git repository whose environment overlays Argo CD or Flux applies."""

    _block_type_name = "Portcullis GitOps Target"
    _block_type_slug = "portcullis-gitops-target"
    _description = "Git repository, branch and overlay layout that promotions are committed to."
    _env_prefix: ClassVar[str] = "PORTCULLIS_GITOPS_"
    _env_hint: ClassVar[str] = "set PORTCULLIS_GITOPS_REPO_URL (the local stack does), or name a saved block"

    repo_url: str = Field(
        description="The GitOps repository: https://..., ssh://... or a local path (tests, demo)."
    )
    branch: str = Field(default="main", description="Branch the cluster's controller watches.")
    overlay_path: str = Field(
        default=DEFAULT_OVERLAY_PATH,
        description="Path of an environment's kustomization.yaml, with an {environment} placeholder.",
    )
    author: str = Field(default=DEFAULT_AUTHOR, description="Commit author as 'Name <email>'.")
    token: SecretStr | None = Field(
        default=None,
        description="HTTPS token with write access to the repository; sent as an HTTP header "
        "through git's environment, never on a command line. Empty for ssh or local paths.",
    )
    token_username: str = Field(
        default="x-access-token",
        description="User name paired with the token (GitHub: x-access-token, GitLab: oauth2).",
    )
    workdir: str | None = Field(
        default=None,
        description="Directory for Portcullis's own clone; default: a directory under the "
        "system temp dir named after the repository.",
    )
    max_push_attempts: int = Field(
        default=3, ge=1, description="Pushes tried when others push to the branch meanwhile."
    )
    git_timeout_seconds: float = Field(default=60.0, gt=0, description="Seconds per git command.")
    kustomize_command: list[str] | None = Field(
        default=None,
        description="Optional renderer argv, e.g. ['kubectl', 'kustomize']: when set, a "
        "promotion is pushed only if the rendered overlay really runs the pinned image.",
    )

    def get_target(self) -> GitOpsTarget:
        """The GitOps target this block describes."""
        if self.workdir:
            workdir = Path(self.workdir)
        else:
            safe = "".join(c if c.isalnum() else "-" for c in self.repo_url).strip("-")[-80:]
            workdir = Path(tempfile.gettempdir()) / "portcullis-gitops" / safe
        return GitOpsTarget(
            self.repo_url,
            workdir,
            branch=self.branch,
            overlay_path=self.overlay_path,
            author=self.author,
            token=self.token,
            token_username=self.token_username,
            max_push_attempts=self.max_push_attempts,
            git_timeout=self.git_timeout_seconds,
            kustomize=self.kustomize_command,
        )
