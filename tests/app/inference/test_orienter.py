"""Turning a crop the orienter finds a quarter or half turn off (FRACTURE_ORIENT).

The geometry is checked with a real ONNX graph whose answer is fixed (it says "turned k quarter
turns" whatever it sees), so the expected crop is known exactly; the trained orienter's accuracy
is its card's (val) and the README's."""

from __future__ import annotations

import json
import os
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.core.config import PipelineOptions
from app.inference.decoding import decode
from app.inference.model_card import CardError, validate_card
from app.inference.pipeline import ImageWork, image_answer, quarter_turns_needed, run_study
from app.inference.plan import Plan, Scoring
from app.inference.runtime import OnnxModel, choose_providers, sha256_of

MODALITIES = ["CR", "DX", "RG", "OT"]
SPEC = {
    "size": [64, 64],
    "resize": "letterbox",
    "pad_value": 0.0,
    "channels": 3,
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
}


def fixed_orienter(folder: Path, logits: list[float], min_confidence: float = 0.9) -> Path:
    """An ONNX graph (N x 3 x 64 x 64 -> N x 4) that answers `logits` for every image, and its
    card; returns the card's path."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3], keepdims=1),
            helper.make_node("Reshape", ["m", "column"], ["m2"]),
            helper.make_node("Mul", ["m2", "zero"], ["z"]),  # N x 1 zeros: the batch's shape
            helper.make_node("Add", ["z", "answer"], ["turn_logits"]),
        ],
        "fixed",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("turn_logits", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor("column", TensorProto.INT64, [2], [-1, 1]),
            helper.make_tensor("zero", TensorProto.FLOAT, [1, 1], [0.0]),
            helper.make_tensor("answer", TensorProto.FLOAT, [1, 4], logits),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "orienter-fixed.onnx")
    card = {
        "name": "orienter-fixed",
        "version": "0.0.1",
        "task": "orientation",
        "file": "orienter-fixed.onnx",
        "sha256": sha256_of(folder / "orienter-fixed.onnx"),
        "input": SPEC,
        "output": {"turn_logits": "N x 4"},
        "min_confidence": min_confidence,
        "data": "none: a fixed answer for tests",
        "licence": "test",
        "recipe": {},
        "metrics": {},
    }
    path = folder / "orienter-fixed.json"
    path.write_text(json.dumps(card))
    return path


def load_orienter(card_path: Path) -> OnnxModel:
    card = validate_card(json.loads(card_path.read_text()), card_path.name)
    model = OnnxModel.from_card(card, card_path.parent)
    model.load(choose_providers("cpu"), 1)
    return model


def one_hot(k: int, strength: float = 10.0) -> list[float]:
    return [strength if i == k else 0.0 for i in range(4)]


def test_an_orienter_card_needs_its_confidence(tmp_path):
    card = json.loads(fixed_orienter(tmp_path, one_hot(1)).read_text())
    del card["min_confidence"]
    with pytest.raises(CardError, match="min_confidence"):
        validate_card(card, "orienter-fixed.json")


def test_a_turn_is_undone_only_when_the_orienter_is_confident_enough(tmp_path):
    batch = np.zeros((3, 3, 64, 64), np.float32)
    sure = load_orienter(fixed_orienter(tmp_path / "a", one_hot(3), 0.9))
    assert quarter_turns_needed(sure, batch).tolist() == [3, 3, 3]
    # softmax of (1, 0, 0, 0) is 0.475 for turn 0... and of (0, 1, 0, 0) 0.475 for turn 1 < 0.9
    unsure = load_orienter(fixed_orienter(tmp_path / "b", one_hot(1, 1.0), 0.9))
    assert quarter_turns_needed(unsure, batch).tolist() == [0, 0, 0]


def png(pixels: np.ndarray) -> bytes:
    buf = BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def val_radiographs(fracatlas_dir: Path, n: int) -> list[np.ndarray]:
    names = (fracatlas_dir / "splits" / "val.txt").read_text().split()
    paths = [p for n_ in names for p in (fracatlas_dir / "images" / "Fractured").glob(n_)][:n]
    return [np.asarray(Image.open(p).convert("L")) for p in paths]


def aligned_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute grey difference of two crops at the best of their one-pixel shifts, over
    the part they share."""
    best = np.inf
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            a2 = a[max(dy, 0) :, max(dx, 0) :].astype(int)
            b2 = b[max(-dy, 0) :, max(-dx, 0) :].astype(int)
            h, w = min(a2.shape[0], b2.shape[0]), min(a2.shape[1], b2.shape[1])
            best = min(best, float(np.abs(a2[:h, :w] - b2[:h, :w]).mean()))
    return best


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_crop_found_k_quarter_turns_off_is_turned_back_exactly(chain, fracatlas_dir, tmp_path, k):
    """A val radiograph turned k quarter turns counter-clockwise, with an orienter that says so:
    the models see the crop of the turned image turned back clockwise (the same pixels; the box,
    taken around the turned mask, may differ by a pixel at an edge), the crop box and every box
    stay in the frame as sent, and the answer says it turned."""
    crp, clf, det, point = chain
    orienter = load_orienter(fixed_orienter(tmp_path, one_hot(k)))
    checked = 0
    for grey in val_radiographs(fracatlas_dir, 6):
        image = decode(png(np.rot90(grey, k).copy()), "image/png", "x.png", 60_000_000, MODALITIES)
        plain, turned = ([ImageWork(image=image, decode_ms=0.0)] for _ in range(2))
        run_study(plain, Plan.of(crp, clf, det, point))
        run_study(turned, Plan.of(crp, clf, det, point, orienter=orienter))
        w = turned[0]
        if plain[0].crop_fallback:
            assert w.turn is None  # no mask, no turn
            continue
        assert w.quarter_turns == k
        assert (w.turn.degrees + 90.0 * k) % 360.0 == pytest.approx(0.0, abs=1e-9)
        assert aligned_difference(w.crop, np.rot90(plain[0].crop, -k)) < 0.5
        h, wd = image.height, image.width
        # a working pixel apart at most (the working image can be smaller than the frame)
        pixel = max(h, wd) / max(w.seen.shape)
        assert abs(np.subtract(w.crop_box, plain[0].crop_box)).max() <= pixel + 1e-6
        if len(w.boxes):
            assert (w.boxes >= 0).all()
            assert (w.boxes[:, [0, 2]] <= wd + 1e-3).all()
            assert (w.boxes[:, [1, 3]] <= h + 1e-3).all()
        assert any("proximal end up" in n for n in image_answer(0, w, Scoring(None, 0.5, "")).notes)
        checked += 1
    assert checked >= 4


def test_the_quarter_turn_composes_with_the_upright_turn(chain, fracatlas_dir, tmp_path):
    """A radiograph set down 45 degrees off and a half turn: the upright turn and the orienter's
    half turn make one Turn, whose crop is the upright-turned crop turned by 180 degrees."""
    crp, clf, det, point = chain
    orienter = load_orienter(fixed_orienter(tmp_path, one_hot(2)))
    composed = 0
    for grey in val_radiographs(fracatlas_dir, 12):
        tilted = np.asarray(Image.fromarray(grey).rotate(45, expand=True))
        image = decode(png(tilted), "image/png", "x.png", 60_000_000, MODALITIES)
        upright, both = ([ImageWork(image=image, decode_ms=0.0)] for _ in range(2))
        run_study(upright, Plan.of(crp, clf, det, point, options=PipelineOptions(upright=True)))
        run_study(
            both,
            Plan.of(crp, clf, det, point, orienter=orienter, options=PipelineOptions(upright=True)),
        )
        if upright[0].turn is None:
            continue
        w = both[0]
        assert (w.turn.degrees - upright[0].turn.degrees) % 360.0 == pytest.approx(180.0)
        # resampled at sub-pixel-different places: near, not equal
        assert aligned_difference(w.crop, np.rot90(upright[0].crop, 2)) < 2.0
        composed += 1
    assert composed >= 2


def test_the_service_orients_only_when_configured_to_and_says_with_what(fracatlas_dir, tmp_path):
    """FRACTURE_ORIENT needs an orienter in the models folder (not ready, saying so, without
    one); with one, the answer names it and notes the turn."""
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    shipped = Settings().models_dir
    with TestClient(create_app(Settings(orient=True, models_dir=shipped))) as client:
        if not any(shipped.glob("orienter-*.json")):
            r = client.get("/readyz")
            assert r.status_code == 503 and "orienter" in r.text
    folder = tmp_path / "models"
    folder.mkdir()
    for f in shipped.iterdir():
        if not f.name.startswith("orienter-"):
            os.symlink(f.resolve(), folder / f.name)
    fixed_orienter(folder, one_hot(1))
    body = png(np.rot90(val_radiographs(fracatlas_dir, 1)[0]).copy())
    for orient in (True, False):
        with TestClient(create_app(Settings(orient=orient, models_dir=folder))) as client:
            r = client.post("/v1/predict", content=body, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            answer = r.json()
            notes = answer["images"][0]["notes"]
            listed = client.get("/v1/models")
            assert listed.status_code == 200, listed.text
            roles = {m["name"]: (m["role"], m["default"]) for m in listed.json()["models"]}
            assert roles["orienter-fixed"] == ("orienter", orient)
            if orient:
                assert answer["models"]["orienter"]["name"] == "orienter-fixed"
                assert any("proximal end up" in n for n in notes)
            else:
                assert "orienter" not in answer["models"]  # the default answer's keys
                assert not any("proximal end up" in n for n in notes)
