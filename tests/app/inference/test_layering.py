"""The architecture as a test: the core that training imports pulls in no web framework, and the
DICOM layer no route."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

CORE = (
    "app.inference.decoding",
    "app.inference.preprocessing",
    "app.inference.model_card",
    "app.inference.runtime",
    "app.inference.pipeline",
    "app.inference.postprocess",
    "app.inference.operating_point",
    "app.inference.answers",
    "app.inference.plan",
)


def imported_after(modules: tuple[str, ...]) -> set[str]:
    code = (
        "import sys, json\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    import json

    return set(json.loads(out.stdout))


def test_the_inference_core_imports_no_web_framework():
    loaded = imported_after(CORE)
    web = sorted(m for m in loaded if m.split(".")[0] in ("fastapi", "starlette", "uvicorn"))
    assert not web, web
    assert not any(
        m.startswith(("app.api", "app.dicom", "app.pacs", "app.results")) for m in loaded
    )


def test_training_uses_the_core_not_the_service():
    loaded = imported_after(("training.evaluate", "training.classifier", "training.data"))
    service = ("app.api", "app.dicom", "app.pacs", "app.results", "app.main")
    assert not any(m.startswith(service) for m in loaded)


# The service's floors, bottom first: a module may import its own floor or any floor below,
# never one above (app/main.py builds the app from all of them and is not listed).
LAYERS = (
    ("app.core",),
    ("app.inference", "app.admission"),
    ("app.dicom", "app.batching", "app.study"),
    ("app.results",),
    ("app.service",),
    ("app.pacs",),
    ("app.api",),
)


def _floor(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def _imports(path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("app.")}


def test_every_app_module_imports_only_its_floor_or_below():
    """Globbed, not listed: a new module is placed by its package and checked at once."""
    modules = sorted((REPO / "app").rglob("*.py"))
    assert len(modules) > 40
    for path in modules:
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        if name in ("app", "app.main"):
            continue
        floor = _floor(name)
        assert floor is not None, f"{name}: give its package a floor in LAYERS"
        upward = {m for m in _imports(path) if (_floor(m) or 0) > floor}
        assert not upward, f"{name} imports from a floor above: {sorted(upward)}"
