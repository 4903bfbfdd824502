"""`python -m training adapt`: a site's folder read as a hospital has it (every bad row named,
never a traceback), the hold-out by patient, and a real adaptation whose output folder the
service serves with its provenance."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, bone_phantom
from training.site import MIN_IMAGES, SiteDataError, load_site


def png(height: int = 200, width: int = 160) -> bytes:
    out = io.BytesIO()
    Image.fromarray(bone_phantom(height, width)).save(out, format="PNG")
    return out.getvalue()


def site(tmp_path, rows: list[str], files: int = MIN_IMAGES) -> object:
    for i in range(files):
        (tmp_path / f"{i}.png").write_bytes(png())
    (tmp_path / "manifest.csv").write_text("path,fractured,boxes\n" + "\n".join(rows) + "\n")
    return tmp_path


def good_rows(n: int = MIN_IMAGES) -> list[str]:
    return [
        f'{i}.png,{int(i % 3 == 0)},"[[10, 20, 60, 90]]"' if i % 3 == 0 else f"{i}.png,0,"
        for i in range(n)
    ]


def test_a_manifest_folder_is_read_with_its_boxes(tmp_path):
    loaded = load_site(site(tmp_path, good_rows()))
    assert len(loaded.records) == MIN_IMAGES and loaded.source == "manifest"
    fractured = [r for r in loaded.records if r.fractured]
    assert fractured and fractured[0].boxes == [[10 / 160, 20 / 200, 60 / 160, 90 / 200]]
    assert len(loaded.digest) == 64


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["0.png,2,"], "fractured must be 0 or 1"),
        ([f"{i}.png,0," for i in range(MIN_IMAGES)], "no fractured image"),
        (good_rows(MIN_IMAGES - 1), f"at least {MIN_IMAGES}"),
    ],
)
def test_a_folder_that_cannot_adapt_is_refused_with_the_reason(tmp_path, rows, message):
    with pytest.raises(SiteDataError, match=message):
        load_site(site(tmp_path, rows))


def test_bad_rows_are_named_and_skipped(tmp_path):
    rows = good_rows(MIN_IMAGES + 3)
    rows[MIN_IMAGES] = f'{MIN_IMAGES}.png,1,"[[10, 20, 600, 90]]"'  # outside the 160 x 200 image
    rows[MIN_IMAGES + 1] = "missing.png,1,"
    (tmp_path / f"{MIN_IMAGES + 2}.png").write_bytes(b"not an image")
    folder = site(tmp_path, rows, files=MIN_IMAGES + 1)
    (tmp_path / f"{MIN_IMAGES + 2}.png").write_bytes(b"not an image")
    loaded = load_site(folder)
    assert len(loaded.records) == MIN_IMAGES
    assert len(loaded.skipped) == 3
    text = " ".join(loaded.skipped)
    assert "outside" in text and "file missing" in text and "refuse" in text


def test_the_cli_answers_a_bad_folder_in_one_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "adapt",
            "--folder",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "no such folder" in out.stderr


def refused_before_scoring(tmp_path, flag: str, env: dict[str, str], sentence: str) -> None:
    """`adapt ... flag 1` with the served model that `env` names: one line, exit 2, nothing
    written, before any image is scored."""
    import os

    folder = site(tmp_path, good_rows())
    out = subprocess.run(
        [sys.executable, "-m", "training", "adapt", "--folder", str(folder)]
        + ["--out", str(tmp_path / "o"), flag, "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and sentence in out.stderr
    assert not (tmp_path / "o").exists()


def test_a_detector_that_cannot_be_fine_tuned_is_said_before_any_scoring(tmp_path):
    refused_before_scoring(
        tmp_path,
        "--detector-epochs",
        {"FRACTURE_DEFAULT_DETECTOR": "detector-yolov8n"},
        "only a Faster R-CNN",
    )


def test_the_hold_out_keeps_a_patient_on_one_side():
    from training.adapt import split_tune_check

    labels = [1, 1, 0, 0, 0, 1, 0, 0, 1, 0] * 6
    patients = [f"p{i // 2}" for i in range(len(labels))]  # two images per patient
    tune, check = split_tune_check(labels, patients)
    assert set(tune).isdisjoint(check) and len(tune) + len(check) == len(labels)
    assert {patients[i] for i in tune}.isdisjoint({patients[i] for i in check})
    assert 0.2 < len(check) / len(labels) < 0.4
    assert any(labels[i] for i in check) and any(labels[i] for i in tune)


def test_a_site_head_keeps_the_base_when_it_learnt_nothing():
    from app.inference.site_head import SiteHead

    head = SiteHead(np.zeros(4), np.ones(4), np.zeros(4), 1.0, 0.0)
    raw = np.array([0.1, 0.5, 0.9])
    assert np.allclose(
        head.apply(raw, np.random.default_rng(0).normal(size=(3, 4))), raw, atol=1e-6
    )


def test_adapt_writes_a_folder_the_service_serves_with_its_provenance(tmp_path):
    """A small proxy site (60 FracAtlas val images under another look) adapted end to end: OUT
    loads as the service loads a models folder, its classifier card names the site, its images
    and the base models, and the summary carries paired figures with intervals."""
    from tests.conftest import FRACATLAS, need

    need(FRACATLAS)
    from app.inference.runtime import ModelRegistry
    from research.site_proxy import write_site
    from training.adapt import adapt, table

    folder = write_site("all-rotate-512", tmp_path / "site", count=60)
    out = tmp_path / "models-site"
    summary = adapt(folder, out, "proxy", mix_limit=24, val_limit=24)
    assert summary["images"] == 60 and summary["held_out_images"] + summary["tune_images"] == 60
    low, high = summary["held_out_site_auroc"]["delta_ci95"]
    assert low <= summary["held_out_site_auroc"]["delta"] <= high
    assert "held-out site images" in table(summary)
    registry = ModelRegistry(out)
    registry.load_all("cpu", 1)
    card = registry.models["classifier-mobilenetv2"].card
    provenance = card.site_adaptation
    assert provenance.site == "proxy" and provenance.images == 60
    assert len(provenance.images_digest) == 64
    assert provenance.base["classifier"]["name"] == "classifier-mobilenetv2"
    assert (provenance.file is not None) == summary["adapted_shipped"]
    assert card.calibration is not None  # recalibrated on the site either way


def adapted_past_the_guard(tmp_path, monkeypatch, fracatlas_limit: str, **steps: int):
    """A 50-image proxy site adapted with `steps` (e.g. detector_epochs=1), its guard made to
    pass (SHIP_CERTAINTY 0, the FracAtlas limit named 1.0) to exercise what ships: the summary
    and OUT."""
    from tests.conftest import FRACATLAS, need

    need(FRACATLAS)
    import training.adapt as adapting
    from research.site_proxy import write_site

    monkeypatch.setattr(adapting, "SHIP_CERTAINTY", 0.0)
    monkeypatch.setattr(adapting, fracatlas_limit, 1.0)
    folder = write_site("all-rotate-512", tmp_path / "site", count=50)
    out = tmp_path / "models-site"
    return adapting.adapt(folder, out, "proxy", mix_limit=16, val_limit=12, **steps), out


def test_adapt_fine_tunes_the_detector_on_the_crops_the_service_takes(tmp_path, monkeypatch):
    """--detector-epochs: the served Faster R-CNN, warm-started from its own graph, trained on
    the site's served crops and FracAtlas's, guarded and, past the guard (made to pass here, to
    exercise what ships), written into OUT with the fused score following the new file."""
    import training.adapt as adapting
    from app.inference.runtime import ModelRegistry, sha256_of

    summary, out = adapted_past_the_guard(
        tmp_path, monkeypatch, "MAX_FRACATLAS_RECALL_LOSS", detector_epochs=1
    )
    detector = summary["detector"]
    assert detector["site_crops"] > 0 and detector["fracatlas_crops"] > 0
    assert len(detector["losses"]) == 1 and detector["adapted_shipped"]
    recall = detector["held_out_site_recall"]
    assert recall["lesions"] > 0 and 0 <= recall["recall_b"] <= 1
    assert "lesion recall" in adapting.table(summary)
    registry = ModelRegistry(out)
    registry.load_all("cpu", 1)
    card = registry.models["detector-frcnn-mobilenetv2-robust"].card
    base = ModelRegistry(REPO / "models").models["detector-frcnn-mobilenetv2-robust"].card
    assert card.sha256 == sha256_of(out / card.file) != base.sha256
    assert card.site_adaptation.site == "proxy"
    fusion = registry.models["classifier-mobilenetv2"].card.fusion
    assert fusion is None or fusion.detector_sha256 == card.sha256


def test_truth_boxes_land_where_the_detector_looks():
    """A frame box mapped into the served crop (frame_boxes_to_crop) and back by the detect
    stage's own mapping is the same box; where the crop was turned upright, the box around it."""
    from tests.conftest import FRACATLAS, need

    need(FRACATLAS)
    from app.inference.pipeline import ImageWork, run_study
    from training.data import load_records
    from training.evaluate import decode_record, served_plan
    from training.site_detector import frame_boxes_to_crop

    plan = served_plan(REPO / "models")
    records = [r for r in load_records() if r.split == "val" and r.boxes][:12]
    seen = {"turned": 0, "upright": 0}
    for rec in records:
        image, normalised = decode_record(rec, "none")
        w = ImageWork(image=image, decode_ms=0.0)
        run_study([w], plan)
        frame = normalised * np.array([image.width, image.height] * 2, np.float32)
        inside = frame_boxes_to_crop(w, frame)
        if len(inside) != len(frame):
            continue  # a box outside the crop is dropped, as training drops it
        back = inside.copy()
        x1, y1 = (w.turned_box if w.turn else w.working_box)[:2]
        back[:, [0, 2]] += x1
        back[:, [1, 3]] += y1
        if w.turn:
            back = w.turn.boxes_back(back)
        back = image.to_frame(back)
        sx, sy = image.scale
        slack = 2 * max(sx, sy)  # the crop's whole working pixels
        if w.turn:
            seen["turned"] += 1
            assert (back[:, :2] <= frame[:, :2] + slack).all()
            assert (back[:, 2:] >= frame[:, 2:] - slack).all()
        else:
            seen["upright"] += 1
            assert np.abs(back - frame).max() <= slack
    assert seen["upright"] + seen["turned"] >= 6, seen
