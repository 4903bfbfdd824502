"""Paint out burned-in annotations (side markers, acquisition text, label tabs) before the
models look at an image.

Sites burn letters and text into the pixels at the brightest grey level, on the dark
background around the anatomy. The models never learned that a bright "L" is not bone: under the
`markers` shift the classifier loses about 0.02 AUROC (6 of the detector's 265 boxes at the fp=0.4
row sit on a letter). An annotation is told from anatomy by what it is made of: a small bright
island (the top of the image's own range) with a sharp step down to a much darker ring around
it. Bone, even cortical bone or metal, sits inside soft tissue or joins a large bright area, so it
fails one test or the other. Each island found is filled smoothly from the pixels around it; the
image's geometry is unchanged, so boxes need no mapping. What is painted is only what the models
see: the answer's boxes refer to the image as sent.

Off by default (FRACTURE_PAINT_OUT_MARKERS): on val it brings scores nearer the unmarked image's
but not AUROC, and the shipped detector boxes painted patches over bone (README, "Site
calibration"; research/marker_boxes.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# On the image's own range (its minimum 0, its maximum 1): islands are grown from pixels at or
# above BRIGHT and must hold at least one at or above CORE (burned-in text is the top level;
# JPEG ringing and interpolation pull edges down).
BRIGHT = 0.78
CORE = 0.85
# The ring (pixels within RING_PX of the island, outside it) must be this much darker than the
# island, on the same scale: text on background or soft tissue, not bone in soft tissue.
MIN_STEP = 0.40
# An island larger than this share of the image, or longer than this share of its long side,
# is anatomy (a skull, an abdomen, a whole bright limb), not an annotation.
MAX_AREA = 0.02
MAX_EXTENT = 0.2
RING_PX = 3
# Specks smaller than this are left alone (noise, not worth a note)
MIN_AREA_PX = 20
# Islands are painted with a margin, so that JPEG halos around the letters go too.
PAINT_MARGIN_PX = 2


@dataclass(frozen=True)
class Painted:
    """What suppression found: the islands' boxes (x1, y1, x2, y2, working pixels)."""

    boxes: tuple[tuple[int, int, int, int], ...]

    @property
    def count(self) -> int:
        return len(self.boxes)


def suppress_markers(pixels: np.ndarray) -> tuple[np.ndarray, Painted]:
    """The image with burned-in annotations painted out (same shape and dtype; the input itself
    when none is found), and what was painted."""
    from scipy import ndimage

    lo, hi = float(pixels.min()), float(pixels.max())
    if hi <= lo:
        return pixels, Painted(())
    level = (pixels.astype(np.float32) - lo) / (hi - lo)
    bright = level >= BRIGHT
    labels, n = ndimage.label(bright, structure=np.ones((3, 3), bool))
    if n == 0:
        return pixels, Painted(())
    h, w = pixels.shape
    area = np.bincount(labels.ravel(), minlength=n + 1)
    cores = np.bincount(labels.ravel(), weights=(level >= CORE).ravel(), minlength=n + 1)
    paint = np.zeros((h, w), bool)
    boxes = []
    grow = np.ones((2 * RING_PX + 1, 2 * RING_PX + 1), bool)
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or cores[i] == 0 or not MIN_AREA_PX <= area[i] <= MAX_AREA * h * w:
            continue
        ys, xs = sl
        if ys.start == 0 or xs.start == 0 or ys.stop == h or xs.stop == w:
            continue  # film edges and collimator strips run off the image; annotations do not
        if max(ys.stop - ys.start, xs.stop - xs.start) > MAX_EXTENT * max(h, w):
            continue
        # the island and its ring, in a window around it
        y1, y2 = max(0, ys.start - RING_PX), min(h, ys.stop + RING_PX)
        x1, x2 = max(0, xs.start - RING_PX), min(w, xs.stop + RING_PX)
        # a tab's dark letters are holes in its island: they belong to it
        island = ndimage.binary_fill_holes(labels[y1:y2, x1:x2] == i)
        if paint[y1:y2, x1:x2][island].any():
            continue  # inside a tab already found (the bowl of its letter)
        near = ndimage.binary_dilation(island, grow)
        ring = near & ~island & ~bright[y1:y2, x1:x2]
        if not ring.any():
            continue
        window = level[y1:y2, x1:x2]
        step = float(np.median(window[island & bright[y1:y2, x1:x2]]))
        if step - float(np.median(window[ring])) < MIN_STEP:
            continue
        paint[y1:y2, x1:x2] |= ndimage.binary_dilation(island, iterations=PAINT_MARGIN_PX)
        boxes.append((x1, y1, x2, y2))
    if not boxes:
        return pixels, Painted(())
    out = pixels.copy()
    for x1, y1, x2, y2 in boxes:
        _fill_smoothly(level, paint, out, (x1, y1, x2, y2), lo, hi)
    return out, Painted(tuple(boxes))


# Painted pixels take a normalised Gaussian average of the unpainted pixels around them, at the
# finest of these scales (pixels) where enough of them are near: a letter over bone becomes the
# bone's smooth course there, not a flat patch the detector would box; a large tab the scale
# of its size.
FILL_SIGMAS = (2.0, 6.0, 18.0)
MIN_FILL_WEIGHT = 0.05


def _fill_smoothly(
    level: np.ndarray,
    paint: np.ndarray,
    out: np.ndarray,
    box: tuple[int, int, int, int],
    lo: float,
    hi: float,
) -> None:
    """Fill the painted pixels inside `box` of `out` (in place) from the unpainted around them."""
    from scipy import ndimage

    h, w = level.shape
    m = int(3 * FILL_SIGMAS[-1])
    x1, y1, x2, y2 = box
    wy1, wy2, wx1, wx2 = max(0, y1 - m), min(h, y2 + m), max(0, x1 - m), min(w, x2 + m)
    hole = paint[wy1:wy2, wx1:wx2]
    known = (~hole).astype(np.float32)
    values = level[wy1:wy2, wx1:wx2] * known
    filled = np.full(hole.shape, np.nan, np.float32)
    for sigma in FILL_SIGMAS:
        weight = ndimage.gaussian_filter(known, sigma)
        ok = np.isnan(filled) & (weight >= MIN_FILL_WEIGHT)
        filled[ok] = ndimage.gaussian_filter(values, sigma)[ok] / weight[ok]
        if not np.isnan(filled[hole]).any():
            break  # every painted pixel has its value: the wider scales would change none
    # the window's own median where even the widest scale sees too little
    rest = level[wy1:wy2, wx1:wx2][~hole]
    filled = np.where(np.isnan(filled), float(np.median(rest)) if rest.size else 0.0, filled)
    target = np.zeros_like(hole)  # only this box: neighbours fill their own
    inner = (slice(y1 - wy1, y2 - wy1), slice(x1 - wx1, x2 - wx1))
    target[inner] = hole[inner]
    fill = lo + filled[target] * (hi - lo)
    if np.issubdtype(out.dtype, np.integer):
        fill = np.rint(fill)
    out[wy1:wy2, wx1:wx2][target] = fill.astype(out.dtype)
