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
