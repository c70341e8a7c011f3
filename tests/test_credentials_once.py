"""Each side's credentials are resolved once per run, by the flow, and passed on as objects.

Stages that took a block name loaded (and decrypted) the same credentials up to five times
per run, each time from whatever the block store held at that moment. This walks the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _resolve_calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "resolve" and isinstance(node.func.value, ast.Name)
            and node.func.value.id in ("BuildCredentials", "DeployCredentials")]


def test_no_task_resolves_credentials() -> None:
    """tasks/ take credentials objects; none looks a block up by name."""
    found = [f"{path.name}:{call.lineno}" for path in sorted((ROOT / "tasks").glob("*.py"))
             for call in _resolve_calls(ast.parse(path.read_text()))]
    assert found == []


def test_each_flow_resolves_each_side_at_most_once() -> None:
    """In flows/, each function that runs a flow's body resolves each side at most once."""
    twice: list[str] = []
    for path in sorted((ROOT / "flows").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef):
                sides = [call.func.value.id for call in _resolve_calls(node)]  # type: ignore[attr-defined]
                twice += [f"{path.name}:{node.name}:{side}" for side in set(sides)
                          if sides.count(side) > 1]
    assert twice == []


def test_no_deployed_flow_lets_a_run_name_its_credentials() -> None:
    """A run's parameters are whatever the caller of the Prefect API typed: a flow the workers
    run must take its credentials (and with them its trust roots) from the worker's own
    settings, never from a block the run names."""
    import importlib
    import inspect

    import yaml

    spec = yaml.safe_load((ROOT / "deployments.yaml").read_text())
    entrypoints = sorted({d["entrypoint"] for d in spec["deployments"]})
    assert "flows/deployed.py:rollback_deployed" in entrypoints
    named: list[str] = []
    for entrypoint in entrypoints:
        path, name = entrypoint.split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        named += [f"{entrypoint}({p})" for p in inspect.signature(flow.fn).parameters
                  if "credential" in p or "block" in p or "key" in p or "trust" in p]
    assert named == []

