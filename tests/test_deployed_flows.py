"""What deployments.yaml ships agrees with what the workers run, and every deployed flow checks
its worker from the inside.

Walks deployments.yaml and the code (no server): a shipped deployment its side's worker was
not configured for would be refused at every run (the catalog's scheduled promotions and the
DORA report once were), and a deployed flow without ``_side`` first would run wherever it was
started (rollback, clear-pin and the DORA report once did).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any

import yaml

from infra.production import ENTRYPOINTS, POOLS

ROOT = Path(__file__).resolve().parent.parent


def _deployments() -> list[dict[str, Any]]:
    return list(yaml.safe_load((ROOT / "deployments.yaml").read_text())["deployments"])


def test_every_shipped_deployment_is_configured_on_its_sides_worker() -> None:
    shipped: dict[str, dict[str, str]] = {side: {} for side in POOLS}
    for deployment in _deployments():
        path, name = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        (side,) = [s for s, pool in POOLS.items() if pool == deployment["work_pool"]["name"]]
        shipped[side][f"{flow.name}/{deployment['name']}"] = deployment["entrypoint"]
    assert shipped == ENTRYPOINTS


def _first_call(function: ast.FunctionDef) -> str | None:
    """The name of the function the first statement that runs calls (``f(...)`` or
    ``return f(...)``), if it is one."""
    runs = [stmt for stmt in function.body if not (  # the docstring does not run
        isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))]
    first = runs[0]
    call = first.value if isinstance(first, ast.Expr | ast.Return) else None
    if isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
        return call.func.id
    return None


def test_every_deployed_flow_first_checks_that_it_runs_on_its_worker() -> None:
    unchecked: list[str] = []
    for entrypoint in sorted({d["entrypoint"] for d in _deployments()}):
        path, name = entrypoint.split(":")
        functions = {node.name: node for node in ast.parse((ROOT / path).read_text()).body
                     if isinstance(node, ast.FunctionDef)}
        called = _first_call(functions[name])
        if called in functions and called != "_side":  # a shared body: its first call counts
            called = _first_call(functions[called])
        if called != "_side":
            unchecked.append(entrypoint)
    assert unchecked == []
