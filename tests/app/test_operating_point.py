"""fp_per_image -> detector threshold by interpolation in the card's table."""

from __future__ import annotations

import pytest

from app import operating_point as op

TABLE = [
    {"fp_per_image": 0.1, "threshold": 0.576, "recall": 0.742},
    {"fp_per_image": 0.2, "threshold": 0.379, "recall": 0.785},
    {"fp_per_image": 0.3, "threshold": 0.262, "recall": 0.805},
    {"fp_per_image": 0.4, "threshold": 0.193, "recall": 0.824},
    {"fp_per_image": 0.5, "threshold": 0.149, "recall": 0.840},
]


def test_rows_are_returned_exactly():
    point = op.from_fp_rate(TABLE, 0.4)
    assert point.detector_threshold == pytest.approx(0.193)
    assert point.expected_recall == pytest.approx(0.824)


def test_between_rows_is_linear():
    point = op.from_fp_rate(TABLE, 0.25)
    assert point.detector_threshold == pytest.approx((0.379 + 0.262) / 2)
    assert point.expected_recall == pytest.approx((0.785 + 0.805) / 2)


def test_table_order_does_not_matter():
    assert op.from_fp_rate(TABLE[::-1], 0.15).detector_threshold == pytest.approx(
        (0.576 + 0.379) / 2
    )


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
