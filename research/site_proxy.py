"""A stand-in for another hospital's labelled images, to prove `python -m training adapt`: the
FracAtlas val images under a source shift (training/shifts.py), written as a site would send
them (one file each, a manifest.csv with labels and boxes in image pixels).

    python -m research.site_proxy --shift all-rotate-512 --out runs/site-all-rotate-512
    python -m training adapt --folder runs/site-all-rotate-512 --out runs/models-site

`--count N` keeps a stratified, seeded N of the images (the learning curve's points). The adapt
command keeps FracAtlas val images that are in the site folder out of its forgetting check.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from training.data import load_records, read_grey
from training.shifts import shift_image, shift_names


def write_site(shift: str, out: Path, count: int | None = None, seed: int = 0) -> Path:
    """The val images under `shift` in `out`, with `out/manifest.csv`."""
    import io

    from PIL import Image

    records = [r for r in load_records() if r.split == "val"]
    if count is not None:
        rng = np.random.default_rng(seed)
        keep: list[int] = []
        for positive in (True, False):
            idx = [i for i, r in enumerate(records) if r.fractured == positive]
            share = round(count * len(idx) / len(records))
            keep += [int(i) for i in rng.choice(idx, size=min(share, len(idx)), replace=False)]
        records = [records[i] for i in sorted(keep)]
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for rec in records:
        data, ctype, boxes = shift_image(read_grey(rec.path), rec.boxes, shift, rec.image_id)
        suffix = ".png" if "png" in ctype else ".jpg"
        name = f"{rec.image_id}{suffix}"
        (out / name).write_bytes(data)
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
        pixels = [[round(float(v), 1) for v in b * np.array([w, h, w, h])] for b in boxes]
        pixels = [b for b in pixels if b[2] > b[0] and b[3] > b[1]]
        rows.append({"path": name, "fractured": int(rec.fractured), "boxes": json.dumps(pixels)})
    with open(out / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "fractured", "boxes"])
        writer.writeheader()
        writer.writerows(rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shift", type=shift_names, default=("all-rotate-512",))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--count", type=int)
    args = ap.parse_args()
    print(write_site(args.shift[0], args.out, args.count))


if __name__ == "__main__":
    main()
