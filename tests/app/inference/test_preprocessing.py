"""Preprocessing shared by training and serving: stretch, letterbox, crop box, NMS."""

from __future__ import annotations

import numpy as np
import pytest

from app.inference.model_card import InputSpec
from app.inference.preprocessing import (
    crop_box_from_logits,
    letterbox,
    mask_crop_box,
    model_input,
    stretch_grey,
)


def test_stretch_clips_percentiles_to_unit_range():
    img = np.linspace(0, 1000, 10_000, dtype=np.float32).reshape(100, 100)
    out = stretch_grey(img)
    assert out.min() == 0.0 and out.max() == 1.0
    assert stretch_grey(np.full((4, 4), 7.0)).max() == 0.0  # flat image: no division by zero


def test_letterbox_maps_boxes_back_exactly():
    img = np.zeros((300, 600), np.float32)
    canvas, place = letterbox(img, 256, 0.5)
    assert canvas.shape == (256, 256)
    assert place.scale == pytest.approx(256 / 600)
    box_in_input = np.array(
        [
            [
                place.pad_x + 10 * place.scale,
                place.pad_y + 20 * place.scale,
                place.pad_x + 110 * place.scale,
                place.pad_y + 220 * place.scale,
            ]
        ]
    )
    assert np.allclose(place.to_image(box_in_input), [[10, 20, 110, 220]], atol=1e-3)


def test_model_input_follows_the_spec():
    spec = InputSpec(size=(32, 32), resize="letterbox", channels=3, mean=[0.5] * 3, std=[0.25] * 3)
    x, _ = model_input(np.ones((10, 20), np.float32), spec)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    assert x.max() == pytest.approx(2.0) and x.min() == pytest.approx(-2.0)


def test_mask_crop_box_with_margin_and_empty_mask():
    mask = np.zeros((100, 200), bool)
    mask[20:60, 50:150] = True
    assert mask_crop_box(mask, 0.0) == (50, 20, 150, 60)
    assert mask_crop_box(mask, 0.1) == (40, 16, 160, 64)
    assert mask_crop_box(np.zeros((5, 5), bool), 0.1) is None
    logits = np.where(mask, 5.0, -5.0).astype(np.float32)[::2, ::2]  # half-resolution logits
    x1, y1, x2, y2 = crop_box_from_logits(logits, 100, 200, 0.0)
    assert abs(x1 - 50) <= 2 and abs(y1 - 20) <= 2 and abs(x2 - 150) <= 2 and abs(y2 - 60) <= 2
