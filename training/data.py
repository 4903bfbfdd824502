"""The one reader of the FracAtlas release layout, and the resized cache every family trains from.

Release layout: images/{Fractured,Non_fractured}/*.jpg, Annotations/YOLO/<id>.txt (normalised
cx cy w h), dataset.csv, splits/{train,val,test}.txt. Images are read as grey after EXIF
transposition; truncated JPEGs are accepted (a few FracAtlas files miss their last bytes).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from app.inference.decoding import lenient_pillow
from app.inference.model_card import DEFAULT_CROP_MARGIN, InputSpec
from app.inference.preprocessing import mask_crop_box, model_input, stretch_grey
from training.progress import progress

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fracatlas"
DEFAULT_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "fracatlas"
# FracAtlas's regions nearest an upper-limb-only source (elbow, wrist, forearm, fingers, shoulder)
HAND_SHOULDER = ("hand", "shoulder")
SPLITS = ("train", "val", "test")
BODY_REGIONS = ("hand", "leg", "hip", "shoulder", "mixed")
# The cropper card's margin (the service reads it from there): training crops follow the same rule.
CROP_MARGIN = DEFAULT_CROP_MARGIN


def data_root() -> Path:
    """FracAtlas root: $FRACATLAS_ROOT or ../shared/data/fracatlas next to the checkout."""
    return Path(os.environ.get("FRACATLAS_ROOT", DEFAULT_ROOT))


@dataclass
class Record:
    """One radiograph: boxes are normalised xyxy in the EXIF-transposed frame."""

    image_id: str
    path: str
    split: str | None
    fractured: bool
    region: str
    boxes: list[list[float]] = field(default_factory=list)


def read_grey(path: str | Path) -> np.ndarray:
    """Decode a JPEG/PNG as a uint8 grey array after EXIF orientation."""
    with Image.open(path) as im, lenient_pillow():  # some FracAtlas JPEGs miss their last bytes
        im.load()
        return np.asarray(ImageOps.exif_transpose(im).convert("L"))


def _yolo_boxes(label_file: Path) -> list[list[float]]:
    if not label_file.exists():
        return []
    boxes = []
    for line in label_file.read_text().split("\n"):
        parts = line.split()
        if len(parts) != 5:
            continue
        cx, cy, w, h = map(float, parts[1:])
        boxes.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return boxes


def load_records(root: str | Path | None = None) -> list[Record]:
    """Every image of the release with its label, boxes, body region and fixed split."""
    root = Path(root) if root else data_root()
    split_of: dict[str, str] = {}
    for split in SPLITS:
        split_file = root / "splits" / f"{split}.txt"
        if split_file.exists():
            for name in split_file.read_text().split():
                split_of[name] = split
    records = []
    with open(root / "dataset.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            name = row["image_id"]
            fractured = row["fractured"] == "1"
            folder = "Fractured" if fractured else "Non_fractured"
            region = next((r for r in BODY_REGIONS if row.get(r) == "1"), "unknown")
            boxes = _yolo_boxes(root / "Annotations" / "YOLO" / f"{Path(name).stem}.txt")
            records.append(
                Record(
                    image_id=Path(name).stem,
                    path=str(root / "images" / folder / name),
                    split=split_of.get(name),
                    fractured=fractured,
                    region=region,
                    boxes=boxes,
                )
            )
    return records


def weak_bone_mask(grey: np.ndarray) -> np.ndarray:
    """Weak anatomy mask: grey stretch, two-level Otsu, opening, large components, holes filled.

    A single Otsu split keeps only dense bone and cuts fingers and toes (8% of fracture boxes fell
    outside its crop); a second Otsu inside the dark class separates background from anatomy,
    which keeps 99.9% of train+val+test boxes inside the crop.
    """
    import cv2

    g = (stretch_grey(grey) * 255).astype(np.uint8)
    g = cv2.GaussianBlur(g, (5, 5), 0)
    upper, _ = cv2.threshold(g, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = g[g <= upper].reshape(1, -1)
    lower, _ = cv2.threshold(dark, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    m = (g > lower).astype(np.uint8)
    k = max(3, round(min(g.shape) / 100)) | 1
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((k, k), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= 0.005 * m.size
    m = keep[labels].astype(np.uint8)
    # Fill holes: background reachable from the border stays background.
    flood = np.pad(m, 1)
    cv2.floodFill(flood, None, (0, 0), 1)
    return (m | (1 - flood[1:-1, 1:-1])).astype(np.uint8)


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write` to a temporary name beside `path`, then rename: a second run building the same
    cache never reads half a file."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def _save_png_atomic(pixels: np.ndarray, path: Path) -> None:
    _write_atomic(path, Image.fromarray(pixels).save)


def _cache_one(args: tuple[dict, str, int]) -> dict:
    rec, out_dir, long_side = args
    grey = read_grey(rec["path"])
    h, w = grey.shape
    scale = long_side / max(h, w)
    if scale < 1:
        grey = np.asarray(
            Image.fromarray(grey).resize((round(w * scale), round(h * scale)), Image.BILINEAR)
        )
    mask = weak_bone_mask(grey)
    _save_png_atomic(grey, Path(out_dir) / "images" / f"{rec['image_id']}.png")
    _save_png_atomic(mask * 255, Path(out_dir) / "masks" / f"{rec['image_id']}.png")
    box = mask_crop_box(mask, CROP_MARGIN)
    mh, mw = mask.shape
    crop = (
        [0.0, 0.0, 1.0, 1.0]
        if box is None
        else [box[0] / mw, box[1] / mh, box[2] / mw, box[3] / mh]
    )
    return {**rec, "orig_size": [w, h], "weak_crop": crop}


def build_cache(
    root: str | Path | None = None,
    cache: str | Path = DEFAULT_CACHE,
    long_side: int = 512,
    workers: int = 2,
    limit: int | None = None,
) -> Path:
    """Decode every image once: grey, EXIF-transposed, long side <= long_side, plus weak masks."""
    out = Path(cache)
    index_file = out / "index.json"
    if index_file.exists():
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    records = [asdict(r) for r in load_records(root)]
    if limit:
        records = _balanced_subset(records, limit)
    jobs = [(r, str(out), long_side) for r in records]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            rows = list(
                progress(pool.map(_cache_one, jobs, chunksize=16), "cache", total=len(jobs))
            )
    else:
        rows = [_cache_one(j) for j in progress(jobs, "cache")]
    text = json.dumps({"long_side": long_side, "records": rows})
    _write_atomic(index_file, lambda tmp: tmp.write_text(text))
    return out


def _balanced_subset(records: list[dict], limit: int) -> list[dict]:
    """A small subset with both classes in every split (for smoke runs and tests)."""
    picked = []
    per = max(1, limit // 6)
    for split in SPLITS:
        for frac in (True, False):
            group = [r for r in records if r["split"] == split and r["fractured"] == frac]
            picked += group[:per]
    return picked


@dataclass
class CachedImage:
    image_id: str
    split: str | None
    fractured: bool
    region: str
    boxes: np.ndarray  # normalised xyxy, shape (n, 4)
    weak_crop: tuple[float, float, float, float]
    image_path: Path
    mask_path: Path

    def grey(self) -> np.ndarray:
        return np.asarray(Image.open(self.image_path))

    def mask(self) -> np.ndarray:
        return (np.asarray(Image.open(self.mask_path)) > 127).astype(np.uint8)


def load_cache(
    cache: str | Path = DEFAULT_CACHE, splits: Iterable[str] | None = None
) -> list[CachedImage]:
    cache = Path(cache)
    rows = json.loads((cache / "index.json").read_text())["records"]
    wanted = set(splits) if splits else None
    out = []
    for r in rows:
        if wanted is not None and r["split"] not in wanted:
            continue
        out.append(
            CachedImage(
                image_id=r["image_id"],
                split=r["split"],
                fractured=r["fractured"],
                region=r["region"],
                boxes=np.asarray(r["boxes"], dtype=np.float32).reshape(-1, 4),
                weak_crop=tuple(r["weak_crop"]),
                image_path=cache / "images" / f"{r['image_id']}.png",
                mask_path=cache / "masks" / f"{r['image_id']}.png",
            )
        )
    return out


def training_crop(item: CachedImage, grow: float = 0.02) -> tuple[float, float, float, float]:
    """The crop a model trains on: the weak-mask crop, widened to hold every fracture box.

    At serving time the crop comes from the U-Net; training on crops of the same rule keeps the
    scale the classifier and detector see the same.
    """
    x1, y1, x2, y2 = item.weak_crop
    for bx1, by1, bx2, by2 in item.boxes:
        x1, y1 = min(x1, bx1 - grow), min(y1, by1 - grow)
        x2, y2 = max(x2, bx2 + grow), max(y2, by2 + grow)
    return max(0.0, x1), max(0.0, y1), min(1.0, x2), min(1.0, y2)


def crop_item(item: CachedImage, use_boxes: bool) -> tuple[np.ndarray, np.ndarray]:
    """Grey crop (uint8) of an item and its boxes in normalised crop coordinates.

    use_boxes: widen the crop to hold every fracture box (training only; evaluation crops must
    not look at labels, so val/test use the label-free weak-mask crop).
    """
    grey = item.grey()
    h, w = grey.shape
    x1, y1, x2, y2 = training_crop(item) if use_boxes else item.weak_crop
    px1, py1 = int(np.floor(x1 * w)), int(np.floor(y1 * h))
    px2, py2 = max(px1 + 1, int(np.ceil(x2 * w))), max(py1 + 1, int(np.ceil(y2 * h)))
    crop = grey[py1:py2, px1:px2]
    boxes = item.boxes.copy()
    if len(boxes):
        boxes[:, [0, 2]] = (boxes[:, [0, 2]] * w - px1) / (px2 - px1)
        boxes[:, [1, 3]] = (boxes[:, [1, 3]] * h - py1) / (py2 - py1)
        boxes = boxes.clip(0, 1)
    return crop, boxes


def input_item(
    item: CachedImage, spec: InputSpec, use_boxes: bool
) -> tuple[np.ndarray, np.ndarray]:
    """An item's crop as the service feeds it to a model (CHW float, per `spec`) and its
    fracture boxes in that input's pixels (xyxy, float32, shape (n, 4))."""
    crop, boxes = crop_item(item, use_boxes=use_boxes)
    x, placement = model_input(stretch_grey(crop), spec)
    h, w = crop.shape
    px = boxes.reshape(-1, 4) * np.array([w, h, w, h], dtype=np.float32) * placement.scale
    px[:, [0, 2]] += placement.pad_x
    px[:, [1, 3]] += placement.pad_y
    return x, px.astype(np.float32)


def subsample_negatives(items: list, negatives_per_positive: float, seed: int) -> list:
    """Every fractured item and a seeded draw of `negatives_per_positive` unfractured ones per
    fractured (detectors learn little from the many empty crops)."""
    rng = np.random.default_rng(seed)
    pos = [it for it in items if it.fractured]
    neg = [it for it in items if not it.fractured]
    k = min(len(neg), round(len(pos) * negatives_per_positive))
    return pos + [neg[i] for i in rng.choice(len(neg), size=k, replace=False)]
