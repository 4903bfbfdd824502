"""DINOv2 ViT-S/14 classifier (FractuVision).

With a supplied DINOv2 checkpoint (facebookresearch key format, e.g. dinov2_vits14_pretrain.pth,
verified by sha256) the ViT starts from it; otherwise from our own DINO self-distillation on
train+val radiographs without labels (student/teacher, EMA teacher, centred sharpened targets).
Then the shared linear-probe + fine-tune stages. The export is quantised to int8 (dynamic) to
keep the ONNX file small.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from training import classifier, common
from training.augment import ssl_views
from training.progress import progress
from training.weights import load_verified_state_dict

EMBED_DIM = 384


def build_vit(img_size: int) -> Any:
    import timm

    return timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=img_size, num_classes=0
    )


def load_dinov2_checkpoint(model: Any, path: str, sha256: str | None) -> list[str]:
    """Load facebookresearch DINOv2 weights into the timm ViT (positions resampled); missing keys."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = load_verified_state_dict(path, sha256)
    state = checkpoint_filter_fn(state, model)
    return model.load_state_dict(state, strict=False).missing_keys


def pretrain(
    recipe: dict[str, Any], backbone: Any, items: list, log: common.RunLog
) -> dict[str, Any]:
    import torch
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    cfg = recipe["pretrain"]

    def head() -> Any:
        return DINOProjectionHead(EMBED_DIM, 512, 64, cfg["output_dim"])

    student = torch.nn.Sequential(backbone, head())
    # Built, not deep-copied: the head's weight-normalised layer cannot be deep-copied.
    teacher = torch.nn.Sequential(build_vit(recipe["finetune"]["input_size"]), head())
    teacher.load_state_dict(student.state_dict())
    deactivate_requires_grad(teacher)
    criterion = DINOLoss(
        output_dim=cfg["output_dim"], warmup_teacher_temp_epochs=max(1, cfg["epochs"] // 3)
    )
    opt = torch.optim.AdamW(student.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    x_all = torch.from_numpy(classifier.crops_as_array(items, cfg["source_size"], use_boxes=False))
    steps_per_epoch = max(1, len(x_all) // cfg["batch_size"])
    total = cfg["epochs"] * steps_per_epoch
    ckpt_path = log.run_dir / "ssl_last.pt"
    start = common.resume(ckpt_path, student=student, teacher=teacher, opt=opt)
    for epoch in progress(range(start, cfg["epochs"]), "epochs"):
        student.train()
        t0, losses = time.time(), []
        perm = torch.randperm(len(x_all))[: steps_per_epoch * cfg["batch_size"]]
        for step, idx in enumerate(perm.split(cfg["batch_size"])):
            global_step = epoch * steps_per_epoch + step
            for group in opt.param_groups:
                group["lr"] = cosine_schedule(global_step, total, cfg["lr"], cfg["lr"] * 0.01)
            momentum = cosine_schedule(global_step, total, 0.996, 1.0)
            update_momentum(student, teacher, m=momentum)
            views = [(v - 0.5) / 0.25 for v in ssl_views(x_all[idx], cfg["input_size"])]
            views = [v.expand(-1, 3, -1, -1) for v in views]
            with torch.no_grad():
                teacher_out = [teacher(v) for v in views]
            student_out = [student(v) for v in views]
            loss = criterion(teacher_out, student_out, epoch=epoch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        common.end_epoch(
            log,
            ckpt_path,
            epoch,
            t0,
            {"stage": "dino", "loss": float(np.mean(losses))},
            stateful={"student": student, "teacher": teacher, "opt": opt},
        )
    # The teacher's backbone is the better encoder (the DINO paper's finding).
    backbone.load_state_dict(teacher[0].state_dict())
    return {"method": "DINO self-distillation (global views)", "images": len(items), **cfg}


def train(recipe: dict[str, Any], out_dir: Path = common.MODELS_DIR) -> dict[str, Any]:
    run = common.start_run(recipe)
    log, items = run.log, run.items
    size = recipe["finetune"]["input_size"]
    if size % 14 or recipe["pretrain"]["input_size"] % 14:
        raise ValueError("ViT-S/14 input sizes must be multiples of 14")
    backbone = build_vit(size)
    if recipe.get("init_weights"):
        missing = load_dinov2_checkpoint(
            backbone, recipe["init_weights"], recipe.get("init_sha256")
        )
        log.write(event="init", weights=recipe["init_weights"], missing=missing)
        summary = {"method": "supplied DINOv2 checkpoint", "file": recipe["init_weights"]}
    else:
        if recipe["pretrain"]["input_size"] != size:
            raise ValueError(
                "without dynamic position embeddings, pretrain and finetune sizes match"
            )
        summary = pretrain(recipe, backbone, items["train"] + items["val"], log)
    return classifier.finetune(
        backbone,
        EMBED_DIM,
        recipe,
        items,
        log,
        out_dir,
        architecture="ViT-S/14 (timm vit_small_patch14_dinov2), linear head on the CLS token",
        pretraining=summary,
    )
