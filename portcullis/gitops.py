"""A GitOps target: promotion is a commit to an environment overlay, rollback is its revert.

In the pull-based model nothing here talks to a cluster. Portcullis pins the promoted image
by digest in ``overlays/<environment>/kustomization.yaml`` (kustomize ``images:``), writes the
traceability annotations next to it, commits with a message naming the app, the environment,
the digest, the flow run and the approvers, and pushes. Argo CD or Flux, running inside the
cluster, notices the commit and applies it. The Git history is then the deploy log: every
promotion is a commit with machine-readable trailers, and every rollback is a ``git revert``
of one of them.

Two layers:

* :func:`render_overlay` and friends are pure: a kustomization mapping in, a new one out.
* :class:`GitOpsTarget` works on a clone it owns (clone, fetch, edit, commit, push, and on a
  non-fast-forward push fetch + rebase + retry). Git runs only through
  :func:`portcullis.toolrun.run_tool`; a token travels in the environment, never on argv.
"""

from __future__ import annotations

import base64
import fcntl
import os
import re
import statistics
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parseaddr
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import Field, SecretStr, field_validator

from portcullis.canary.analysis import BUDGET_SHARES, CanaryPolicy
from portcullis.errors import ConfigurationError, PolicyRefusal, ToolError, TransientError
from portcullis.models import CommitSha, Digest, Frozen, ImageRef
from portcullis.toolrun import ToolResult, run_tool

ANNOTATION_PREFIX = "portcullis.dev/"
"""Every annotation Portcullis owns in an overlay starts with this; others are left alone."""

# Trailer keys: the machine-readable part of every commit Portcullis makes.
TRAILER_ACTION = "Portcullis-Action"
TRAILER_APP = "Portcullis-App"
TRAILER_ENVIRONMENT = "Portcullis-Environment"
TRAILER_IMAGE_NAME = "Portcullis-Image-Name"
TRAILER_DIGEST = "Portcullis-Digest"
TRAILER_SOURCE_COMMIT = "Portcullis-Source-Commit"
TRAILER_FLOW_RUN = "Portcullis-Flow-Run"
TRAILER_REVERTS = "Portcullis-Reverts"
TRAILER_APPROVED_BY = "Approved-by"

DEFAULT_OVERLAY_PATH = "overlays/{environment}/kustomization.yaml"
DEFAULT_AUTHOR = "Portcullis <portcullis@localhost>"

_ENV_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Kubernetes container image names in manifests: no whitespace, no control characters.
_IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$")
# Anything written into a trailer must be one line, or a value could forge another trailer.
_ONE_LINE_RE = re.compile(r"^[^\x00-\x1f\x7f]+$")
_REVERT_LINE_RE = re.compile(r"^This reverts commit ([0-9a-f]{40})\.?$", re.MULTILINE)


# --------------------------------------------------------------------------------------------
# Typed values
# --------------------------------------------------------------------------------------------


def _one_line(value: str, what: str) -> str:
    if not _ONE_LINE_RE.fullmatch(value) or value != value.strip():
        raise ValueError(f"{what} must be one line of printable text: {value!r}")
    return value


class TraceAnnotations(Frozen):
    """Who and what put a digest into an environment: written as ``portcullis.dev/*``."""

    commit: CommitSha = Field(description="the source commit the image was built from")
    flow_run_url: str = Field(description="the Prefect flow run that promoted it")
    approved_by: tuple[str, ...] = Field(
        default=(), description="approver ids, in the order they approved; empty when none was required"
    )
    deployed_at: datetime = Field(description="when the promotion was committed (timezone-aware)")

    @field_validator("flow_run_url")
    @classmethod
    def _url_is_one_token(cls, value: str) -> str:
        _one_line(value, "flow_run_url")
        if " " in value:
            raise ValueError(f"flow_run_url must not contain spaces: {value!r}")
        return value

    @field_validator("approved_by")
    @classmethod
    def _approvers_are_plain(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            _one_line(name, "an approver")
            if "," in name:  # the annotation joins them with commas
                raise ValueError(f"an approver id must not contain a comma: {name!r}")
        return value

    @field_validator("deployed_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("deployed_at must be timezone-aware")
        return value.astimezone(UTC)

    def as_annotations(self, digest: str) -> dict[str, str]:
        """The annotation mapping for ``commonAnnotations`` (all values are strings)."""
        return {
            f"{ANNOTATION_PREFIX}commit": self.commit,
            f"{ANNOTATION_PREFIX}flow-run-url": self.flow_run_url,
            f"{ANNOTATION_PREFIX}approved-by": ",".join(self.approved_by),
            f"{ANNOTATION_PREFIX}deployed-at": self.deployed_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            f"{ANNOTATION_PREFIX}digest": digest,
        }


class GitOpsCommit(Frozen):
    """A commit Portcullis pushed to the GitOps repository."""

    sha: CommitSha = Field(description="the commit as it now is on the remote branch")
    environment: str
    digest: Digest = Field(description="the digest the environment's overlay pins after it")
    message: str = Field(description="the full commit message")
    pushed_to: str = Field(description="'<repo url> <branch>'")
    push_attempts: int = Field(ge=1, description="1 unless someone else pushed in between")


# --------------------------------------------------------------------------------------------
# The pure part: kustomization in, kustomization out
# --------------------------------------------------------------------------------------------


def parse_kustomization(text: str, where: str) -> dict[str, Any]:
    """Parse a kustomization.yaml and check the parts Portcullis touches.

    Args:
        text: the file's content.
        where: the file's name for error messages.

    Returns:
        The mapping, in file order.

    Raises:
        ConfigurationError: not YAML, not a mapping, not a Kustomization, or ``images`` /
            ``commonAnnotations`` of the wrong shape.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigurationError(
            f"overlay {where} is not valid YAML: {exc}",
            hint="fix the file in the GitOps repository, then promote again",
        ) from None
    if not isinstance(data, dict):
        raise ConfigurationError(
            f"overlay {where} is not a kustomization (a YAML mapping), it holds "
            f"{type(data).__name__}",
            hint="it needs at least `resources: [../../base]`",
        )
    kind = data.get("kind", "Kustomization")
    if kind != "Kustomization":
        raise ConfigurationError(f"overlay {where} has kind {kind!r}, not Kustomization")
    images = data.get("images", [])
    if not isinstance(images, list) or not all(
        isinstance(e, dict) and isinstance(e.get("name"), str) for e in images
    ):
        raise ConfigurationError(
            f"overlay {where}: `images` must be a list of mappings each with a `name`"
        )
    annotations = data.get("commonAnnotations", {})
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise ConfigurationError(
            f"overlay {where}: `commonAnnotations` must map strings to strings"
        )
    return data


def dump_kustomization(data: Mapping[str, Any], header: str = "") -> str:
    """Serialise a kustomization mapping, keeping key order; ``header`` is kept on top."""
    body: str = yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False, width=1000)
    return header + body


def leading_comments(text: str) -> str:
    """The comment block at the top of a YAML file (PyYAML drops comments; this one we keep)."""
    lines = []
    for line in text.splitlines(keepends=True):
        if not line.startswith("#"):
            break
        lines.append(line)
    return "".join(lines)


def pinned_digest(kustomization: Mapping[str, Any], image_name: str) -> str | None:
    """The digest the overlay pins for ``image_name``, or None when it pins none."""
    for entry in kustomization.get("images", []):
        if entry.get("name") == image_name:
            digest = entry.get("digest")
            return digest if isinstance(digest, str) else None
    return None


def render_overlay(
    kustomization: Mapping[str, Any],
    image: ImageRef,
    annotations: TraceAnnotations,
    *,
    image_name: str,
) -> dict[str, Any]:
    """Pin ``image`` by digest in a kustomization and stamp the traceability annotations.

    The input is not modified. Key order is kept so that a promotion's diff is just the
    changed lines. The ``images`` entry for ``image_name`` is replaced by exactly
    ``name`` / ``newName`` / ``digest`` (a ``newTag`` there before is dropped: a tag next to a
    digest only invites confusion about what runs); other entries stay as they are.
    Every ``portcullis.dev/`` annotation is replaced; other annotations stay.

    Args:
        kustomization: the overlay as parsed by :func:`parse_kustomization`.
        image: the image to pin; its type guarantees a digest.
        annotations: commit, flow run, approvers, time.
        image_name: the image name the base manifests use (``image: hello`` -> ``hello``).

    Returns:
        A new kustomization mapping.
    """
    if not _IMAGE_NAME_RE.fullmatch(image_name):
        raise ConfigurationError(f"{image_name!r} is not an image name a manifest can use")
    entry = {"name": image_name, "newName": image.name, "digest": image.digest}
    out = dict(kustomization)
    images = [dict(e) for e in out.get("images", [])]
    for i, existing in enumerate(images):
        if existing.get("name") == image_name:
            images[i] = entry
            break
    else:
        images.append(entry)
    out["images"] = images
    common = {
        k: v for k, v in dict(out.get("commonAnnotations", {})).items()
        if not k.startswith(ANNOTATION_PREFIX)
    }
    common.update(annotations.as_annotations(image.digest))
    out["commonAnnotations"] = common
    return out


# --------------------------------------------------------------------------------------------
# The canary in the cluster: an Argo Rollouts Rollout and AnalysisTemplate from the policy
# --------------------------------------------------------------------------------------------

ROLLOUT_FILE = "portcullis-rollout.yaml"
"""The overlay file holding the rendered Rollout and AnalysisTemplate."""


class RolloutMetrics(Frozen):
    """Where the cluster's Prometheus keeps the figures the AnalysisTemplate asks for.

    Argo Rollouts labels the pods of each version with ``rollouts-pod-template-hash``; the
    queries select the canary and the stable version by that label (as exported to
    Prometheus, by default ``rollouts_pod_template_hash``).
    """

    prometheus_address: str = "http://prometheus-operated.monitoring.svc:9090"
    requests_metric: str = Field(default="http_requests_total", description="request counter")
    error_matcher: str = Field(default='code=~"5.."', description="label matcher of errors")
    latency_metric: str = Field(
        default="http_request_duration_seconds",
        description="response-time histogram; it needs a bucket at max_latency_seconds",
    )
    hash_label: str = "rollouts_pod_template_hash"
    replicas: int = Field(default=2, ge=1, description="pods of the Rollout")

    @field_validator("requests_metric", "latency_metric", "hash_label")
    @classmethod
    def _metric_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", value):
            raise ValueError(f"{value!r} is not a Prometheus metric or label name")
        return value

    @field_validator("error_matcher")
    @classmethod
    def _matcher(cls, value: str) -> str:
        if not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*(=|!=|=~|!~)"[^"{}\\]*"', value):
            raise ValueError(f"{value!r} is not one PromQL label matcher")
        return value


def _num(value: float) -> str:
    return f"{value:.6g}"


def _wilson(errors: str, total: str, z: float, sign: str) -> str:
    """PromQL of a Wilson score bound (``sign`` '+' upper, '-' lower) of errors/total."""
    p = f"(({errors}) / ({total}))"
    z2 = _num(z * z)
    return (
        f"(({p} + {z2} / (2 * ({total}))) {sign} {_num(z)} * sqrt(clamp_min({p} * (1 - {p}) "
        f"/ ({total}) + {z2} / (4 * ({total}) * ({total})), 0))) / (1 + {z2} / ({total}))"
    )


def _three_valued(fail: str, passed: str) -> str:
    """1 when ``fail`` holds, -1 when ``passed`` holds, 0 (Inconclusive) otherwise."""
    return f"({fail}) - (({passed}) * (1 - ({fail})))"


def render_canary(
    policy: CanaryPolicy,
    *,
    app: str,
    workload: str,
    metrics: RolloutMetrics | None = None,
) -> list[dict[str, Any]]:
    """The Argo Rollouts objects that run ``policy``'s canary in the cluster.

    A ``Rollout`` takes over the base ``Deployment`` through ``workloadRef`` (so the overlay's
    ``images:`` digest pin still decides what runs) and walks the policy's steps: ``setWeight``,
    ``pause`` for the window, then an inline analysis over that window. The
    ``AnalysisTemplate`` holds one Prometheus metric per check of the judge
    (:mod:`portcullis.canary.analysis`) with the same limits and the same false-failure
    budget, split the same way over the same number of looks. Argo judges every measurement
    alone with PromQL, so the in-cluster checks are per-window approximations of the judge:
    Wilson score bounds instead of Clopper-Pearson, a two-proportion z test per window instead
    of the sequential test, and a p90 ratio with one bucket of slack instead of Mann-Whitney.
    Each query answers 1 (fail), -1 (pass) or 0 (not enough evidence: Inconclusive), and
    ``failureLimit`` / ``inconclusiveLimit`` are the policy's.

    Args:
        policy: the environment's canary policy.
        app: the application; names the objects.
        workload: the base Deployment's name.
        metrics: where the figures live in the cluster's Prometheus.

    Returns:
        ``[Rollout, AnalysisTemplate]`` as mappings.
    """
    m = metrics or RolloutMetrics()
    for name, value in (("app", app), ("workload", workload)):
        if not _ENV_NAME_RE.fullmatch(value):
            raise ConfigurationError(f"{name} {value!r} is not a Kubernetes object name")
    lim = policy.limits
    alpha = lim.false_failure_rate
    z_pass = statistics.NormalDist().inv_cdf(lim.pass_confidence)

    def z_fail(share: str, looks: float) -> float:
        return statistics.NormalDist().inv_cdf(1 - alpha * BUDGET_SHARES[share] / looks)

    def sel(version: str, extra: str = "") -> str:
        matchers = [f'{m.hash_label}="{{{{args.{version}-hash}}}}"', *([extra] if extra else [])]
        return "{" + ",".join(matchers) + "}"

    def total(metric: str, version: str, extra: str = "") -> str:
        return f"(sum(increase({metric}{sel(version, extra)}[{{{{args.window}}}}])) or vector(0))"

    n_c, n_b = total(m.requests_metric, "canary"), total(m.requests_metric, "stable")
    x_c = total(m.requests_metric, "canary", m.error_matcher)
    x_b = total(m.requests_metric, "stable", m.error_matcher)
    enough = f"({n_c} >= bool {lim.min_requests}) * ({n_b} >= bool {lim.min_requests})"
    limit = _num(lim.max_error_rate)
    error_rate = _three_valued(
        f"({_wilson(x_c, n_c, z_fail('error-rate', policy.max_samples), '-')} > bool {limit}) "
        f"* (({x_b}) / ({n_b}) <= bool {limit})",
        f"({_wilson(x_c, n_c, z_pass, '+')} <= bool {limit}) * {enough}",
    )
    tau = _num(lim.max_error_ratio)
    pooled = f"(({x_c}) + ({x_b})) / (({n_c}) + ({n_b}))"
    z_ratio = (
        f"((({x_c}) / ({n_c}) - {tau} * ({x_b}) / ({n_b})) / sqrt(clamp_min({pooled} * "
        f"(1 - {pooled}) * (1 / ({n_c}) + {_num(lim.max_error_ratio**2)} / ({n_b})), 1e-12)))"
    )
    z_crit = _num(z_fail("error-rate-vs-baseline", policy.max_samples))
    error_ratio = _three_valued(f"{z_ratio} > bool {z_crit}", f"({z_ratio} <= bool {z_crit}) * {enough}")
    count_c, count_b = (total(f"{m.latency_metric}_count", v) for v in ("canary", "stable"))
    le = f'le="{_num(lim.max_latency_seconds)}"'
    slow_c = f"(({count_c}) - {total(f'{m.latency_metric}_bucket', 'canary', le)})"
    slow_b = f"(({count_b}) - {total(f'{m.latency_metric}_bucket', 'stable', le)})"
    allowed = _num(1 - lim.latency_quantile)
    latency = _three_valued(
        f"({_wilson(slow_c, count_c, z_fail('latency', policy.max_samples), '-')} > bool "
        f"{allowed}) * (({slow_b}) / ({count_b}) <= bool {allowed})",
        f"({_wilson(slow_c, count_c, z_pass, '+')} <= bool {allowed}) * "
        f"({count_c} >= bool {lim.min_requests})",
    )

    def p90(version: str) -> str:
        # No data gives an empty vector, which Argo counts as an Error: NaN is Inconclusive.
        return (
            f"(histogram_quantile(0.9, sum by (le) (increase({m.latency_metric}_bucket"
            f"{sel(version)}[{{{{args.window}}}}]))) or vector(NaN))"
        )

    ratio = _num(lim.max_latency_ratio)
    slack = _num(lim.max_latency_ratio * 1.1)  # one histogram bucket
    latency_ratio = _three_valued(
        f"{p90('canary')} > bool {slack} * {p90('stable')}",
        f"({p90('canary')} <= bool {ratio} * {p90('stable')}) * "
        f"({count_c} >= bool {lim.min_requests})",
    )
    template_name = f"{app}-canary"
    checks = {
        "error-rate": error_rate,
        "error-rate-vs-baseline": error_ratio,
        "latency": latency,
        "latency-vs-baseline": latency_ratio,
    }
    template: dict[str, Any] = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AnalysisTemplate",
        "metadata": {"name": template_name},
        "spec": {
            "args": [{"name": "canary-hash"}, {"name": "stable-hash"}, {"name": "window"}],
            "metrics": [
                {
                    "name": name,
                    "count": 1,
                    "successCondition": "result[0] < 0",
                    "failureCondition": "result[0] > 0",
                    "failureLimit": policy.failure_limit,
                    "inconclusiveLimit": policy.inconclusive_limit,
                    "consecutiveErrorLimit": policy.consecutive_error_limit,
                    "provider": {"prometheus": {"address": m.prometheus_address, "query": query}},
                }
                for name, query in checks.items()
            ],
        },
    }
    steps: list[dict[str, Any]] = []
    for step in policy.steps:
        window = f"{max(1, round(step.window_seconds))}s"
        steps.append({"setWeight": step.weight})
        steps.append({"pause": {"duration": window}})
        steps.append({
            "analysis": {
                "templates": [{"templateName": template_name}],
                "args": [
                    {"name": "canary-hash",
                     "valueFrom": {"podTemplateHashValue": "Latest"}},
                    {"name": "stable-hash",
                     "valueFrom": {"podTemplateHashValue": "Stable"}},
                    {"name": "window", "value": window},
                ],
            }
        })
    rollout: dict[str, Any] = {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": app},
        "spec": {
            "replicas": m.replicas,
            "workloadRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": workload,
                            "scaleDown": "progressively"},
            "strategy": {"canary": {"steps": steps}},
        },
    }
    return [rollout, template]


def render_canary_overlay(
    kustomization: Mapping[str, Any], *, workload: str
) -> dict[str, Any]:
    """Add the rendered Rollout file to an overlay, and scale the base Deployment to zero.

    The Rollout runs the pods from the Deployment's template; the Deployment itself keeps no
    replicas (in Git, so Argo CD / Flux do not scale it back up). The input is not modified.
    """
    out = dict(kustomization)
    resources = list(out.get("resources", []))
    if ROLLOUT_FILE not in resources:
        resources.append(ROLLOUT_FILE)
    out["resources"] = resources
    patch = {
        "target": {"kind": "Deployment", "name": workload},
        "patch": "- op: replace\n  path: /spec/replicas\n  value: 0\n",
    }
    patches = [p for p in out.get("patches", []) if p != patch]
    out["patches"] = [*patches, patch]
    return out


def promotion_message(
    app: str,
    environment: str,
    image: ImageRef,
    annotations: TraceAnnotations,
    image_name: str,
) -> str:
    """The commit message of a promotion: a summary a human reads, trailers a machine reads."""
    approvers = ", ".join(annotations.approved_by) or "nobody (no approval required)"
    lines = [
        f"promote {app} to {environment}: {image.digest}",
        "",
        f"Portcullis pins {image} in {environment}.",
        "",
        f"Source commit: {annotations.commit}",
        f"Flow run: {annotations.flow_run_url}",
        f"Approved by: {approvers}",
        "",
        f"{TRAILER_ACTION}: promote",
        f"{TRAILER_APP}: {app}",
        f"{TRAILER_ENVIRONMENT}: {environment}",
        f"{TRAILER_IMAGE_NAME}: {image_name}",
        f"{TRAILER_DIGEST}: {image.digest}",
        f"{TRAILER_SOURCE_COMMIT}: {annotations.commit}",
        f"{TRAILER_FLOW_RUN}: {annotations.flow_run_url}",
    ]
    lines += [f"{TRAILER_APPROVED_BY}: {name}" for name in annotations.approved_by]
    return "\n".join(lines) + "\n"


def rollback_message(
    promotion: PromotionEntry,
    environment: str,
    restored_digest: str,
    *,
    reason: str,
    flow_run_url: str | None,
) -> str:
    """The commit message of a rollback (a revert of ``promotion``)."""
    app = promotion.trailers.get(TRAILER_APP, ["?"])[0]
    lines = [
        f"rollback {app} in {environment} to {restored_digest}",
        "",
        f"Reverts the promotion of {promotion.digest}: {reason}",
        "",
        f"This reverts commit {promotion.sha}.",
        "",
        f"{TRAILER_ACTION}: rollback",
        f"{TRAILER_APP}: {app}",
        f"{TRAILER_ENVIRONMENT}: {environment}",
        f"{TRAILER_IMAGE_NAME}: {promotion.image_name}",
        f"{TRAILER_DIGEST}: {restored_digest}",
        f"{TRAILER_REVERTS}: {promotion.sha}",
    ]
    if flow_run_url:
        lines.append(f"{TRAILER_FLOW_RUN}: {flow_run_url}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PromotionEntry:
    """A promotion commit found in the history, with its trailers."""

    sha: str
    trailers: Mapping[str, list[str]]

    @property
    def digest(self) -> str:
        """The digest this promotion pinned."""
        return self.trailers[TRAILER_DIGEST][0]

    @property
    def image_name(self) -> str:
        """The image name in the overlay this promotion changed."""
        return self.trailers[TRAILER_IMAGE_NAME][0]


def parse_trailers(block: str) -> dict[str, list[str]]:
    """``git log --format=%(trailers:only,unfold)`` output to key -> values."""
    out: dict[str, list[str]] = {}
    for line in block.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            out.setdefault(key.strip(), []).append(value.strip())
    return out


# --------------------------------------------------------------------------------------------
# The Git part
# --------------------------------------------------------------------------------------------

_TRANSIENT_MARKERS = (
    "could not resolve host",
    "connection refused",
    "connection reset",
    "connection timed out",
    "operation timed out",
    "early eof",
    "the remote end hung up",
    "temporary failure",
    "returned error: 5",  # HTTP 5xx
)
_AUTH_MARKERS = (
    "authentication failed",
    "could not read username",
    "could not read password",
    "permission denied",
    "returned error: 401",
    "returned error: 403",
    "invalid username or password",
)
_MISSING_MARKERS = ("does not appear to be a git repository", "repository not found",
                    "' does not exist",
                    "returned error: 404")
_NOT_FAST_FORWARD_MARKERS = ("(fetch first)", "(non-fast-forward)", "stale info")


def _is_loopback(host: str | None) -> bool:
    return host in ("127.0.0.1", "::1", "localhost")


class GitOpsTarget:
    """An environment overlay in a Git repository that Argo CD or Flux applies.

    The target keeps its own clone in ``workdir`` and treats it as a cache: before every
    operation the clone is reset to the remote branch, so nothing local survives. To make
    sure that never destroys someone's checkout, it refuses a directory it did not clone
    (marked by ``portcullis.workdir`` in the clone's config) or whose ``origin`` is another
    repository.

    Args:
        repo_url: the remote (a path to a bare repository, ``file://``, ``https://`` or
            ``ssh://``).
        workdir: where the clone lives; created when missing.
        branch: the branch Argo CD / Flux watches.
        overlay_path: where an environment's kustomization lives, with ``{environment}``.
        author: ``Name <email>`` of the commits.
        token: an HTTPS token; sent as a Basic auth header through ``GIT_CONFIG_*``
            environment variables, scoped to ``repo_url`` and redacted from errors.
        token_username: the user name paired with the token (GitHub: ``x-access-token``,
            GitLab: ``oauth2``).
        max_push_attempts: pushes tried before giving up when others keep pushing.
        git_timeout: seconds for one git command.
        kustomize: optional argv of a kustomize renderer (``["kubectl", "kustomize"]``); when
            set, a promotion is only pushed if the rendered overlay really runs the image.
    """

    def __init__(
        self,
        repo_url: str,
        workdir: Path,
        *,
        branch: str = "main",
        overlay_path: str = DEFAULT_OVERLAY_PATH,
        author: str = DEFAULT_AUTHOR,
        token: SecretStr | None = None,
        token_username: str = "x-access-token",
        max_push_attempts: int = 3,
        git_timeout: float = 60.0,
        kustomize: list[str] | None = None,
    ) -> None:
        if repo_url.startswith("-") or not repo_url.strip():
            raise ConfigurationError(f"{repo_url!r} is not a repository URL")
        if branch.startswith("-") or not re.fullmatch(r"[A-Za-z0-9._/-]+", branch):
            raise ConfigurationError(f"{branch!r} is not a branch name Portcullis will push to")
        if "{environment}" not in overlay_path:
            raise ConfigurationError(
                f"overlay path {overlay_path!r} has no {{environment}} placeholder"
            )
        name, email = parseaddr(author)
        if not name or "@" not in email:
            raise ConfigurationError(f"author {author!r} is not 'Name <email>'")
        if token is not None:
            parts = urlsplit(repo_url)
            if parts.scheme != "https" and not (parts.scheme == "http" and _is_loopback(parts.hostname)):
                raise ConfigurationError(
                    f"a token is configured but {repo_url} is not an https URL",
                    hint="use https (a token over plain http or to a path would leak or be ignored)",
                )
        if max_push_attempts < 1:
            raise ConfigurationError("max_push_attempts must be at least 1")
        self.repo_url = repo_url
        self.workdir = Path(workdir)
        self.branch = branch
        self.overlay_path = overlay_path
        self.max_push_attempts = max_push_attempts
        self.git_timeout = git_timeout
        self.kustomize = kustomize
        self._author_name = name
        self._author_email = email
        self._token = token
        self._token_username = token_username

    # ---- plumbing --------------------------------------------------------------------------

    @property
    def pushed_to(self) -> str:
        """``'<repo url> <branch>'``, as recorded in results."""
        return f"{self.repo_url} {self.branch}"

    def _env(self) -> tuple[dict[str, str], dict[str, str]]:
        env = {
            # Hermetic: neither the machine's nor the user's git config changes what we do,
            # and git never stops to ask for a password on a terminal nobody watches.
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ASKPASS": "",
            "SSH_ASKPASS": "",
            "GIT_ALLOW_PROTOCOL": "file:https:http:ssh",
            "LC_ALL": "C",
            "GIT_AUTHOR_NAME": self._author_name,
            "GIT_AUTHOR_EMAIL": self._author_email,
            "GIT_COMMITTER_NAME": self._author_name,
            "GIT_COMMITTER_EMAIL": self._author_email,
            "GIT_EDITOR": "true",
        }
        secret: dict[str, str] = {}
        if self._token is not None:
            pair = f"{self._token_username}:{self._token.get_secret_value()}".encode()
            env["GIT_CONFIG_COUNT"] = "1"
            env["GIT_CONFIG_KEY_0"] = f"http.{self.repo_url}.extraHeader"
            secret["GIT_CONFIG_VALUE_0"] = "Authorization: Basic " + base64.b64encode(pair).decode()
            # Also listed so the raw token is redacted should any tool ever echo it.
            secret["PORTCULLIS_GITOPS_TOKEN_REDACT"] = self._token.get_secret_value()
        return env, secret

    def _git(self, *args: str, cwd: Path | None = None, ok_codes: tuple[int, ...] = (0,)) -> ToolResult:
        env, secret = self._env()
        try:
            return run_tool(
                ["git", *args],
                timeout=self.git_timeout,
                env=env,
                secret_env=secret,
                cwd=str(cwd or self.workdir),
                ok_codes=ok_codes,
            )
        except ToolError as exc:
            raise self._classify(args[0], exc) from None

    def _classify(self, command: str, exc: ToolError) -> Exception:
        text = exc.stderr.lower()
        if exc.returncode is None:
            return TransientError(
                f"git {command} against {self.repo_url} timed out after {self.git_timeout:.0f}s"
            )
        if any(m in text for m in _AUTH_MARKERS):
            return ConfigurationError(
                f"git {command}: {self.repo_url} refused the credentials: {exc.stderr.strip()[-500:]}",
                hint="check the token (and token_username) in the GitOps target block",
            )
        if any(m in text for m in _MISSING_MARKERS):
            return ConfigurationError(
                f"git {command}: there is no repository at {self.repo_url}",
                hint="check repo_url in the GitOps target block",
            )
        if any(m in text for m in _TRANSIENT_MARKERS):
            return TransientError(f"git {command} against {self.repo_url} failed: {exc.stderr.strip()[-500:]}")
        return exc

    def _out(self, *args: str) -> str:
        return self._git(*args).stdout.decode().strip()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        # Two flow runs sharing a workdir would reset each other's half-made commit.
        self.workdir.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.workdir.with_name(self.workdir.name + ".lock")
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def sync(self) -> None:
        """Clone the remote into the workdir, or fetch and reset the clone to the remote branch.

        Raises:
            ConfigurationError: the workdir is not a clone Portcullis made, or its origin is
                another repository, or the branch does not exist on the remote.
        """
        if not (self.workdir / ".git").exists():
            if self.workdir.exists() and any(self.workdir.iterdir()):
                raise ConfigurationError(
                    f"workdir {self.workdir} exists, is not empty and is not a Portcullis clone",
                    hint="point the GitOps target at an empty or missing directory",
                )
            self.workdir.parent.mkdir(parents=True, exist_ok=True)
            self._git("clone", "--quiet", "--no-checkout", "--", self.repo_url, str(self.workdir),
                      cwd=self.workdir.parent)
            self._git("config", "portcullis.workdir", "true")
        else:
            marker = self._git("config", "--get", "portcullis.workdir", ok_codes=(0, 1))
            if marker.stdout.decode().strip() != "true":
                raise ConfigurationError(
                    f"workdir {self.workdir} is a git clone Portcullis did not make; "
                    "refusing to reset it",
                    hint="give the GitOps target its own directory",
                )
            origin = self._out("remote", "get-url", "origin")
            if origin != self.repo_url:
                raise ConfigurationError(
                    f"workdir {self.workdir} is a clone of {origin}, not of the configured "
                    f"{self.repo_url}; refusing to push there",
                    hint="use a separate workdir per GitOps repository, or delete this one",
                )
        self._fetch()
        self._git("checkout", "--quiet", "--force", "-B", self.branch, f"origin/{self.branch}")
        self._git("reset", "--quiet", "--hard", f"origin/{self.branch}")
        self._git("clean", "-qfdx")

    def _fetch(self) -> None:
        refspec = f"+refs/heads/{self.branch}:refs/remotes/origin/{self.branch}"
        try:
            self._git("fetch", "--quiet", "--prune", "origin", refspec)
        except ToolError as exc:
            if "couldn't find remote ref" in exc.stderr.lower():
                raise ConfigurationError(
                    f"branch {self.branch!r} does not exist in {self.repo_url}",
                    hint="create it with the base and overlays, or configure the right branch",
                ) from None
            raise

    def _overlay_file(self, environment: str) -> Path:
        if not _ENV_NAME_RE.fullmatch(environment):
            raise ConfigurationError(
                f"{environment!r} is not an environment name (lower-case letters, digits, '-')"
            )
        return self.workdir / self.overlay_path.format(environment=environment)

    def _read_overlay(self, environment: str) -> tuple[Path, str, dict[str, Any]]:
        path = self._overlay_file(environment)
        rel = path.relative_to(self.workdir).as_posix()
        if not path.is_file():
            raise ConfigurationError(
                f"overlay {rel} for environment {environment!r} does not exist in "
                f"{self.repo_url} ({self.branch})",
                hint=f"commit {rel} (with `resources:` pointing at the base) before promoting",
            )
        text = path.read_text()
        return path, text, parse_kustomization(text, rel)

    def _check_rendered(self, environment: str, image: ImageRef) -> None:
        if self.kustomize is None:
            return
        overlay_dir = self._overlay_file(environment).parent
        try:
            out = run_tool([*self.kustomize, str(overlay_dir)], timeout=self.git_timeout).stdout.decode()
        except ToolError as exc:
            raise ConfigurationError(
                f"kustomize cannot build the {environment} overlay after pinning {image.digest}: "
                f"{exc.stderr.strip()[-500:]}",
                hint="fix the overlay or base in the GitOps repository",
            ) from None
        if str(image) not in out:
            raise ConfigurationError(
                f"the {environment} overlay pins {image} but the rendered manifests never use it",
                hint="the image name must match the `image:` used in the base manifests",
            )

    def _head(self) -> str:
        return self._out("rev-parse", "HEAD")

    def _push(self) -> bool:
        """Push HEAD to the branch. True when pushed; False when the remote moved on."""
        env, secret = self._env()
        result = run_tool(
            ["git", "push", "--porcelain", "origin", f"HEAD:refs/heads/{self.branch}"],
            timeout=self.git_timeout, env=env, secret_env=secret, cwd=str(self.workdir),
            check=False,
        )
        if result.returncode == 0:
            return True
        text = (result.stdout.decode(errors="replace") + result.stderr).lower()
        if any(m in text for m in _NOT_FAST_FORWARD_MARKERS):
            return False
        if "hook declined" in text or "protected branch" in text:
            raise PolicyRefusal(
                f"{self.repo_url} refused the push to {self.branch}: {result.stderr.strip()[-500:]}",
                hint="the repository's branch protection must allow Portcullis to push",
            )
        raise self._classify("push", ToolError("git", result.returncode, result.stderr))

    def _rebase_onto_remote(self, what: str) -> None:
        self._fetch()
        rebase = self._git("rebase", "--quiet", f"origin/{self.branch}", ok_codes=(0, 1))
        if rebase.returncode != 0:
            self._git("rebase", "--abort", ok_codes=(0, 128))
            other = self._out("log", "-1", "--format=%h %an: %s", f"origin/{self.branch}")
            raise PolicyRefusal(
                f"{what} conflicts with a change pushed meanwhile to {self.branch} ({other}); "
                "nothing was pushed",
                hint="look at that change, then run the promotion or rollback again",
            )

    def _commit_and_push(self, path: Path, message: str, environment: str, expected: str,
                         image_name: str, what: str,
                         also: tuple[Path, ...] = ()) -> tuple[str, int]:
        for changed in (path, *also):
            self._git("add", "--", changed.relative_to(self.workdir).as_posix())
        self._commit(message)
        for attempt in range(1, self.max_push_attempts + 1):
            if self._push():
                return self._head(), attempt
            if attempt == self.max_push_attempts:
                break
            self._rebase_onto_remote(what)
            # A clean rebase can still leave another value in place (a change on the same
            # file that git merged beside ours): only push what we meant.
            _, _, data = self._read_overlay(environment)
            if pinned_digest(data, image_name) != expected:
                raise PolicyRefusal(
                    f"after rebasing {what} on {self.branch}, the {environment} overlay no longer "
                    f"pins {expected}; nothing was pushed",
                    hint="someone changed the same overlay; check it and try again",
                )
        raise TransientError(
            f"{what}: {self.repo_url} {self.branch} kept moving; gave up after "
            f"{self.max_push_attempts} push attempts"
        )

    def _commit(self, message: str) -> None:
        env, secret = self._env()
        try:
            run_tool(["git", "commit", "--quiet", "--no-verify", "--cleanup=verbatim", "-F", "-"],
                     timeout=self.git_timeout, env=env, secret_env=secret,
                     cwd=str(self.workdir), stdin=message.encode())
        except ToolError as exc:
            raise self._classify("commit", exc) from None

    # ---- the operations ---------------------------------------------------------------------

    def current_digest(self, environment: str, image_name: str) -> str | None:
        """The digest the remote branch's overlay pins for ``image_name`` in ``environment``."""
        with self._locked():
            self.sync()
            _, _, data = self._read_overlay(environment)
            return pinned_digest(data, image_name)

    def promote(
        self,
        app: str,
        environment: str,
        image: ImageRef,
        annotations: TraceAnnotations,
        *,
        image_name: str | None = None,
        canary: CanaryPolicy | None = None,
        workload: str | None = None,
        metrics: RolloutMetrics | None = None,
    ) -> GitOpsCommit:
        """Pin ``image`` in the environment's overlay, commit and push.

        Args:
            app: the application, named in the message and trailers.
            environment: which overlay (``overlays/<environment>``).
            image: the digest-pinned image to run.
            annotations: commit, flow run, approvers and time, written into the overlay.
            image_name: the image name in the base manifests; default ``app``.
            canary: the environment's canary policy: rendered into the overlay as an Argo
                Rollouts Rollout and AnalysisTemplate (:func:`render_canary`), in the same
                commit as the digest.
            workload: the base Deployment the Rollout takes over; default ``app``.
            metrics: where the cluster's Prometheus keeps the canary's figures.

        Returns:
            The pushed commit.

        Raises:
            ConfigurationError: the overlay is missing or malformed, or the workdir is wrong.
            PolicyRefusal: the promotion conflicts with a concurrent change, or the remote
                refuses the push.
            TransientError: the remote is unreachable or kept moving.
        """
        name = image_name or app
        _one_line(app, "app")
        with self._locked():
            self.sync()
            path, text, data = self._read_overlay(environment)
            also: tuple[Path, ...] = ()
            if canary is not None:
                deployment = workload or app
                data = render_canary_overlay(data, workload=deployment)
                rollout_path = path.parent / ROLLOUT_FILE
                rollout_path.write_text(
                    "# Rendered by Portcullis from the environment's canary policy; edits here "
                    "are overwritten.\n" + yaml.safe_dump_all(
                        render_canary(canary, app=app, workload=deployment, metrics=metrics),
                        sort_keys=False, width=1000,
                    )
                )
                also = (rollout_path,)
            rendered = dump_kustomization(
                render_overlay(data, image, annotations, image_name=name), leading_comments(text)
            )
            if rendered == text:
                raise PolicyRefusal(
                    f"{environment} already pins {image.digest} with exactly these annotations; "
                    "nothing to commit"
                )
            path.write_text(rendered)
            self._check_rendered(environment, image)
            message = promotion_message(app, environment, image, annotations, name)
            sha, attempts = self._commit_and_push(
                path, message, environment, image.digest, name, f"promotion of {image.digest}",
                also,
            )
        return GitOpsCommit(sha=sha, environment=environment, digest=image.digest,
                            message=message, pushed_to=self.pushed_to, push_attempts=attempts)

    def promotions(self, environment: str) -> list[PromotionEntry]:
        """Portcullis promotions of ``environment`` on the branch not yet reverted, newest first."""
        log = self._out(
            "log", "--format=%H%x1f%B%x1f%(trailers:only,unfold)%x1e", f"origin/{self.branch}"
        )
        reverted: set[str] = set()
        found: list[PromotionEntry] = []
        for record in log.split("\x1e"):
            parts = record.strip("\n").split("\x1f")
            if len(parts) != 3:
                continue
            sha, body, trailer_block = parts
            trailers = parse_trailers(trailer_block)
            # Reverts are newer than what they revert, so walking newest-first sees them first;
            # a hand-made `git revert` counts too.
            reverted.update(trailers.get(TRAILER_REVERTS, []))
            reverted.update(_REVERT_LINE_RE.findall(body))
            if (
                trailers.get(TRAILER_ACTION) == ["promote"]
                and trailers.get(TRAILER_ENVIRONMENT) == [environment]
                and TRAILER_DIGEST in trailers
                and TRAILER_IMAGE_NAME in trailers
                and sha not in reverted
            ):
                found.append(PromotionEntry(sha=sha, trailers=trailers))
        return found

    def rollback(
        self,
        environment: str,
        *,
        reason: str = "rolled back by Portcullis",
        flow_run_url: str | None = None,
    ) -> GitOpsCommit:
        """Revert the newest Portcullis promotion of ``environment`` that is not reverted yet.

        Args:
            environment: which overlay.
            reason: why, for the commit message (one line).
            flow_run_url: the flow run that decided the rollback, if any.

        Returns:
            The pushed revert commit; ``digest`` is the digest the overlay pins now.

        Raises:
            PolicyRefusal: nothing to roll back, the revert conflicts with a later hand
                edit, or it would leave the environment with no digest-pinned image.
        """
        _one_line(reason, "reason")
        if flow_run_url is not None:
            _one_line(flow_run_url, "flow_run_url")
        with self._locked():
            self.sync()
            self._read_overlay(environment)  # refuses a missing or malformed overlay first
            candidates = self.promotions(environment)
            if not candidates:
                raise PolicyRefusal(
                    f"there is no Portcullis promotion of {environment} left to roll back on "
                    f"{self.branch}",
                    hint="promote a known-good digest instead",
                )
            target = candidates[0]
            revert = self._git("revert", "--no-commit", target.sha, ok_codes=(0, 1))
            if revert.returncode != 0:
                self._git("revert", "--abort", ok_codes=(0, 128))
                raise PolicyRefusal(
                    f"reverting {target.sha[:12]} conflicts with later changes to the "
                    f"{environment} overlay; nothing was pushed",
                    hint="promote the wanted digest explicitly instead",
                )
            path, _, data = self._read_overlay(environment)
            restored = pinned_digest(data, target.image_name)
            if restored is None:
                self._git("reset", "--quiet", "--hard", f"origin/{self.branch}")
                raise PolicyRefusal(
                    f"reverting {target.sha[:12]} would leave {environment} with no "
                    f"digest-pinned {target.image_name} (it was the first promotion)",
                    hint="promote a known-good digest instead",
                )
            message = rollback_message(
                target, environment, restored, reason=reason, flow_run_url=flow_run_url
            )
            sha, attempts = self._commit_and_push(
                path, message, environment, restored, target.image_name,
                f"rollback of {target.sha[:12]}",
            )
        return GitOpsCommit(sha=sha, environment=environment, digest=restored,
                            message=message, pushed_to=self.pushed_to, push_attempts=attempts)


def now_utc() -> datetime:
    """The current time in UTC, for :attr:`TraceAnnotations.deployed_at`."""
    return datetime.now(UTC)
