"""Optional official weights from a local file, accepted only when their sha256 matches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.inference.runtime import sha256_of


class WeightsMismatchError(ValueError):
    """The file on disk is not the file the recipe names."""


def verify_sha256(path: str | Path, expected: str | None) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if not expected:
        raise WeightsMismatchError(
            f"{path}: a recipe that names weights must also give their sha256"
        )
    actual = sha256_of(path)
    if actual != expected.lower():
        raise WeightsMismatchError(
            f"{path}: sha256 {actual} does not match the expected {expected}"
        )
    return path


def load_verified_state_dict(path: str | Path, expected_sha256: str | None) -> dict[str, Any]:
    """Load a torch state dict after checking its sha256; unwraps {'model': ...} style files."""
    import torch

    state = torch.load(verify_sha256(path, expected_sha256), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher", "student"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    return state
