"""fp_per_image -> detector threshold by interpolation in the card's table."""

from __future__ import annotations

import pytest

from app.inference import operating_point as op
from app.inference.model_card import ModelCard

ROWS = [
    {"fp_per_image": 0.1, "threshold": 0.576, "recall": 0.742},
    {"fp_per_image": 0.2, "threshold": 0.379, "recall": 0.785},
    {"fp_per_image": 0.3, "threshold": 0.262, "recall": 0.805},
    {"fp_per_image": 0.4, "threshold": 0.193, "recall": 0.824},
    {"fp_per_image": 0.5, "threshold": 0.149, "recall": 0.840},
]


def detector_card(rows: list[dict]) -> ModelCard:
    return ModelCard.model_validate(
        {
            "name": "detector-test",
            "version": "1",
            "task": "detection",
            "file": "detector-test.onnx",
            "sha256": "0" * 64,
            "input": {
                "size": [64, 64],
                "resize": "letterbox",
                "channels": 3,
                "mean": [0, 0, 0],
                "std": [1, 1, 1],
            },
            "output": {"postprocess": "rcnn"},
            "operating_points": rows,
            "data": "test",
            "licence": "test",
            "recipe": {},
            "metrics": {},
        }
    )


TABLE = detector_card(ROWS)


def test_rows_are_returned_exactly():
    point = op.from_fp_rate(TABLE, 0.4)
    assert point.detector_threshold == pytest.approx(0.193)
    assert point.expected_recall == pytest.approx(0.824)


def test_between_rows_is_linear():
    point = op.from_fp_rate(TABLE, 0.25)
    assert point.detector_threshold == pytest.approx((0.379 + 0.262) / 2)
    assert point.expected_recall == pytest.approx((0.785 + 0.805) / 2)


def test_a_table_that_does_not_rise_is_refused_at_load():
    with pytest.raises(ValueError):
        detector_card(ROWS[::-1])


def test_the_range_is_the_cards_table():
    short = detector_card(ROWS[:3])  # 0.1 to 0.3
    assert op.from_fp_rate(short, 0.3).detector_threshold == pytest.approx(0.262)
    with pytest.raises(ValueError, match=r"\[0.1, 0.3\]"):
        op.from_fp_rate(short, 0.4)


@pytest.mark.parametrize("rate", [0.0, 0.09, 0.51, 2.0])
def test_outside_the_range_is_refused(rate):
    with pytest.raises(ValueError):
        op.from_fp_rate(TABLE, rate)


def test_score_threshold_overrides():
    point = op.from_score(0.05)
    assert point.as_dict() == {
        "fp_per_image": None,
        "detector_threshold": 0.05,
        "expected_recall": None,
    }
    with pytest.raises(ValueError):
        op.from_score(1.5)
