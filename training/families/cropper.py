"""Cropper (Xie et al.): a U-Net segments bone/anatomy; the service crops to the mask's box.

FracAtlas has no bone masks, so the U-Net learns the weak masks of `training.data.weak_bone_mask`
(two-level Otsu + morphology); it then runs on any radiograph without the hand-tuned rules.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from app.inference.model_card import InputSpec
from app.inference.preprocessing import crop_box_from_logits, model_input, resize, stretch_grey
from training import common, export, metrics
from training.data import CROP_MARGIN
from training.progress import progress


def build_unet(base: int = 16, depth: int = 4) -> Any:
    """A plain U-Net: conv-BN-ReLU pairs, max-pool down, transposed-conv up, skip concatenation."""
    import torch
    from torch import nn

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            widths = [base * 2**i for i in range(depth + 1)]
            self.down = nn.ModuleList([block(1, widths[0])])
            self.down.extend(block(widths[i], widths[i + 1]) for i in range(depth))
            self.up = nn.ModuleList(
                nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                for i in reversed(range(depth))
            )
            self.merge = nn.ModuleList(
                block(2 * widths[i], widths[i]) for i in reversed(range(depth))
            )
            self.head = nn.Conv2d(widths[0], 1, 1)
            self.pool = nn.MaxPool2d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            skips = []
            for i, stage in enumerate(self.down):
                x = stage(x if i == 0 else self.pool(x))
                skips.append(x)
            skips.pop()
            for up, merge in zip(self.up, self.merge, strict=True):
                x = merge(torch.cat([up(x), skips.pop()], dim=1))
            return self.head(x)

    return UNet()


def input_spec(size: int) -> InputSpec:
    return export.input_spec(size, resize="stretch", channels=1, mean=0.5, std=0.25)


def _arrays(items: list, spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    size = spec.size[0]
    xs, ys = [], []
    for it in items:
        x, _ = model_input(stretch_grey(it.grey()), spec)
        xs.append(x)
        ys.append((resize(it.mask().astype(np.float32), size, size) > 0.5)[None].astype(np.float32))
    return np.stack(xs), np.stack(ys)


def _augment(
    x: Any, y: Any, spec: InputSpec, rotate_p: float = 0.0, flatten_p: float = 0.0
) -> tuple[Any, Any]:
    import torch

    if torch.rand(1) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    if torch.rand(1) < 0.3:
        x, y = x.flip(-2), y.flip(-2)
    if rotate_p > 0:
        x, y = _set_down_at_an_angle(x, y, spec, rotate_p, flatten_p)
    gain = 1 + 0.2 * (torch.rand(x.shape[0], 1, 1, 1) - 0.5)
    shift = 0.4 * (torch.rand(x.shape[0], 1, 1, 1) - 0.5)
    return x * gain + shift, y


def _set_down_at_an_angle(
    x: Any, y: Any, spec: InputSpec, p: float, flatten_p: float = 0.0
) -> tuple[Any, Any]:
    """Turn a share `p` of the batch by any angle on a canvas grown to hold it all (black
    corners, as the `rotate` shift and a film scanned askew give), the masks with the pixels:
    the weak masks of upright images then teach bone, not 'whatever is not black'. A share
    `flatten_p` of those is first made flatter and brighter (another detector's LUT), so that a
    grey background inside black corners is not taken for bone either."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    turned = torch.rand(n) < p
    if not turned.any():
        return x, y
    mean, std = spec.mean[0], spec.std[0]
    if flatten_p > 0:
        flat = (torch.rand(n) < flatten_p).view(n, 1, 1, 1)
        # black goes to 0.13-0.40 grey (the `contrast` shift takes it to 0.28)
        keep_contrast = 0.5 + 0.3 * torch.rand(n, 1, 1, 1)  # of the grey range, about mid-grey
        lift = 0.03 + 0.12 * torch.rand(n, 1, 1, 1)
        grey = x * std + mean
        flattened = ((0.5 + (grey - 0.5) * keep_contrast + lift).clamp(0, 1) - mean) / std
        x = torch.where(flat, flattened, x)
    angle = torch.rand(n) * 2 * torch.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    grow = cos.abs() + sin.abs()  # the grown canvas's side over the image's, for a square
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos * grow, -sin * grow
    theta[:, 1, 0], theta[:, 1, 1] = sin * grow, cos * grow
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    black = (0.0 - mean) / std  # a black pixel after normalisation
    xt = F.grid_sample(x - black, grid, align_corners=False, padding_mode="zeros") + black
    yt = (F.grid_sample(y, grid, align_corners=False, padding_mode="zeros") > 0.5).to(y.dtype)
    keep = turned.view(n, 1, 1, 1)
    return torch.where(keep, xt, x), torch.where(keep, yt, y)


def train(recipe: dict[str, Any], out_dir: Path = common.MODELS_DIR) -> dict[str, Any]:
    """Train the U-Net on weak masks, export ONNX + card, report val (and test) Dice and box
    coverage."""
    import torch
    import torch.nn.functional as F

    run = common.start_run(recipe)
    log, run_dir = run.log, run.run_dir
    spec = input_spec(recipe["input_size"])
    train_items, val_items = run.items["train"], run.items["val"]
    x_train, y_train = (torch.from_numpy(a) for a in _arrays(train_items, spec))
    x_val, y_val = (torch.from_numpy(a) for a in _arrays(val_items, spec))

    model = build_unet(recipe["base_channels"], recipe["depth"])
    opt = torch.optim.AdamW(
        model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"]
    )
    epochs = recipe["epochs"]
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=recipe["lr"],
        total_steps=epochs * max(1, -(-len(x_train) // recipe["batch_size"])),
    )
    ckpt_path = run_dir / "last.pt"
    start = common.resume(ckpt_path, model=model, opt=opt, sched=sched)
    for epoch in progress(range(start, epochs), "epochs"):
        model.train()
        t0, losses = time.time(), []
        for idx in torch.randperm(len(x_train)).split(recipe["batch_size"]):
            x, y = _augment(
                x_train[idx],
                y_train[idx],
                spec,
                recipe.get("rotate_p", 0.0),
                recipe.get("flatten_p", 0.0),
            )
            logits = model(x)
            prob = torch.sigmoid(logits)
            soft_dice = 1 - (2 * (prob * y).sum() + 1) / (prob.sum() + y.sum() + 1)
            loss = F.binary_cross_entropy_with_logits(logits, y) + soft_dice
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        val_dice = _dice_of(model, x_val, y_val)
        common.end_epoch(
            log,
            ckpt_path,
            epoch,
            t0,
            {"loss": float(np.mean(losses)), "val_dice": val_dice},
            stateful={"model": model, "opt": opt, "sched": sched},
        )

    onnx_path = out_dir / f"{recipe['name']}.onnx"
    export.export_onnx(
        model, torch.from_numpy(x_val[:1].numpy()), onnx_path, ("image",), ("mask_logits",)
    )
    parity = export.check_parity(model, onnx_path, x_val[:4].numpy(), tolerance=1e-3)
    measured = {"val": evaluate_onnx(onnx_path, run.items["val"], spec, report_dir=run_dir)}
    if run.items["test"]:  # only when the run reports test (common.start_run)
        measured["test"] = evaluate_onnx(onnx_path, run.items["test"], spec)
    return export.ship_card(
        onnx_path,
        recipe,
        log,
        task="segmentation",
        spec=spec,
        output={"mask_logits": "N x 1 x H x W logits of bone/anatomy; mask = logit > 0"},
        data=common.FRACATLAS_ATTRIBUTION
        + "; targets are weak masks (two-level Otsu + morphology)",
        licence="Proprietary model weights; training data CC BY 4.0 (FracAtlas)",
        metrics={**measured, "onnx_parity_max_abs_diff": parity},
        architecture=f"U-Net, {recipe['depth']} levels, base {recipe['base_channels']} channels",
        crop_margin=CROP_MARGIN,
    )


def _dice_of(model: Any, x: Any, y: Any) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(b) for b in x.split(32)]) > 0
    return metrics.dice(pred.numpy(), y.numpy() > 0.5)


def evaluate_onnx(
    onnx_path: Path, items: list, spec: InputSpec, report_dir: Path | None = None
) -> dict:
    """Dice against weak masks and the share of fracture boxes fully inside the crop box."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    dices, inside, areas, shown = [], [], [], []
    for it in items:
        grey = it.grey()
        x, _ = model_input(stretch_grey(grey), spec)
        logits = session.run(None, {"image": x[None]})[0][0, 0]
        h, w = grey.shape
        pred_mask = resize(logits, h, w) > 0
        dices.append(metrics.dice(pred_mask, it.mask()))
        box = crop_box_from_logits(logits, h, w, CROP_MARGIN) or (0, 0, w, h)
        areas.append((box[2] - box[0]) * (box[3] - box[1]) / (w * h))
        for b in it.boxes:
            bx = b * np.array([w, h, w, h])
            tol = 1.0  # a pixel of rounding
            inside.append(
                bool(
                    bx[0] >= box[0] - tol
                    and bx[1] >= box[1] - tol
                    and bx[2] <= box[2] + tol
                    and bx[3] <= box[3] + tol
                )
            )
        if report_dir is not None and len(shown) < 12 and (len(it.boxes) or len(shown) % 2):
            shown.append((grey, pred_mask, box, it.boxes))
    if report_dir is not None and shown:
        from training.plots import crop_grid

        crop_grid(shown, report_dir / "crop_grid.png")
    return {
        "n_images": len(items),
        "dice_vs_weak_masks": float(np.mean(dices)),
        "fracture_boxes_inside_crop": float(np.mean(inside)) if inside else None,
        "n_fracture_boxes": len(inside),
        "mean_crop_area_fraction": float(np.mean(areas)),
    }
