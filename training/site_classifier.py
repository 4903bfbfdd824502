"""The site's classifier for `python -m training adapt --classifier-epochs N`: the served
MobileNetV2 ensemble's second member fine-tuned on the site's tune images, in the very crops the
service takes of them, mixed with as many FracAtlas training crops.

The member is rebuilt in torch from the served graph itself (no training run or pretrained file
needed on the site's machine): its convolutions, read in graph order, go back onto torchvision's
MobileNetV2 as training/pretrained.py loads ImageNet weights (each BatchNorm identity plus the
folded bias, TensorFlow's SAME padding on stride 2), its image head, per-cell head and the fusion
weight baked into the graph with them. BatchNorm statistics stay frozen (a few hundred images
cannot re-estimate them), the rest learns at a tenth of the recipe's rate, with the recipe's own
augmentation and box supervision where the site's manifest has boxes. The trained weights are
folded and written back over the same initialisers: the graph keeps its structure, its outputs
and its first member, whose pooled features the familiarity reference and radiograph probe read,
so they keep their meaning.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.inference.model_card import InputSpec
from app.inference.pipeline import ImageWork
from app.inference.preprocessing import model_input
from app.inference.runtime import OnnxModel
from training.classifier.inputs import box_mask
from training.pretrained import TfliteLayer
from training.site import SiteDataError
from training.site_detector import crop_boxes_to_input

FEATURE_DIM = 1280
TUNED_MEMBER = "member1_"  # the member fine-tuned; member0's features stay as served
LR_FRACTION = 0.1  # of the member recipe's full fine-tune rate (adapt --classifier-rate)
BATCH = 16


@dataclass
class MemberWeights:
    """One MobileNetV2 member of a served classifier graph: its convolutions in graph order
    (weight and folded bias initialiser names with them), its image head, per-cell head and
    fusion weight (image logit share)."""

    prefix: str
    convs: list[TfliteLayer]
    bias_names: list[str]
    head: tuple[np.ndarray, np.ndarray]
    map_head: tuple[np.ndarray, np.ndarray]
    fusion: float


def _constant(graph: Any, name: str) -> float:
    from onnx import numpy_helper

    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return float(numpy_helper.to_array(node.attribute[0].t))
    for init in graph.initializer:
        if init.name == name:
            return float(numpy_helper.to_array(init))
    raise SiteDataError(f"no constant {name} in the classifier graph")


def read_member(path: Path, prefix: str) -> MemberWeights:
    """The member whose initialisers start with `prefix` (e.g. "member1_"), from a graph that
    training.export.average_logit_graph merged."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    weights = {i.name: numpy_helper.to_array(i).copy() for i in graph.initializer}
    head_name = f"{prefix}head.weight"
    if head_name not in weights or f"{prefix}map_head.weight" not in weights:
        raise SiteDataError(
            f"{path.name}: no localising member {prefix!r} (head and per-cell head): only the "
            "MobileNetV2 ensemble can be fine-tuned here"
        )
    convs, bias_names, gemm_out = [], [], None
    for node in graph.node:
        if node.op_type == "Conv" and node.input[1].startswith(prefix):
            if node.input[1] == f"{prefix}map_head.weight":
                continue
            strides = next(a.ints for a in node.attribute if a.name == "strides")
            bias = weights[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            if bias is None:
                raise SiteDataError(f"{path.name}: {node.name} has no folded bias")
            convs.append(
                TfliteLayer("CONV_2D", node.input[1], weights[node.input[1]], bias, strides[0])
            )
            bias_names.append(node.input[2])
        elif node.op_type == "Gemm" and node.input[1] == head_name:
            gemm_out = node.output[0]
    # fusion * image logit: the Mul that takes the head's (gathered) output
    fusion = None
    gathered = {n.output[0] for n in graph.node if n.op_type == "Gather" and n.input[0] == gemm_out}
    for node in graph.node:
        if node.op_type == "Mul" and node.input[0] in gathered:
            fusion = _constant(graph, node.input[1])
    if fusion is None:
        raise SiteDataError(f"{path.name}: member {prefix!r} has no image/cell fusion")
    return MemberWeights(
        prefix,
        convs,
        bias_names,
        (weights[head_name], weights[f"{prefix}head.bias"]),
        (weights[f"{prefix}map_head.weight"], weights[f"{prefix}map_head.bias"]),
        fusion,
    )


def rebuild(member: MemberWeights) -> Any:
    """The member as training.classifier's localising model, answering as the graph does."""
    import torch
    import torchvision
    from torch import nn

    from training.classifier.models import build_localising_model
    from training.pretrained import _load_layers

    net = torchvision.models.mobilenet_v2(weights=None)
    net.classifier = nn.Identity()
    _load_layers(net.features, member.convs, None)
    model = build_localising_model(net, FEATURE_DIM, "mobilenet")
    head = nn.Linear(FEATURE_DIM, 1)  # the graph's head is folded already (fold_head)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(member.head[0].reshape(1, -1)))
        head.bias.copy_(torch.from_numpy(member.head[1].reshape(1)))
        model.map_head.weight.copy_(torch.from_numpy(member.map_head[0]))
        model.map_head.bias.copy_(torch.from_numpy(member.map_head[1]))
    model.head = head
    model.fusion = member.fusion
    return model.eval()


def folded(model: Any) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each backbone convolution's weight and bias with its (frozen-statistics) BatchNorm
    folded in, in module order: what the graph's initialisers hold."""
    import torch
    from torch import nn

    modules = list(model.backbone.features.modules())
    weights, biases = [], []
    for i, conv in enumerate(modules):
        if not isinstance(conv, nn.Conv2d):
            continue
        bn = next(m for m in modules[i + 1 :] if isinstance(m, nn.BatchNorm2d))
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            weights.append((conv.weight * scale.view(-1, 1, 1, 1)).numpy().copy())
            biases.append((bn.bias - bn.running_mean * scale).numpy().copy())
    return weights, biases


def write_member(source: Path, out: Path, member: MemberWeights, model: Any) -> Path:
    """`source` with the member's initialisers replaced by `model`'s (folded) weights."""
    import onnx
    from onnx import numpy_helper

    graph_model = onnx.load(str(source))
    weights, biases = folded(model)
    new = {
        f"{member.prefix}head.weight": model.head.weight.detach().numpy(),
        f"{member.prefix}head.bias": model.head.bias.detach().numpy(),
        f"{member.prefix}map_head.weight": model.map_head.weight.detach().numpy(),
        f"{member.prefix}map_head.bias": model.map_head.bias.detach().numpy(),
    }
    for layer, bias_name, w, b in zip(
        member.convs, member.bias_names, weights, biases, strict=True
    ):
        new[layer.name], new[bias_name] = w, b
    for init in graph_model.graph.initializer:
        if init.name in new:
            value = np.asarray(new.pop(init.name), dtype=np.float32)
            init.CopyFrom(numpy_helper.from_array(value.reshape(tuple(init.dims)), init.name))
    if new:
        raise SiteDataError(f"{source.name}: initialisers {sorted(new)[:3]} not found")
    onnx.save(graph_model, str(out))
    return out


def training_crop(w: ImageWork, crop_boxes: np.ndarray, spec: InputSpec) -> tuple[Any, Any]:
    """(uint8 plane at the classifier's input size, uint8 mask of the fracture boxes) from an
    image the served pipeline has cropped; `crop_boxes` in crop pixels."""
    import torch

    assert w.crop is not None
    x, placement = model_input(w.crop, spec, w.crop_levels)
    plane = np.asarray(x)[0] * float(np.ravel(spec.std)[0]) + float(np.ravel(spec.mean)[0])
    mask = box_mask(plane.shape, crop_boxes_to_input(crop_boxes, placement))
    pixels = (plane * 255).round().clip(0, 255).astype(np.uint8)
    return torch.from_numpy(pixels), torch.from_numpy(mask)


@dataclass
class CropSet:
    """Training crops of one source: uint8 planes, box masks, labels, and whether each image's
    boxes are known (a fractured image without boxes teaches its label, not where)."""

    planes: list[Any]
    masks: list[Any]
    labels: list[int]
    boxes_known: list[bool]

    def __len__(self) -> int:
        return len(self.labels)


def site_loss(model: Any, x: Any, y: Any, masks: Any, known: Any, pos_weight: Any) -> Any:
    """training.classifier's localisation loss with the per-cell term kept to images whose
    boxes are known: image BCE + per-cell BCE + BCE of the max cell against the label."""
    import torch.nn.functional as F

    image, cells = model.outputs(x)
    targets = F.adaptive_max_pool2d(masks.float().unsqueeze(1), cells.shape[-2:])[:, 0]
    per_cell = F.binary_cross_entropy_with_logits(
        cells, targets, pos_weight=cells.new_tensor(10.0), reduction="none"
    ).mean(dim=(1, 2))
    cell_term = (per_cell * known).sum() / known.sum().clamp(min=1.0)
    return (
        F.binary_cross_entropy_with_logits(image, y, pos_weight=pos_weight)
        + cell_term
        + F.binary_cross_entropy_with_logits(cells.amax(dim=(1, 2)), y, pos_weight=pos_weight)
    )


def fine_tune(
    classifier: OnnxModel,
    site: CropSet,
    fracatlas: CropSet,
    epochs: int,
    out_path: Path,
    deadline: float | None = None,
    lr_fraction: float = LR_FRACTION,
) -> dict[str, Any]:
    """Fine-tune the served ensemble's second member on the site crops and as many FracAtlas
    crops (fractured first); write the graph with its new weights to `out_path`. What it did,
    for the card."""
    import torch

    from training import augment
    from training.classifier.fit import augment_args
    from training.classifier.inputs import to_input

    card = classifier.card
    recipes = (card.recipe.get("member_recipes") or []) if card else []
    if card is None or card.recipe.get("family") != "ensemble" or len(recipes) < 2:
        raise SiteDataError(
            f"{classifier.name}: only the MobileNetV2 ensemble (family ensemble) can be "
            "fine-tuned: its first member's features must stay as the familiarity saw them"
        )
    cfg = recipes[1]["finetune"]
    member = read_member(classifier.path, TUNED_MEMBER)
    model = rebuild(member)
    order = sorted(range(len(fracatlas)), key=lambda i: -fracatlas.labels[i])  # fractured first
    mix = order[: len(site)]
    planes = torch.stack(site.planes + [fracatlas.planes[i] for i in mix])
    masks = torch.stack(site.masks + [fracatlas.masks[i] for i in mix])
    labels = torch.tensor(site.labels + [fracatlas.labels[i] for i in mix], dtype=torch.float32)
    known = torch.tensor(
        site.boxes_known + [fracatlas.boxes_known[i] for i in mix], dtype=torch.float32
    )
    positives = float(labels.sum())
    pos_weight = torch.tensor((len(labels) - positives) / max(positives, 1.0))
    spec = classifier.spec
    params = [p for p in model.parameters() if p.requires_grad]
    lr = lr_fraction * float(cfg["full_lr"])
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=float(cfg["weight_decay"]))
    steps = max(1, epochs * -(-len(labels) // BATCH))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    args = augment_args(cfg)
    losses = []
    for epoch in range(epochs):
        if deadline is not None and time.monotonic() > deadline:
            raise SiteDataError("--minutes ran out while fine-tuning the classifier")
        model.train()
        for module in model.modules():  # statistics frozen: BatchNorm in eval mode
            if isinstance(module, torch.nn.BatchNorm2d):
                module.eval()
        t0, running = time.time(), []
        for idx in torch.randperm(len(labels)).split(BATCH):
            x_u8, m = augment.augment_batch(planes[idx], masks[idx], **args)
            loss = site_loss(model, to_input(x_u8, spec), labels[idx], m, known[idx], pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            running.append(loss.item())
        losses.append(float(np.mean(running)))
        print(
            f"adapt: classifier epoch {epoch + 1}/{epochs}, loss {losses[-1]:.3f}, "
            f"{time.time() - t0:.0f} s",
            flush=True,
        )
    model.eval()
    write_member(classifier.path, out_path, member, model)
    return {
        "method": f"the ensemble's second member fine-tuned {epochs} epoch(s) from the served "
        f"graph (lr {lr:g}, BatchNorm statistics frozen, {cfg.get('augment', 'light')} "
        "augmentation); the first member, whose features the familiarity reads, as served",
        "site_crops": len(site),
        "fracatlas_crops": len(mix),
        "losses": [round(v, 4) for v in losses],
    }
