"""Fracture classifiers shared by the SimCLR and DINO families: data, fine-tuning, export, card.

Stages (Thorat et al.): a linear head on the frozen self-supervised backbone, then the whole
network fine-tuned. Class imbalance: BCE with pos_weight = negatives / positives. The decision
threshold is chosen on val (Youden's J) and written into the card; test is only reported.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from app.preprocessing import model_input, stretch_grey
from training import common, export, metrics
from training.data import CachedImage, crop_item


def input_spec(size: int) -> dict[str, Any]:
    return {
        "size": [size, size],
        "resize": "letterbox",
        "pad_value": 0.0,
        "channels": 3,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }


def crops_as_array(items: list[CachedImage], size: int, use_boxes: bool) -> np.ndarray:
    """Letterboxed, stretched grey crops as uint8 (n, size, size): small enough to keep in RAM."""
    spec = {"size": [size, size], "resize": "letterbox", "pad_value": 0.0, "channels": 1}
    out = np.empty((len(items), size, size), dtype=np.uint8)
    for i, it in enumerate(items):
        crop, _ = crop_item(it, use_boxes=use_boxes)
        x, _ = model_input(stretch_grey(crop), spec)
        out[i] = np.round(x[0] * 255).astype(np.uint8)
    return out


def to_input(batch_u8: Any, spec: dict[str, Any]) -> Any:
    """uint8 (n, h, w) torch tensor -> normalised (n, 3, h, w) float, as the service feeds it."""
    x = batch_u8.float().div(255.0).unsqueeze(1).expand(-1, spec["channels"], -1, -1)
    mean = x.new_tensor(spec["mean"]).view(1, -1, 1, 1)
    std = x.new_tensor(spec["std"]).view(1, -1, 1, 1)
    return (x - mean) / std


def finetune_augment(x_u8: Any) -> Any:
    """Light, X-ray-sensible augmentation on uint8 batches: flips, rotation, shift, contrast."""
    import torch
    from torchvision.transforms import v2

    aug = v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(0.2),
            v2.RandomAffine(degrees=15, translate=(0.08, 0.08), scale=(0.9, 1.15)),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
        ]
    )
    return torch.stack([aug(img.unsqueeze(0))[0] for img in x_u8])


def build_probability_model(backbone: Any, feature_dim: int) -> Any:
    """backbone -> linear head -> sigmoid, the exported graph (N x 3 x S x S -> N x 1)."""
    import torch
    from torch import nn

    class ProbabilityModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            # Non-affine BatchNorm first: the probe works whatever the feature scale.
            self.head = nn.Sequential(
                nn.BatchNorm1d(feature_dim, affine=False), nn.Linear(feature_dim, 1)
            )

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.logits(x))

    return ProbabilityModel()


def fold_head(model: Any) -> None:
    """Fold the head's BatchNorm (running statistics) into its Linear: same outputs in eval
    mode, and a graph every exporter handles."""
    import torch
    from torch import nn

    bn, linear = model.head[0], model.head[1]
    scale = torch.rsqrt(bn.running_var + bn.eps)
    folded = nn.Linear(linear.in_features, linear.out_features)
    with torch.no_grad():
        folded.weight.copy_(linear.weight * scale)
        folded.bias.copy_(linear.bias - (linear.weight * scale * bn.running_mean).sum(dim=1))
    model.head = folded
    model.eval()


def _scores(model: Any, x_u8: Any, spec: dict[str, Any], batch: int = 64) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        return torch.cat([model(to_input(b, spec)) for b in x_u8.split(batch)])[:, 0].numpy()


def finetune(
    backbone: Any,
    feature_dim: int,
    recipe: dict[str, Any],
    items: dict[str, list[CachedImage]],
    log: common.RunLog,
    out_dir: Path,
    architecture: str,
    pretraining: dict[str, Any],
) -> dict[str, Any]:
    """Linear probe, then full fine-tune, then threshold on val, export and card."""
    import torch
    import torch.nn.functional as F

    cfg = recipe["finetune"]
    spec = input_spec(cfg["input_size"])
    size = cfg["input_size"]
    x_train = torch.from_numpy(crops_as_array(items["train"], size, use_boxes=True))
    x_val = torch.from_numpy(crops_as_array(items["val"], size, use_boxes=False))
    y_train = torch.tensor([float(it.fractured) for it in items["train"]])
    y_val = np.array([int(it.fractured) for it in items["val"]])
    pos = float(y_train.sum())
    pos_weight = torch.tensor((len(y_train) - pos) / max(pos, 1.0))

    model = build_probability_model(backbone, feature_dim)
    ckpt_path = log.run_dir / "finetune_last.pt"
    stages = [
        ("linear", cfg["linear_epochs"], cfg["linear_lr"]),
        ("full", cfg["full_epochs"], cfg["full_lr"]),
    ]
    state = common.load_checkpoint(ckpt_path)
    done = state["done"] if state else []
    if state:
        model.load_state_dict(state["model"])
    best = {"auroc": -1.0, "state": None}
    for stage, epochs, lr in stages:
        if stage in done or epochs == 0:
            continue
        for p in model.backbone.parameters():
            p.requires_grad = stage == "full"
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg["weight_decay"])
        steps = epochs * -(-len(x_train) // cfg["batch_size"])
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=steps, pct_start=0.15
        )
        for epoch in range(epochs):
            # BatchNorm statistics stay frozen while only the head learns.
            model.train(stage == "full")
            model.head.train()
            t0, losses = time.time(), []
            for idx in torch.randperm(len(x_train)).split(cfg["batch_size"]):
                x = to_input(finetune_augment(x_train[idx]), spec)
                loss = F.binary_cross_entropy_with_logits(
                    model.logits(x)[:, 0], y_train[idx], pos_weight=pos_weight
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
            val_scores = _scores(model, x_val, spec)
            val = metrics.classification_metrics(y_val, val_scores, 0.5)
            log.write(
                event="epoch",
                stage=stage,
                epoch=epoch,
                loss=float(np.mean(losses)),
                val_auroc=val["auroc"],
                epoch_s=round(time.time() - t0, 1),
            )
            if stage == "full" and (val["auroc"] or 0) > best["auroc"]:
                best = {
                    "auroc": val["auroc"],
                    "epoch": epoch,
                    "state": {k: v.clone() for k, v in model.state_dict().items()},
                }
        done.append(stage)
        common.save_checkpoint(ckpt_path, model=model.state_dict(), done=done)
    if best["state"] is not None:  # keep the epoch with the best val AUROC
        model.load_state_dict(best["state"])

    val_scores = _scores(model, x_val, spec)
    threshold = metrics.youden_threshold(y_val, val_scores)
    x_test = torch.from_numpy(crops_as_array(items["test"], size, use_boxes=False))
    y_test = np.array([int(it.fractured) for it in items["test"]])
    test_scores = _scores(model, x_test, spec)

    fold_head(model)
    onnx_path = out_dir / f"{recipe['name']}.onnx"
    example = to_input(x_val[:2], spec)
    export.export_onnx(model, example, onnx_path, ("image",), ("probability",))
    parity_batch = to_input(x_val[:8], spec).numpy()
    parity = {"fp32": export.check_parity(model, onnx_path, parity_batch, tolerance=1e-4)}
    if recipe.get("quantize"):
        # int8 weights (dynamic quantisation): a ViT-S file shrinks about 4x; test metrics below
        # are measured on the quantised graph itself.
        parity["int8"] = export.quantize_int8(model, onnx_path, parity_batch, tolerance=0.1)
        test_scores = export.onnx_outputs(onnx_path, to_input(x_test, spec).numpy())[:, 0]
        val_scores = export.onnx_outputs(onnx_path, to_input(x_val, spec).numpy())[:, 0]
        threshold = metrics.youden_threshold(y_val, val_scores)
    from training import plots

    plots.roc_pr_plots(y_test, test_scores, log.run_dir, "test")
    test = metrics.classification_metrics(y_test, test_scores, threshold)
    plots.confusion_plot(test["confusion_matrix"], log.run_dir, "test")
    card = {
        "name": recipe["name"],
        "version": recipe["version"],
        "task": "classification",
        "architecture": architecture,
        "input": spec,
        "output": {"probability": "N x 1 fracture probability (sigmoid in the graph)"},
        "decision_threshold": threshold,
        "threshold_rule": "Youden's J (sensitivity + specificity - 1) maximised on the val split",
        "data": common.FRACATLAS_ATTRIBUTION
        + "; inputs are crops to the weak anatomy mask (train: widened to hold every box)",
        "recipe": {"config": f"training/configs/{recipe['family']}.yaml", **recipe},
        "pretraining": pretraining,
        "licence": "Proprietary model weights; training data CC BY 4.0 (FracAtlas)",
        "metrics": {
            "test": test,
            "val": metrics.classification_metrics(y_val, val_scores, threshold),
            "best_epoch": best.get("epoch"),
            "onnx_parity_max_abs_diff": parity,
            "note": "test inputs are label-free weak-mask crops; the served pipeline uses the U-Net crop",
        },
        "trained_on": common.hardware(),
        "train_time_s": log.training_seconds(),
    }
    export.write_card(onnx_path, card)
    log.write(event="done", metrics=card["metrics"])
    return card
