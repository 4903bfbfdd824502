"""Would bringing every crop to one rendering first make the shifted and unshifted images nearer?

    python -m research.canonical_contrast [--images 100]

Instead of teaching the classifier every site's rendering by augmentation, a canonical step in
front of it (in training and serving alike) could remove the difference before the network looks:
CLAHE at several clip limits, global histogram equalisation, or matching each crop's histogram to
the mean FracAtlas quantile function. A step only helps if a radiograph and its shifted rendering
come out nearer than they went in. Measured on train images (no val image, no model), each image
and its shift brought to 288 x 288 and stretched as the service does, then 1 - Pearson r between
the two after each step (lower: nearer); `matched, unshifted` is how far matching moves an image
that was not shifted at all:

    step                contrast  processing  jpeg
    as served (none)    0.0072    0.0835      0.0005
    CLAHE clip 2, 8x8   0.0142    0.1027      0.0019
    CLAHE clip 4, 8x8   0.0194    0.1097      0.0038
    CLAHE clip 8, 8x8   0.0231    0.1399      0.0082
    global equalisation 0.0298    0.1894      0.0255
    histogram matched   0.0038    0.0987      0.0046   (matched, unshifted: 0.0510)

(100 train images, every 3rd of the first 300; the matching reference from 100 others.) Every
equalisation moves the two renderings further apart, because it amplifies the noise, the JPEG
blocks and the edge enhancement that differ between them; matching undoes the gamma of `contrast`
but moves an unshifted FracAtlas image seven times as far as that shift does, and does nothing
for `processing`, the costliest. So no canonical step was trained (the percentile stretch the
service already applies removes the linear part of a window change); the candidate of this round
is candidates/mobilenet-member.yaml instead.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
from PIL import Image

from app.inference.preprocessing import resize, stretch_grey
from training.data import load_records, read_grey
from training.shifts import shift_image

SIZE = 288
SHIFTS = ("contrast", "processing", "jpeg")


def as_served(grey: np.ndarray) -> np.ndarray:
    """The stretched uint8 plane the classifier would see (square: the step is what differs)."""
    return np.round(stretch_grey(resize(grey, SIZE, SIZE)) * 255).astype(np.uint8)


def shifted(grey: np.ndarray, shift: str, image_id: str) -> np.ndarray:
    data, _, _ = shift_image(grey, np.zeros((0, 4)), shift, image_id)
    return as_served(np.asarray(Image.open(io.BytesIO(data)).convert("L")))


def clahe(clip: float, tiles: int):
    import cv2

    op = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles))
    return lambda plane: op.apply(plane)


def histogram_matcher(references: list[np.ndarray]):
    """Map each plane's grey quantiles onto the mean quantile function of `references`."""
    q = (np.arange(256) + 0.5) / 256
    cdfs = [np.cumsum(np.bincount(p.ravel(), minlength=256)) / p.size for p in references]
    target = np.mean([np.searchsorted(c, q) for c in cdfs], axis=0)

    def match(plane: np.ndarray) -> np.ndarray:
        counts = np.bincount(plane.ravel(), minlength=256) / plane.size
        mid = np.cumsum(counts) - counts / 2  # each level's mid-quantile
        return np.interp(mid, q, target)[plane]

    return match


def distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(1.0 - np.corrcoef(a.ravel().astype(np.float64), b.ravel())[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100)
    args = ap.parse_args()
    train = [r for r in load_records() if r.split == "train"]
    probe = train[: 3 * args.images : 3]
    reference = [as_served(read_grey(r.path)) for r in train[1 : 6 * args.images : 6]]
    steps = {
        "as served (none)": lambda p: p,
        "CLAHE clip 2, 8x8": clahe(2, 8),
        "CLAHE clip 4, 8x8": clahe(4, 8),
        "CLAHE clip 8, 8x8": clahe(8, 8),
        "global equalisation": clahe(40, 1),
        "histogram matched": histogram_matcher(reference),
    }
    rows: dict[str, dict[str, list[float]]] = {s: {k: [] for k in SHIFTS} for s in steps}
    moved = []
    for rec in probe:
        grey = read_grey(rec.path)
        plane = as_served(grey)
        moved.append(distance(plane, steps["histogram matched"](plane)))
        for shift in SHIFTS:
            other = shifted(grey, shift, rec.image_id)
            for name, step in steps.items():
                rows[name][shift].append(distance(step(plane), step(other)))
    print(f"{'step':20}" + "".join(f"{s:>12}" for s in SHIFTS))
    for name, per in rows.items():
        print(f"{name:20}" + "".join(f"{np.mean(per[s]):12.4f}" for s in SHIFTS))
    print(f"matched, unshifted: {np.mean(moved):.4f}")


if __name__ == "__main__":
    main()
