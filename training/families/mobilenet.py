"""Classifier from real ImageNet weights: MobileNetV2 converted from ../shared/pretrained.

The converted network (training/pretrained.py) gets its BatchNorms calibrated on our training
crops (same function, radiograph statistics), then the shared box-supervised fine-tune
(training/classifier.py: image head + per-cell head on the stride-32 map, MIL term, fusion chosen
on val), class-balanced epochs and the robust augmentation when the recipe asks for them.
The `bam` family is this recipe with attention modules inserted (training/families/bam.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training import classifier, common, pretrained

FEATURE_DIM = 1280


def calibrate_on_crops(model: Any, x_train_u8: Any, spec: dict[str, Any], n: int = 256) -> None:
    """BatchNorm statistics from `n` training crops (see pretrained.calibrate_batchnorm)."""
    import torch

    idx = torch.randperm(len(x_train_u8))[:n]
    batches = [classifier.to_input(b, spec) for b in x_train_u8[idx].split(32)]
    pretrained.calibrate_batchnorm(model.backbone, batches)


def build_backbone(recipe: dict[str, Any]) -> tuple[Any, pretrained.PretrainedFile]:
    source = pretrained.FILES[recipe.get("pretrained", pretrained.MOBILENET_V2.file)]
    return pretrained.mobilenet_v2(source), source


def train_with(
    run: common.Run,
    backbone: Any,
    source: pretrained.PretrainedFile,
    architecture: str,
    out_dir: Path,
) -> dict[str, Any]:
    recipe, log, items = run.recipe, run.log, run.items
    return classifier.finetune(
        backbone,
        FEATURE_DIM,
        recipe,
        items,
        log,
        out_dir,
        architecture=architecture,
        pretraining={
            "method": "supervised ImageNet-1k weights, converted from 8-bit TFLite and dequantised",
            "weights": source.card(),
            "batchnorm": "identity plus folded bias, then calibrated on 256 training crops",
        },
        feature_map="mobilenet",
        on_start=calibrate_on_crops,
    )


# where --device may put the training loop (training/__main__.py; the fit in training.classifier)
DEVICES = ("cpu", "cuda")


def train(recipe: dict[str, Any], out_dir: Path = common.MODELS_DIR) -> dict[str, Any]:
    run = common.start_run(recipe)  # seeded before any weight is initialised
    backbone, source = build_backbone(recipe)
    return train_with(
        run,
        backbone,
        source,
        "MobileNetV2 1.0 (torchvision layout, TF SAME padding), ImageNet init, box-supervised",
        out_dir,
    )
