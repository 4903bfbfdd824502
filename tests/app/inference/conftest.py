"""Fixtures shared by the inference tests."""

from __future__ import annotations

import pytest

from app.core.config import Settings
from app.inference import operating_point as op
from app.inference.runtime import ModelRegistry


@pytest.fixture(scope="module")
def chain():
    """The shipped default models (cropper, classifier, detector) and the default operating
    point, as the service loads them."""
    s = Settings()
    registry = ModelRegistry(s.models_dir)
    registry.load_all("cpu", 0)
    crp = registry.get("cropper", None, "")
    clf = registry.get("classifier", None, s.default_classifier)
    det = registry.get("detector", None, s.default_detector)
    return crp, clf, det, op.from_fp_rate(det.card, s.default_fp_per_image)
