"""SimCLR ResNet-18 classifier (Thorat et al.): self-supervised pretraining, then fine-tuning.

Pretraining sees train+val radiographs without labels (never test): two augmented views per
image, a 128-d projection head, NT-Xent with cosine similarity and a temperature, SGD.
Augmentations are X-ray-sensible: crops, rotation, translation, flips, brightness/contrast, blur;
no colour. The backbone is saved on its own so the Faster R-CNN family can start from it.
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


def build_resnet18() -> Any:
    """torchvision ResNet-18 without its fc layer: N x 3 x H x W -> N x 512."""
    import torchvision
    from torch import nn

    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Identity()
    return net


def build_simclr(backbone: Any, projection_dim: int, temperature: float) -> Any:
    """backbone + 128-d projection head + NT-Xent: module(view1, view2) -> loss."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from torch import nn

    class SimCLR(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = SimCLRProjectionHead(512, 512, projection_dim)
            self.criterion = NTXentLoss(temperature=temperature)

        def forward(self, v1: Any, v2: Any) -> Any:
            return self.criterion(self.head(self.backbone(v1)), self.head(self.backbone(v2)))

    return SimCLR()


def pretrain(recipe: dict[str, Any], items: list, log: common.RunLog) -> tuple[Any, dict[str, Any]]:
    """NT-Xent pretraining of a ResNet-18; resumable from runs/<name>/ssl_last.pt."""
    import torch

    cfg = recipe["pretrain"]
    backbone = build_resnet18()
    if recipe.get("init_weights"):
        state = load_verified_state_dict(recipe["init_weights"], recipe.get("init_sha256"))
        missing = backbone.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False
        )
        log.write(event="init", weights=recipe["init_weights"], missing=missing.missing_keys)
    if cfg["epochs"] == 0:
        return backbone, {"epochs": 0}
    model = build_simclr(backbone, cfg["projection_dim"], cfg["temperature"])
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg["lr"], momentum=0.9, weight_decay=cfg["weight_decay"]
    )
    steps_per_epoch = len(items) // cfg["batch_size"]
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg["lr"], total_steps=cfg["epochs"] * steps_per_epoch, pct_start=0.1
    )
    x_all = torch.from_numpy(classifier.crops_as_array(items, cfg["source_size"], use_boxes=False))
    mean, std = 0.5, 0.25
    ckpt_path = log.run_dir / "ssl_last.pt"
    start = common.resume(ckpt_path, model=model, opt=opt, sched=sched)
    for epoch in progress(range(start, cfg["epochs"]), "epochs"):
        model.train()
        t0, losses = time.time(), []
        perm = torch.randperm(len(x_all))[: steps_per_epoch * cfg["batch_size"]]
        for idx in perm.split(cfg["batch_size"]):
            v1, v2 = ssl_views(x_all[idx], cfg["input_size"])
            loss = model(
                ((v1 - mean) / std).expand(-1, 3, -1, -1), ((v2 - mean) / std).expand(-1, 3, -1, -1)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        common.end_epoch(
            log,
            ckpt_path,
            epoch,
            t0,
            {"stage": "simclr", "loss": float(np.mean(losses)), "lr": sched.get_last_lr()[0]},
            stateful={"model": model, "opt": opt, "sched": sched},
        )
    torch.save(backbone.state_dict(), log.run_dir / "ssl_backbone.pt")
    summary = {"method": "SimCLR (NT-Xent)", "images": len(items), **cfg}
    return backbone, summary


def train(recipe: dict[str, Any], out_dir: Path = common.MODELS_DIR) -> dict[str, Any]:
    run = common.start_run(recipe)
    log, items = run.log, run.items
    backbone, summary = pretrain(recipe, items["train"] + items["val"], log)
    return classifier.finetune(
        backbone,
        512,
        recipe,
        items,
        log,
        out_dir,
        architecture="ResNet-18 (torchvision), SimCLR-pretrained, linear head",
        pretraining=summary,
    )
