"""How often the orienter undoes the right quarter turn on val radiographs under a shift.

    python -m research.orienter_under_shift --orienter DIR --shift rot90

The shift's own turn is recorded while the image is made (training/shifts.py draws it), the
served crop stage runs (cropper, upright turn), and the quarter turns left between the crop and
the upright radiograph (the shift's angle plus the upright turn, to the nearest quarter) are
compared with what the orienter says at its card's min_confidence: set right, made wrong, left
turned, or (when nothing was left) turned wrongly. Per region too. A diagnostic, not a choice.

orienter-mobilenetv2 1.0.0 (min_confidence 0.95), val, 523 crops (set right / left turned / made
wrong of those the shift left turned; upright ones turned wrongly):
  rot90             400 / 118 / 5 of 523 (hand 119 / 80 / 2 of 201)
  rotate@5          245 / 143 / 3 of 391; 1 of 132 upright
  all-rotate-512@5  236 / 147 / 4 of 387; 3 of 136 upright (hand 81 / 77 / 2 of 160)
  none              6 of 523 upright turned wrongly
So the stage does under the combined shift about what it does under rot90 (61% of turned crops
set right against 76%); that the image score did not move there is the classifier's rot4 views,
not the orienter failing.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from app.core.config import RADIOGRAPH_MODALITIES, PipelineOptions
from app.inference.decoding import decode
from app.inference.pipeline import ImageWork, quarter_turns_needed, take_crops
from app.inference.preprocessing import model_input
from app.inference.runtime import ModelRegistry, choose_providers
from training import shifts
from training.data import load_records, read_grey


def shifted_with_turn(rec, shift: str) -> tuple[bytes, str, float]:  # noqa: ANN001
    """The shifted image and the counter-clockwise degrees the shift turned it by."""
    turned = [0.0]
    rot90, rotate_any = shifts._rot90, shifts.rotate_any

    def record_rot90(grey, boxes, k):  # noqa: ANN001, ANN202
        turned[0] += 90.0 * k
        return rot90(grey, boxes, k)

    def record_any(grey, boxes, degrees):  # noqa: ANN001, ANN202
        turned[0] += degrees
        return rotate_any(grey, boxes, degrees)

    shifts._rot90, shifts.rotate_any = record_rot90, record_any
    try:
        data, ctype, _ = shifts.shift_image(
            read_grey(rec.path), np.zeros((0, 4)), shift, rec.image_id
        )
    finally:
        shifts._rot90, shifts.rotate_any = rot90, rotate_any
    return data, ctype, turned[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orienter", required=True, help="folder with the orienter's ONNX and card")
    ap.add_argument("--shift", default="rot90")
    args = ap.parse_args()
    orienter = ModelRegistry(Path(args.orienter)).orienter(True)
    cropper = ModelRegistry(Path("models")).get("cropper", None, "")
    for m in (orienter, cropper):
        m.load(choose_providers("cpu"), 0)
    tally: dict[str, Counter] = {}
    for rec in [r for r in load_records() if r.split == "val"]:
        data, ctype, degrees = shifted_with_turn(rec, args.shift)
        w = ImageWork(decode(data, ctype, rec.image_id, 10**9, list(RADIOGRAPH_MODALITIES)), 0.0)
        if take_crops([w], cropper, PipelineOptions(upright=True))[0] is None:
            continue
        upright_ccw = w.turn.degrees if w.turn else 0.0
        left = round((degrees + upright_ccw) / 90.0) % 4  # quarter turns (ccw) still in the crop
        x = model_input(w.crop, orienter.spec, w.crop_levels)[0][None]
        said = int(quarter_turns_needed(orienter, x)[0])
        if left == 0:
            outcome = "upright, turned wrongly" if said else "upright, left alone"
        else:
            outcome = "set right" if said == left else ("made wrong" if said else "left turned")
        for key in ("all", rec.region):
            tally.setdefault(key, Counter())[outcome] += 1
    print(json.dumps({"shift": args.shift, **{k: dict(v) for k, v in tally.items()}}, indent=1))


if __name__ == "__main__":
    main()
