"""Turn a radiograph set down at an angle so that its bone axis lies along an image axis.

Other hospitals' radiographs arrive tilted by any angle, and the models lose most at angles
between quarter turns (1.2.0's val AUROC 0.917 -> 0.848 under the `rotate` shift; the detector's
best box 0.859 -> 0.640). Quarter turns the models handle themselves (rot4 views, quarter-turn training),
so only the residual angle matters: the long axis of the bone mask, folded into (-45, 45] degrees.
When that residual is large and the mask elongated enough for its axis to mean something, the
working image is turned by it (canvas grown, no pixel lost) and the crop is taken there; boxes
found in the turned image come back as the upright boxes around them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

# Residual tilts up to this are left alone: the models trained on crops turned by up to +-20
# (the detector: quarter turns only) or +-45 degrees, and FracAtlas's own radiographs mostly lie
# within it (80 val images: a median of 9 degrees off an axis, a fifth beyond 20).
MIN_TURN_DEGREES = 20.0
# The mask's long axis is trusted when its variance is at least this many times the short
# axis's (a hand spread flat, or a near-square mask, has no axis worth turning to).
MIN_ELONGATION = 2.0


@dataclass(frozen=True)
class Turn:
    """A rotation of a height x width working image onto a grown canvas: turned = A p + t."""

    degrees: float  # counter-clockwise as displayed
    matrix: np.ndarray  # 2 x 3, working pixels -> turned pixels
    size: tuple[int, int]  # the turned canvas (height, width)
    source: tuple[int, int]  # the working image (height, width)

    @property
    def inverse(self) -> np.ndarray:
        """2 x 3, turned pixels -> working pixels."""
        return np.linalg.inv(np.vstack([self.matrix, [0.0, 0.0, 1.0]]))[:2]

    def image(self, pixels: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """The working image turned (bilinear, black where the canvas grew), same dtype; with
        `box` (x1, y1, x2, y2 in turned pixels) only that part of the turned canvas is made."""
        x1, y1, x2, y2 = box or (0, 0, self.size[1], self.size[0])
        inverse = self.inverse.copy()
        inverse[:, 2] += inverse[:, :2] @ [x1, y1]  # output pixel (0, 0) is turned (x1, y1)
        plane = Image.fromarray(pixels.astype(np.float32), mode="F")
        turned = plane.transform(
            (x2 - x1, y2 - y1),
            Image.Transform.AFFINE,
            tuple(inverse.ravel()),
            Image.Resampling.BILINEAR,
        )
        out = np.asarray(turned)
        if np.issubdtype(pixels.dtype, np.integer):
            info = np.iinfo(pixels.dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        return out.astype(pixels.dtype)

    def points(self, xy: np.ndarray) -> np.ndarray:
        """(n, 2) working pixels -> turned pixels."""
        return xy @ self.matrix[:, :2].T + self.matrix[:, 2]

    def boxes_back(self, boxes: np.ndarray) -> np.ndarray:
        """xyxy boxes in turned pixels -> the upright boxes around them in working pixels."""
        if not len(boxes):
            return np.zeros((0, 4), np.float32)
        out = enclosing_boxes(boxes, self.inverse)
        h, w = self.source
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
        return out.astype(np.float32)


def enclosing_boxes(boxes: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """xyxy pixel boxes (k, 4) under a 2x3 affine map: the upright box around each box's four
    moved corners (for a rotation: the turned lesion's enclosing box)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    corners = np.stack([b[:, [0, 1]], b[:, [2, 1]], b[:, [2, 3]], b[:, [0, 3]]], 1)
    moved = np.concatenate([corners, np.ones((*corners.shape[:2], 1))], 2) @ affine.T
    return np.concatenate([moved.min(1), moved.max(1)], 1)


def residual_tilt(
    mask: np.ndarray, scale: tuple[float, float] = (1.0, 1.0)
) -> tuple[float, float] | None:
    """(residual degrees in [-45, 45), elongation) of a binary mask's long axis, the angle
    measured in image coordinates (y down) after scaling its pixels by (sx, sy); None for an
    empty mask."""
    ys, xs = np.nonzero(mask)
    if xs.size < 3:
        return None
    cov = np.cov(np.stack([xs * scale[0], ys * scale[1]]).astype(np.float64))
    values, vectors = np.linalg.eigh(cov)
    if values[1] <= 0:
        return None
    long_axis = vectors[:, 1]
    angle = math.degrees(math.atan2(long_axis[1], long_axis[0]))
    residual = (angle + 45.0) % 90.0 - 45.0
    return residual, float(values[1] / max(values[0], 1e-9))


def turn_for(degrees_cw: float, height: int, width: int) -> Turn:
    """The turn that rotates an image by `degrees_cw` in image coordinates (y down, i.e.
    clockwise as displayed) about its centre, on a canvas grown to hold every pixel."""
    phi = math.radians(degrees_cw)
    a = np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])
    corners = np.array([[0, 0], [width, 0], [0, height], [width, height]], dtype=np.float64)
    turned = corners @ a.T
    low, high = turned.min(axis=0), turned.max(axis=0)
    matrix = np.hstack([a, -low[:, None]])
    size = (int(math.ceil(high[1] - low[1] - 1e-6)), int(math.ceil(high[0] - low[0] - 1e-6)))
    return Turn(degrees=-degrees_cw, matrix=matrix, size=size, source=(height, width))


def upright_turn(mask: np.ndarray, height: int, width: int) -> Turn | None:
    """The turn that sets the mask's long axis along the nearest image axis, for a
    height x width working image whose bone mask (any resolution) is `mask`; None when the tilt
    is small or the axis undefined."""
    mh, mw = mask.shape
    tilt = residual_tilt(mask, (width / mw, height / mh))
    if tilt is None:
        return None
    residual, elongation = tilt
    if abs(residual) < MIN_TURN_DEGREES or elongation < MIN_ELONGATION:
        return None
    return turn_for(-residual, height, width)


def turned_crop_box(
    turn: Turn, mask: np.ndarray, margin: float
) -> tuple[int, int, int, int] | None:
    """The crop box of the turned image: the box around the turned mask's pixels (their
    corners), grown by `margin` of its size on every side as the upright crop is, clipped."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    h, w = turn.source
    mh, mw = mask.shape
    sx, sy = w / mw, h / mh
    corners = np.concatenate(
        [np.stack([(xs + dx) * sx, (ys + dy) * sy], axis=1) for dx in (0, 1) for dy in (0, 1)]
    )
    turned = turn.points(corners)
    x1, y1 = turned.min(axis=0)
    x2, y2 = turned.max(axis=0)
    dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
    th, tw = turn.size
    return (
        max(0, int(np.floor(x1 - dx))),
        max(0, int(np.floor(y1 - dy))),
        min(tw, int(np.ceil(x2 + dx))),
        min(th, int(np.ceil(y2 + dy))),
    )
