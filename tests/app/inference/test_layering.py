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
    assert not any(m.startswith("app.api") or m.startswith("app.dicom") for m in loaded)


def test_training_uses_the_core_not_the_service():
    loaded = imported_after(("training.evaluate", "training.classifier", "training.data"))
    assert not any(m.startswith(("app.api", "app.dicom", "app.main")) for m in loaded)
