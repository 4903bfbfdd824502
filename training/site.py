"""A site's labelled images, as a hospital has them: either the FracAtlas release layout
(`dataset.csv` with image_id,fractured; `Annotations/YOLO/` where boxes are known), or any folder
of DICOM, PNG and JPEG files with a manifest `manifest.csv`:

    path,fractured,boxes
    wrist/0001.dcm,1,"[[412, 388, 470, 451]]"
    wrist/0002.png,0,

`path` is relative to the folder, `fractured` 0 or 1, `boxes` (optional) a JSON list of
[x1, y1, x2, y2] in the pixels of the image as stored (after EXIF orientation for JPEG). The
manifest the service exports from readers' feedback (GET /v1/feedback/manifest.csv) names an
image by `sop_instance_uid` (found among the folder's DICOM files) or by the file name it was
uploaded under (found anywhere in the folder when `path` is not relative to it). Every
problem is reported: a row that cannot be used is named, and the whole folder is refused only
when what is left cannot adapt anything (fewer than MIN_IMAGES, or no fractured image).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from training.data import Record, load_records

MANIFEST = "manifest.csv"
MIN_IMAGES = 50


class SiteDataError(ValueError):
    """A site folder that cannot be used as it is: the message says what to mend."""


@dataclass
class SiteImages:
    records: list[Record]
    skipped: list[str]  # "path: why", one per unusable row
    source: str  # "release layout" or "manifest"

    @property
    def digest(self) -> str:
        """sha256 of the sorted image list with labels: which images a card was adapted on."""
        text = "\n".join(sorted(f"{Path(r.path).name},{int(r.fractured)}" for r in self.records))
        return hashlib.sha256(text.encode()).hexdigest()


def load_site(folder: Path) -> SiteImages:
    """The usable labelled images of `folder`; SiteDataError when the folder cannot be used."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SiteDataError(f"{folder}: no such folder")
    if (folder / "dataset.csv").is_file():
        records, skipped = _release_layout(folder)
        site = SiteImages(records, skipped, "release layout")
    elif (folder / MANIFEST).is_file():
        records, skipped = _manifest(folder)
        site = SiteImages(records, skipped, "manifest")
    else:
        raise SiteDataError(
            f"{folder}: neither dataset.csv (the release layout) nor {MANIFEST} "
            "(path,fractured[,boxes]) is there"
        )
    if len(site.records) < MIN_IMAGES:
        raise SiteDataError(
            f"{folder}: {len(site.records)} usable images, at least {MIN_IMAGES} are needed"
            + (f" ({len(site.skipped)} skipped: {site.skipped[0]} ...)" if site.skipped else "")
        )
    if not any(r.fractured for r in site.records):
        raise SiteDataError(f"{folder}: no fractured image among {len(site.records)}")
    if all(r.fractured for r in site.records):
        raise SiteDataError(f"{folder}: no unfractured image among {len(site.records)}")
    return site


def _release_layout(folder: Path) -> tuple[list[Record], list[str]]:
    records, skipped = [], []
    try:
        rows = load_records(folder)
    except (KeyError, ValueError) as exc:
        raise SiteDataError(f"{folder}/dataset.csv: {exc}") from None
    for r in rows:
        if not Path(r.path).is_file():
            skipped.append(f"{r.image_id}: file missing ({r.path})")
            continue
        records.append(r)
    return records, skipped


def _manifest(folder: Path) -> tuple[list[Record], list[str]]:
    records, skipped = [], []
    finder = _Finder(folder)
    with open(folder / MANIFEST, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or [])
        if "fractured" not in columns or not columns & {"path", "sop_instance_uid"}:
            raise SiteDataError(
                f"{folder / MANIFEST}: the columns are path (or sop_instance_uid) and fractured"
            )
        for line, row in enumerate(reader, start=2):
            name = (row.get("path") or "").strip()
            uid = (row.get("sop_instance_uid") or "").strip()
            where = f"{MANIFEST} line {line} ({name or uid or 'no path'})"
            label = (row.get("fractured") or "").strip()
            if label not in ("0", "1"):
                raise SiteDataError(f"{where}: fractured must be 0 or 1, got {label!r}")
            path = finder.find(name, uid)
            if path is None:
                skipped.append(f"{where}: file missing")
                continue
            try:
                size = _image_size(path)
                boxes = _boxes(row.get("boxes") or "", size)
            except SiteDataError as exc:
                skipped.append(f"{where}: {exc}")
                continue
            records.append(
                Record(
                    image_id=path.stem,
                    path=str(path),
                    split=None,
                    fractured=label == "1",
                    region="unknown",
                    boxes=boxes,
                )
            )
    return records, skipped


class _Finder:
    """A manifest row's file: its path under the folder, else the one file of that name in the
    folder's tree, else the DICOM file whose SOPInstanceUID the row names (headers read once)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._by_name: dict[str, list[Path]] | None = None
        self._by_uid: dict[str, Path] | None = None

    def find(self, name: str, uid: str) -> Path | None:
        if name and (self.folder / name).is_file():
            return self.folder / name
        if name:
            found = self.by_name().get(Path(name).name, [])
            if len(found) == 1:
                return found[0]
        return self.by_uid().get(uid) if uid else None

    def by_name(self) -> dict[str, list[Path]]:
        if self._by_name is None:
            self._by_name = {}
            for p in sorted(self.folder.rglob("*")):
                if p.is_file():
                    self._by_name.setdefault(p.name, []).append(p)
        return self._by_name

    def by_uid(self) -> dict[str, Path]:
        if self._by_uid is None:
            import pydicom

            self._by_uid = {}
            for paths in self.by_name().values():
                for p in paths:
                    try:
                        ds = pydicom.dcmread(
                            p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
                        )
                    except Exception:  # noqa: BLE001 (not DICOM: PNG, JPEG, the manifest)
                        continue
                    uid = str(getattr(ds, "SOPInstanceUID", "") or "")
                    if uid:
                        self._by_uid.setdefault(uid, p)
        return self._by_uid


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image as the service decodes it (EXIF applied for JPEG)."""
    from app.core.config import RADIOGRAPH_MODALITIES
    from app.core.errors import ApiError
    from app.inference.decoding import decode

    try:
        image = decode(path.read_bytes(), None, path.name, 10**9, list(RADIOGRAPH_MODALITIES))
    except ApiError as exc:
        raise SiteDataError(f"the service would refuse it: {exc.code} ({exc.detail})") from None
    return image.width, image.height


def _boxes(text: str, size: tuple[int, int]) -> list[list[float]]:
    """Manifest boxes in image pixels -> normalised xyxy; SiteDataError for a box outside."""
    if not text.strip():
        return []
    try:
        boxes = json.loads(text)
    except json.JSONDecodeError:
        raise SiteDataError(f"boxes is not a JSON list: {text[:40]!r}") from None
    w, h = size
    out = []
    for box in boxes if isinstance(boxes, list) else [None]:
        if not (isinstance(box, list) and len(box) == 4):
            raise SiteDataError(f"a box is not [x1, y1, x2, y2]: {box!r}")
        x1, y1, x2, y2 = (float(v) for v in box)
        if not (0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h):
            raise SiteDataError(f"box {box} lies outside the {w}x{h} image")
        out.append([x1 / w, y1 / h, x2 / w, y2 / h])
    return out
