"""Operating points: false positives per image -> detector threshold, from the detector's card."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from app.inference.model_card import ModelCard


@dataclass(frozen=True)
class OperatingPoint:
    fp_per_image: float | None
    detector_threshold: float
    expected_recall: float | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "fp_per_image": self.fp_per_image,
            "detector_threshold": round(self.detector_threshold, 6),
            "expected_recall": None
            if self.expected_recall is None
            else round(self.expected_recall, 4),
        }


def from_fp_rate(card: ModelCard, fp_per_image: float) -> OperatingPoint:
    """Linear interpolation between the detector card's rows; ValueError outside the range its
    table covers."""
    lo, hi = card.fp_range
    if not lo - 1e-9 <= fp_per_image <= hi + 1e-9:
        raise ValueError(f"fp_per_image must lie in [{lo}, {hi}], got {fp_per_image}")
    rows = card.operating_points or []
    xs = np.array([r.fp_per_image for r in rows], dtype=float)
    threshold = float(np.interp(fp_per_image, xs, [r.threshold for r in rows]))
    recall = float(np.interp(fp_per_image, xs, [r.recall for r in rows]))
    return OperatingPoint(
        fp_per_image=fp_per_image, detector_threshold=threshold, expected_recall=recall
    )


def from_score(score_threshold: float) -> OperatingPoint:
    """An explicit threshold overrides the table: no FP rate or recall is promised."""
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"score_threshold must lie in [0, 1], got {score_threshold}")
    return OperatingPoint(
        fp_per_image=None, detector_threshold=score_threshold, expected_recall=None
    )
