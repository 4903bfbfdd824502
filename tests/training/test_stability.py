"""The operating-point stability table: every card row's threshold measured under each shift,
with intervals."""

from __future__ import annotations

from tests.conftest import FRACATLAS, need


def test_stability_table_measures_every_row_under_every_shift():
    need(FRACATLAS)
    from training.common import MODELS_DIR
    from training.data import load_records
    from training.evaluate import operating_point_stability

    records = [r for r in load_records(FRACATLAS) if r.split == "val"]
    picked = [r for r in records if r.fractured][:6] + [r for r in records if not r.fractured][:6]
    table = operating_point_stability(picked, MODELS_DIR, shifts=("none", "lowres"))
    assert set(table["shifts"]) == {"none", "lowres"}
    for shift in table["shifts"].values():
        assert set(shift["detector"]) == {"0.1", "0.2", "0.3", "0.4", "0.5"}
        rates = [shift["detector"][k]["fp_per_image"] for k in ("0.1", "0.3", "0.5")]
        assert rates == sorted(rates)  # a lower threshold never gives fewer false positives
        assert 0.0 <= shift["classifier"]["auroc"] <= 1.0
        low, high = shift["classifier"]["ci95"]["auroc"]
        assert low <= shift["classifier"]["auroc"] <= high
        for row in shift["detector"].values():  # every row with its interval over images
            assert row["fp_per_image_ci95"][0] <= row["fp_per_image"] <= row["fp_per_image_ci95"][1]


def test_an_unknown_shift_is_refused_before_any_image_is_read(capsys):
    import pytest

    from training.evaluate import main

    with pytest.raises(SystemExit) as exit_:
        main(["--split", "val", "--stability", "--shifts", "rotate,sideways"])
    assert exit_.value.code == 2
    assert "sideways" in capsys.readouterr().err
