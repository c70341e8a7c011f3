"""Flows over the whole app catalog.

* ``promote-catalog`` (local stack): build and promote every catalog app to dev, one subflow
  per app; one app's refusal (a freeze, a failed gate) never stops the others. Staging and
  prod take a verified requester per promotion, so they are promoted per app.

The scheduled ``dora-report`` over the catalog is a deploy-side flow: see :mod:`flows.deployed`.

The scheduled promotions of every app are one deployment per app and environment in
``deployments.yaml`` (``dev-greeter``...), not a fan-out: only a run the server's scheduler
created carries ``auto_scheduled``, the proof that no person started it; runs a fan-out flow
created through the API would not, and staging and prod would rightly refuse them.
"""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from flows.promote import promote
from portcullis.catalog import load_catalog
from portcullis.errors import PortcullisError
from tasks.board import publish_board


@flow(name="promote-catalog", log_prints=True)
def promote_catalog(commit: str = "HEAD", ref: str = "main", requested_by: str = "unknown") -> dict[str, str]:
    """Build and promote every catalog app to dev, each independently of the others.

    Args:
        commit: commit-ish of each app's repository to build.
        ref: branch the commit must be on.
        requested_by: who asked (recorded, unverified: dev needs no approval).

    Returns:
        For each app: "promoted <image>" or "refused: <why>".
    """
    catalog = load_catalog()
    outcome: dict[str, str] = {}
    for app in catalog.for_environment("dev"):
        try:
            result = promote.with_options(flow_run_name=f"{app.name}-dev")(
                app=app.name, environment="dev", source_repo=app.source_repo(catalog.base), commit=commit,
                ref=ref, context_path=app.context, requested_by=requested_by)
            outcome[app.name] = (f"promoted {result.image}" if result is not None
                                 else "nothing new: the digest of this commit already runs")
        except PortcullisError as exc:
            outcome[app.name] = f"refused: {exc}"
        print(f"{app.name}: {outcome[app.name]}")
    table = "\n".join(f"| {name} | {what.replace('|', '/')} |" for name, what in outcome.items())
    create_markdown_artifact(markdown=f"# Catalog promotion to dev\n\n| app | outcome |\n|---|---|\n{table}\n",
                             key="catalog-dev", description="what the catalog promotion started and how each ended")
    publish_board()
    return outcome

