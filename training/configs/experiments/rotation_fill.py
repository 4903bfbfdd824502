"""Do the black corners of a turned radiograph cost the classifier under the combined shifts?

    python training/configs/experiments/rotation_fill.py score --fill black --shift all-rotate-512@14
    python training/configs/experiments/rotation_fill.py score --fill background --shift all-rotate-512@14
    python training/configs/experiments/rotation_fill.py summary

`all-rotate` and `all-rotate-512` (training/shifts.py) flatten the contrast first and turn the
image last, so the corners the turn adds are black beside a background the flattening made grey:
a straight step no training crop shows, because training turns each crop before its photometric
changes (the fill then takes the background's level). Another source's turned exports look like
the shift. `score` runs the served pipeline (ensemble.py's scorer, the served classifier fused with
the best box) on val with the corners filled black (the shift as it is) or with the image's own
background level (the median of its border before the turn); `summary` pairs the two on the same
images. A diagnostic, fixed before any figure: if the background fill raises AUROC by 0.010 or
more on both shifts, the next recipe turns some crops after their photometric change.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))  # ensemble.py beside it

import ensemble  # noqa: E402

from app.inference.pipeline import image_score_fusion  # noqa: E402
from training import metrics, shifts  # noqa: E402
from training.common import MODELS_DIR, read_rows  # noqa: E402
from training.evaluate import served_models  # noqa: E402
from training.shifts import shift_name  # noqa: E402

FILLS = ("black", "background")
ROUND = "rotation-fill"


def background_fill() -> None:
    """Make the shift's turn fill its corners with the image's border median."""

    def onto_background(grey: np.ndarray, boxes: np.ndarray, degrees: float):
        border = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
        return shifts._rotate_any(grey, boxes, degrees, fill=int(np.median(border)))

    shifts.rotate_any = onto_background


def summary() -> dict:
    _, clf, det = served_models(MODELS_DIR, None, None)
    weight = image_score_fusion(clf, det).classifier_weight
    out = {}
    for path in sorted((ensemble.OUT / ROUND / "black").glob("scores-*.csv")):
        other = ensemble.OUT / ROUND / "background" / path.name
        if not other.exists():
            continue
        a, b = read_rows(path), read_rows(other)
        assert [r["image_id"] for r in a] == [r["image_id"] for r in b]
        y = np.array([int(r["fractured"]) for r in a])
        sa = ensemble.ensemble_scores(a, ("default",), weight)
        sb = ensemble.ensemble_scores(b, ("default",), weight)
        d = metrics.paired_auroc_difference(y, sa, sb)
        out[path.stem.removeprefix("scores-")] = {
            "black": d["auroc_a"],
            "background": d["auroc_b"],
            "delta": d["delta"],
            "ci95": d["delta_ci95"],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("score")
    sc.add_argument("--fill", choices=FILLS, required=True)
    sc.add_argument("--shift", type=shift_name, required=True)
    sc.add_argument("--limit", type=int, default=None)
    sub.add_parser("summary")
    args = ap.parse_args()
    if args.command == "score":
        if args.fill == "background":
            background_fill()
        path = ensemble.score(args.shift, args.limit, {"ref"}, f"{ROUND}/{args.fill}")
        print(path)
    else:
        print(json.dumps(summary(), indent=1))


if __name__ == "__main__":
    main()
