"""Test-time views of the classifier (card `input.tta`): a score that ignores the orientation.

Radiographs from other sites arrive turned by quarter turns; with `rot4` the classifier's score
is the mean logit over the four quarter turns of its input, so turning the input permutes the
views and leaves the score as it was (up to float rounding), whatever the network learned.
"""

from __future__ import annotations

import numpy as np
import pytest

from app.core.config import Settings
from app.inference.model_card import read_card
from app.inference.pipeline import classify, tta_views
from app.inference.runtime import OnnxModel


def test_views_of_a_quarter_turn_are_the_same_views():
    batch = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    turned = np.rot90(batch, 1, axes=(-2, -1))
    for tta, n in (("none", 1), ("rot4", 4), ("d4", 8)):
        views, again = tta_views(batch, tta), tta_views(turned, tta)
        assert len(views) == n and all(v.shape == batch.shape for v in views)
        if tta != "none":
            key = sorted(v.tobytes() for v in views)
            assert key == sorted(v.tobytes() for v in again)


def test_rotation_views_need_a_square_input():
    with pytest.raises(ValueError, match="square"):
        tta_views(np.zeros((1, 3, 4, 6), np.float32), "rot4")


@pytest.mark.parametrize("tta", ["rot4", "d4"])
def test_the_shipped_classifier_under_rotation_views_ignores_a_quarter_turn(tta):
    s = Settings()
    card = read_card(s.models_dir / f"{s.default_classifier}.json")
    card = card.model_copy(update={"input": card.input.model_copy(update={"tta": tta})})
    model = OnnxModel.from_card(card, s.models_dir)
    model.load(["CPUExecutionProvider"], 0)
    h, w = card.input.size
    rng = np.random.default_rng(1)
    batch = ((rng.random((3, card.input.channels, h, w)) - 0.5) / 0.5).astype(np.float32)
    p = classify(model, batch)
    assert p.shape == (3,) and np.all((p > 0) & (p < 1))
    for k in (1, 2, 3):
        turned = np.ascontiguousarray(np.rot90(batch, k, axes=(-2, -1)))
        np.testing.assert_allclose(classify(model, turned), p, atol=1e-4)
    # without views the network alone is not invariant (else this test proves nothing)
    bare = card.model_copy(update={"input": card.input.model_copy(update={"tta": "none"})})
    plain = OnnxModel.from_card(bare, s.models_dir)
    plain.load(["CPUExecutionProvider"], 0)
    turned = np.ascontiguousarray(np.rot90(batch, 1, axes=(-2, -1)))
    assert np.abs(classify(plain, turned) - classify(plain, batch)).max() > 1e-3
