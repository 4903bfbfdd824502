"""Calibrate the served models on labelled images: a classifier probability that reads as a
frequency (Platt scaling), its decision threshold, and the detector's fp_per_image table.

    python -m training calibrate --split val --write-card          # the shipped cards, on val
    python -m training calibrate --split val --write-card --fuse --fuse-shift all
                                                     # + choose a fused image score
    python -m training calibrate --folder /site/labelled --site st-olav --out site.json

A site runs the second form on its own labelled radiographs (the FracAtlas release layout: images/,
Annotations/YOLO/, dataset.csv) when the shipped operating points do not hold there, and points
the service at the file with FRACTURE_SITE_CALIBRATION. Everything goes through the service's own
decode -> crop -> classify -> detect, so the numbers hold for what is served.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.inference.model_card import (
    Calibration,
    CardError,
    Fusion,
    SiteCalibration,
    SiteClassifier,
    SiteDetector,
    fused_score,
)
from app.inference.plan import Plan
from training import export, metrics
from training.common import MODELS_DIR
from training.data import data_root, load_records
from training.detection import froc_operating_points
from training.evaluate import best_box_scores, collect, served_plan
from training.shifts import shift_names


def fit_platt(labels: list[int], probs: list[float], fitted_on: str) -> Calibration:
    """Logistic regression of the label on logit(p): slope and intercept (no regularisation
    to speak of, so a well-calibrated model keeps slope ~1, intercept ~0)."""
    from sklearn.linear_model import LogisticRegression

    p = np.clip(np.asarray(probs, dtype=float), 1e-7, 1 - 1e-7)
    z = np.log(p / (1 - p)).reshape(-1, 1)
    fit = LogisticRegression(C=1e6).fit(z, np.asarray(labels))
    return Calibration(
        slope=float(fit.coef_[0, 0]), intercept=float(fit.intercept_[0]), fitted_on=fitted_on
    )


# Classifier weights a fused image score may take (1.0: the classifier alone).
FUSION_WEIGHTS = (0.25, 0.5, 0.75, 1.0)


@dataclass
class ScoreFit:
    """What labelled images decide about the served score: the classifier's Platt calibration and
    Youden threshold, and at a fusion weight below 1 the fused score's own (a Fusion)."""

    calibration: Calibration
    decision_threshold: float
    calibrated: np.ndarray  # the classifier's calibrated probability on the fitted images
    served: np.ndarray  # what the service answers on them: `calibrated`, or the fused score's
    fusion: Fusion | None = None


def fit_scores(
    labels: list[int],
    raw: np.ndarray,
    max_box: np.ndarray,
    fitted_on: str,
    weight: float | None = None,
    detector: tuple[str, str] | None = None,
    chosen_on: str = "",
) -> ScoreFit:
    """Calibration and threshold of the classifier's raw probability on these images; with a
    `weight` below 1 and the `detector` (name, sha256) whose best boxes `max_box` are, the fused
    score's calibration and threshold too. calibrate and adapt both fit through this."""
    platt = fit_platt(labels, list(raw), fitted_on)
    calibrated = np.array([platt.apply(p) for p in raw])
    threshold = metrics.youden_threshold(labels, list(calibrated))
    fit = ScoreFit(platt, threshold, calibrated, served=calibrated)
    if weight is not None and weight < 1.0 and detector is not None:
        fused_raw = fused_score(np.asarray(raw), np.asarray(max_box), weight)
        fused_platt = fit_platt(labels, list(fused_raw), fitted_on)
        fit.served = np.array([fused_platt.apply(v) for v in fused_raw])
        fit.fusion = Fusion(
            detector=detector[0],
            detector_sha256=detector[1],
            classifier_weight=weight,
            calibration=fused_platt,
            decision_threshold=metrics.youden_threshold(labels, list(fit.served)),
            chosen_on=chosen_on,
        )
    return fit


def calibrate(
    records: list,
    models_dir: Path,
    classifier: str | None,
    detector: str | None,
    source: str,
    fuse: bool = False,
    fuse_shifts: tuple[str, ...] = (),
) -> tuple[SiteCalibration, dict[str, Any]]:
    """Fit on `records`; (the site calibration, a summary with its effect). The classifier card's
    fusion with this detector, if any, is refitted at its weight; `fuse` chooses the weight here
    (FUSION_WEIGHTS, the highest AUROC on these images; none when the classifier alone wins); a
    card with neither a fusion nor `fuse` is fitted at its recipe's `fusion_weight`, if it has one.
    With `fuse_shifts` (training/shifts.py) the weight is the one with the highest mean AUROC
    over these images and the same images under each shift: a best box that degrades on other
    sources' images must not pull the score down there."""
    plan = served_plan(models_dir, classifier, detector)
    clf, det = plan.classifier, plan.detector
    shipped = plan.scoring.fusion
    # a classifier without a fit for this detector file (not shipped with one yet, or the
    # detector re-exported) may name the weight it is served at (an ensemble keeps the weight
    # its ship rule was measured at)
    unfitted = shipped is None and det.card.task == "detection"
    asked = clf.card.recipe.get("fusion_weight") if unfitted else None
    # fit on the raw probability; the boxes down to the floor of every fused score
    clf.card = clf.card.model_copy(update={"calibration": None, "fusion": None})
    plan = Plan.of(plan.cropper, clf, det, plan.point, plan.orienter, plan.options)
    run = collect(records, plan)
    fitted_on = f"{source}: {len(records)} images through the served pipeline"
    probs = np.asarray(run.probs, dtype=float)
    max_box = np.array(best_box_scores(run.preds))
    fusion_summary, aurocs = None, {}
    weight, chosen_on = None, ""
    if fuse or shipped or asked is not None:
        if shipped:
            weight, chosen_on = shipped.classifier_weight, shipped.chosen_on
        elif asked is not None:
            weight = float(asked)
            chosen_on = f"the recipe's fusion_weight ({clf.card.recipe['config']})"
        else:
            weight, chosen_on = 1.0, ""
        if fuse:
            runs = [(probs, max_box)]
            for shift in fuse_shifts:
                shifted = collect(records, plan, shift)
                runs.append((np.asarray(shifted.probs), np.array(best_box_scores(shifted.preds))))

            def mean_auroc(w: float) -> float:
                scores = [fused_score(p, m, w) for p, m in runs]
                aucs = [metrics.classification_metrics(run.labels, s, 0.5)["auroc"] for s in scores]
                return float(np.mean(aucs))

            aurocs = {w: mean_auroc(w) for w in FUSION_WEIGHTS}
            weight = max(aurocs, key=lambda w: (aurocs[w], w))
            under = "".join(f" and under --shift {shift}" for shift in fuse_shifts)
            under += " (mean)" if fuse_shifts else ""
            chosen_on = f"highest AUROC of {list(FUSION_WEIGHTS)} on {fitted_on}{under}"
    fit = fit_scores(
        run.labels, probs, max_box, fitted_on, weight, (det.name, det.card.sha256), chosen_on
    )
    platt, threshold, calibrated, fusion = (
        fit.calibration,
        fit.decision_threshold,
        fit.calibrated,
        fit.fusion,
    )
    if fusion is not None:
        fusion_summary = {
            "versus_classifier_alone": metrics.paired_auroc_difference(
                run.labels, calibrated, fit.served
            ),
            "brier_calibrated": float(np.mean((fit.served - run.labels) ** 2)),
            "mean_auroc_by_weight": {str(w): a for w, a in aurocs.items()},
            "at_threshold": metrics.classification_metrics(
                run.labels, fit.served, fusion.decision_threshold
            ),
        }
    froc = metrics.froc(run.preds, run.gts)
    table = froc_operating_points({"froc_table": froc.table()})
    site = SiteCalibration(
        site=source,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        images=len(records),
        fractured=int(sum(run.labels)),
        classifier=SiteClassifier(
            name=clf.name,
            sha256=clf.card.sha256,
            calibration=platt,
            decision_threshold=threshold,
            fusion=fusion,
        ),
        detector=SiteDetector(name=det.name, sha256=det.card.sha256, operating_points=table),
    )
    summary = {
        "brier_raw": float(np.mean((np.asarray(run.probs) - run.labels) ** 2)),
        "brier_calibrated": float(np.mean((np.asarray(calibrated) - run.labels) ** 2)),
        "mean_probability_raw": float(np.mean(run.probs)),
        "mean_probability_calibrated": float(np.mean(calibrated)),
        "prevalence": float(np.mean(run.labels)),
        "classifier_at_threshold": metrics.classification_metrics(
            run.labels, calibrated, threshold
        ),
        "fusion": fusion_summary,
    }
    return site, summary


def write_into_cards(
    site: SiteCalibration,
    models_dir: Path,
    summary: dict[str, Any],
    roles: tuple[str, ...] = ("classifier", "detector"),
) -> None:
    """Store the fit in the shipped classifier card (calibration, threshold) and/or the
    detector's table; the ONNX files and their sha256 are untouched."""
    for entry in (getattr(site, role) for role in roles):
        path = models_dir / f"{entry.name}.json"
        card = json.loads(path.read_text())
        try:
            update = site.update_for(card["name"], card["sha256"])
        except CardError:
            raise ValueError(f"{path.name}: the card's model changed while calibrating") from None
        assert update is not None  # the entry names this card
        fusion = update.pop("fusion", None)
        if fusion is not None:
            card["fusion"] = fusion
        elif card.get("fusion", {}).get("detector_sha256") == site.detector.sha256:
            card.pop("fusion")  # refitted for this detector: the classifier alone serves
        if "calibration" in update:
            update["threshold_rule"] = (
                "Youden's J on the calibrated probability, served pipeline, " + site.site
            )
            card.setdefault("metrics", {})["calibration"] = summary
        card.update(update)
        export.save_card(path, card)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m training calibrate", description=__doc__)
    parser.add_argument("--split", choices=["train", "val", "test"], help="default: val")
    parser.add_argument("--folder", type=Path, help="labelled images in the release layout")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--classifier")
    parser.add_argument("--detector")
    parser.add_argument("--site", help="name written into the calibration (default: the folder)")
    parser.add_argument("--out", type=Path, help="site calibration file to write")
    parser.add_argument(
        "--write-card", action="store_true", help="store the fit in the shipped cards instead"
    )
    parser.add_argument(
        "--fuse",
        action="store_true",
        help="choose a fused image score (classifier with the detector's best box) here",
    )
    parser.add_argument(
        "--fuse-shift",
        type=shift_names,
        default=(),
        help="with --fuse: choose the weight on these images and the same under these shifts "
        "(comma-separated)",
    )
    parser.add_argument(
        "--roles",
        default="classifier,detector",
        help="with --write-card: which cards to update (comma-separated)",
    )
    args = parser.parse_args(argv)
    records = load_records(args.folder or data_root())
    split = args.split or (None if args.folder else "val")
    if split == "test":
        parser.error("calibrating on the test split would make its figures meaningless")
    if split:
        records = [r for r in records if r.split == split]
    source = args.site or (Path(args.folder).name if args.folder else f"FracAtlas {split}")
    site, summary = calibrate(
        records, args.models_dir, args.classifier, args.detector, source, args.fuse, args.fuse_shift
    )
    if args.write_card:
        write_into_cards(site, args.models_dir, summary, tuple(args.roles.split(",")))
    if args.out:
        args.out.write_text(site.model_dump_json(indent=2) + "\n")
    print(json.dumps({"calibration": site.model_dump(mode="json"), "summary": summary}, indent=2))
    return 0
