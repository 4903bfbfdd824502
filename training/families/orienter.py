"""Which way up is a bone crop? A quarter-turn classifier from the ImageNet MobileNetV2.

FracAtlas shows limbs proximal end up (hands and feet point down), other sites often the other
way, and the upright turn (app/inference/upright.py) only brings a bone onto the nearest image
axis: the detector still meets crops a quarter or half turn from anything it trained on (lesion
recall at the 0.4 row 0.530 upright, 0.385 under the `rot90` shift). Labels cost nothing: a
training crop turned by k quarter turns counter-clockwise is class k. Crops are first tilted by
up to `tilt_degrees` (what the upright turn leaves), mirrored, and changed as another site's
device would (augment.robust_photometric), so the answer rests on anatomy, not on FracAtlas's
look. The card's `min_confidence`, chosen on val, is the softmax probability below which the
service leaves a crop as it is (a wrong turn of an upright crop costs what a right one gains).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.inference.pipeline import turn_probabilities, turns_to_undo
from training import classifier, common, export, pretrained
from training.progress import progress

FEATURE_DIM = 1280
TURNS = 4
CONFIDENCES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)


def turned_batch(x_u8: Any, rng: random.Random, recipe: dict[str, Any]) -> tuple[Any, Any]:
    """A uint8 (n, s, s) batch, each crop tilted, mirrored and photometrically changed, then
    turned by a random number of quarter turns counter-clockwise (its label)."""
    import torch
    from torchvision.transforms import v2

    from training.augment import robust_photometric

    degrees = recipe["tilt_degrees"]
    tilt = v2.RandomAffine(degrees=degrees, translate=(0.06, 0.06), scale=(0.9, 1.1))
    out, labels = [], []
    for img in x_u8:
        t = tilt(v2.RandomHorizontalFlip()(img.unsqueeze(0)))[0]
        t = torch.from_numpy(robust_photometric(t.numpy(), rng))
        k = rng.randrange(TURNS)
        out.append(t.rot90(k, (-2, -1)))
        labels.append(k)
    return torch.stack(out), torch.tensor(labels)


def all_turns(x_u8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every crop at each of its four quarter turns (counter-clockwise), with the turn as label."""
    turned = [np.rot90(x_u8, k, axes=(-2, -1)) for k in range(TURNS)]
    labels = np.repeat(np.arange(TURNS), len(x_u8))
    return np.ascontiguousarray(np.concatenate(turned)), labels


def turn_table(probs: np.ndarray, labels: np.ndarray) -> list[dict[str, float]]:
    """Per confidence, by the service's own rule (turns_to_undo): share of upright crops turned
    (a harm), of turned crops set right, and of turned crops turned wrongly (neither right nor
    left alone)."""
    rows = []
    upright = labels == 0
    for c in CONFIDENCES:
        k = turns_to_undo(probs, c)
        rows.append(
            {
                "min_confidence": c,
                "upright_turned": float((k[upright] != 0).mean()),
                "turned_set_right": float((k[~upright] == labels[~upright]).mean()),
                "turned_made_wrong": float(
                    ((k[~upright] != labels[~upright]) & (k[~upright] != 0)).mean()
                ),
            }
        )
    return rows


def choose_confidence(table: list[dict[str, float]], max_upright_turned: float) -> float:
    """The lowest confidence that turns at most `max_upright_turned` of upright crops."""
    for row in table:
        if row["upright_turned"] <= max_upright_turned:
            return row["min_confidence"]
    return table[-1]["min_confidence"]


def accuracy_by(probs: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    hit = probs.argmax(axis=1) == labels
    return {
        "all": float(hit.mean()),
        "by_turn": [float(hit[labels == k].mean()) for k in range(TURNS)],
        "by_region": {g: float(hit[groups == g].mean()) for g in sorted(set(groups))},
    }


def _onnx_probabilities(path: Path, x_u8: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    import torch

    batch = classifier.to_input(torch.from_numpy(x_u8), spec).numpy()
    return turn_probabilities(export.onnx_outputs(path, batch))


def train(recipe: dict[str, Any], out_dir: Path = common.MODELS_DIR) -> dict[str, Any]:
    """Train the quarter-turn classifier, export ONNX + card with val accuracy and the turn table
    at each confidence, `min_confidence` chosen on val."""
    import torch
    from torch import nn

    run = common.start_run(recipe)
    log, run_dir = run.log, run.run_dir
    size = recipe["input_size"]
    spec = classifier.input_spec(size, mean=0.5, std=0.5)
    train_items, val_items = run.items["train"], run.items["val"]
    x_train = torch.from_numpy(classifier.crops_as_array(train_items, size, use_boxes=False))
    x_val = classifier.crops_as_array(val_items, size, use_boxes=False)

    source = pretrained.FILES[recipe.get("pretrained", pretrained.MOBILENET_V2.file)]
    backbone = pretrained.mobilenet_v2(source)
    # the TFLite weights come with BatchNorm folded in: identity BNs collapse in train mode
    idx = torch.randperm(len(x_train))[:256]
    pretrained.calibrate_batchnorm(
        backbone, [classifier.to_input(b, spec) for b in x_train[idx].split(32)]
    )
    model = nn.Sequential(backbone, nn.Linear(FEATURE_DIM, TURNS))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=1e-4)
    bs, epochs = recipe["batch_size"], recipe["epochs"]
    steps = max(1, len(x_train) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe["lr"], total_steps=epochs * steps
    )
    ckpt_path = run_dir / "last.pt"
    start = common.resume(ckpt_path, model=model, opt=opt, sched=sched)
    val_x4, val_labels = all_turns(x_val)
    regions = np.array([it.region for it in val_items] * TURNS)
    for epoch in progress(range(start, epochs), "epochs"):
        rng = random.Random(recipe["seed"] * 1000 + epoch)  # a resumed epoch draws the same
        model.train()
        t0, losses = time.time(), []
        order = torch.randperm(len(x_train))
        for s in range(steps):
            xb, yb = turned_batch(x_train[order[s * bs : (s + 1) * bs]], rng, recipe)
            loss = nn.functional.cross_entropy(model(classifier.to_input(xb, spec)), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            logits = torch.cat(
                [
                    model(classifier.to_input(torch.from_numpy(b), spec))
                    for b in np.array_split(val_x4, max(1, len(val_x4) // 64))
                ]
            ).numpy()
        common.end_epoch(
            log,
            ckpt_path,
            epoch,
            t0,
            {
                "loss": float(np.mean(losses)),
                "val_accuracy": accuracy_by(turn_probabilities(logits), val_labels, regions)["all"],
            },
            stateful={"model": model, "opt": opt, "sched": sched},
        )

    onnx_path = out_dir / f"{recipe['name']}.onnx"
    example = classifier.to_input(torch.from_numpy(x_val[:1]), spec)
    export.export_onnx(model, example, onnx_path, ("image",), ("turn_logits",))
    parity_batch = classifier.to_input(torch.from_numpy(x_val[:4]), spec).numpy()
    parity = export.check_parity(model, onnx_path, parity_batch, tolerance=1e-3)
    probs = _onnx_probabilities(onnx_path, val_x4, spec)
    table = turn_table(probs, val_labels)
    min_confidence = choose_confidence(table, recipe["max_upright_turned"])
    measured = {
        "val": {
            "n_crops": len(val_items),
            "accuracy": accuracy_by(probs, val_labels, regions),
            "turn_table": table,
        }
    }
    if run.items["test"]:  # only when the run reports test (common.start_run)
        x_test4, test_labels = all_turns(
            classifier.crops_as_array(run.items["test"], size, use_boxes=False)
        )
        test_regions = np.array([it.region for it in run.items["test"]] * TURNS)
        test_probs = _onnx_probabilities(onnx_path, x_test4, spec)
        measured["test"] = {
            "accuracy": accuracy_by(test_probs, test_labels, test_regions),
            "turn_table": turn_table(test_probs, test_labels),
        }
    return export.ship_card(
        onnx_path,
        recipe,
        log,
        task="orientation",
        spec=spec,
        output={
            "turn_logits": "N x 4 logits: the crop was turned k quarter turns counter-clockwise "
            "from FracAtlas's orientation (proximal end up); the service undoes the most probable "
            "turn when its softmax probability reaches min_confidence"
        },
        data=common.FRACATLAS_ATTRIBUTION
        + "; labels are the quarter turns applied to each crop (no annotation used)",
        licence="Proprietary model weights; training data CC BY 4.0 (FracAtlas); ImageNet "
        "weights Apache-2.0",
        metrics={**measured, "onnx_parity_max_abs_diff": parity},
        architecture="MobileNetV2 (ImageNet) + linear 4-way head",
        min_confidence=min_confidence,
        pretraining={"weights": source.card()},
    )
