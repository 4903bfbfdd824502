"""Does another ImageNet backbone rank val better than the served classifier's MobileNetV2s?

    python -m research.backbone_pair runs/classifier-efficientnet-lite0

Scores the val weak-mask crops (the crops every classifier card measures val on) with the rot4
views each network is served with, and pairs on the same images (95% paired bootstrap), over all
images and over hand and shoulder:
- the candidate against the served classifier's first network (2.0.0: the same recipe and seed
  on MobileNetV2: the backbone alone differs);
- the candidate against the served classifier (two MobileNetV2s, mean logit);
- the mean logit of the candidate and the first network against the served classifier (a member
  of another architecture, whose errors may differ more than a second MobileNetV2's did).
A measurement, no choice: the served comparison (docs/results/efficientnet-lite0.md) decides.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from research.learning_curve import SHIPPED, first_network, val_crops
from training.classifier import onnx_scores
from training.metrics import paired_auroc_difference


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(p / (1 - p))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder with export/*.onnx")
    args = parser.parse_args()
    x, spec, y, upper = val_crops()
    with tempfile.TemporaryDirectory() as tmp:
        first = onnx_scores(first_network(SHIPPED, Path(tmp) / "first.onnx"), x, spec)
    served = onnx_scores(SHIPPED, x, spec)
    candidate = onnx_scores(next((args.run / "export").glob("*.onnx")), x, spec)
    pair = 1 / (1 + np.exp(-(logit(candidate) + logit(first)) / 2))
    rows = (
        ("candidate vs first network", first, candidate),
        ("candidate vs served", served, candidate),
        ("candidate + first vs served", served, pair),
    )
    for label, a, b in rows:
        for name, keep in (("all", np.ones_like(upper)), ("hand and shoulder", upper)):
            d = paired_auroc_difference(y[keep], a[keep], b[keep])
            lo, hi = d["delta_ci95"]
            print(
                f"{label:30s} {name:18s} n={d['n']:4d} {d['auroc_a']:.3f} -> {d['auroc_b']:.3f} "
                f"({d['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}])"
            )


if __name__ == "__main__":
    main()
