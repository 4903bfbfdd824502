"""The README stays a user's page: short, its links alive, its models table the cards' own."""

from __future__ import annotations

import re

from tests.conftest import REPO
from training import readme

TEXT = (REPO / "README.md").read_text()


def test_the_readme_is_short():
    assert len(TEXT.splitlines()) <= 450


def test_the_models_table_is_generated_from_the_cards():
    assert readme.blocks(TEXT)["models"] == readme.models_table(), "run `make docs`"


def test_the_sample_answer_is_generated_not_typed():
    answer = readme.blocks(TEXT)["answer"]
    assert '"request_id": "readme"' in answer and '"study":' in answer


def test_every_local_link_and_picture_exists():
    for target in re.findall(r"\]\(([^)#]+)\)", TEXT):
        if "://" not in target:
            assert (REPO / target).exists(), target


def test_regenerating_keeps_the_other_text(tmp_path):
    copy = tmp_path / "README.md"
    copy.write_text("intro\n<!-- generated: models -->\nstale\n<!-- /generated -->\nend\n")
    assert readme.regenerate(["models"], copy) == ["models"]
    text = copy.read_text()
    assert text.startswith("intro\n") and text.endswith("<!-- /generated -->\nend\n")
    assert readme.regenerate(["models"], copy) == []
