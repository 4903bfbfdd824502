"""A mean-logit ensemble of trained classifiers, shipped as one ONNX graph.

Each member is a recipe of its own (`members`: config paths); a member whose export is not in
runs/<name>/export yet is trained there first (resumable, as any run), so one command retrains
the whole ensemble. The graphs are merged by training.export.average_logit_graph: the service
runs the result as any classifier (one session, the card's test-time views), and its probability
is the sigmoid of the members' mean logit (`int8: true`: each member quantised first, for speed
on the CPU). The card is measured like every classifier's (val weak-mask crops, Youden
threshold; test with `report_test`) and names each member by sha256.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from app.inference.model_card import read_card
from training import classifier, common, export
from training.common import REPO, load_recipe

INT8 = {
    "weights": "int8, per output channel (QDQ)",
    "activations": "uint8, ranges (min-max) from 128 seeded train crops",
    "float": "everything after each backbone's feature map: pooling, heads, logit, sigmoid",
    "function": "training.export.quantize_static_int8",
}


def member_export(config: str | Path, run_keys: dict[str, Any]) -> Path:
    """The ONNX file of one member recipe, trained first when its export is missing."""
    from training.families import FAMILIES

    recipe = load_recipe(REPO / config, run_keys)
    out = common.RUNS_DIR / recipe["name"] / "export"
    onnx_path = out / f"{recipe['name']}.onnx"
    if not onnx_path.exists():
        importlib.import_module(FAMILIES[recipe["family"]][0]).train(recipe, out)
    return onnx_path


def train(recipe: dict[str, Any], out_dir: Path = common.MODELS_DIR) -> dict[str, Any]:
    run_keys = {k: recipe[k] for k in ("cache", "limit") if k in recipe}
    paths = [member_export(config, run_keys) for config in recipe["members"]]
    cards = [read_card(p.with_suffix(".json")) for p in paths]
    spec = cards[0].input
    for path, card in zip(paths, cards, strict=True):
        if card.input != spec:
            raise SystemExit(f"{path.name}: another input spec than {paths[0].name}")
    run = common.start_run(recipe)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged = paths
    if recipe.get("int8"):  # each member quantised, then merged (what its rule measured)
        calibration = classifier.int8_calibration_inputs(run.items["train"], spec)
        (run.run_dir / "int8").mkdir(exist_ok=True)
        merged = [
            export.quantize_static_int8(p, run.run_dir / "int8" / p.name, calibration)
            for p in paths
        ]
    onnx_path = export.average_logit_graph(merged, out_dir / f"{recipe['model_name']}.onnx")

    import torch

    scores, labels, regions = {}, {}, {}
    for split in ("val", "test"):
        items = run.items[split]
        if not items:
            continue
        crops = classifier.crops_as_array(items, spec.size[0], use_boxes=False)
        scores[split] = classifier.onnx_scores(onnx_path, torch.from_numpy(crops), spec)
        labels[split] = np.array([int(it.fractured) for it in items])
        regions[split] = [it.region for it in items]
    threshold, measured, ci95, by_region = classifier.split_metrics(scores, labels, regions)
    members = [
        {
            "name": card.name,
            "version": card.version,
            "file": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path),
            "sha256": card.sha256,
            "config": config,
            "val_auroc": card.metrics.get("val", {}).get("auroc"),
        }
        for config, path, card in zip(recipe["members"], paths, cards, strict=True)
    ]
    return export.ship_card(
        onnx_path,
        recipe | {"member_recipes": [c.recipe for c in cards]},
        run.log,
        name=recipe["model_name"],
        task="classification",
        spec=spec,
        output={"probability": "N x 1 fracture probability: sigmoid of the members' mean logit"},
        data=cards[0].data,
        licence=cards[0].licence,
        metrics={
            **measured,
            "ci95": {**ci95, "method": classifier.CI95_METHOD},
            "by_region": by_region,
            "note": "inputs are label-free weak-mask crops; the served pipeline uses the U-Net crop",
        },
        train_time_s=float(sum(getattr(c, "train_time_s", None) or 0.0 for c in cards)),
        decision_threshold=threshold,
        threshold_rule="Youden's J (sensitivity + specificity - 1) maximised on the val split",
        architecture=f"mean logit of {len(cards)} networks in one graph: "
        + "; ".join(
            f"{c.name} ({getattr(c, 'architecture', None) or 'see its card'})" for c in cards
        ),
        pretraining=getattr(cards[0], "pretraining", None),
        members=members,
        quantization=INT8 if recipe.get("int8") else None,
    )
