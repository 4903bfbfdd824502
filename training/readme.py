"""The README's numbers, generated: the shipped models' table from their cards, and the answer
the service gives today to a named sample file (`make docs`; tests/test_readme.py fails when the
README's models table differs from the cards).

Each generated block sits between `<!-- generated: NAME -->` and `<!-- /generated -->` lines.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from training.common import MODELS_DIR, REPO

README = REPO / "README.md"
SAMPLE_SPLIT = "val"  # the README's sample: the first fractured image of this split
BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- /generated -->)", re.S)
RESULTS = REPO / "docs" / "results"


def _interval(ci: list[float] | None) -> str:
    return f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""


def _headline(card: dict[str, Any], split: str) -> str:
    """The card's headline figure on one split, with its bootstrap 95% CI where it has one."""
    metrics = card.get("metrics", {})
    figures = metrics.get(split)
    if not figures:
        return "-"
    task = card["task"]
    if task == "classification":
        ci = metrics.get("ci95", {}).get(split, {}).get("auroc")
        return f"AUROC {figures['auroc']:.3f}{_interval(ci)}"
    if task == "detection":
        return f"AP50 {figures['ap50']:.3f}"
    if task == "segmentation":
        return f"Dice {figures['dice_vs_weak_masks']:.3f}"
    return "-"


def models_table(models_dir: Path = MODELS_DIR) -> str:
    rows = [
        "| model | version | task | recipe | val (card) | test (card) | results |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in sorted(models_dir.glob("*.json")):
        card = json.loads(path.read_text())
        config = card.get("recipe", {}).get("config", "")
        decision = RESULTS / f"{Path(config).stem}.md"
        link = f"[{decision.name}](docs/results/{decision.name})" if decision.is_file() else "-"
        rows.append(
            f"| `{card['name']}` | {card['version']} | {card['task']} | `{config}` | "
            f"{_headline(card, 'val')} | {_headline(card, 'test')} | {link} |"
        )
    return "\n".join(rows) + "\n"


def sample_image() -> Path:
    from training.data import load_records

    record = next(r for r in load_records() if r.split == SAMPLE_SPLIT and r.fractured)
    return Path(record.path).resolve()


def sample_answer() -> str:
    """POST /v1/predict of the sample through the app as `make serve` builds it (in process)."""
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    path = sample_image()
    with TestClient(create_app(Settings())) as client:
        answer = client.post(
            "/v1/predict",
            content=path.read_bytes(),
            headers={"content-type": "image/jpeg", "x-request-id": "readme"},
        ).json()
    relative = path.relative_to(REPO.parent).as_posix()
    lines = [
        "```bash",
        f"curl -s -H 'Content-Type: image/jpeg' --data-binary @../{relative} "
        "localhost:8000/v1/predict",
        "```",
        "",
        "```json",
        "{" + ",\n ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in answer.items()) + "}",
        "```",
    ]
    return "\n".join(lines) + "\n"


GENERATORS = {"models": models_table, "answer": sample_answer}


def blocks(text: str) -> dict[str, str]:
    return {m.group(2): m.group(3) for m in BLOCK.finditer(text)}


def regenerate(names: list[str] | None = None, readme: Path = README) -> list[str]:
    """Rewrite the README's generated blocks (all, or `names`); returns those that changed."""
    text = readme.read_text()
    changed = []

    def fill(match: re.Match) -> str:
        name = match.group(2)
        if names is not None and name not in names:
            return match.group(0)
        body = GENERATORS[name]()
        if body != match.group(3):
            changed.append(name)
        return match.group(1) + body + match.group(4)

    readme.write_text(BLOCK.sub(fill, text))
    return changed


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m training readme",
        description="regenerate the README's numbers (models table, sample answer)",
    )
    parser.add_argument("blocks", nargs="*", choices=[[], *GENERATORS], help="default: all")
    args = parser.parse_args(argv)
    changed = regenerate(args.blocks or None)
    print(f"README: regenerated {', '.join(changed) if changed else 'nothing (up to date)'}")
    return 0
