"""The promote flow: build -> deploy, with typed results between stages.

Later stages (sign, SBOM, scan, verify, freeze, approval, canary) plug in between; the shape
stays: each stage takes the previous stage's frozen result and returns its own.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from portcullis.models import BuildResult, Deployment
from tasks.build import build_image
from tasks.deploy import deploy

Environment = Literal["dev", "staging", "prod"]


def summary_markdown(build: BuildResult, deployment: Deployment) -> str:
    """The promotion summary shown as a Prefect artifact."""
    rows = [
        ("app", build.app),
        ("environment", deployment.environment),
        ("image", f"`{build.image}`"),
        ("commit", f"`{build.source.commit}` on `{build.source.ref}`"),
        ("author", build.source.author),
        ("running at", deployment.url),
        ("container", f"`{deployment.container_name}`"),
        ("rollback target", f"`{deployment.previous_digest}`" if deployment.previous_digest else "none (first deploy)"),
        ("deployed at", deployment.deployed_at.isoformat()),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"# Promoted {build.app} to {deployment.environment}\n\n| | |\n|---|---|\n{table}\n"


@flow(name="promote", log_prints=True)
def promote(
    app: str = "hello",
    environment: Environment = "dev",
    source_repo: str = ".",
    commit: str = "HEAD",
    ref: str = "main",
    context_path: str = "examples/hello",
    build_credentials_block: str | None = None,
    deploy_credentials_block: str | None = None,
) -> Deployment:
    """Promote ``app`` at ``commit`` to ``environment``.

    Args:
        app: application name (also the registry repository name).
        environment: dev, staging or prod.
        source_repo: git repository with the app's source.
        commit: commit-ish to build; pinned to a full id before anything else.
        ref: branch the commit must be on.
        context_path: directory holding the Dockerfile.
        build_credentials_block: saved build credentials; None reads PORTCULLIS_BUILD_*.
        deploy_credentials_block: saved deploy credentials; None reads PORTCULLIS_DEPLOY_*.

    Returns:
        Where the new version runs, and the digest it replaced.
    """
    build = build_image(app, source_repo, commit, ref, context_path, build_credentials_block)
    deployment = deploy(
        build.image, app, environment, build.source.commit, deploy_credentials_block
    )
    create_markdown_artifact(
        markdown=summary_markdown(build, deployment),
        key=f"promotion-{app}-{environment}",
        description=f"{app} {build.image.digest[:19]} promoted to {environment}",
    )
    print(f"{app} {build.image} runs in {environment} at {deployment.url}")
    return deployment
