"""How high can the served score rank upper-limb radiographs, before and under a source shift?

    python -m training evaluate --split val --report runs/eval-val-none
    python -m training evaluate --split val --shift all-rotate-512@15 --report runs/eval-val-ar512-15
    python -m research.upper_limb_ceiling runs/eval-val-none runs/eval-val-ar512-15

The other source of the generalisation issue is upper limb only (elbow, wrist, forearm, fingers,
humerus, shoulder); FracAtlas's nearest regions are its hand and shoulder images. Each report's
per-image scores (scores.csv: the served, fused probability) give the AUROC over every image and
over hand and shoulder only, each with a 95% percentile-bootstrap interval (images resampled). A
measurement, no choice: it says where the in-distribution ceiling of the regions that matter lies.

Measured (val, default models: classifier 2.2.0 fused with detector 1.2.0, cropper 2.0.0 with the
upright turn; draw @15, which no choice has seen):

    report              all images (523, 94 fractured)   hand and shoulder (213, 60 fractured)
    none                0.913 [0.877, 0.944]            0.870 [0.809, 0.919]
    all-rotate-512@15   0.838 [0.788, 0.884]            0.758 [0.680, 0.827]

Under all-rotate-512@15 the detector card's 0.4 row gives 0.29 FP/image [0.24, 0.34], lesion
recall 0.214 [0.139, 0.294]. So FracAtlas's own upper limbs, unshifted, already rank below the
0.90 asked of the other source (the interval reaches 0.92 at best), and the nearest proxy of that
source takes 0.11 more from them. ~8 min each evaluation on the 2-core CPU beside the test suite.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from training.data import HAND_SHOULDER
from training.metrics import bootstrap_classification


def auroc_with_interval(labels: list[int], scores: list[float]) -> tuple[float, list[float]]:
    """AUROC and its 95% bootstrap interval (1000 resamples, seed 0, as the reports use)."""
    from sklearn.metrics import roc_auc_score

    interval = bootstrap_classification(labels, scores, threshold=0.5)["auroc"]
    return float(roc_auc_score(labels, scores)), interval


def summarise(report: Path) -> dict[str, tuple[int, int, float, list[float]]]:
    """{'all' | 'hand and shoulder': (images, fractured, AUROC, interval)} of one report."""
    with (report / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    out = {}
    for name, keep in (
        ("all", rows),
        ("hand and shoulder", [r for r in rows if r["region"] in HAND_SHOULDER]),
    ):
        labels = [int(r["fractured"]) for r in keep]
        scores = [float(r["probability"]) for r in keep]
        out[name] = (len(keep), sum(labels), *auroc_with_interval(labels, scores))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="evaluation report folders")
    args = parser.parse_args()
    for report in args.reports:
        for name, (n, pos, auroc, (lo, hi)) in summarise(report).items():
            print(
                f"{report.name:28s} {name:18s} n={n:4d} fractured={pos:3d} AUROC {auroc:.3f} [{lo:.3f}, {hi:.3f}]"
            )


if __name__ == "__main__":
    main()
