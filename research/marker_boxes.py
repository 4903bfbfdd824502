"""How many of the detector's boxes land on burned-in letters, with annotations painted out
(FRACTURE_PAINT_OUT_MARKERS, app/inference/markers.py) or not.

    python -m research.marker_boxes [--style trained|unseen] [--limit N]

Val images under the `markers` shift (or markers of styles the training never draws, from
marker_styles.py), the served pipeline with the default models at the fp=0.4 row, both ways on
the same images. A box is on a letter when at least ON_LETTERS of its area is marker pixels (those
the shift changed by more than 30 grey levels). Prints one JSON object. A measurement, not shipped.
"""

from __future__ import annotations

import argparse
import json
import random
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

import training.shifts as shifts
from app.core.config import RADIOGRAPH_MODALITIES, PipelineOptions, Settings
from app.inference.decoding import decode
from app.inference.operating_point import from_fp_rate
from app.inference.pipeline import ImageWork, run_study
from app.inference.plan import Plan
from research import marker_styles
from training.common import MODELS_DIR
from training.data import load_records, read_grey
from training.evaluate import served_plan

ON_LETTERS = 0.10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--style", choices=("trained", "unseen"), default="trained")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    if args.style == "unseen":
        style = marker_styles.unseen_marker
        shifts.paint_marker = lambda img, rng: style(img, random.Random(rng.random()))
    served = served_plan(MODELS_DIR)
    crp, clf, det = served.cropper, served.classifier, served.detector
    point = from_fp_rate(det.card, 0.4)
    upright = Settings().upright
    plans = {
        painted: Plan.of(crp, clf, det, point, options=PipelineOptions(upright, painted))
        for painted in (False, True)
    }
    records = [r for r in load_records() if r.split == "val"][: args.limit]
    counts = {
        painted: {"boxes": 0, "on_letters": 0, "images_with_a_box_on_letters": 0}
        for painted in (False, True)
    }
    for rec in records:
        grey = read_grey(rec.path)
        data, ctype, _ = shifts.shift_image(grey, np.zeros((0, 4)), "markers", rec.image_id)
        marked = np.asarray(Image.open(BytesIO(data)).convert("L"))
        letters = np.abs(marked.astype(np.int16) - grey) > 30
        image = decode(data, ctype, Path(rec.path).name, 10**9, list(RADIOGRAPH_MODALITIES))
        for painted in (False, True):
            work = [ImageWork(image=image, decode_ms=0.0)]
            run_study(work, plans[painted])
            on = 0
            for x1, y1, x2, y2 in np.round(work[0].boxes).astype(int):
                box = letters[max(0, y1) : y2, max(0, x1) : x2]
                on += bool(box.size and box.mean() >= ON_LETTERS)
            c = counts[painted]
            c["boxes"] += len(work[0].boxes)
            c["on_letters"] += on
            c["images_with_a_box_on_letters"] += on > 0
    print(
        json.dumps(
            {
                "style": args.style,
                "images": len(records),
                "models": [m.card.name + " " + m.card.version for m in (crp, clf, det)],
                "fp_per_image_row": 0.4,
                "as_sent": counts[False],
                "painted_out": counts[True],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
