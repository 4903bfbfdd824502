"""A trained classifier exported: ONNX with parity checks (int8 when the recipe says), the decision
threshold on val, metrics with bootstrap intervals, the card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training import common, export, metrics
from training.classifier.fit import onnx_scores, served_scores
from training.classifier.inputs import CropData, to_input
from training.classifier.models import fold_head

CI95_METHOD = "percentile bootstrap over images, 1000 resamples"


def split_metrics(
    scores: dict[str, np.ndarray], labels: dict[str, np.ndarray], regions: dict[str, list[str]]
) -> tuple[float, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A classifier card's numbers: the Youden threshold on val, then per split (`scores` keys)
    the metrics at it, their bootstrap CIs and the AUROC per body region."""
    threshold = metrics.youden_threshold(labels["val"], scores["val"])
    measured, ci95, by_region = {}, {}, {}
    for split, p in scores.items():
        measured[split] = metrics.classification_metrics(labels[split], p, threshold)
        ci95[split] = metrics.bootstrap_classification(labels[split], p, threshold)
        by_region[split] = metrics.auroc_by_group(labels[split], p, regions[split])
    return threshold, measured, ci95, by_region


def export_with_card(
    model: Any,
    data: CropData,
    recipe: dict[str, Any],
    log: common.RunLog,
    out_dir: Path,
    card_fields: dict[str, Any],
    extra_metrics: dict[str, Any],
) -> dict[str, Any]:
    """Fold the head, export ONNX (int8 if the recipe says so) with parity checks, pick the
    decision threshold on val (Youden, on the exported graph's scores when quantised), measure
    val (and test, when the run reports it) with bootstrap intervals and per region, write the
    card."""
    spec = data.spec
    with_test = len(data.y_test) > 0
    val_scores = served_scores(model, data.x_val, spec)
    test_scores = served_scores(model, data.x_test, spec) if with_test else None
    fold_head(model)
    onnx_path = out_dir / f"{recipe['name']}.onnx"
    export.export_onnx(
        model, to_input(data.x_val[:2], spec), onnx_path, ("image",), ("probability",)
    )
    parity_batch = to_input(data.x_val[:8], spec).numpy()
    parity = {"fp32": export.check_parity(model, onnx_path, parity_batch, tolerance=1e-4)}
    if recipe.get("quantize"):
        # int8 weights (dynamic quantisation): a ViT-S file shrinks about 4x; the metrics below
        # are measured on the quantised graph itself.
        parity["int8"] = export.quantize_int8(model, onnx_path, parity_batch, tolerance=0.1)
        test_scores = onnx_scores(onnx_path, data.x_test, spec) if with_test else None
        val_scores = onnx_scores(onnx_path, data.x_val, spec)
    scores = {"val": val_scores} | ({"test": test_scores} if with_test else {})
    labels = {"val": data.y_val, "test": data.y_test}
    threshold, measured, ci95, by_region = split_metrics(scores, labels, data.regions)
    if with_test:
        from training import plots

        plots.roc_pr_plots(data.y_test, test_scores, log.run_dir, "test")
        plots.confusion_plot(measured["test"]["confusion_matrix"], log.run_dir, "test")
    return export.ship_card(
        onnx_path,
        recipe,
        log,
        task="classification",
        spec=spec,
        output={"probability": "N x 1 fracture probability (sigmoid in the graph)"},
        data=common.FRACATLAS_ATTRIBUTION
        + "; inputs are crops to the weak anatomy mask (train: widened to hold every box)",
        licence="Proprietary model weights; training data CC BY 4.0 (FracAtlas)",
        metrics={
            **measured,
            "ci95": {**ci95, "method": CI95_METHOD},
            "by_region": by_region,
            **extra_metrics,
            "onnx_parity_max_abs_diff": parity,
            "note": "test inputs are label-free weak-mask crops; the served pipeline uses the U-Net crop",
        },
        decision_threshold=threshold,
        threshold_rule="Youden's J (sensitivity + specificity - 1) maximised on the val split",
        **card_fields,
    )
