"""Shared fixtures: paths to ../shared data (tests skip with a reason without it), the app."""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import gc
import io
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# The in-process apps of the tests keep their results in a database of this session only,
# removed when the interpreter exits.
_STATE = tempfile.TemporaryDirectory(prefix="fracture-test-state-")
os.environ.setdefault("FRACTURE_STATE_DIR", _STATE.name)
SHARED = REPO.parent / "shared" / "data"
DICOM_DIR = SHARED / "dicom"
FRACATLAS = SHARED / "fracatlas"


def _release_freed_memory() -> None:
    """glibc keeps what onnxruntime's threads free in per-thread arenas; without a trim the
    suite's process grew module by module to 10 GB, though each module's models are gone."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:  # glibc only (musl has none)
        trim(0)


@pytest.fixture(autouse=True, scope="module")
def release_memory_after_each_module():
    yield
    _release_freed_memory()


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data lies next to the checkout)")
    return path


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    return need(DICOM_DIR)


@pytest.fixture(scope="session")
def dicom_manifest(dicom_dir: Path) -> list[dict]:
    with open(dicom_dir / "MANIFEST.tsv", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.fixture(scope="session")
def fracatlas_dir() -> Path:
    return need(FRACATLAS)


@pytest.fixture(scope="session")
def test_split_images(fracatlas_dir: Path) -> list[Path]:
    names = (fracatlas_dir / "splits" / "test.txt").read_text().split()
    found = []
    for name in names:
        for folder in ("Fractured", "Non_fractured"):
            p = fracatlas_dir / "images" / folder / name
            if p.exists():
                found.append(p)
    return found


@pytest.fixture(scope="session")
def app_client():
    """The real app on the bundled models (loaded once per test session)."""
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    app = create_app(Settings())
    with TestClient(app, raise_server_exceptions=False) as client:
        if not app.state.fracture.ready:
            pytest.fail(f"service not ready: {app.state.fracture.not_ready_reason}")
        yield client


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def phantom_box(height: int, width: int) -> tuple[int, int, int, int]:
    """Where bone_phantom puts its bone: right of centre, most of the height."""
    return round(0.6 * width), round(0.12 * height), round(0.8 * width), round(0.88 * height)


def bone_phantom(height: int = 480, width: int = 640) -> np.ndarray:
    """Dark background with one bright, textured, bone-like bar at phantom_box()."""
    rng = np.random.default_rng(0)
    img = rng.normal(20, 4, (height, width))
    x1, y1, x2, y2 = phantom_box(height, width)
    yy, xx = np.mgrid[y1:y2, x1:x2]
    cx = (x1 + x2) / 2
    cortex = 200 - 60 * np.abs((xx - cx) / ((x2 - x1) / 2))
    img[y1:y2, x1:x2] = cortex + rng.normal(0, 5, cortex.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def captured_logs(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog
