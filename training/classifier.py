"""Fracture classifiers shared by the SimCLR and DINO families: data, fine-tuning, export, card.

Stages (Thorat et al.): a linear head on the frozen self-supervised backbone, then the whole
network fine-tuned. Class imbalance: BCE with pos_weight = negatives / positives. The decision
threshold is chosen on val (Youden's J) and written into the card; test is only reported.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training import augment, common, export, metrics
from training.data import CachedImage, input_item
from training.progress import progress


def input_spec(
    size: int, mean: float = 0.5, std: float = 0.25, tta: str = "none"
) -> dict[str, Any]:
    """Letterboxed grey crop as 3 equal channels, (x - mean) / std (ImageNet MobileNets: 0.5 / 0.5,
    the TFLite files' (q - 128) / 128); `tta`: the served test-time views (card input.tta)."""
    return export.input_spec(size, mean=mean, std=std, tta=tta)


def views(x_u8: Any, spec: dict[str, Any]) -> list[Any]:
    """The card's test-time views of a uint8 (n, s, s) batch, as the service makes them."""
    import torch

    from app.inference.pipeline import tta_views

    return [torch.from_numpy(v) for v in tta_views(x_u8.numpy(), spec.get("tta", "none"))]


def crops_as_array(items: list[CachedImage], size: int, use_boxes: bool) -> np.ndarray:
    """Letterboxed, stretched grey crops as uint8 (n, size, size): small enough to keep in RAM."""
    return crops_and_box_masks(items, size, use_boxes)[0]


def crops_and_box_masks(
    items: list[CachedImage], size: int, use_boxes: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Letterboxed crops as uint8 (n, size, size) and, aligned with them, uint8 masks that are 1
    inside the fracture boxes (all zero for unfractured images)."""
    spec = {"size": [size, size], "resize": "letterbox", "pad_value": 0.0, "channels": 1}
    out = np.empty((len(items), size, size), dtype=np.uint8)
    masks = np.zeros((len(items), size, size), dtype=np.uint8)
    for i, it in enumerate(items):
        x, boxes = input_item(it, spec, use_boxes=use_boxes)
        out[i] = np.round(x[0] * 255).astype(np.uint8)
        for bx1, by1, bx2, by2 in boxes:
            x1, y1 = int(np.floor(bx1)), int(np.floor(by1))
            x2, y2 = int(np.ceil(bx2)), int(np.ceil(by2))
            masks[i, max(0, y1) : max(y1 + 1, y2), max(0, x1) : max(x1 + 1, x2)] = 1
    return out, masks


def int8_calibration_inputs(
    items: list[CachedImage], spec: dict[str, Any], count: int = 128, seed: int = 0
) -> np.ndarray:
    """Model inputs that set an int8 graph's activation ranges (export.quantize_static_int8):
    a seeded draw of `count` train crops, normalised as the service feeds them."""
    import torch

    picked = np.random.default_rng(seed).permutation(len(items))[:count]
    crops = crops_as_array([items[i] for i in sorted(picked)], spec["size"][0], use_boxes=False)
    return to_input(torch.from_numpy(crops), spec).numpy()


def to_input(batch_u8: Any, spec: dict[str, Any]) -> Any:
    """uint8 (n, h, w) torch tensor -> normalised (n, 3, h, w) float, as the service feeds it."""
    x = batch_u8.float().div(255.0).unsqueeze(1).expand(-1, spec["channels"], -1, -1)
    mean = x.new_tensor(spec["mean"]).view(1, -1, 1, 1)
    std = x.new_tensor(spec["std"]).view(1, -1, 1, 1)
    return (x - mean) / std


def image_head(feature_dim: int) -> Any:
    """Pooled features -> one logit. Non-affine BatchNorm first: the linear probe works whatever
    the feature scale (folded into the Linear at export, see fold_head)."""
    from torch import nn

    return nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False), nn.Linear(feature_dim, 1))


def build_probability_model(backbone: Any, feature_dim: int) -> Any:
    """backbone -> linear head -> sigmoid, the exported graph (N x 3 x S x S -> N x 1)."""
    import torch
    from torch import nn

    class ProbabilityModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = image_head(feature_dim)

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.logits(x))

    return ProbabilityModel()


def resnet_feature_map(net: Any, x: Any) -> Any:
    """Last feature map (stride 32) of a torchvision ResNet."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def mobilenet_feature_map(net: Any, x: Any) -> Any:
    """Last feature map (stride 32) of a torchvision MobileNet (its `features`)."""
    return net.features(x)


def timm_feature_map(net: Any, x: Any) -> Any:
    """Last feature map (stride 32) of a timm CNN (EfficientNet-Lite: after conv_head)."""
    return net.forward_features(x)


FEATURE_MAPS = {
    "resnet": resnet_feature_map,
    "mobilenet": mobilenet_feature_map,
    "timm": timm_feature_map,
}


def build_localising_model(backbone: Any, feature_dim: int, feature_map: str = "resnet") -> Any:
    """A CNN classifier that also learns where the fracture is (box supervision).

    Besides the image head on the pooled features, a 1x1 convolution turns the last feature map
    (stride 32) into per-cell fracture logits trained against the fracture boxes: dense targets
    give far more signal per radiograph than one image label, which matters with ~600 fractured
    training images. The image logit is fusion * image head + (1 - fusion) * max cell logit;
    fusion is chosen on val after training. Exported graph: N x 3 x S x S -> N x 1 probability.
    `feature_map` names how the backbone's last map is read (FEATURE_MAPS).
    """
    import torch
    from torch import nn

    read_map = FEATURE_MAPS[feature_map]

    class LocalisingModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = image_head(feature_dim)
            self.map_head = nn.Conv2d(feature_dim, 1, kernel_size=1)
            # Set after training (choose_fusion); the export bakes them into the graph.
            self.fusion = 0.5
            self.hflip_tta = False

        def feature_map(self, x: torch.Tensor) -> torch.Tensor:
            return read_map(self.backbone, x)

        def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(image logits N, cell logits N x h x w)."""
            fmap = self.feature_map(x)
            return self.head(fmap.mean(dim=(2, 3)))[:, 0], self.map_head(fmap)[:, 0]

        def fused(self, x: torch.Tensor) -> torch.Tensor:
            image, cells = self.outputs(x)
            return self.fusion * image + (1 - self.fusion) * cells.amax(dim=(1, 2))

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            out = self.fused(x)
            if self.hflip_tta:  # mean logit over the image and its mirror
                out = (out + self.fused(x.flip(-1))) / 2
            return out[:, None]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.logits(x))

    return LocalisingModel()


def localisation_loss(
    model: Any, x: Any, y: Any, masks: Any, pos_weight: Any, cell_pos_weight: float
) -> Any:
    """Image BCE + BCE of every cell against the boxes + BCE of the max cell (MIL) against the
    image label. Cells touched by a box are positive."""
    import torch.nn.functional as F

    image, cells = model.outputs(x)
    targets = F.adaptive_max_pool2d(masks.float().unsqueeze(1), cells.shape[-2:])[:, 0]
    cell_weight = cells.new_tensor(cell_pos_weight)
    return (
        F.binary_cross_entropy_with_logits(image, y, pos_weight=pos_weight)
        + F.binary_cross_entropy_with_logits(cells, targets, pos_weight=cell_weight)
        + F.binary_cross_entropy_with_logits(cells.amax(dim=(1, 2)), y, pos_weight=pos_weight)
    )


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
    """Probabilities as served: the sigmoid of the mean logit over the card's views."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = [
            torch.cat([model.logits(to_input(b, spec)) for b in v.split(batch)])[:, 0]
            for v in views(x_u8, spec)
        ]
        return torch.sigmoid(torch.stack(logits).mean(dim=0)).numpy()


def onnx_scores(onnx_path: Path, x_u8: Any, spec: dict[str, Any]) -> np.ndarray:
    """_scores of the exported graph itself (e.g. quantised)."""
    from app.inference.pipeline import mean_logit

    p = [export.onnx_outputs(onnx_path, to_input(v, spec).numpy())[:, 0] for v in views(x_u8, spec)]
    return mean_logit(np.stack(p))


FUSION_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def _head_outputs(model: Any, x_u8: Any, spec: dict[str, Any], flip: bool) -> np.ndarray:
    """Image-head and max-cell logits of a localising model, (n, 2)."""
    import torch

    model.eval()
    per_view = []
    with torch.no_grad():
        for v in views(x_u8, spec):  # mean over the card's views: linear, so fusion commutes
            rows = []
            for b in v.split(64):
                x = to_input(b, spec)
                image, cells = model.outputs(x.flip(-1) if flip else x)
                rows.append(torch.stack([image, cells.amax(dim=(1, 2))], dim=1))
            per_view.append(torch.cat(rows))
    return torch.stack(per_view).mean(dim=0).numpy()


def choose_fusion(
    model: Any,
    x_val: Any,
    y_val: np.ndarray,
    x_test: Any,
    y_test: np.ndarray,
    spec: dict[str, Any],
    cfg: dict[str, Any],
) -> dict[str, Any]:
    """Pick the image-head / max-cell fusion weight by val AUROC and set the model's test-time
    flip from the recipe; return val and test AUROC of every variant (test is only reported, and
    only when the run reports test)."""
    table: dict[str, Any] = {"val": {}}
    splits = [("val", x_val, y_val)] + ([("test", x_test, y_test)] if len(y_test) else [])
    for split, x, y in splits:
        table[split] = {}
        plain = _head_outputs(model, x, spec, flip=False)
        mirrored = _head_outputs(model, x, spec, flip=True)
        for tta, out in ((False, plain), (True, (plain + mirrored) / 2)):
            for fusion in FUSION_GRID:
                score = fusion * out[:, 0] + (1 - fusion) * out[:, 1]
                key = f"fusion={fusion}" + (" +hflip" if tta else "")
                table[split][key] = metrics.classification_metrics(y, score, 0.0)["auroc"]
    tta = bool(cfg.get("hflip_tta", False))
    suffix = " +hflip" if tta else ""
    chosen = max(FUSION_GRID, key=lambda f: table["val"][f"fusion={f}{suffix}"])
    model.fusion, model.hflip_tta = chosen, tta
    table["chosen"] = {"fusion": chosen, "hflip_tta": tta, "rule": "fusion: max val AUROC"}
    return table


def epoch_indices(
    y: Any, negatives_per_positive: float | None, groups: np.ndarray | None = None
) -> Any:
    """Shuffled training indices of one epoch: every image, or (class-balanced) every fractured
    image plus a fresh random draw of `negatives_per_positive` unfractured ones per fractured.
    With `groups` (a body region per image) the draw is made within each group, so every group
    has the same share of fractures and which group an image is from says nothing about its
    label."""
    import torch

    if not negatives_per_positive:
        return torch.randperm(len(y))
    labels = y > 0.5
    if groups is None:
        masks = [torch.ones_like(labels)]
    else:
        masks = [torch.from_numpy(groups == g) for g in np.unique(groups)]
    parts = []
    for inside in masks:
        pos = torch.nonzero(labels & inside)[:, 0]
        neg = torch.nonzero(~labels & inside)[:, 0]
        k = min(len(neg), round(len(pos) * negatives_per_positive))
        parts += [pos, neg[torch.randperm(len(neg))[:k]]]
    picked = torch.cat(parts)
    return picked[torch.randperm(len(picked))]


def train_subset(items: list[CachedImage], fraction: float, seed: int) -> list[CachedImage]:
    """A seeded `fraction` of the train images, drawn within fractured and unfractured apart so
    the share of fractures stays; order kept."""
    rng = np.random.default_rng(seed)
    keep: set[int] = set()
    for label in (True, False):
        idx = [i for i, it in enumerate(items) if bool(it.fractured) == label]
        k = max(1, round(len(idx) * fraction))
        keep.update(int(i) for i in rng.choice(idx, size=k, replace=False))
    return [it for i, it in enumerate(items) if i in keep]


@dataclass
class CropData:
    """Letterboxed uint8 crops of every split as torch tensors, with labels (and, for train, the
    box masks), and the input spec they are normalised with."""

    spec: dict[str, Any]
    x_train: Any
    m_train: Any
    y_train: Any
    x_val: Any
    y_val: np.ndarray
    x_test: Any
    y_test: np.ndarray
    regions: dict[str, list[str]]


def crop_data(items: dict[str, list[CachedImage]], cfg: dict[str, Any]) -> CropData:
    import torch

    size = cfg["input_size"]
    train_crops, train_masks = crops_and_box_masks(items["train"], size, use_boxes=True)

    def labels(split: str) -> np.ndarray:
        return np.array([int(it.fractured) for it in items[split]])

    return CropData(
        spec=input_spec(size, cfg.get("mean", 0.5), cfg.get("std", 0.25), cfg.get("tta", "none")),
        x_train=torch.from_numpy(train_crops),
        m_train=torch.from_numpy(train_masks),
        y_train=torch.tensor(labels("train"), dtype=torch.float32),
        x_val=torch.from_numpy(crops_as_array(items["val"], size, use_boxes=False)),
        y_val=labels("val"),
        x_test=torch.from_numpy(crops_as_array(items["test"], size, use_boxes=False)),
        y_test=labels("test"),
        regions={s: [it.region for it in items[s]] for s in ("train", "val", "test")},
    )


def fit(
    model: Any,
    data: CropData,
    cfg: dict[str, Any],
    log: common.RunLog,
    on_start: Any = None,
) -> dict[str, Any]:
    """Linear probe, then the full fine-tune; the weights of the best val-AUROC epoch are loaded
    at the end. Checkpointed after every epoch (runs/<name>/finetune_last.pt): a killed run
    resumes at the next epoch. `on_start(model, x_train_u8, spec)` runs once before the first
    epoch of a fresh run. Returns {"auroc", "epoch"} of the kept epoch."""
    import torch
    import torch.nn.functional as F

    spec, x_train, m_train, y_train = data.spec, data.x_train, data.m_train, data.y_train
    localising = bool(cfg.get("localisation"))
    balance = cfg.get("negatives_per_positive")
    # balance_by_region: the class balance drawn within each body region (epoch_indices)
    groups = np.array(data.regions["train"]) if cfg.get("balance_by_region") else None
    pos = float(y_train.sum())
    negatives = (len(y_train) - pos) if not balance else pos * balance
    pos_weight = torch.tensor(negatives / max(pos, 1.0))
    augment_args = {
        "strength": cfg.get("augment", "light"),
        "rotate_degrees": cfg.get("rotate_degrees", 15.0),
        "rot90_p": cfg.get("rot90_p", 0.0),
        "skip": frozenset(cfg.get("augment_skip") or ()),
        "compound_p": float(cfg.get("compound_p", 0.0)),
        "processing_p": float(cfg.get("processing_p", 0.0)),
        "aspect_p": float(cfg.get("aspect_p", 0.0)),
        "min_squeeze": float(cfg.get("min_squeeze", 0.6)),
    }
    channels_last = bool(cfg.get("channels_last", False))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    ckpt_path = log.run_dir / "finetune_last.pt"
    stages = [
        ("linear", cfg["linear_epochs"], cfg["linear_lr"]),
        ("full", cfg["full_epochs"], cfg["full_lr"]),
    ]
    state = common.load_checkpoint(ckpt_path)
    if state:
        model.load_state_dict(state["model"])
    elif on_start is not None:
        on_start(model, x_train, spec)
    model = model.to(memory_format=memory_format)
    done = state["done"] if state else []
    best = state.get("best", {"auroc": -1.0, "state": None}) if state else {"auroc": -1.0}
    best.setdefault("state", None)

    def batch_loss(idx: Any) -> Any:
        if localising:
            x_u8, masks = augment.augment_batch(x_train[idx], m_train[idx], **augment_args)
            return localisation_loss(
                model,
                to_input(x_u8, spec).contiguous(memory_format=memory_format),
                y_train[idx],
                masks,
                pos_weight,
                cfg.get("cell_pos_weight", 10.0),
            )
        x = to_input(augment.augment_batch(x_train[idx], **augment_args), spec)
        return F.binary_cross_entropy_with_logits(
            model.logits(x.contiguous(memory_format=memory_format))[:, 0],
            y_train[idx],
            pos_weight=pos_weight,
        )

    for stage, epochs, lr in stages:
        if stage in done or epochs == 0:
            continue
        for p in model.backbone.parameters():
            p.requires_grad = stage == "full"
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg["weight_decay"])
        per_epoch = len(epoch_indices(y_train, balance, groups))
        steps = epochs * -(-per_epoch // cfg["batch_size"])
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=lr, total_steps=steps, pct_start=0.15
        )
        start = 0
        if state and state.get("stage") == stage:
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            start = state["epoch"] + 1
        for epoch in progress(range(start, epochs), "epochs"):
            # BatchNorm statistics stay frozen while only the head learns.
            model.train(stage == "full")
            model.head.train()
            t0, losses = time.time(), []
            for idx in epoch_indices(y_train, balance, groups).split(cfg["batch_size"]):
                loss = batch_loss(idx)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
            val_auroc = metrics.classification_metrics(
                data.y_val, _scores(model, data.x_val, spec), 0.5
            )["auroc"]
            log.write(
                event="epoch",
                stage=stage,
                epoch=epoch,
                loss=float(np.mean(losses)),
                val_auroc=val_auroc,
                images=per_epoch,
                epoch_s=round(time.time() - t0, 1),
            )
            if stage == "full" and (val_auroc or 0) > best["auroc"]:
                best = {
                    "auroc": val_auroc,
                    "epoch": epoch,
                    "state": {k: v.clone() for k, v in model.state_dict().items()},
                }
            common.save_checkpoint(
                ckpt_path,
                model=model.state_dict(),
                done=done,
                stage=stage,
                epoch=epoch,
                opt=opt.state_dict(),
                sched=sched.state_dict(),
                best=best,
            )
        done.append(stage)
        state = None
        common.save_checkpoint(ckpt_path, model=model.state_dict(), done=done, best=best)
    if best["state"] is not None:  # keep the epoch with the best val AUROC
        model.load_state_dict(best["state"])
    model.to(memory_format=torch.contiguous_format)
    return {"auroc": best["auroc"], "epoch": best.get("epoch")}


def calibrate(model: Any, data: CropData, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Choose what val decides after training: the localising model's fusion weight (every
    variant's val and test AUROC is returned for the card; test is only reported)."""
    if not hasattr(model, "map_head"):
        return None
    return choose_fusion(model, data.x_val, data.y_val, data.x_test, data.y_test, data.spec, cfg)


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
    val_scores = _scores(model, data.x_val, spec)
    test_scores = _scores(model, data.x_test, spec) if with_test else None
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
    card = {
        "name": recipe["name"],
        "version": recipe["version"],
        "task": "classification",
        "input": spec,
        "output": {"probability": "N x 1 fracture probability (sigmoid in the graph)"},
        "decision_threshold": threshold,
        "threshold_rule": "Youden's J (sensitivity + specificity - 1) maximised on the val split",
        "data": common.FRACATLAS_ATTRIBUTION
        + "; inputs are crops to the weak anatomy mask (train: widened to hold every box)",
        "recipe": recipe,
        "licence": "Proprietary model weights; training data CC BY 4.0 (FracAtlas)",
        **card_fields,
        "metrics": {
            **measured,
            "ci95": {**ci95, "method": CI95_METHOD},
            "by_region": by_region,
            **extra_metrics,
            "onnx_parity_max_abs_diff": parity,
            "note": "test inputs are label-free weak-mask crops; the served pipeline uses the U-Net crop",
        },
        "trained_on": common.hardware(),
        "train_time_s": log.training_seconds(),
    }
    export.write_card(onnx_path, card)
    log.write(event="done", metrics=card["metrics"])
    return card


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
    best = fit(model, data, cfg, log, on_start)
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
