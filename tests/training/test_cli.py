"""The training command line: every command listed, typos in --set refused, promote validates."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from training.__main__ import parse_overrides, promote
from training.common import MODELS_DIR, REPO
from training.families import FAMILIES

CONFIGS = REPO / "training" / "configs"


def test_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "training", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0
    for command in (*FAMILIES, "evaluate", "compare", "calibrate", "promote"):
        assert command in out.stdout


@pytest.mark.parametrize(
    "config", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS))
)
def test_every_recipe_names_a_family_and_a_parent_that_exist(config):
    """Shipped and experiment recipes alike stay runnable: a known family, a model name, and a
    warm-start parent that is itself a recipe in the repo (of another model)."""
    from training.common import load_recipe

    recipe = load_recipe(config)
    assert recipe.get("family", config.stem.split("-")[0]) in FAMILIES
    assert recipe["name"]
    parent = recipe.get("warm_start")
    if parent:
        assert (REPO / parent).is_file(), parent
        assert load_recipe(REPO / parent)["name"] != recipe["name"]


def test_unknown_override_keys_are_refused():
    recipe = CONFIGS / "simclr.yaml"
    assert parse_overrides(["pretrain.epochs=50", "cache=/tmp/c"], recipe) == {
        "pretrain.epochs": 50,
        "cache": "/tmp/c",
    }
    with pytest.raises(SystemExit, match="no such entry"):
        parse_overrides(["pretrain.epoch=50"], recipe)
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_overrides(["pretrain.epochs"], recipe)


def test_promote_copies_a_valid_export_and_refuses_a_tampered_one(tmp_path):
    export, models = tmp_path / "export", tmp_path / "models"
    export.mkdir()
    models.mkdir()
    for suffix in (".onnx", ".json"):
        shutil.copy(MODELS_DIR / f"cropper-unet{suffix}", export / f"cropper-unet{suffix}")
    copied = promote(export, models)
    assert sorted(p.name for p in copied) == ["cropper-unet.json", "cropper-unet.onnx"]
    (export / "cropper-unet.onnx").write_bytes(b"not the model")
    with pytest.raises(SystemExit, match="sha256"):
        promote(export, models)
    card = json.loads((export / "cropper-unet.json").read_text())
    del card["crop_margin"]
    (export / "cropper-unet.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="crop_margin"):
        promote(export, models)


def test_promote_as_ships_a_candidate_under_the_served_name(tmp_path):
    export, models = tmp_path / "export", tmp_path / "models"
    export.mkdir()
    models.mkdir()
    card = json.loads((MODELS_DIR / "cropper-unet.json").read_text())
    card.update(name="cropper-unet-candidate", file="cropper-unet-candidate.onnx")
    (export / "cropper-unet-candidate.json").write_text(json.dumps(card))
    shutil.copy(MODELS_DIR / "cropper-unet.onnx", export / "cropper-unet-candidate.onnx")
    copied = promote(export, models, name="cropper-unet", version="9.0.0")
    assert sorted(p.name for p in copied) == ["cropper-unet.json", "cropper-unet.onnx"]
    shipped = json.loads((models / "cropper-unet.json").read_text())
    assert (shipped["name"], shipped["file"], shipped["version"]) == (
        "cropper-unet",
        "cropper-unet.onnx",
        "9.0.0",
    )
    assert shipped["trained_as"] == "cropper-unet-candidate"
    assert shipped["sha256"] == card["sha256"]
    assert (models / "cropper-unet.onnx").read_bytes() == (
        MODELS_DIR / "cropper-unet.onnx"
    ).read_bytes()


@pytest.mark.parametrize(
    "argv",
    [
        ["mobilenet", "--config", "nope.yaml"],
        ["evaluate", "--folder", "/nonexistent/site"],
        ["evaluate", "--split", "val", "--classifier", "nope"],
        ["calibrate", "--folder", "/nonexistent/site", "--out", "site.json"],
    ],
    ids=["missing-recipe", "missing-folder", "unknown-classifier", "calibrate-missing-folder"],
)
def test_a_bad_path_or_name_is_one_line_and_exit_2(argv, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "training", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path if argv[0] == "calibrate" else REPO,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0], out.stderr


def test_print_config_shows_the_merged_recipe_and_trains_nothing(tmp_path):
    import yaml

    out = subprocess.run(
        [sys.executable, "-m", "training", "mobilenet", "--print-config"]
        + ["--set", "finetune.full_epochs=3", "--out", str(tmp_path / "never")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    recipe = yaml.safe_load(out.stdout)
    assert recipe["finetune"]["full_epochs"] == 3 and recipe["family"] == "mobilenet"
    assert recipe["config"] == "training/configs/mobilenet.yaml"
    assert not (tmp_path / "never").exists()


def test_device_is_resolved_before_anything_trains(tmp_path):
    """auto picks the CPU where torch sees no GPU (or the family trains on the CPU only), and
    the merged recipe says where the run would train; cuda that cannot be had is one line."""
    import torch
    import yaml

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "training", *argv, "--print-config"],
            capture_output=True,
            text=True,
            cwd=REPO,
        )

    cpu = run("frcnn", "--config", "training/configs/frcnn-mobilenet.yaml", "--device", "cpu")
    assert cpu.returncode == 0 and yaml.safe_load(cpu.stdout)["device"] == "cpu", cpu.stderr
    auto = run("cropper")  # the U-Net's loop runs on the CPU only
    assert yaml.safe_load(auto.stdout)["device"] == "cpu"
    refused = [run("cropper", "--device", "cuda")]
    if not torch.cuda.is_available():
        refused.append(run("mobilenet", "--device", "cuda"))
    for out in refused:
        assert out.returncode == 2 and "Traceback" not in out.stderr
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "cuda" in lines[0], out.stderr
