"""The site's detector for `python -m training adapt --detector-epochs N`: the served Faster
R-CNN fine-tuned on the site's tune images, in the very crops the service takes of them (its
cropper, upright turn and orienter), mixed with FracAtlas training crops so FracAtlas is not
forgotten, warm-started from the served graph itself (no training run needed on the site's
machine). Only a detector exported by the frcnn family can be fine-tuned here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from app.inference.model_card import InputSpec
from app.inference.pipeline import ImageWork
from app.inference.preprocessing import model_input
from app.inference.runtime import OnnxModel
from app.inference.upright import enclosing_boxes
from training import common
from training.site import SiteDataError

MIX_PER_SITE_IMAGE = 1.0  # FracAtlas train crops per site crop in each epoch
FINE_TUNE_LR = 0.002  # a quarter of the shipped recipe's rate: a warm start, few images


def frame_boxes_to_crop(w: ImageWork, boxes: np.ndarray) -> np.ndarray:
    """xyxy boxes in the frame as sent -> pixels of the crop the models looked at (the upright
    box around each where the crop was turned), clipped to it, slivers dropped: the inverse of
    the detect stage's mapping."""
    sx, sy = w.image.scale
    b = np.asarray(boxes, np.float64).reshape(-1, 4) / [sx, sy, sx, sy]
    if w.turn is not None:
        b = enclosing_boxes(b, w.turn.matrix)
    x1, y1 = (w.turned_box if w.turn is not None else w.working_box)[:2]
    b = b - [x1, y1, x1, y1]
    assert w.crop is not None
    h, wd = w.crop.shape
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, wd)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
    keep = (b[:, 2] - b[:, 0] > 1) & (b[:, 3] - b[:, 1] > 1)
    return b[keep].astype(np.float32)


def training_pair(w: ImageWork, frame_boxes: np.ndarray, spec: InputSpec) -> tuple[Any, Any]:
    """(uint8 crop at the detector's input size, boxes in its pixels) as frcnn.train_epoch
    takes them, from an image the served pipeline has cropped."""
    import torch

    assert w.crop is not None
    x, placement = model_input(w.crop, spec, w.crop_levels)
    px = crop_boxes_to_input(frame_boxes_to_crop(w, frame_boxes), placement)
    pixels = (np.asarray(x)[0] * 255).round().clip(0, 255).astype(np.uint8)
    return torch.from_numpy(pixels), torch.from_numpy(px.astype(np.float32))


def crop_boxes_to_input(boxes: np.ndarray, placement: Any) -> np.ndarray:
    """xyxy boxes in crop pixels -> pixels of the letterboxed model input."""
    px = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    px[:, [0, 2]] = px[:, [0, 2]] * placement.scale + placement.pad_x
    px[:, [1, 3]] = px[:, [1, 3]] * placement.scale + placement.pad_y
    return px


def fine_tune(
    detector: OnnxModel,
    site_pairs: list[tuple[Any, Any]],
    fracatlas_pairs: list[tuple[Any, Any]],
    epochs: int,
    out_path: Path,
    run_name: str,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Fine-tune the served detector on `site_pairs` and up to as many FracAtlas training
    pairs (fractured first); export the graph to `out_path`. What it did, for the card."""
    import torch

    from training.families import frcnn

    card = detector.card
    if card is None or card.recipe.get("family") != "frcnn":
        raise SiteDataError(
            f"{detector.name}: only a Faster R-CNN detector (family frcnn) can be fine-tuned"
        )
    recipe = {
        **card.recipe,
        "warm_start_onnx": str(Path(detector.path).resolve()),
        "warm_start_sha256": card.sha256,
        "epochs": epochs,
        "lr": FINE_TUNE_LR,
        "name": run_name,
    }
    log = common.RunLog(common.RUNS_DIR / run_name, recipe)
    model = frcnn.build_model(recipe)
    frcnn.warm_start_from_file(model, recipe, log)
    ranked = sorted(fracatlas_pairs, key=lambda pair: -len(pair[1]))  # stable: fractured first
    mix = ranked[: round(MIX_PER_SITE_IMAGE * len(site_pairs))]
    data = site_pairs + mix
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params, lr=recipe["lr"], momentum=0.9, weight_decay=recipe["weight_decay"]
    )
    steps = max(1, epochs * -(-len(data) // recipe["batch_size"]))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe["lr"], total_steps=steps, pct_start=0.1
    )
    losses = []
    for epoch in range(epochs):
        if deadline is not None and time.monotonic() > deadline:
            raise SiteDataError("--minutes ran out while fine-tuning the detector")
        t0 = time.time()
        losses.append(frcnn.train_epoch(model, data, recipe, epoch, opt, sched))
        log.write(event="epoch", epoch=epoch, loss=losses[-1], epoch_s=round(time.time() - t0, 1))
        print(
            f"adapt: detector epoch {epoch + 1}/{epochs}, loss {losses[-1]:.3f}, "
            f"{time.time() - t0:.0f} s",
            flush=True,
        )
    model.eval()
    frcnn.export_graph(model, recipe, out_path)
    return {
        "method": f"Faster R-CNN fine-tuned {epochs} epoch(s) from the served graph "
        f"(lr {FINE_TUNE_LR}, {recipe.get('augment') or 'flip'} augmentation)",
        "site_crops": len(site_pairs),
        "fracatlas_crops": len(mix),
        "losses": [round(v, 4) for v in losses],
    }
