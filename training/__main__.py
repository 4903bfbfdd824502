"""python -m training <family> --config training/configs/<family>.yaml [--set key=value ...]

Families: cropper, simclr, dino, mobilenet, bam, yolo, frcnn. `python -m training evaluate ...` evaluates the
served pipeline on a split or a folder in the release layout (see training/evaluate.py);
`python -m training calibrate ...` fits a site's operating points (training/calibrate.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import yaml

from training.common import load_recipe

FAMILIES = {
    "cropper": "training.cropper",
    "simclr": "training.simclr",
    "dino": "training.dino",
    "yolo": "training.yolo",
    "frcnn": "training.frcnn",
    "mobilenet": "training.mobilenet",
    "bam": "training.bam",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "evaluate":
        from training.evaluate import main as evaluate_main

        return evaluate_main(argv[1:])
    if argv and argv[0] == "calibrate":
        from training.calibrate import main as calibrate_main

        return calibrate_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m training")
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("--config", required=True, help="YAML recipe")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe entry (dotted keys, YAML values)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for the ONNX file and card (default: models/)",
    )
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    recipe = load_recipe(args.config, overrides)
    train = importlib.import_module(FAMILIES[args.family]).train
    card = train(recipe, Path(args.out)) if args.out else train(recipe)
    print(json.dumps(card.get("metrics", {}), indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
