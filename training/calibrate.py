"""Calibrate the served models on labelled images: a classifier probability that reads as a
frequency (Platt scaling), its decision threshold, and the detector's fp_per_image table.

    python -m training calibrate --split val --write-card          # the shipped cards, on val
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
from pathlib import Path
from typing import Any

import numpy as np

from app.inference.model_card import (
    Calibration,
    CardError,
    SiteCalibration,
    SiteClassifier,
    SiteDetector,
    validate_card,
)
from training import metrics
from training.common import MODELS_DIR
from training.data import data_root, load_records
from training.detection import froc_operating_points
from training.evaluate import collect, served_models


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


def calibrate(
    records: list, models_dir: Path, classifier: str | None, detector: str | None, source: str
) -> tuple[SiteCalibration, dict[str, Any]]:
    """Fit on `records`; (the site calibration, a summary with its effect)."""
    crp, clf, det = served_models(models_dir, classifier, detector)
    clf.card = clf.card.model_copy(update={"calibration": None})  # fit on the raw probability
    run = collect(records, (crp, clf, det))
    fitted_on = f"{source}: {len(records)} images through the served pipeline"
    platt = fit_platt(run.labels, run.probs, fitted_on)
    calibrated = [platt.apply(p) for p in run.probs]
    threshold = metrics.youden_threshold(run.labels, calibrated)
    froc = metrics.froc(run.preds, run.gts)
    table = froc_operating_points({"froc_table": froc.table()})
    site = SiteCalibration(
        site=source,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        images=len(records),
        fractured=int(sum(run.labels)),
        classifier=SiteClassifier(
            name=clf.name, sha256=clf.card.sha256, calibration=platt, decision_threshold=threshold
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
        if "calibration" in update:
            update["threshold_rule"] = (
                "Youden's J on the calibrated probability, served pipeline, " + site.site
            )
            card.setdefault("metrics", {})["calibration"] = summary
        card.update(update)
        validate_card(card, path.name)
        path.write_text(json.dumps(card, indent=2) + "\n")


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
    site, summary = calibrate(records, args.models_dir, args.classifier, args.detector, source)
    if args.write_card:
        write_into_cards(site, args.models_dir, summary, tuple(args.roles.split(",")))
    if args.out:
        args.out.write_text(site.model_dump_json(indent=2) + "\n")
    print(json.dumps({"calibration": site.model_dump(mode="json"), "summary": summary}, indent=2))
    return 0
