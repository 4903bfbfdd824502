"""The lab's scripts stay importable as a package (no sys.path tricks), and the product never
imports the lab."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPTS = sorted(p.stem for p in (REPO / "research").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_experiment_imports_without_running(name):
    module = importlib.import_module(f"research.{name}")
    assert module.__doc__, f"research/{name}.py says what it asks in its docstring"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_product_and_its_training_never_import_the_lab():
    for package in ("app", "training", "bench"):
        for path in (REPO / package).rglob("*.py"):
            leaks = {m for m in imported_modules(path) if m.split(".")[0] == "research"}
            assert not leaks, f"{path.relative_to(REPO)} imports {leaks}"


def test_configs_hold_recipes_only():
    configs = REPO / "training" / "configs"
    assert not [p for p in configs.rglob("*") if p.is_file() and p.suffix != ".yaml"]
