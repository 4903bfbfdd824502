"""The retrospective runner: a nested folder through the service, one CSV row per file (refused
files with their error), resumed where a first run stopped; with --sr, DICOM through STOW-RS and
each analysis' own SR saved."""

from __future__ import annotations

import csv
import shutil

import pydicom

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


def test_sr_sends_dicom_through_stow_and_keeps_each_analysis_results(
    app_client, tmp_path, test_split_images, dicom_dir
):
    folder = tmp_path / "month"
    folder.mkdir()
    shutil.copy(test_split_images[0], folder / "one.jpg")
    shutil.copy(dicom_dir / "RG3_UNC.dcm", folder / "wrist.dcm")
    shutil.copy(dicom_dir / "CR-MONO1-10-chest.dcm", folder / "chest.dcm")
    sr_dir = tmp_path / "sr"
    out = tmp_path / "audit.csv"
    counts = run(folder, out, app_client, concurrency=1, sr_dir=sr_dir)
    assert counts["analysed"] == 2 and counts["refused"] == 1 and counts["result_objects"] >= 1
    with open(out, newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    # STOW-RS refuses the chest film with its reason, as /v1/predict would name it
    assert rows["chest.dcm"]["status"] == "409" and rows["chest.dcm"]["error"] == "out_of_scope"
    source = pydicom.dcmread(dicom_dir / "RG3_UNC.dcm", stop_before_pixels=True)
    assert rows["wrist.dcm"]["verdict"] in ("fracture", "doubt", "no_fracture")
    saved = sorted((sr_dir / source.StudyInstanceUID).glob("*.dcm"))
    modalities = {pydicom.dcmread(p).Modality for p in saved}
    assert "SR" in modalities
    assert not (sr_dir / "one.jpg").exists() and len(list(sr_dir.iterdir())) == 1
    # an analysis that is not this study's: 404; a result_id that is no id: 422
    study = f"/dicomweb/studies/{source.StudyInstanceUID}"
    assert app_client.get(study, params={"result_id": "0" * 12}).status_code == 404
    assert app_client.get(study, params={"result_id": "../x"}).status_code == 422
