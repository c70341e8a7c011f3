"""The product never reaches into the local stack, the tests or the benchmarks.

``portcullis/``, ``tasks/``, ``flows/`` and ``blocks/`` are what a deploy or build worker runs;
``infra/`` is the local stack (and its demo commands, its users), ``tests/`` and ``bench/`` are
ours. Every import statement in every product file is read (also those inside functions, and
``importlib.import_module``/``__import__`` with a literal name), so no chain of product modules
can import them either.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("portcullis", "tasks", "flows", "blocks")
NOT_PRODUCT = ("infra", "tests", "bench")


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in ``source``, literal dynamic ones included."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _outside_product(module: str) -> bool:
    return module.split(".")[0] in NOT_PRODUCT


def test_the_walk_sees_every_kind_of_import() -> None:
    source = ("import infra.stack\nfrom tests.support import codes\n"
              "def f():\n    from infra.haproxy import Router\n"
              "importlib.import_module('bench.board')\nfrom . import sibling\nimport infrastructure\n")
    assert [m for _, m in imported_modules(source) if _outside_product(m)] == [
        "infra.stack", "tests.support", "infra.haproxy", "bench.board"]


@pytest.mark.parametrize("package", PRODUCT)
def test_product_code_imports_nothing_from_the_stack_the_tests_or_the_benchmarks(package: str) -> None:
    files = sorted((REPO_ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    offending = [f"{path.relative_to(REPO_ROOT)}:{line}: {module}"
                 for path in files for line, module in imported_modules(path.read_text())
                 if _outside_product(module)]
    assert offending == [], "product code imports local infrastructure:\n" + "\n".join(offending)
