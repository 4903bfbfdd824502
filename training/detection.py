"""What both detector families share: crops as detector inputs, ONNX evaluation, FROC table, card.

Detectors see the same crop the service gives them (the anatomy crop); evaluation runs the
exported ONNX graph through the service's own post-processing, so the card's operating-point
table holds for what is served. The table is calibrated on val; test is only reported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from app.core.config import DEFAULT_FP_PER_IMAGE
from app.inference.operating_point import card_rows
from app.inference.preprocessing import stretch_grey
from training import metrics, plots
from training.data import CachedImage, crop_item

# score threshold used when collecting boxes for FROC / AP: low, to trace the whole curve
COLLECT_THRESHOLD = 0.001

Detect = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""A detector on one stretched grey crop in [0, 1] -> (boxes xyxy in crop pixels, scores)."""


def onnx_detector(onnx_path: Path, spec: dict[str, Any], output: dict[str, Any]) -> Detect:
    """The exported detector run by the service's own detect stage (app.inference.pipeline.detect_crops);
    `output` is the card's output block (postprocess kind, NMS IoU)."""
    from app.inference.pipeline import detect_crops
    from app.inference.runtime import OnnxModel

    model = OnnxModel.unshipped(onnx_path, spec, output)
    model.load(["CPUExecutionProvider"], intra_op_threads=0)

    def detect(crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return detect_crops(model, [crop], COLLECT_THRESHOLD)[0]

    return detect


def run_on_items(detect: Detect, items: list[CachedImage]) -> dict[str, Any]:
    """Detections and ground truth in label-free crop pixels, per item."""
    preds, gts, sizes, crops = [], [], [], []
    for it in items:
        crop_u8, boxes = crop_item(it, use_boxes=False)
        crop = stretch_grey(crop_u8)
        h, w = crop.shape
        preds.append(detect(crop))
        gts.append(boxes * np.array([w, h, w, h], dtype=np.float32))
        sizes.append((w, h))
        crops.append(crop_u8)
    return {
        "preds": preds,
        "gts": gts,
        "sizes": sizes,
        "crops": crops,
        "labels": [int(it.fractured) for it in items],
    }


def detection_metrics(run: dict[str, Any], report_dir: Path | None, prefix: str) -> dict[str, Any]:
    """AP50, AP50-95, FROC (recall at 0.1..0.5 FP/image, CPM), image AUROC from max box score."""
    f = metrics.froc(run["preds"], run["gts"])
    ap = metrics.coco_ap(run["preds"], run["gts"], run["sizes"])
    image_scores = [float(s.max()) if len(s) else 0.0 for _, s in run["preds"]]
    image = metrics.classification_metrics(run["labels"], image_scores, 0.5)
    out = {
        **ap,
        "n_images": f.n_images,
        "n_lesions": f.n_lesions,
        "froc_table": f.table(),
        "froc_cpm": f.cpm(),
        "recall_at_0.4_fp": f.recall_at(DEFAULT_FP_PER_IMAGE),
        "image_auroc_max_box_score": image["auroc"],
    }
    if report_dir is not None:
        report_dir.mkdir(parents=True, exist_ok=True)
        plots.froc_plot(f.fp_per_image, f.recall, report_dir, prefix)
        shown = [i for i, g in enumerate(run["gts"]) if len(g)][:8] + [
            i for i, g in enumerate(run["gts"]) if not len(g)
        ][:4]
        samples = []
        for i in shown:
            boxes, scores = run["preds"][i]
            top = scores >= max(0.1, float(scores.max()) if len(scores) else 1.0) - 1e-9
            samples.append((run["crops"][i], run["gts"][i], boxes[top][:3], scores[top][:3]))
        plots.detection_grid(samples, report_dir / f"{prefix}_detections.png")
    return out


def froc_operating_points(val_metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The card's table: FP/image -> threshold, recall, precision, calibrated on val."""
    return card_rows(val_metrics["froc_table"])


def finish_detector(
    onnx_path: Path,
    spec: dict[str, Any],
    output: dict[str, Any],
    items: dict[str, list[CachedImage]],
    run_dir: Path,
    recipe: dict[str, Any],
    log: Any,
    **card_fields: Any,
) -> dict[str, Any]:
    """Evaluate an exported detector on val (and test) through the service's detect stage,
    calibrate its operating points on val, and write its card (the family's own fields, e.g.
    architecture, licence, metrics such as parity, are merged in)."""
    from training import common, export

    detect = onnx_detector(onnx_path, spec, output)
    val = detection_metrics(run_on_items(detect, items["val"]), run_dir, "val")
    measured = {"val": val}
    if items["test"]:  # only when the run reports test (common.start_run)
        measured["test"] = detection_metrics(run_on_items(detect, items["test"]), run_dir, "test")
    extra_metrics = card_fields.pop("metrics", {})
    return export.ship_card(
        onnx_path,
        recipe,
        log,
        task="detection",
        spec=spec,
        output=output,
        data=common.FRACATLAS_ATTRIBUTION + "; detector sees anatomy crops",
        metrics={**measured, **extra_metrics},
        operating_points=froc_operating_points(val),
        operating_points_rule="FROC on val: lowest threshold with mean FP/image <= target, "
        "IoU >= 0.5",
        **card_fields,
    )
