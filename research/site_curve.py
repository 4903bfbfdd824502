"""The site learning curve: what 50, 100, 200 or 400 of a site's labelled images are worth to
`python -m training adapt`, measured on the same site's images that adapted nothing.

    python -m research.site_curve --shift all-rotate-512 --out runs/site-curve

The proxy site is FracAtlas val under a source shift, as research.site_proxy writes it. A fixed,
stratified quarter of it is the site's test set; adapt's steps are fitted on nested, stratified
draws of the rest (REPEATS draws for each size below the whole pool) exactly as the command fits
them (adapt.fit_head with the FracAtlas mix, adapt.recalibrate, the FROC table on the draw), and
measured on the test set against the base models recalibrated on the same draw: served AUROC
(paired bootstrap), and lesion recall and FP/image at the fp=0.4 threshold of each table. Every
image is scored once through the served pipeline; the curve is then cheap to draw. A
measurement, no choice: nothing here picks a setting.
"""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from app.inference.model_card import Fusion
from app.inference.operating_point import from_fp_rate
from research.site_proxy import write_site
from training import metrics
from training.adapt import (
    FRACATLAS_MIX,
    Scored,
    fit_head,
    recalibrate,
    score,
    served_probability,
    tune_threshold,
)
from training.data import load_records
from training.evaluate import served_plan
from training.site import load_site

SIZES = (50, 100, 200, 400)
REPEATS = 3
TEST_SHARE = 0.25
FP_RATE = 0.4


def stratified(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices keeping the share of positives, as an ordered permutation's prefix."""
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    k = round(count * len(pos) / len(labels))
    return np.sort(np.concatenate([rng.permutation(pos)[:k], rng.permutation(neg)[: count - k]]))


def point(
    tune: Scored,
    test: Scored,
    mix: Scored,
    fusion: Fusion | None,
    base_threshold: float,
    logit_scale: float | None = None,
) -> dict[str, Any]:
    """Adapt's steps fitted on `tune`, measured on `test` against the base recalibrated alike."""
    head, fit = fit_head(tune, mix, logit_scale)
    source = f"curve draw of {len(tune.labels)}"
    base = recalibrate(np.asarray(tune.raw), tune, fusion, source)
    adapted_raw = head.apply(np.asarray(test.raw), np.stack(test.features))
    tuned_raw = head.apply(np.asarray(tune.raw), np.stack(tune.features))
    adapted = recalibrate(tuned_raw, tune, fusion, source)
    served_base = served_probability(
        np.asarray(test.raw), np.asarray(test.max_box), base["fusion"], base["calibration"]
    )
    served_adapted = served_probability(
        adapted_raw, np.asarray(test.max_box), adapted["fusion"], adapted["calibration"]
    )
    site_threshold = tune_threshold(tune, FP_RATE)
    return {
        "tune_images": len(tune.labels),
        "tune_fractured": int(sum(tune.labels)),
        "C": fit["C"],
        "auroc": metrics.paired_auroc_difference(test.labels, served_base, served_adapted),
        "lesions_at_shipped_threshold": metrics.bootstrap_detection_at(
            test.preds, test.gts, base_threshold
        ),
        "lesions_at_site_threshold": metrics.bootstrap_detection_at(
            test.preds, test.gts, site_threshold
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shift", default="all-rotate-512")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models-dir", type=Path, default=Path("models"))
    ap.add_argument(
        "--logit-scale", type=float, help="fit_head's logit_scale (default: adapt's LOGIT_SCALE)"
    )
    args = ap.parse_args()
    site_dir = args.out / f"site-{args.shift}"
    if not (site_dir / "manifest.csv").is_file():
        write_site(args.shift, site_dir)
    site = load_site(site_dir)
    plan = served_plan(args.models_dir)
    scored = args.out / "scored.pkl"  # the served pipeline's answers, reused by a rerun
    if scored.is_file():
        everything, mix = pickle.loads(scored.read_bytes())
    else:
        everything = score(plan, site.records, f"site ({len(site.records)})")
        train = [r for r in load_records() if r.split == "train"]
        rng = np.random.default_rng(0)
        mix = score(
            plan,
            [train[i] for i in sorted(rng.permutation(len(train))[:FRACATLAS_MIX])],
            "FracAtlas train mix",
        )
        scored.write_bytes(pickle.dumps((everything, mix)))
    labels = np.asarray(everything.labels)
    test_idx = stratified(labels, round(TEST_SHARE * len(labels)), np.random.default_rng(1))
    pool_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    test = everything.take(test_idx)
    shipped = plan.detector.card
    base_threshold = from_fp_rate(shipped, FP_RATE).detector_threshold
    points = []
    # the last point is the whole pool when it holds fewer than the largest size
    for size in sorted({min(size, len(pool_idx)) for size in SIZES}):
        for repeat in range(REPEATS if size < len(pool_idx) else 1):
            draw = stratified(labels[pool_idx], size, np.random.default_rng(100 + repeat))
            tune = everything.take(pool_idx[draw])
            points.append(
                {
                    "size": size,
                    "repeat": repeat,
                    **point(tune, test, mix, plan.scoring.fusion, base_threshold, args.logit_scale),
                }
            )
            a = points[-1]["auroc"]
            print(
                f"{size:>4} #{repeat}: AUROC base {a['auroc_a']:.3f} adapted {a['auroc_b']:.3f} "
                f"({a['delta']:+.3f} [{a['delta_ci95'][0]:+.3f}, {a['delta_ci95'][1]:+.3f}])",
                flush=True,
            )
    summary = {
        "shift": args.shift,
        "site_images": len(labels),
        "test_images": len(test_idx),
        "test_fractured": int(labels[test_idx].sum()),
        "test_lesions": int(sum(len(g) for g in test.gts)),
        "pool_images": len(pool_idx),
        "base_threshold_fp_0.4": base_threshold,
        "models": {m.role: f"{m.name} {m.version}" for m in (plan.classifier, plan.detector)},
        "logit_scale": args.logit_scale,
        "points": points,
    }
    name = f"site-curve-x{args.logit_scale:g}.json" if args.logit_scale else "site-curve.json"
    (args.out / name).write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
