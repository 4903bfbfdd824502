"""The shipped models/ folder: every ONNX file has a complete card that matches it."""

from __future__ import annotations

import json

import onnx
import yaml

from app.inference.runtime import sha256_of
from tests.conftest import REPO
from training.export import CARD_FIELDS

MODELS = REPO / "models"
MAX_FOLDER_BYTES = 200 * 1024 * 1024


def cards() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(MODELS.glob("*.json"))]


def test_every_model_has_a_complete_matching_card():
    onnx_files = {p.name for p in MODELS.glob("*.onnx")}
    assert onnx_files == {c["file"] for c in cards()}
    roles = {c["task"] for c in cards()}
    assert {"segmentation", "classification", "detection"} <= roles
    for card in cards():
        assert not [f for f in CARD_FIELDS if f not in card], card["name"]
        assert card["sha256"] == sha256_of(MODELS / card["file"]), card["name"]
        assert "FracAtlas" in card["data"] and "CC BY 4.0" in card["data"]
        assert card["metrics"]["test"], card["name"]
        assert card["input"]["size"] and card["input"]["channels"] in (1, 3)
        model = onnx.load(str(MODELS / card["file"]), load_external_data=False)
        opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert opset >= 17, card["name"]


def test_classifier_thresholds_and_detector_tables():
    for card in cards():
        if card["task"] == "classification":
            assert 0 < card["decision_threshold"] < 1 and "val" in card["threshold_rule"]
        if card["task"] == "detection":
            rows = card["operating_points"]
            assert [r["fp_per_image"] for r in rows] == [0.1, 0.2, 0.3, 0.4, 0.5]
            thresholds = [r["threshold"] for r in rows]
            assert thresholds == sorted(
                thresholds, reverse=True
            )  # more FP allowed: lower threshold
            recalls = [r["recall"] for r in rows]
            assert recalls == sorted(recalls)
        if "ultralytics" in card.get("architecture", ""):
            assert "AGPL-3.0" in card["licence"]


def test_models_folder_stays_small():
    sizes = {p.name: p.stat().st_size for p in MODELS.iterdir()}
    assert sum(sizes.values()) < MAX_FOLDER_BYTES, sizes
    assert max(sizes.values()) < 100 * 1024 * 1024


def test_every_card_says_what_it_is_for_and_what_it_is_not():
    for card_path in sorted(MODELS.glob("*.json")):
        card = json.loads(card_path.read_text())
        assert card["intended_use"] and "not for primary diagnosis" in card["intended_use"]
        assert card["out_of_scope"] and card["limitations"], card["name"]
        assert card["created"] and card["changelog"][-1]["version"] == card["version"]


def test_make_train_retrains_every_shipped_model_from_its_cards_recipe():
    """`make train` names each shipped model with the recipe its card was trained from."""
    import re

    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    runs = re.search(r"^TRAIN_RUNS := (.*)$", text, re.MULTILINE).group(1).split()
    planned = {name: recipe for _, recipe, name in (r.split(":") for r in runs)}
    for card in cards():
        # a run may ship under another name (an ensemble's recipe names its model_name)
        run = card["name"] if card["name"] in planned else card["recipe"].get("name")
        assert run in planned, f"make train does not retrain {card['name']}"
        config = f"training/configs/{planned[run]}.yaml"
        assert (REPO / config).is_file()
        if card["recipe"].get("warm_start_onnx"):
            # made from a shipped graph (a re-export): make train trains it from the start with
            # the recipe that gives the same name and version
            planned_recipe = yaml.safe_load((REPO / config).read_text())
            assert (planned_recipe["name"], planned_recipe["version"]) == (
                card["name"],
                card["version"],
            )
        else:
            assert card["recipe"]["config"] == config, card["name"]


def test_top_level_recipes_are_the_ones_shipped_cards_name():
    """training/configs/ holds the recipes of shipped models (their cards' and `make train`'s),
    their ensemble members and the runs they warm-start from; every other recipe is a candidate
    (training/configs/candidates/)."""
    import re

    configs = REPO / "training" / "configs"
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    runs = re.search(r"^TRAIN_RUNS := (.*)$", text, re.MULTILINE).group(1).split()
    todo = {card["recipe"]["config"] for card in cards()}
    todo |= {f"training/configs/{r.split(':')[1]}.yaml" for r in runs}
    named: set[str] = set()
    while todo:
        config = todo.pop()
        named.add(config)
        recipe = yaml.safe_load((REPO / config).read_text())
        todo |= set(recipe.get("members", [])) | {recipe.get("warm_start")} - {None} - named
    top = {p.relative_to(REPO).as_posix() for p in configs.glob("*.yaml")}
    assert top - named == set(), "not named by a shipped card: move to training/configs/candidates/"
