"""In-toto statements about an image digest: SLSA provenance, SBOM and scan results.

The build side produces these and signs them; the deploy side only trusts what it can verify.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from portcullis.models import BuildResult, ImageRef

STATEMENT_V1 = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1"
CYCLONEDX_BOM = "https://cyclonedx.org/bom"
SCAN_RESULT = "https://portcullis.dev/attestations/vulnerability-scan/v1"
BUILD_TYPE = "https://portcullis.dev/buildtypes/docker-sdk/v1"
BUILDER_ID = "https://portcullis.dev/builders/prefect-promote"


def statement(image: ImageRef, predicate_type: str, predicate: dict[str, Any]) -> dict[str, Any]:
    """An in-toto v1 Statement whose only subject is ``image``'s digest."""
    return {
        "_type": STATEMENT_V1,
        "subject": [{"name": image.name, "digest": {"sha256": image.digest.removeprefix("sha256:")}}],
        "predicateType": predicate_type,
        "predicate": predicate,
    }


def _ts(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _base_dependency(base_image: str | None) -> list[dict[str, Any]]:
    if base_image is None:
        return []
    name, _, digest = base_image.rpartition("@")
    return [{"uri": f"docker-image://{name}", "name": "base-image",
             "digest": {"sha256": digest.removeprefix("sha256:")}}]


def slsa_provenance(build: BuildResult, *, flow_run_url: str | None = None) -> dict[str, Any]:
    """SLSA v1 provenance predicate: builder, source repo, commit, ref, flow run, times."""
    return {
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {
                "source": {
                    "repository": build.source.repo_url,
                    "ref": f"refs/heads/{build.source.ref}",
                    "commit": build.source.commit,
                    "path": build.source.context_path,
                    "author": build.source.author,
                },
                "app": build.app,
            },
            "resolvedDependencies": [
                {"uri": f"git+{build.source.repo_url}@refs/heads/{build.source.ref}",
                 "digest": {"gitCommit": build.source.commit}},
                *_base_dependency(build.base_image),
            ],
        },
        "runDetails": {
            "builder": {"id": BUILDER_ID},
            "metadata": {
                "invocationId": flow_run_url or build.flow_run_id or "",
                "startedOn": _ts(build.started_at),
                "finishedOn": _ts(build.finished_at),
            },
        },
    }
