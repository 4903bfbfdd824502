"""python -m training <command> ...: train a family, evaluate, calibrate, promote.

    python -m training mobilenet                       # training/configs/mobilenet.yaml
    python -m training frcnn --config training/configs/frcnn-mobilenet.yaml --set epochs=20
    python -m training promote runs/classifier-mobilenetv2/export
    python -m training promote runs/<candidate>/export --as classifier-mobilenetv2 --version 2.0.0
    python -m training evaluate --split val
    python -m training compare reports/val-a reports/val-b   # paired bootstrap of two reports
    python -m training calibrate --folder /data/site --out site.json
    python -m training verdict --write-card              # fracture / doubt / no fracture
    python -m training adapt --folder /data/site --out models-site

A family trains into runs/<name>/ (checkpoints, log, plots) and writes its ONNX file and card to
runs/<name>/export/ (val figures only; `--report-test` adds the test split, for the model about
to ship); `promote` validates that card and copies both into models/, the folder the service
serves. Nothing overwrites a shipped model by accident.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
from pathlib import Path

import yaml

from app.core.errors import ApiError
from app.inference.model_card import CardError
from app.inference.runtime import ModelLoadError
from training.common import MODELS_DIR, REPO, RUNS_DIR, DeviceError, load_recipe, resolve_device
from training.families import FAMILIES
from training.site import SiteDataError
from training.weights import WeightsMismatchError

# What a caller's bad path, name or recipe raises: answered in one line with exit status 2.
USER_ERRORS = (
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    yaml.YAMLError,
    ApiError,
    CardError,
    ModelLoadError,
    WeightsMismatchError,
    SiteDataError,
    DeviceError,
)

# Keys a run may set that recipes do not carry: the data cache, a smoke-run image limit,
# whether the run measures the test split (--report-test) and the device (--device).
RUN_KEYS = {"cache", "limit", "report_test", "device"}


def parse_overrides(items: list[str], recipe_path: Path) -> dict:
    """--set key=value pairs; a key the recipe does not have is refused (typos would otherwise
    be recorded in the card as if they had been used)."""
    base = yaml.safe_load(recipe_path.read_text())
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        node, known = base, True
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                known = False
                break
            node = node[part]
        if not known and key not in RUN_KEYS:
            raise SystemExit(f"--set {key}: {recipe_path.name} has no such entry")
        overrides[key] = yaml.safe_load(value)
    return overrides


def promote(
    export_dir: Path,
    models_dir: Path = MODELS_DIR,
    name: str | None = None,
    version: str | None = None,
) -> list[Path]:
    """Copy a run's ONNX file(s) and card(s) into models/ after validating each card against its
    file (schema and sha256). `name` / `version` ship a single candidate trained under an
    experiment's name as a served model (card name and file renamed, weights byte-identical)."""
    from app.inference.model_card import read_card, validate_card
    from app.inference.runtime import sha256_of

    copied = []
    cards = sorted(export_dir.glob("*.json"))
    if not cards:
        raise SystemExit(f"{export_dir}: no model card to promote")
    if (name or version) and len(cards) != 1:
        raise SystemExit(
            f"{export_dir}: --as / --version need exactly one card, found {len(cards)}"
        )
    for card_path in cards:
        card = read_card(card_path)
        onnx = export_dir / card.file
        if sha256_of(onnx) != card.sha256:
            raise SystemExit(f"{card_path.name}: {card.file} does not match its sha256")
        raw = json.loads(card_path.read_text())
        stem = name or card.name
        raw.update(name=stem, file=f"{stem}.onnx", version=version or card.version)
        if stem != card.name:
            raw["trained_as"] = card.name
        validate_card(raw, card_path.name)
        shutil.copy2(onnx, models_dir / f"{stem}.onnx")
        (models_dir / f"{stem}.json").write_text(json.dumps(raw, indent=2) + "\n")
        copied += [models_dir / f"{stem}.onnx", models_dir / f"{stem}.json"]
    return copied


def train_main(family: str, argv: list[str]) -> int:
    module, about = FAMILIES[family]
    parser = argparse.ArgumentParser(prog=f"python -m training {family}", description=about)
    configs = REPO / "training" / "configs"
    # the family's own recipe: a shipped one, else a candidate; none means --config is needed
    default = next(
        (
            p
            for p in (configs / f"{family}.yaml", configs / "candidates" / f"{family}.yaml")
            if p.is_file()
        ),
        None,
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=default,
        required=default is None,
        help=f"default: {default.relative_to(REPO)}" if default else "the recipe (YAML)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe entry (dotted keys, YAML values); unknown keys are refused",
    )
    parser.add_argument(
        "--out", type=Path, help="folder for the ONNX file and card (default runs/<name>/export)"
    )
    parser.add_argument(
        "--report-test",
        action="store_true",
        help="also measure the test split into the card: for the model about to ship, once",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where torch trains: auto = cuda where torch sees a GPU and the family trains "
        "there, else cpu (the ONNX export is always made on the CPU)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the recipe as the run would use it (file, then --set) and exit",
    )
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set, args.config)
    if args.report_test:
        overrides["report_test"] = True
    family_module = importlib.import_module(module)
    overrides["device"] = resolve_device(
        str(overrides.get("device", args.device)), getattr(family_module, "DEVICES", ("cpu",))
    )
    recipe = load_recipe(args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(recipe, sort_keys=False), end="")
        return 0
    out = args.out or RUNS_DIR / recipe["name"] / "export"
    card = family_module.train(recipe, out)
    print(json.dumps(card.get("metrics", {}), indent=2, default=str))
    print(f"wrote {out}; ship it with: python -m training promote {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="command")
    for family, (_, about) in FAMILIES.items():
        commands.add_parser(family, help=f"train: {about}", add_help=False)
    commands.add_parser("evaluate", help="the served pipeline on a split or folder", add_help=False)
    commands.add_parser(
        "compare", help="paired bootstrap of two evaluation reports", add_help=False
    )
    commands.add_parser(
        "calibrate", help="a site's calibration and operating points", add_help=False
    )
    commands.add_parser("verdict", help="fit the three-level verdict's thresholds", add_help=False)
    commands.add_parser("familiarity", help="fit the out-of-distribution reference", add_help=False)
    commands.add_parser("adapt", help="adapt the models to a site's images", add_help=False)
    commands.add_parser("readme", help="regenerate the README's numbers", add_help=False)
    promote_parser = commands.add_parser("promote", help="copy a run's export into models/")
    promote_parser.add_argument("export_dir", type=Path)
    promote_parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    promote_parser.add_argument("--as", dest="name", help="ship under this model name")
    promote_parser.add_argument("--version", help="the shipped card's version")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        return run_command(parser, command, rest, argv)
    except USER_ERRORS as exc:
        # something the caller gave (a path, a name, a recipe) is wrong: one line, no traceback
        print(f"python -m training {command}: error: {user_message(exc)}", file=sys.stderr)
        return 2


def user_message(exc: BaseException) -> str:
    detail = getattr(exc, "detail", None)  # the service's own errors (unknown model names)
    if detail:
        return str(detail)
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def run_command(parser: argparse.ArgumentParser, command: str, rest: list[str], argv) -> int:
    if command == "evaluate":
        from training.evaluate import main as evaluate_main

        return evaluate_main(rest)
    if command == "compare":
        from training.evaluate import compare_main

        return compare_main(rest)
    if command == "calibrate":
        from training.calibrate import main as calibrate_main

        return calibrate_main(rest)
    if command == "adapt":
        from training.adapt import main as adapt_main

        return adapt_main(rest)
    if command == "familiarity":
        from training.familiarity import main as familiarity_main

        return familiarity_main(rest)
    if command == "verdict":
        from training.verdict import main as verdict_main

        return verdict_main(rest)
    if command == "readme":
        from training.readme import main as readme_main

        return readme_main(rest)
    if command == "promote":
        args = parser.parse_args(argv)
        for path in promote(args.export_dir, args.models_dir, args.name, args.version):
            print(f"promoted {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
        return 0
    if command in FAMILIES:
        return train_main(command, rest)
    parser.parse_args(argv)  # prints the usage error
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
