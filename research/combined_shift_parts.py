"""What in the combined shifts costs the classifier: each part left out, and the turn's corners.

    python -m research.combined_shift_parts score --variant V --shift S
    python -m research.combined_shift_parts summary

Under `all-rotate-512` (training/shifts.py: 512 px on the long side, flattened contrast, burned-in
markers, any angle, JPEG) the served default loses 0.07-0.09 AUROC on val, while each part alone
costs at most 0.02. `score` runs the served pipeline (ensemble.py's scorer: the served classifier
fused with the best box) on val under one variant of a combined shift; `summary` pairs every
variant with `as-shifted` on the same images. Every variant keeps the shift's random numbers (the
same angles and marker places): `without-markers` draws the markers and paints none,
`without-rotate` draws the angle and does not turn; the other parts draw nothing.

First question, fixed before any figure: the shift flattens the contrast and turns last, so the
corners the turn adds are black beside a background the flattening made grey, a step no training
crop shows (training turns each crop before its photometric changes, so the fill takes the
background's level). `background-fill` fills them with the image's border median instead. If that
raised AUROC by 0.010 or more on both shifts, the next recipe would turn some crops after their
photometric change. Measured (val, 523 images, served defaults: classifier 2.2.0, detector 1.2.0):
all-rotate-512@14 0.825 -> 0.819 (-0.006 [-0.026, 0.015]), all-rotate@14 0.819 -> 0.818 (-0.001
[-0.030, 0.030]): the corners cost nothing.
Second question: which part, with the others in place, costs most (each `without-` variant on
all-rotate-512@14). A diagnostic that says where the next recipe should look. Measured (same
images, paired against as-shifted 0.825): without-rotate 0.863 (+0.038 [0.010, 0.070]),
without-contrast 0.860 (+0.035 [0.007, 0.064]), without-markers 0.852 (+0.026 [-0.000, 0.054]),
without-jpeg 0.841 (+0.016 [0.001, 0.030]), without-lowres512 0.827 (+0.002 [-0.006, 0.008]).
Alone the flattened contrast cost 0.014 and the turn 0.017 (card, stability_val_2.1.0); beside
the others each costs twice that or more: the parts compound, and the 512 px resolution is not
among them.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from research import ensemble
from training import metrics, shifts
from training.augment import burn_marker
from training.common import MODELS_DIR, read_rows
from training.evaluate import served_plan
from training.shifts import shift_name

PARTS = ("lowres", "lowres512", "contrast", "markers", "rotate", "jpeg")
VARIANTS = ("as-shifted", "background-fill", *(f"without-{p}" for p in PARTS))
ROUND = "combined-shift-parts"


def background_fill() -> None:
    """Make the shift's turn fill its corners with the image's border median."""

    def onto_background(grey: np.ndarray, boxes: np.ndarray, degrees: float):
        border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
        return shifts.rotate_grown(grey, boxes, degrees, fill=int(np.median(border)))

    shifts.rotate_any = onto_background


def leave_out(part: str) -> None:
    """Leave one part out of every combined shift, its random numbers still drawn."""
    if part == "markers":
        shifts.paint_marker = lambda img, rng: burn_marker(img.copy(), rng)
    elif part == "rotate":
        shifts.rotate_any = lambda grey, boxes, degrees: (grey, boxes)
    else:  # parts that draw nothing
        shifts.COMBINED = {name: steps - {part} for name, steps in shifts.COMBINED.items()}


def summary() -> dict:
    weight = served_plan(MODELS_DIR).scoring.fusion.classifier_weight
    out: dict = {}
    for path in sorted((ensemble.OUT / ROUND / "as-shifted").glob("scores-*.csv")):
        shift = path.stem.removeprefix("scores-")
        base = read_rows(path)
        y = np.array([int(r["fractured"]) for r in base])
        a = ensemble.ensemble_scores(base, ("default",), weight)
        out[shift] = {"as-shifted": metrics.classification_metrics(y, a, 0.5)["auroc"]}
        for variant in VARIANTS[1:]:
            other = ensemble.OUT / ROUND / variant / path.name
            if not other.exists():
                continue
            rows = read_rows(other)
            assert [r["image_id"] for r in rows] == [r["image_id"] for r in base]
            d = metrics.paired_auroc_difference(
                y, a, ensemble.ensemble_scores(rows, ("default",), weight)
            )
            out[shift][variant] = {
                "auroc": d["auroc_b"],
                "delta": d["delta"],
                "ci95": d["delta_ci95"],
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("score")
    sc.add_argument("--variant", choices=VARIANTS, required=True)
    sc.add_argument("--shift", type=shift_name, required=True)
    sc.add_argument("--limit", type=int, default=None)
    sub.add_parser("summary")
    args = ap.parse_args()
    if args.command == "score":
        if args.variant == "background-fill":
            background_fill()
        elif args.variant.startswith("without-"):
            leave_out(args.variant.removeprefix("without-"))
        print(ensemble.score(args.shift, args.limit, {"ref"}, f"{ROUND}/{args.variant}"))
    else:
        print(json.dumps(summary(), indent=1))


if __name__ == "__main__":
    main()
