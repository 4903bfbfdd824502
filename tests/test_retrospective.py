"""The retrospective runner: a nested folder through the service, one CSV row per file (refused
files with their error), resumed where a first run stopped."""

from __future__ import annotations

import csv
import shutil

from tools.retrospective import run


def test_a_folder_goes_through_and_a_second_run_resumes(
    app_client, tmp_path, test_split_images, dicom_dir
):
    folder = tmp_path / "month"
    (folder / "a" / "b").mkdir(parents=True)
    shutil.copy(test_split_images[0], folder / "a" / "one.jpg")
    shutil.copy(dicom_dir / "RG3_UNC.dcm", folder / "a" / "b" / "no-extension")  # DICOM by bytes
    shutil.copy(dicom_dir / "CR-MONO1-10-chest.dcm", folder / "chest.dcm")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "audit.csv"
    first = run(folder, out, app_client, concurrency=2)
    assert first["sent"] == 3 and first["analysed"] == 2 and first["refused"] == 1
    with open(out, newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    assert rows["chest.dcm"]["status"] == "422" and rows["chest.dcm"]["error"] == "out_of_scope"
    assert rows["a/one.jpg"]["verdict"] in ("fracture", "doubt", "no_fracture")
    assert "a/b/no-extension" in rows
    shutil.copy(test_split_images[1], folder / "a" / "two.jpg")
    second = run(folder, out, app_client)
    assert second["sent"] == 1 and second["skipped_as_done"] == 3
    with open(out, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 4
