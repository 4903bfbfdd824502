"""Source shifts move the fracture boxes with the pixels and are the same on every run."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from training.shifts import SHIFTS, shift_image


def bright_box_image() -> tuple[np.ndarray, np.ndarray]:
    img = np.full((120, 200), 40, np.uint8)
    img[30:60, 120:180] = 250  # the "lesion": x 120..180, y 30..60
    return img, np.array([[120 / 200, 30 / 120, 180 / 200, 60 / 120]], np.float32)


@pytest.mark.parametrize("kind", [s for s in SHIFTS if s not in ("none", "markers")])
def test_boxes_follow_the_pixels(kind):
    img, boxes = bright_box_image()
    data, ctype, moved = shift_image(img, boxes, kind, "IMG0000001")
    out = np.asarray(Image.open(io.BytesIO(data)).convert("L")).astype(float)
    assert ctype == ("image/jpeg" if kind in ("jpeg", "all", "all-rotate") else "image/png")
    h, w = out.shape
    x1, y1, x2, y2 = (moved[0] * [w, h, w, h]).round().astype(int)
    inside = out[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].mean()
    outside = np.delete(out, np.s_[max(0, y1 - 3) : y2 + 3], axis=0).mean()
    assert inside > outside + 60


def test_shifts_are_deterministic_per_image():
    img, boxes = bright_box_image()
    a = shift_image(img, boxes, "all", "IMG0000007")
    b = shift_image(img, boxes, "all", "IMG0000007")
    assert a[0] == b[0] and np.array_equal(a[2], b[2])


def test_any_angle_keeps_every_pixel_and_boxes_the_rotated_lesion():
    img, boxes = bright_box_image()
    data, _, moved = shift_image(img, boxes, "rotate", "IMG0000003")
    out = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    h, w = out.shape
    assert h * w > img.size  # the canvas grew: no corner of the film was cut
    assert (out > 200).sum() >= 0.9 * 30 * 60  # the lesion is all there
    x1, y1, x2, y2 = (moved[0] * [w, h, w, h]).round().astype(int)
    ys, xs = np.nonzero(out > 200)
    assert x1 - 2 <= xs.min() and xs.max() <= x2 + 2 and y1 - 2 <= ys.min() and ys.max() <= y2 + 2
