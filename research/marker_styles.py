"""Do burned-in markers of styles the training never draws cost more than the trained style?

    python -m research.marker_styles {trained,unseen,none} \
        evaluate --split val --shift all-rotate --report runs/markers/paired-<style>

Runs `python -m training ...` with the shifts' marker replaced: `trained` is the style of
training/augment.py (the `markers` shift's own), `unseen` a serif lead letter in an outlined box,
acquisition text in a small plain font or a ruler with ticks, `none` no marker. Each style draws
from a generator of its own, seeded by one draw of the shift's, so the three see the same angles.
Measured (val, default 2.1.0 models, `all-rotate` with that seeding): trained 0.805, unseen 0.809
(paired +0.005 [-0.033, 0.044]), none 0.837 (+0.032 [0.000, 0.066]): the style does not matter,
the markers cost about 0.03 in the combined shift. Not shipped: a measurement.
"""

from __future__ import annotations

import random
import sys

import numpy as np

import training.shifts as shifts
from training.__main__ import main


def unseen_marker(img: np.ndarray, rng: random.Random) -> None:
    """One annotation of a style training/augment.py never draws, burned in place."""
    import cv2

    h, w = img.shape
    side = max(h, w)
    kind = rng.choice(["lead", "text", "ruler"])
    if kind == "lead":  # a lead side marker: serif letters in an outlined box
        text = rng.choice(["L", "R", "D", "S", "DX", "SX"])
        scale = side / rng.uniform(250, 450)
        thick = max(1, round(2.5 * scale))
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_TRIPLEX, scale, thick)
        x = rng.randrange(0, max(1, w - tw - 10))
        y = rng.randrange(th + 10, max(th + 11, h - 10))
        cv2.rectangle(img, (x - 6, y - th - 6), (x + tw + 6, y + 6), 255, max(1, thick // 2))
        cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_TRIPLEX, scale, 255, thick)
    elif kind == "text":  # acquisition text in a corner
        lines = [
            f"{rng.randrange(2001, 2024)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}",
            f"ID {rng.randrange(10000, 99999)}",
            f"kVp {rng.randrange(45, 70)} mAs {rng.uniform(1, 8):.1f}",
        ]
        scale = side / rng.uniform(500, 900)
        thick = max(1, round(1.2 * scale))
        x0 = rng.choice([5, max(5, w - int(220 * scale))])
        y0 = rng.choice([int(20 * scale) + 5, max(int(20 * scale) + 5, h - int(70 * scale))])
        for i, line in enumerate(lines):
            at = (x0, y0 + int(i * 22 * scale))
            cv2.putText(img, line, at, cv2.FONT_HERSHEY_PLAIN, scale * 1.4, 230, thick)
    else:  # a ruler with ticks along the bottom edge
        n = rng.randrange(8, 20)
        step = max(4, (w - 20) // (n + 1))
        y = rng.randrange(h - max(12, h // 10), h - 4)
        width = max(1, side // 400)
        cv2.line(img, (10, y), (10 + n * step, y), 255, width)
        for i in range(n + 1):
            tick = side // 60 if i % 5 == 0 else side // 120
            cv2.line(img, (10 + i * step, y), (10 + i * step, y - tick), 255, width)


STYLES = {
    "trained": shifts.paint_marker,
    "unseen": unseen_marker,
    "none": lambda img, rng: None,
}

if __name__ == "__main__":
    style = STYLES[sys.argv[1]]

    def marker_of_its_own(img: np.ndarray, rng: random.Random) -> None:
        style(img, random.Random(rng.random()))  # one draw of the shift's numbers, any style

    shifts.paint_marker = marker_of_its_own
    sys.exit(main(sys.argv[2:]))
