"""The house's floors (docs/architecture.md): the CLI (trainer/controller) and the pod's code
(trainer/worker) never import each other, tasks never import the worker, and trainer/ itself
imports neither. Read from the source, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from support import REPO

PACKAGE = REPO / "trainer"
# package -> the packages its modules must not import
FORBIDDEN = {
    "trainer.controller": ("trainer.worker",),
    "trainer.worker": ("trainer.controller",),
    "trainer.tasks": ("trainer.worker", "trainer.controller"),
    "trainer": ("trainer.worker", "trainer.controller"),
}
ENTRY_POINTS = {"trainer/__main__.py"}  # `python -m trainer` starts the worker: its one job


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def package_of(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:2]) if len(parts) > 2 else "trainer"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_a_module_imports_nothing_below_a_floor_it_must_not(path):
    if str(path.relative_to(REPO)) in ENTRY_POINTS:
        return
    forbidden = FORBIDDEN[package_of(path)]
    bad = sorted(m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert not bad, f"{path.relative_to(REPO)} imports {bad}, across the floors of docs/architecture.md"
