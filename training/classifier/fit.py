"""Training a classifier: the linear probe then the full fine-tune, checkpointed every epoch
(the best val epoch kept), the image/cell fusion chosen on val, scores as served."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from app.inference.model_card import InputSpec
from training import augment, common, export, metrics
from training.classifier.inputs import CropData, epoch_indices, to_input, views
from training.classifier.models import localisation_loss
from training.progress import progress


def served_scores(model: Any, x_u8: Any, spec: InputSpec, batch: int = 64) -> np.ndarray:
    """Probabilities as served: the sigmoid of the mean logit over the card's views."""
    import torch

    model.eval()
    device = _device_of(model)
    with torch.no_grad():
        logits = [
            torch.cat([model.logits(to_input(b, spec).to(device)) for b in v.split(batch)])[:, 0]
            for v in views(x_u8, spec)
        ]
        return torch.sigmoid(torch.stack(logits).mean(dim=0)).cpu().numpy()


def _device_of(model: Any) -> Any:
    return next(model.parameters()).device


def onnx_scores(onnx_path: Path, x_u8: Any, spec: InputSpec) -> np.ndarray:
    """served_scores of the exported graph itself (e.g. quantised)."""
    from app.inference.pipeline import mean_logit

    p = [export.onnx_outputs(onnx_path, to_input(v, spec).numpy())[:, 0] for v in views(x_u8, spec)]
    return mean_logit(np.stack(p))


FUSION_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def _head_outputs(model: Any, x_u8: Any, spec: InputSpec, flip: bool) -> np.ndarray:
    """Image-head and max-cell logits of a localising model, (n, 2)."""
    import torch

    model.eval()
    device = _device_of(model)
    per_view = []
    with torch.no_grad():
        for v in views(x_u8, spec):  # mean over the card's views: linear, so fusion commutes
            rows = []
            for b in v.split(64):
                x = to_input(b, spec).to(device)
                image, cells = model.outputs(x.flip(-1) if flip else x)
                rows.append(torch.stack([image, cells.amax(dim=(1, 2))], dim=1))
            per_view.append(torch.cat(rows))
    return torch.stack(per_view).mean(dim=0).cpu().numpy()


def choose_fusion(
    model: Any,
    x_val: Any,
    y_val: np.ndarray,
    x_test: Any,
    y_test: np.ndarray,
    spec: InputSpec,
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


def augment_args(cfg: dict[str, Any]) -> dict[str, Any]:
    """training.augment.augment_batch's arguments from a recipe's fine-tune section."""
    return {
        "strength": cfg.get("augment", "light"),
        "rotate_degrees": cfg.get("rotate_degrees", 15.0),
        "rot90_p": cfg.get("rot90_p", 0.0),
        "skip": frozenset(cfg.get("augment_skip") or ()),
        "compound_p": float(cfg.get("compound_p", 0.0)),
        "processing_p": float(cfg.get("processing_p", 0.0)),
        "aspect_p": float(cfg.get("aspect_p", 0.0)),
        "min_squeeze": float(cfg.get("min_squeeze", 0.6)),
    }


def fit(
    model: Any,
    data: CropData,
    cfg: dict[str, Any],
    log: common.RunLog,
    on_start: Any = None,
    device: Any = "cpu",
) -> dict[str, Any]:
    """Linear probe, then the full fine-tune; the weights of the best val-AUROC epoch are loaded
    at the end. Checkpointed after every epoch (runs/<name>/finetune_last.pt): a killed run
    resumes at the next epoch. `on_start(model, x_train_u8, spec)` runs once before the first
    epoch of a fresh run; the epochs run on `device`, the model comes back on the CPU. Returns
    {"auroc", "epoch"} of the kept epoch."""
    import torch
    import torch.nn.functional as F

    spec, x_train, m_train, y_train = data.spec, data.x_train, data.m_train, data.y_train
    localising = bool(cfg.get("localisation"))
    balance = cfg.get("negatives_per_positive")
    # balance_by_region: the class balance drawn within each body region (epoch_indices)
    groups = np.array(data.regions["train"]) if cfg.get("balance_by_region") else None
    pos = float(y_train.sum())
    negatives = (len(y_train) - pos) if not balance else pos * balance
    device = torch.device(device)
    pos_weight = torch.tensor(negatives / max(pos, 1.0), device=device)
    augmentation = augment_args(cfg)
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
    model = model.to(device, memory_format=memory_format)
    done = state["done"] if state else []
    best = state.get("best", {"auroc": -1.0, "state": None}) if state else {"auroc": -1.0}
    best.setdefault("state", None)

    def batch_loss(idx: Any) -> Any:
        if localising:
            x_u8, masks = augment.augment_batch(x_train[idx], m_train[idx], **augmentation)
            return localisation_loss(
                model,
                to_input(x_u8, spec).to(device).contiguous(memory_format=memory_format),
                y_train[idx].to(device),
                masks.to(device),
                pos_weight,
                cfg.get("cell_pos_weight", 10.0),
            )
        x = to_input(augment.augment_batch(x_train[idx], **augmentation), spec).to(device)
        return F.binary_cross_entropy_with_logits(
            model.logits(x.contiguous(memory_format=memory_format))[:, 0],
            y_train[idx].to(device),
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
                data.y_val, served_scores(model, data.x_val, spec), 0.5
            )["auroc"]
            if stage == "full" and (val_auroc or 0) > best["auroc"]:
                best = {
                    "auroc": val_auroc,
                    "epoch": epoch,
                    "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                }
            common.end_epoch(
                log,
                ckpt_path,
                epoch,
                t0,
                {
                    "stage": stage,
                    "loss": float(np.mean(losses)),
                    "val_auroc": val_auroc,
                    "images": per_epoch,
                },
                stateful={"model": model, "opt": opt, "sched": sched},
                saved={"done": done, "stage": stage, "best": best},
            )
        done.append(stage)
        state = None
        common.save_checkpoint(ckpt_path, model=model.state_dict(), done=done, best=best)
    if best["state"] is not None:  # keep the epoch with the best val AUROC
        model.load_state_dict(best["state"])
    model.to("cpu", memory_format=torch.contiguous_format)  # exported and scored on the CPU
    return {"auroc": best["auroc"], "epoch": best.get("epoch")}


def calibrate(model: Any, data: CropData, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Choose what val decides after training: the localising model's fusion weight (every
    variant's val and test AUROC is returned for the card; test is only reported)."""
    if not hasattr(model, "map_head"):
        return None
    return choose_fusion(model, data.x_val, data.y_val, data.x_test, data.y_test, data.spec, cfg)
