"""The classifier families' one call: fit -> calibrate (fusion on val) -> export with its card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training import common
from training.classifier.card import export_with_card
from training.classifier.fit import calibrate, fit
from training.classifier.inputs import crop_data, train_subset
from training.classifier.models import build_localising_model, build_probability_model
from training.data import CachedImage


def finetune(
    backbone: Any,
    feature_dim: int,
    recipe: dict[str, Any],
    items: dict[str, list[CachedImage]],
    log: common.RunLog,
    out_dir: Path,
    architecture: str,
    pretraining: dict[str, Any],
    feature_map: str = "resnet",
    on_start: Any = None,
) -> dict[str, Any]:
    """fit (linear probe, full fine-tune) -> calibrate (fusion on val) -> export with its card."""
    import torch

    cfg = recipe["finetune"]
    fraction = float(cfg.get("train_fraction", 1.0))
    if fraction < 1.0:  # a learning-curve point: fewer labelled train images, val untouched
        items = {**items, "train": train_subset(items["train"], fraction, recipe.get("seed", 0))}
        log.write(event="train_fraction", fraction=fraction, train_images=len(items["train"]))
    data = crop_data(items, cfg)
    if cfg.get("localisation"):
        model = build_localising_model(backbone, feature_dim, feature_map)
    else:
        model = build_probability_model(backbone, feature_dim)
    best = fit(model, data, cfg, log, on_start, device=common.training_device(recipe))
    ablation = calibrate(model, data, cfg)
    if ablation is not None:  # the Faster R-CNN family can start from this backbone
        torch.save(model.backbone.state_dict(), log.run_dir / "classifier_backbone.pt")
    return export_with_card(
        model,
        data,
        recipe,
        log,
        out_dir,
        {"architecture": architecture, "pretraining": pretraining},
        {"best_epoch": best["epoch"], "ablation_auroc": ablation},
    )
