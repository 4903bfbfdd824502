"""The model card schema: every shipped card validates; a bad card means not ready, naming the
file, at start-up rather than a KeyError during a request."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.core.config import Settings
from app.inference.model_card import CardError, ModelCard, read_card
from app.inference.runtime import ModelLoadError, ModelRegistry

MODELS = Settings().models_dir


def copy_models(to: Path) -> None:
    for path in MODELS.iterdir():
        shutil.copy(path, to / path.name)


def test_every_shipped_card_validates():
    cards = [read_card(p) for p in sorted(MODELS.glob("*.json"))]
    assert {c.role for c in cards} == {"cropper", "classifier", "detector"}
    for card in cards:
        if card.role == "detector":
            assert card.detector_output.postprocess in ("yolo", "rcnn")
            assert card.fp_range == (0.1, 0.5)
        if card.role == "cropper":
            assert card.crop_margin is not None


@pytest.mark.parametrize(
    "change, problem",
    [
        (lambda c: c.pop("decision_threshold"), "decision_threshold"),
        (lambda c: c.update(decision_threshold=1.5), "decision_threshold"),
        (lambda c: c["input"].update(channels=2), "input.channels"),
        (lambda c: c["input"].update(mean=[0.5]), "per channel"),
        (lambda c: c.update(sha256="abc"), "sha256"),
        (lambda c: c.update(task="regression"), "task"),
        (lambda c: c.pop("licence"), "licence"),
    ],
)
def test_a_bad_classifier_card_is_refused_with_its_problem(tmp_path, change, problem):
    card = json.loads(next(MODELS.glob("classifier-simclr*.json")).read_text())
    change(card)
    path = tmp_path / "classifier-bad.json"
    path.write_text(json.dumps(card))
    with pytest.raises(CardError, match="classifier-bad.json") as err:
        read_card(path)
    assert problem in str(err.value)


def test_detector_cards_need_a_known_decoder_and_yolo_its_nms_iou():
    card = json.loads(next(MODELS.glob("detector-yolov8n.json")).read_text())
    ModelCard.model_validate(card)
    for output in ({"postprocess": "yolo"}, {"postprocess": "ssd"}, {}):
        with pytest.raises(ValueError):
            ModelCard.model_validate({**card, "output": output})


def test_registry_not_ready_on_a_malformed_card_naming_the_file(tmp_path):
    copy_models(tmp_path)
    (tmp_path / "detector-yolov8n.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="detector-yolov8n.json"):
        ModelRegistry(tmp_path)


def test_two_cards_with_one_name_are_refused(tmp_path):
    copy_models(tmp_path)
    card = json.loads((tmp_path / "classifier-dino-vits14.json").read_text())
    card["name"] = "classifier-simclr-resnet18"
    (tmp_path / "classifier-dino-vits14.json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="both name"):
        ModelRegistry(tmp_path)


def test_a_corrupt_graph_whose_hash_matches_is_not_ready_not_a_crash(tmp_path):
    from fastapi.testclient import TestClient

    from app.inference.runtime import sha256_of
    from app.main import create_app

    copy_models(tmp_path)
    onnx = tmp_path / "cropper-unet.onnx"
    onnx.write_bytes(b"this is no protobuf" * 100)
    card_path = tmp_path / "cropper-unet.json"
    card = json.loads(card_path.read_text())
    card["sha256"] = sha256_of(onnx)
    card_path.write_text(json.dumps(card))
    with TestClient(create_app(Settings(models_dir=tmp_path))) as client:
        r = client.get("/readyz")
        assert r.status_code == 503
        assert "cropper-unet.onnx" in r.json()["detail"]
        assert client.get("/healthz").status_code == 200
