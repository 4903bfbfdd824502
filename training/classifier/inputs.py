"""The classifier families' data: crops as uint8 arrays, the input spec and its test-time views,
normalised model inputs, class-balanced epochs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from app.inference.model_card import InputSpec
from training import export
from training.data import CachedImage, input_item


def input_spec(
    size: int, mean: float = 0.5, std: float = 0.25, tta: str = "none"
) -> dict[str, Any]:
    """Letterboxed grey crop as 3 equal channels, (x - mean) / std (ImageNet MobileNets: 0.5 / 0.5,
    the TFLite files' (q - 128) / 128); `tta`: the served test-time views (card input.tta)."""
    return export.input_spec(size, mean=mean, std=std, tta=tta)


def views(x_u8: Any, spec: InputSpec) -> list[Any]:
    """The card's test-time views of a uint8 (n, s, s) batch, as the service makes them."""
    import torch

    from app.inference.pipeline import tta_views

    return [torch.from_numpy(v) for v in tta_views(x_u8.numpy(), spec.tta)]


def crops_as_array(items: list[CachedImage], size: int, use_boxes: bool) -> np.ndarray:
    """Letterboxed, stretched grey crops as uint8 (n, size, size): small enough to keep in RAM."""
    return crops_and_box_masks(items, size, use_boxes)[0]


def crops_and_box_masks(
    items: list[CachedImage], size: int, use_boxes: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Letterboxed crops as uint8 (n, size, size) and, aligned with them, uint8 masks that are 1
    inside the fracture boxes (all zero for unfractured images)."""
    spec = export.input_spec(size, channels=1)  # grey crops in [0, 1], letterboxed
    out = np.empty((len(items), size, size), dtype=np.uint8)
    masks = np.zeros((len(items), size, size), dtype=np.uint8)
    for i, it in enumerate(items):
        x, boxes = input_item(it, spec, use_boxes=use_boxes)
        out[i] = np.round(x[0] * 255).astype(np.uint8)
        masks[i] = box_mask((size, size), boxes)
    return out, masks


def box_mask(shape: tuple[int, int], boxes: np.ndarray) -> np.ndarray:
    """uint8 mask, 1 on every pixel a box (xyxy, input pixels) touches (at least one)."""
    mask = np.zeros(shape, dtype=np.uint8)
    for bx1, by1, bx2, by2 in np.asarray(boxes, np.float64).reshape(-1, 4):
        x1, y1 = int(np.floor(bx1)), int(np.floor(by1))
        x2, y2 = int(np.ceil(bx2)), int(np.ceil(by2))
        mask[max(0, y1) : max(y1 + 1, y2), max(0, x1) : max(x1 + 1, x2)] = 1
    return mask


def int8_calibration_inputs(
    items: list[CachedImage], spec: InputSpec, count: int = 128, seed: int = 0
) -> np.ndarray:
    """Model inputs that set an int8 graph's activation ranges (export.quantize_static_int8):
    a seeded draw of `count` train crops, normalised as the service feeds them."""
    import torch

    picked = np.random.default_rng(seed).permutation(len(items))[:count]
    crops = crops_as_array([items[i] for i in sorted(picked)], spec.size[0], use_boxes=False)
    return to_input(torch.from_numpy(crops), spec).numpy()


def to_input(batch_u8: Any, spec: InputSpec) -> Any:
    """uint8 (n, h, w) torch tensor -> normalised (n, 3, h, w) float, as the service feeds it."""
    x = batch_u8.float().div(255.0).unsqueeze(1).expand(-1, spec.channels, -1, -1)
    mean = x.new_tensor(spec.mean).view(1, -1, 1, 1)
    std = x.new_tensor(spec.std).view(1, -1, 1, 1)
    return (x - mean) / std


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

    spec: InputSpec
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
