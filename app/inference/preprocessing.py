"""Image preprocessing shared by the service and the training package (numpy + Pillow only).

Every model sees: grey-range stretching (Xie et al.), then its own resize and normalisation as
written in its card's `input` block. Keeping this in one module is what makes training and
serving see the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

STRETCH_PERCENTILES = (0.5, 99.5)


def stretch_grey(
    image: np.ndarray,
    low_pct: float = STRETCH_PERCENTILES[0],
    high_pct: float = STRETCH_PERCENTILES[1],
) -> np.ndarray:
    """Clip a grey image to its [low, high] percentiles and rescale to float32 in [0, 1]."""
    img = np.asarray(image, dtype=np.float32)
    # Percentiles on a subsample: the same answer within a grey level, much faster on 4k images.
    step = max(1, int(np.sqrt(img.size / 250_000)))
    sample = img[::step, ::step]
    lo, hi = np.percentile(sample, [low_pct, high_pct])
    if hi - lo < 1e-6:
        return np.zeros_like(img, dtype=np.float32)
    out = (img - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float32 grey image."""
    if image.shape == (height, width):
        return image.astype(np.float32, copy=False)
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    return np.asarray(pil.resize((width, height), Image.BILINEAR), dtype=np.float32)


class Placement(Protocol):
    """Where an image sits inside a model input; maps model-input boxes back to the image."""

    def to_image(self, boxes: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Letterbox:
    """How an image was placed into a square model input: input = image * scale + pad."""

    scale: float
    pad_x: float
    pad_y: float

    def to_image(self, boxes: np.ndarray) -> np.ndarray:
        """Map xyxy boxes from model-input pixels back to image pixels."""
        out = boxes.astype(np.float32).copy()
        out[:, [0, 2]] = (out[:, [0, 2]] - self.pad_x) / self.scale
        out[:, [1, 3]] = (out[:, [1, 3]] - self.pad_y) / self.scale
        return out


def letterbox(image: np.ndarray, size: int, pad_value: float) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio and pad to size x size, centred (as ultralytics does)."""
    h, w = image.shape
    scale = min(size / h, size / w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = resize(image, new_h, new_w)
    canvas = np.full((size, size), pad_value, dtype=np.float32)
    top = (size - new_h) // 2
    left = (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    return canvas, Letterbox(scale=new_w / w, pad_x=float(left), pad_y=float(top))


def model_input(image: np.ndarray, spec: dict[str, Any]) -> tuple[np.ndarray, Placement]:
    """Turn a stretched grey image in [0, 1] into one CHW model input as its card's spec says.

    spec keys: size [H, W]; resize "stretch" (plain resize) or "letterbox"; channels; mean; std;
    pad_value (letterbox only, in [0, 1] units).
    """
    height, width = spec["size"]
    if spec.get("resize", "stretch") == "letterbox":
        if height != width:
            raise ValueError("letterbox inputs must be square")
        plane, placement = letterbox(image, height, float(spec.get("pad_value", 0.447)))
    else:
        plane = resize(image, height, width)
        h, w = image.shape
        placement = StretchPlacement(sx=width / w, sy=height / h)
    channels = int(spec.get("channels", 1))
    mean = np.asarray(spec.get("mean", [0.0] * channels), dtype=np.float32).reshape(channels, 1, 1)
    std = np.asarray(spec.get("std", [1.0] * channels), dtype=np.float32).reshape(channels, 1, 1)
    chw = np.broadcast_to(plane, (channels, *plane.shape))
    return ((chw - mean) / std).astype(np.float32), placement


@dataclass(frozen=True)
class StretchPlacement:
    """Placement of a plainly resized input: input = image * (sx, sy)."""

    sx: float
    sy: float

    def to_image(self, boxes: np.ndarray) -> np.ndarray:
        out = boxes.astype(np.float32).copy()
        out[:, [0, 2]] /= self.sx
        out[:, [1, 3]] /= self.sy
        return out


def mask_crop_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int] | None:
    """Minimum enclosing box of a binary mask, grown by `margin` of its size on every side.

    Returns (x1, y1, x2, y2) in mask pixels, exclusive ends, clipped to the mask; None when empty.
    """
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        return None
    y1, y2 = int(ys[0]), int(ys[-1]) + 1
    x1, x2 = int(xs[0]), int(xs[-1]) + 1
    dy, dx = round((y2 - y1) * margin), round((x2 - x1) * margin)
    h, w = mask.shape
    return max(0, x1 - dx), max(0, y1 - dy), min(w, x2 + dx), min(h, y2 + dy)


def crop_box_from_logits(
    logits: np.ndarray, height: int, width: int, margin: float
) -> tuple[int, int, int, int] | None:
    """Bone-mask logits (h, w) at model resolution -> crop box in a height x width image."""
    mask = resize(logits, height, width) > 0.0
    return mask_crop_box(mask, margin)
