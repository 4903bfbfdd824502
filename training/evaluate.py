"""Evaluate the served pipeline (the service's own decode -> crop -> classify -> detect) on a
FracAtlas split or any folder in the release layout.

    python -m training evaluate --split test
    python -m training evaluate --folder /data/fracatlas-extra [--split test] [--limit 100]

Writes metrics.json, plots and one self-contained report.html (training/report.py) to the report folder.
Ground-truth boxes are compared in the pixel frame of each image as decoded (EXIF applied).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.core.config import DEFAULT_FP_PER_IMAGE, RADIOGRAPH_MODALITIES, Settings
from app.core.errors import ApiError
from app.inference.decoding import DecodedImage, decode
from app.inference.model_card import fused_score
from app.inference.operating_point import from_fp_rate
from app.inference.pipeline import ImageWork, run_study
from app.inference.plan import Plan, resolve_plan
from app.inference.runtime import ModelLoadError, ModelRegistry, choose_providers
from training import metrics, plots, report
from training.common import MODELS_DIR, REPO
from training.data import Record, data_root, load_records, read_grey
from training.detection import COLLECT_THRESHOLD
from training.progress import progress
from training.shifts import SHIFTS, shift_image, shift_name, shift_names


@dataclass
class Collected:
    """What the served pipeline said about labelled images, with their ground truth."""

    probs: list[float] = field(default_factory=list)
    preds: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    gts: list[np.ndarray] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    inside: list[bool] = field(default_factory=list)
    ood: list[float] = field(default_factory=list)  # where the classifier carries a reference
    raw: list[float] = field(default_factory=list)  # the classifier's own, before any fusion
    shown: list[Any] = field(default_factory=list)
    seconds: float = 0.0


def served_plan(
    models_dir: Path, classifier: str | None = None, detector: str | None = None
) -> Plan:
    """What the service configured by the environment would run on `models_dir` (its defaults
    or the named models, its optional stages and orienter), with every box above
    COLLECT_THRESHOLD kept; only the plan's models are loaded."""
    registry = ModelRegistry(models_dir)
    try:
        plan = resolve_plan(
            registry, Settings(), classifier, detector, score_threshold=COLLECT_THRESHOLD
        )
    except ApiError as exc:
        raise ModelLoadError(f"{exc.detail} (in {models_dir})") from None
    for model in plan.models:
        model.load(choose_providers("cpu"), 0)
    return plan


def decode_record(rec: Record, shift: str) -> tuple[DecodedImage, np.ndarray]:
    """A record as the service decodes it, under a source shift when one is named, with its
    normalised fracture boxes moved along."""
    data, ctype = Path(rec.path).read_bytes(), None
    boxes = np.asarray(rec.boxes, dtype=np.float32).reshape(-1, 4)
    if shift != "none":
        data, ctype, boxes = shift_image(read_grey(rec.path), boxes, shift, rec.image_id)
    return decode(data, ctype, Path(rec.path).name, 10**9, list(RADIOGRAPH_MODALITIES)), boxes


def best_box_scores(preds: list[tuple[np.ndarray, np.ndarray]]) -> list[float]:
    """The highest box score of each image (0 without a box): Xie et al.'s image score."""
    return [float(s.max()) if len(s) else 0.0 for _, s in preds]


def collect(records: list[Record], plan: Plan, shift: str = "none", batch: int = 8) -> Collected:
    """Run the served pipeline on records as `plan` says (served_plan: as the service is
    configured, e.g. FRACTURE_UPRIGHT=false measures it without the upright turn,
    FRACTURE_PAINT_OUT_MARKERS=true with burned-in annotations painted out)."""
    out = Collected()
    t0 = time.perf_counter()
    for start in progress(range(0, len(records), batch), f"evaluate ({shift})"):
        chunk = records[start : start + batch]
        works, chunk_boxes = [], []
        for rec in chunk:
            image, boxes = decode_record(rec, shift)
            works.append(ImageWork(image=image, decode_ms=0.0))
            chunk_boxes.append(boxes)
        run_study(works, plan)
        for rec, w, boxes in zip(chunk, works, chunk_boxes, strict=True):
            h, wd = w.image.height, w.image.width
            gt = boxes * np.array([wd, h, wd, h], np.float32)
            x1, y1, x2, y2 = w.crop_box
            out.inside += [
                bool(b[0] >= x1 - 1 and b[1] >= y1 - 1 and b[2] <= x2 + 1 and b[3] <= y2 + 1)
                for b in gt
            ]
            out.probs.append(w.probability)
            out.raw.append(w.classifier_probability)
            if w.ood_score is not None:
                out.ood.append(w.ood_score)
            out.preds.append((w.boxes, w.scores))
            out.gts.append(gt)
            out.sizes.append((wd, h))
            out.labels.append(int(rec.fractured))
            if len(out.shown) < 12 and (len(gt) or len(out.shown) >= 8):
                frame = (w.image.width, w.image.height)
                out.shown.append(
                    (w.image.pixels, gt, w.boxes[:3], w.scores[:3], frame, rec.image_id)
                )
    out.seconds = time.perf_counter() - t0
    return out


SCORES_FILE = "scores.csv"


def write_scores(
    path: Path, records: list[Record], probs: list[float], max_box: list[float]
) -> None:
    """Per-image scores of a report: what `python -m training compare` pairs two reports by."""
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["image_id", "region", "fractured", "probability", "max_box_score"])
        for rec, p, m in zip(records, probs, max_box, strict=True):
            out.writerow([rec.image_id, rec.region, int(rec.fractured), f"{p:.6f}", f"{m:.6f}"])


def read_scores(report_dir: Path) -> dict[str, dict[str, Any]]:
    with open(report_dir / SCORES_FILE, newline="") as fh:
        return {row["image_id"]: row for row in csv.DictReader(fh)}


def compare(report_a: Path, report_b: Path, score: str = "probability") -> dict[str, Any]:
    """Paired comparison of two reports on the same images: AUROC of each and a bootstrap 95%
    interval of the difference b - a, overall and per region."""
    a, b = read_scores(report_a), read_scores(report_b)
    if set(a) != set(b):
        raise SystemExit(f"{report_a} and {report_b} hold different images; nothing to pair")
    ids = sorted(a)
    labels = [int(a[i]["fractured"]) for i in ids]
    out: dict[str, Any] = {
        "a": str(report_a),
        "b": str(report_b),
        "score": score,
        "all": metrics.paired_auroc_difference(
            labels, [float(a[i][score]) for i in ids], [float(b[i][score]) for i in ids]
        ),
    }
    for region in sorted({a[i]["region"] for i in ids}):
        sub = [i for i in ids if a[i]["region"] == region]
        ys = [int(a[i]["fractured"]) for i in sub]
        if 0 < sum(ys) < len(ys) and sum(ys) >= 5:
            out[region] = metrics.paired_auroc_difference(
                ys, [float(a[i][score]) for i in sub], [float(b[i][score]) for i in sub]
            )
    return out


def evaluate(
    records: list[Record],
    models_dir: Path = MODELS_DIR,
    classifier: str | None = None,
    detector: str | None = None,
    report_dir: Path | None = None,
    batch: int = 8,
    shift: str = "none",
) -> dict[str, Any]:
    """The served pipeline on `records` (optionally under a source shift, training/shifts.py):
    classifier, detector and fused image score with bootstrap 95% intervals and per-region AUROC.
    """
    plan = served_plan(models_dir, classifier, detector)
    crp, clf, det = plan.cropper, plan.classifier, plan.detector
    threshold = plan.scoring.decision_threshold
    c = collect(records, plan, shift, batch)
    probs, preds, gts, sizes, labels = c.probs, c.preds, c.gts, c.sizes, c.labels
    inside, shown, seconds = c.inside, c.shown, c.seconds

    froc = metrics.froc(preds, gts)
    served_point = from_fp_rate(det.card, DEFAULT_FP_PER_IMAGE)
    max_box = best_box_scores(preds)
    # Xie et al.'s image score is the max box score; the mean of it and the classifier's
    # probability is reported beside both.
    # Fusions are made from the classifier's own probability, never from the served score (which
    # is already fused when the card fuses)
    raw = c.raw
    combined = [(p + m) / 2 for p, m in zip(raw, max_box, strict=True)]
    result = {
        "n_images": len(records),
        "models": {m.role: f"{m.name} {m.version}" for m in (crp, clf, det)},
        "classifier": metrics.classification_metrics(labels, probs, threshold),
        "detector": {
            **metrics.coco_ap(preds, gts, sizes),
            "n_lesions": froc.n_lesions,
            "froc_table": froc.table(),
            "froc_cpm": froc.cpm(),
            "recall_at_0.4_fp": froc.recall_at(DEFAULT_FP_PER_IMAGE),
            "at_served_fp_0.4_threshold": froc.at_threshold(served_point.detector_threshold),
            "at_served_fp_0.4_threshold_ci95": metrics.bootstrap_detection_at(
                preds, gts, served_point.detector_threshold
            ),
            "image_auroc_max_box_score": metrics.classification_metrics(labels, max_box, 0.5)[
                "auroc"
            ],
        },
        "combined_image_auroc": metrics.classification_metrics(labels, combined, 0.5)["auroc"],
        "fused_image_auroc": {
            f"{w} * classifier + {1 - w} * max box": metrics.classification_metrics(
                labels, fused_score(np.asarray(raw), np.asarray(max_box), w).tolist(), 0.5
            )["auroc"]
            for w in (0.0, 0.25, 0.5, 0.75, 1.0)
        },
        "classifier_ci95": metrics.bootstrap_classification(labels, probs, threshold),
        "classifier_by_region": metrics.auroc_by_group(labels, probs, [r.region for r in records]),
        "shift": shift,
        "fracture_boxes_inside_crop": float(np.mean(inside)) if inside else None,
        "seconds_per_image_cpu": round(seconds / max(len(records), 1), 4),
    }
    if c.ood:  # how many images the service would flag, and how unlike they are
        ood = np.asarray(c.ood)
        result["familiarity"] = {
            "flagged": round(float(np.mean([plan.scoring.unfamiliar(s) for s in ood])), 4),
            "median_ood_score": round(float(np.median(ood)), 4),
            "threshold": plan.scoring.ood_threshold,
        }
    if plan.scoring.verdict is not None:  # the three-level verdict's shares and rates, with CIs
        result["verdict"] = metrics.verdict_figures(
            np.asarray(labels), np.asarray(probs), plan.scoring.verdict
        )
    result["model_cards"] = {
        m.role: {"name": m.name, "version": m.version, "sha256": m.card.sha256}
        for m in (crp, clf, det)
    }
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        # the file names stay `classifier_*`; the titles say what is plotted: the served score
        plots.roc_pr_plots(labels, probs, report_dir, "classifier", "served fracture_probability")
        plots.confusion_plot(result["classifier"]["confusion_matrix"], report_dir, "classifier")
        plots.froc_plot(froc.fp_per_image, froc.recall, report_dir, "detector", froc.table())
        plots.detection_grid(shown, report_dir / "detections.png")
        report.calibration_plot(labels, probs, report_dir, "classifier")
        worst_cases(records, c, shift, report_dir)
        (report_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        write_scores(report_dir / SCORES_FILE, records, probs, max_box)
        report.write_html(report_dir, result, f"Evaluation: {report_dir.name}")
    return result


def worst_cases(records: list[Record], c: Collected, shift: str, report_dir: Path) -> None:
    """Galleries of the 8 fractured images with the lowest probability and the 8 unfractured
    ones with the highest, each with its truth (red) and detections (cyan)."""
    probs, labels = np.asarray(c.probs), np.asarray(c.labels)
    groups = {
        "worst_false_negatives": [int(i) for i in np.argsort(probs) if labels[i] == 1][:8],
        "worst_false_positives": [int(i) for i in np.argsort(-probs) if labels[i] == 0][:8],
    }
    for name, picked in groups.items():
        samples = []
        for i in picked:
            image, _ = decode_record(records[i], shift)
            boxes, scores = c.preds[i]
            top = scores >= max(0.05, float(scores.max()) if len(scores) else 1.0) - 1e-9
            frame = (image.width, image.height)
            samples.append(
                (
                    image.pixels,
                    c.gts[i],
                    boxes[top][:3],
                    scores[top][:3],
                    frame,
                    records[i].image_id,
                )
            )
        if samples:
            plots.detection_grid(samples, report_dir / f"{name}.png")


def operating_point_stability(
    records: list[Record],
    models_dir: Path,
    classifier: str | None = None,
    detector: str | None = None,
    shifts: Sequence[str] = SHIFTS,
) -> dict[str, Any]:
    """How the card's thresholds behave when the images come from elsewhere: for each shift,
    the FP/image and lesion recall each fp_per_image row's threshold gives, and the classifier's
    AUROC, sensitivity and specificity at its decision threshold, each with a bootstrap 95%
    interval over images."""
    plan = served_plan(models_dir, classifier, detector)
    clf, det = plan.classifier, plan.detector
    rows = det.card.operating_points or []
    out: dict[str, Any] = {"detector": det.name, "classifier": clf.name, "shifts": {}}
    threshold = plan.scoring.decision_threshold
    kept = ("auroc", "sensitivity", "specificity")
    for shift in shifts:
        c = collect(records, plan, shift)
        froc = metrics.froc(c.preds, c.gts)
        cls = metrics.classification_metrics(c.labels, c.probs, threshold)
        ci = metrics.bootstrap_classification(c.labels, c.probs, threshold)
        out["shifts"][shift] = {
            "classifier": {**{k: cls[k] for k in kept}, "ci95": {k: ci[k] for k in kept}},
            "detector": {
                str(row.fp_per_image): {
                    **froc.at_threshold(row.threshold),
                    **metrics.bootstrap_detection_at(c.preds, c.gts, row.threshold),
                }
                for row in rows
            },
        }
    return out


def compare_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training compare",
        description="paired bootstrap of two evaluation reports of the same images",
    )
    parser.add_argument("report_a", type=Path)
    parser.add_argument("report_b", type=Path)
    parser.add_argument("--score", choices=["probability", "max_box_score"], default="probability")
    args = parser.parse_args(argv)
    print(json.dumps(compare(args.report_a, args.report_b, args.score), indent=2))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m training evaluate")
    parser.add_argument(
        "--split",
        choices=["train", "val", "test"],
        help="a fixed split (default: val; test is looked at once per shipped version)",
    )
    parser.add_argument("--folder", type=Path, help="a folder in the FracAtlas release layout")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--classifier")
    parser.add_argument("--detector")
    parser.add_argument("--limit", type=int, help="first N images only")
    parser.add_argument(
        "--shift",
        type=shift_name,
        default="none",
        help=f"degrade every image as another source might (training/shifts.py): one of "
        f"{', '.join(SHIFTS)}; NAME@N draws its random angles, markers... again (N >= 1)",
    )
    parser.add_argument(
        "--report", type=Path, help="report folder (default reports/<split or folder>)"
    )
    parser.add_argument(
        "--stability",
        action="store_true",
        help="instead: the card's thresholds under every shift (FP/image, recall, AUROC)",
    )
    parser.add_argument(
        "--shifts",
        type=shift_names,
        default=SHIFTS,
        help="with --stability: which shifts, comma-separated (default: all of them)",
    )
    args = parser.parse_args(argv)
    records = load_records(args.folder or data_root())
    split = args.split or (None if args.folder else "val")
    if split:
        records = [r for r in records if r.split == split]
    if args.limit:
        records = records[: args.limit]
    if args.stability:
        result = operating_point_stability(
            records, args.models_dir, args.classifier, args.detector, args.shifts
        )
        print(json.dumps(result, indent=2))
        return 0
    name = (split or Path(args.folder).name) + ("" if args.shift == "none" else f"-{args.shift}")
    report_dir = args.report or REPO / "reports" / name
    result = evaluate(
        records, args.models_dir, args.classifier, args.detector, report_dir, shift=args.shift
    )
    print(json.dumps(result, indent=2))
    return 0
