"""What every family shares: recipe loading, seeding, offline mode, checkpoints, the run log."""

from __future__ import annotations

import csv
import json
import os
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "models"
RUNS_DIR = REPO / "runs"
FRACATLAS_ATTRIBUTION = (
    "FracAtlas (Abedeen et al., Scientific Data 10:521, 2023; figshare 10.6084/m9.figshare.22363012),"
    " CC BY 4.0; fixed train/val/test splits of the 3,471-image copy"
)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Per-image scores of a measurement as a CSV (its folder made), columns from the first row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    """A CSV written by write_rows, one dict per row."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def go_offline() -> None:
    """Make every hub and ultralytics stay off the network (no pretrained downloads here)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TORCH_HOME", str(REPO / ".cache" / "torch"))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(REPO / ".cache" / "ultralytics"))
    Path(os.environ["YOLO_CONFIG_DIR"]).mkdir(parents=True, exist_ok=True)


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML recipe; `overrides` (dotted keys) win, for smoke runs and tests. The recipe
    records the file it came from (`config`, repo-relative where possible) for the model card."""
    path = Path(path).resolve()
    recipe = yaml.safe_load(path.read_text())
    recipe["config"] = str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
    for key, value in (overrides or {}).items():
        node = recipe
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return recipe


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class DeviceError(ValueError):
    """A device asked for that this machine or this family cannot train on."""


def resolve_device(asked: str, supported: tuple[str, ...]) -> str:
    """`--device`: auto (cuda where torch sees a GPU and the family trains there, else cpu),
    cpu, or cuda (refused in one line where it cannot be had)."""
    if asked == "auto":
        return "cuda" if "cuda" in supported and pick_device() == "cuda" else "cpu"
    if asked not in supported:
        raise DeviceError(f"this family trains on {' or '.join(supported)} only, not {asked}")
    if asked == "cuda" and pick_device() != "cuda":
        raise DeviceError("--device cuda: torch sees no GPU on this machine")
    return asked


def training_device(recipe: dict[str, Any]) -> Any:
    """The torch device a run trains on (the CLI's resolved `device`; cpu when unset)."""
    import torch

    return torch.device(recipe.get("device", "cpu"))


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class RunLog:
    """Append-only JSON-lines log of a run: hardware, recipe, per-epoch losses and times."""

    def __init__(self, run_dir: Path, recipe: dict[str, Any]):
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "log.jsonl"
        self.started = time.time()
        self.write(event="start", hardware=hardware(), recipe=recipe)

    def training_seconds(self) -> float:
        """Time spent training, over every run that wrote this log (resumed runs included)."""
        total = 0.0
        for line in self.path.read_text().splitlines():
            row = json.loads(line)
            total += float(row.get("epoch_s", 0.0)) + float(row.get("train_s", 0.0))
        return round(total, 1)

    def write(self, **fields: Any) -> None:
        fields.setdefault("elapsed_s", round(time.time() - self.started, 2))
        with open(self.path, "a") as fh:
            fh.write(json.dumps(fields, default=str) + "\n")
        if fields.get("event") == "epoch":
            print(json.dumps(fields, default=str), flush=True)


def save_checkpoint(path: Path, **state: Any) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: a killed run never leaves a half-written checkpoint


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    import torch

    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def resume(path: Path, **stateful: Any) -> int:
    """Restore every named object (model, optimiser, scheduler) from the checkpoint at `path`,
    if there is one; the epoch to start from."""
    state = load_checkpoint(path)
    if state is None:
        return 0
    for name, obj in stateful.items():
        obj.load_state_dict(state[name])
    return state["epoch"] + 1


def checkpoint(path: Path, epoch: int, **stateful: Any) -> None:
    """Save the state of every named object after `epoch` (see resume)."""
    save_checkpoint(path, epoch=epoch, **{name: obj.state_dict() for name, obj in stateful.items()})


def end_epoch(
    log: RunLog,
    path: Path,
    epoch: int,
    started: float,
    figures: dict[str, Any],
    stateful: dict[str, Any] | None = None,
    saved: dict[str, Any] | None = None,
) -> None:
    """The end of every family's training epoch: one log line (the epoch, its `figures`, its
    seconds since `started`, printed too) and a checkpoint the run resumes from: the state of
    every `stateful` object (model, optimiser, scheduler) and the `saved` values as they are."""
    log.write(event="epoch", epoch=epoch, **figures, epoch_s=round(time.time() - started, 1))
    state = {name: obj.state_dict() for name, obj in (stateful or {}).items()}
    save_checkpoint(path, epoch=epoch, **state, **(saved or {}))


@dataclass
class Run:
    """What every family starts from: its recipe, its log in runs/<name>/, the cached images."""

    recipe: dict[str, Any]
    log: RunLog
    items: dict[str, list]

    @property
    def run_dir(self) -> Path:
        return self.log.run_dir


def start_run(recipe: dict[str, Any]) -> Run:
    """The preamble of every family: offline, seeded, the data cache built (or reused), the run
    log opened, the splits loaded (test only with `report_test`)."""
    from training.data import DEFAULT_CACHE, build_cache, load_cache

    go_offline()
    seed_everything(recipe["seed"])
    cache = Path(recipe.get("cache", DEFAULT_CACHE))
    build_cache(
        cache=cache, long_side=recipe.get("cache_long_side", 512), limit=recipe.get("limit")
    )
    log = RunLog(RUNS_DIR / recipe["name"], recipe)
    # test is read only when the run is to report it (a model about to ship): every other run
    # is chosen and compared on val alone, so no experiment ever sees a test figure
    splits = ("train", "val", "test") if recipe.get("report_test") else ("train", "val")
    items = {s: load_cache(cache, [s]) if s in splits else [] for s in ("train", "val", "test")}
    held_out = set(recipe.get("exclude_regions") or ())
    if held_out:  # a body-region hold-out: never trained on, nor chosen with (val)
        for split in ("train", "val"):
            items[split] = [it for it in items[split] if it.region not in held_out]
        log.write(event="hold_out", regions=sorted(held_out), train=len(items["train"]))
    return Run(recipe, log, items)
