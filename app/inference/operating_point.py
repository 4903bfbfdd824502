"""Operating points: false positives per image -> detector threshold. Both halves of the rule
live here: `fit_row` makes a card's table from a FROC curve (training, calibration), `from_fp_rate`
reads it back when serving."""

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


def fit_row(
    thresholds: np.ndarray,
    recall: np.ndarray,
    fp_per_image: np.ndarray,
    precision: np.ndarray,
    fp_rate: float,
) -> dict[str, float]:
    """One row of a card's table from a FROC curve (arrays ordered by descending threshold): the
    lowest threshold whose mean false positives per image stay within `fp_rate`."""
    ok = np.flatnonzero(fp_per_image <= fp_rate + 1e-12)
    if ok.size == 0:
        return {"fp_per_image": fp_rate, "threshold": 1.0, "recall": 0.0, "precision": 1.0}
    i = int(ok[-1])
    return {
        "fp_per_image": fp_rate,
        "threshold": float(thresholds[i]),
        "recall": float(recall[i]),
        "precision": float(precision[i]),
        "achieved_fp_per_image": float(fp_per_image[i]),
    }


def card_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """fit_row's rows as a card keeps them (4 decimals)."""
    return [{k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} for row in rows]


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
