"""YOLOv8 detector (FractuVision) with ultralytics, from yolov8n.yaml or a verified local .pt.

The dataset ultralytics trains on is written from the cache: stretched grey crops (the service's
preprocessing) as PNG, labels in YOLO format. Train crops are widened to hold every box; val
crops are label-free. Export: ONNX without NMS (see app/inference/postprocess.py), dynamic batch axis.
Models trained with ultralytics are AGPL-3.0.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.inference.preprocessing import stretch_grey
from training import common, detection, export
from training.data import crop_item, subsample_negatives
from training.weights import verify_sha256

NMS_IOU = 0.7  # ultralytics' default for predict and val; written into the card, served from it
PAD_VALUE = 114 / 255  # ultralytics' letterbox grey


def input_spec(size: int) -> dict[str, Any]:
    return export.input_spec(size, pad_value=PAD_VALUE)


def write_dataset(
    items: dict[str, list], root: Path, negatives_per_positive: float, seed: int
) -> Path:
    """YOLO folder layout: images/{train,val}/*.png, labels/{train,val}/*.txt, data.yaml."""
    for split, rows in items.items():
        img_dir, lbl_dir = root / "images" / split, root / "labels" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
        if split == "train" and negatives_per_positive >= 0:
            rows = subsample_negatives(rows, negatives_per_positive, seed)
        for it in rows:
            crop, boxes = crop_item(it, use_boxes=split == "train")
            Image.fromarray((stretch_grey(crop) * 255).round().astype(np.uint8)).save(
                img_dir / f"{it.image_id}.png"
            )
            lines = [
                f"0 {(b[0] + b[2]) / 2:.6f} {(b[1] + b[3]) / 2:.6f} {b[2] - b[0]:.6f} {b[3] - b[1]:.6f}"
                for b in boxes
                if b[2] > b[0] and b[3] > b[1]
            ]
            (lbl_dir / f"{it.image_id}.txt").write_text("\n".join(lines))
    data_yaml = root / "data.yaml"
    data_yaml.write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: fracture\n"
    )
    return data_yaml


# where --device may put the training loop (training/__main__.py)
DEVICES = ("cpu", "cuda")


def train(recipe: dict[str, Any], out_dir: Path = common.MODELS_DIR) -> dict[str, Any]:
    run = common.start_run(recipe)
    log, items, run_dir = run.log, run.items, run.run_dir
    from ultralytics import YOLO
    from ultralytics.utils import SETTINGS

    SETTINGS.update({"sync": False})
    ds_root = common.REPO / ".cache" / "yolo" / recipe["name"]
    if not (ds_root / "data.yaml").exists():
        shutil.rmtree(ds_root, ignore_errors=True)
        write_dataset(
            {"train": items["train"], "val": items["val"]},
            ds_root,
            recipe["negatives_per_positive"],
            recipe["seed"],
        )
    data_yaml = ds_root / "data.yaml"

    last = run_dir / "ultralytics" / "weights" / "last.pt"
    if recipe.get("init_weights"):
        model = YOLO(str(verify_sha256(recipe["init_weights"], recipe.get("init_sha256"))))
    else:
        model = YOLO(recipe["model"])
    train_args = dict(recipe["train"])
    t0 = time.time()
    if last.exists() and not (run_dir / "ultralytics" / "weights" / "best.pt").exists():
        YOLO(str(last)).train(resume=True)
    elif not last.exists():
        model.train(
            data=str(data_yaml),
            project=str(run_dir),
            name="ultralytics",
            exist_ok=True,
            seed=recipe["seed"],
            device="cpu" if recipe.get("device", "cpu") == "cpu" else 0,
            pretrained=bool(recipe.get("init_weights")),
            plots=False,
            verbose=False,
            **train_args,
        )
    log.write(event="trained", train_s=round(time.time() - t0, 1))
    best = run_dir / "ultralytics" / "weights" / "best.pt"
    trained = YOLO(str(best if best.exists() else last))
    exported = Path(
        trained.export(
            format="onnx",
            imgsz=train_args["imgsz"],
            dynamic=True,
            simplify=False,
            opset=17,
            half=False,
            nms=False,
            device="cpu",
        )
    )
    onnx_path = out_dir / f"{recipe['name']}.onnx"
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(exported, onnx_path)
    spec = input_spec(train_args["imgsz"])
    parity = parity_with_ultralytics(trained, onnx_path, items["val"][:6], spec)

    output = {
        "output0": "N x 5 x anchors: cx, cy, w, h (input pixels), fracture score; no NMS",
        "postprocess": "yolo",
        "nms_iou": NMS_IOU,
    }
    return detection.finish_detector(
        onnx_path,
        spec,
        output,
        items,
        run_dir,
        recipe,
        log,
        architecture=f"YOLOv8 ({recipe['model']}), one class, ultralytics",
        licence="AGPL-3.0 (trained with ultralytics); training data CC BY 4.0 (FracAtlas)",
        metrics={"parity_vs_ultralytics": parity},
    )


def parity_with_ultralytics(model: Any, onnx_path: Path, items: list, spec: dict[str, Any]) -> dict:
    """Our ONNX + numpy post-processing against ultralytics' own predict on the same inputs.

    Both see the same letterboxed tensor: the raw graph outputs must agree with the torch model's,
    and on those outputs our post-processing and ultralytics' NMS must give, at a 0.001 threshold,
    the same number of boxes with the same scores on every image.
    """
    import torch

    from app.inference.postprocess import yolo_detections
    from app.inference.preprocessing import model_input

    net = model.model.float().eval()
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    from ultralytics.utils.nms import non_max_suppression

    # A low threshold, so that boxes exist to compare even for a barely trained model.
    conf = 0.001
    raw_diff, worst_score, count_mismatch, compared, matched = 0.0, 0.0, 0, 0, 0
    for it in items:
        crop, _ = crop_item(it, use_boxes=False)
        x, _ = model_input(stretch_grey(crop), spec)
        ours_raw = session.run(None, {"images": x[None]})[0]
        with torch.no_grad():
            raw = net(torch.from_numpy(x[None]))
            raw = raw[0] if isinstance(raw, (list, tuple)) else raw
        raw_diff = max(raw_diff, float(np.abs(ours_raw - raw.numpy()).max()))
        ours_boxes, ours_scores = yolo_detections(ours_raw[0], conf, NMS_IOU)
        # ultralytics' NMS on the same ONNX output: raw differences of ~1e-5 must not move a
        # score across the threshold and count as a post-processing mismatch.
        ref = non_max_suppression(torch.from_numpy(ours_raw), conf_thres=conf, iou_thres=NMS_IOU)
        ref = ref[0].numpy()
        if len(ref) != len(ours_boxes):
            count_mismatch += 1
            continue
        if len(ref):
            worst_score = max(
                worst_score, float(np.abs(np.sort(ours_scores) - np.sort(ref[:, 4])).max())
            )
            dist = np.abs(ours_boxes[:, None, :] - ref[None, :, :4]).max(axis=2)
            matched += int((dist.min(axis=1) <= 1.0).sum())
            compared += len(ours_boxes)
    result = {
        "images": len(items),
        "raw_output_max_abs_diff": raw_diff,
        "boxes_compared": compared,
        # Where scores tie to float precision (a barely trained model), NMS may keep either box
        # of an overlapping pair: reported, not enforced. tests/app/test_preprocessing.py checks
        # the NMS itself against ultralytics' on tie-free inputs.
        "boxes_within_1px": round(matched / compared, 4) if compared else None,
        "max_score_diff": worst_score,
        "images_with_count_mismatch": count_mismatch,
    }
    if compared == 0 or count_mismatch or worst_score > 1e-3 or raw_diff > 1e-2:
        raise RuntimeError(f"YOLO export or post-processing parity failed: {result}")
    return result
