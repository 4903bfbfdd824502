"""The secondary capture a radiologist sees in the PACS: readable labels next to their boxes,
no made-up orientation."""

from __future__ import annotations

import numpy as np

from app.dicom.results import ImageFindings, build_secondary_capture, source_header
from tests.conftest import bone_phantom
from tests.dicom_factory import make_dataset


def capture(height: int, width: int, boxes: list[list[float]], orientation=None):
    pixels = bone_phantom(height, width)
    ds = make_dataset(pixels.astype(np.uint16) * 8, bits_stored=12)
    if orientation:
        ds.PatientOrientation = orientation
    finding = ImageFindings(
        source=source_header(ds),
        pixels=pixels.astype(np.float32),
        probability=0.8,
        verdict="fracture",
        boxes=np.asarray(boxes, np.float32),
        scores=np.full(len(boxes), 0.6, np.float32),
    )
    return build_secondary_capture(finding, "1.2.3.4", 1)


def label_rows(rgb: np.ndarray, x1: int, x2: int, y1: int, y2: int) -> np.ndarray:
    """Rows of a region that hold label pixels (the yellow text colour)."""
    region = rgb[y1:y2, x1:x2].astype(int)
    yellow = (region[..., 0] > 200) & (region[..., 1] > 170) & (region[..., 2] < 80)
    return np.flatnonzero(yellow.any(axis=1)) + y1


def test_label_scales_with_the_image_and_sits_at_its_box():
    h, w = 1800, 1500
    box = [600, 900, 800, 1100]
    rgb = capture(h, w, [box]).pixel_array
    above = label_rows(rgb, 600, 900, 800, 899)  # the strip right above the box
    assert len(above) >= min(h, w) / 60  # text height ~ 1/40 of the short side, not 11 px
    assert above.max() >= 880  # adjacent to the box, not 84 px above it
    header = label_rows(rgb, 0, w, 0, 120)
    assert len(header) >= min(h, w) / 60


def test_orientation_is_copied_or_left_empty():
    assert capture(300, 240, [[10, 10, 60, 60]], orientation=["A", "F"]).PatientOrientation == [
        "A",
        "F",
    ]
    assert not capture(300, 240, [[10, 10, 60, 60]]).get("PatientOrientation")


def test_the_capture_is_lossless_rle_with_its_laterality():
    sc = capture(300, 240, [[10, 10, 60, 60]])
    assert sc.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"  # RLE Lossless
    assert "Laterality" in sc and not sc.Laterality  # Type 2C: present, empty without a source


def test_the_capture_passes_dciodvfy(tmp_path):
    """dicom3tools' IOD checker (Debian dicom3tools): no error in the secondary capture."""
    import shutil
    import subprocess

    import pytest

    from app.dicom.results import encode

    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    path = tmp_path / "sc.dcm"
    path.write_bytes(encode(capture(300, 240, [[10, 10, 60, 60]])))
    out = subprocess.run([tool, str(path)], capture_output=True, text=True)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def report(probabilities: list[float], threshold: float, no_fracture_below: float = 0.2):
    from app.dicom.results import Algorithms, build_sr

    findings = []
    for i, p in enumerate(probabilities):
        pixels = bone_phantom(300, 240)
        ds = make_dataset(pixels.astype(np.uint16) * 8, bits_stored=12)
        ds.SOPInstanceUID = f"1.2.3.4.5.{i + 1}"
        findings.append(
            ImageFindings(
                source=source_header(ds),
                pixels=pixels.astype(np.float32),
                probability=p,
                verdict="fracture"
                if p >= threshold
                else "no_fracture"
                if p < no_fracture_below
                else "doubt",
                boxes=np.zeros((0, 4), np.float32),
                scores=np.zeros(0, np.float32),
            )
        )
    point = {
        "detector_threshold": 0.667,
        "fp_per_image": 0.4,
        "decision_threshold": threshold,
        "no_fracture_below": no_fracture_below,
        "fracture_from": threshold,
    }
    algorithms = Algorithms(("cropper-unet", "2"), ("classifier-x", "1"), ("detector-y", "1"))
    return build_sr(findings, point, algorithms, "1.2.3.9")


def test_the_sr_says_present_or_absent_and_the_triage_verdict_for_every_image():
    """Read back as a reporting tool would (highdicom): per image, negatives too, Fracture
    Present / Absent, the three-level verdict (Present / Equivocal / Absent) and the thresholds
    the probability was judged by."""
    import highdicom as hd

    sr = hd.sr.ComprehensiveSR.from_dataset(report([0.81, 0.3, 0.12], threshold=0.4))
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 3
    verdicts = []
    for group in groups:
        evaluations = {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()}
        assert set(evaluations) == {"Fracture", "Fracture triage verdict"}
        verdicts.append((evaluations["Fracture"], evaluations["Fracture triage verdict"]))
        values = {m.name.value: m.value for m in group.get_measurements()}
        assert values["FRACTHR"] == values["FRACFROM"] == 0.4 and values["FRACNOBELOW"] == 0.2
    assert verdicts == [("Present", "Present"), ("Absent", "Equivocal"), ("Absent", "Absent")]


def test_the_sr_passes_dciodvfy(tmp_path):
    import shutil
    import subprocess

    import pytest

    from app.dicom.results import encode

    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode(report([0.81, 0.12], threshold=0.4)))
    out = subprocess.run([tool, str(path)], capture_output=True, text=True)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def test_uids_are_ours_never_pydicoms_example_root():
    from app.dicom.results import DEVICE_UID, build_secondary_capture

    sr = report([0.5], threshold=0.4)
    assert sr.SOPInstanceUID.startswith("2.25.") and DEVICE_UID.startswith("2.25.")
    assert DEVICE_UID in str(sr) and "1.2.826.0.1.3680043.10.1287" not in str(sr)
    pixels = bone_phantom(200, 160)
    finding = ImageFindings(
        source=source_header(make_dataset(pixels.astype(np.uint16) * 8, bits_stored=12)),
        pixels=pixels.astype(np.float32),
        probability=0.2,
        verdict="no_fracture",
        boxes=np.zeros((0, 4), np.float32),
        scores=np.zeros(0, np.float32),
    )
    sc = build_secondary_capture(finding, "1.2.3.4", 1, uid_root="1.2.999.77.")
    assert sc.SOPInstanceUID.startswith("1.2.999.77.")


def test_a_uid_root_must_look_like_one():
    import pytest
    from pydantic import ValidationError

    from app.core.config import Settings

    assert Settings(uid_root="1.2.999.77.").uid_root == "1.2.999.77."
    for bad in ("1.2.999.77", "abc.", "1.02.3.", "1." * 30):
        with pytest.raises(ValidationError):
            Settings(uid_root=bad)


def test_the_sr_says_when_an_image_is_outside_validated_conditions():
    """An image flagged out of distribution: its ood_score as a measurement and the flag as a
    qualitative evaluation a reporting tool can read; the capture says it in words."""
    import highdicom as hd

    from app.dicom.results import Algorithms, build_secondary_capture, build_sr

    findings = []
    for i, (score, flagged) in enumerate(((0.9, False), (3.2, True))):
        pixels = bone_phantom(300, 240)
        ds = make_dataset(pixels.astype(np.uint16) * 8, bits_stored=12)
        ds.SOPInstanceUID = f"1.2.3.4.6.{i + 1}"
        findings.append(
            ImageFindings(
                source=source_header(ds),
                pixels=pixels.astype(np.float32),
                probability=0.3,
                verdict="doubt",
                boxes=np.zeros((0, 4), np.float32),
                scores=np.zeros(0, np.float32),
                ood_score=score,
                out_of_distribution=flagged,
            )
        )
    point = {"detector_threshold": 0.667, "fp_per_image": 0.4, "decision_threshold": 0.4}
    algorithms = Algorithms(("cropper-unet", "2"), ("classifier-x", "1"), ("detector-y", "1"))
    sr = hd.sr.ComprehensiveSR.from_dataset(build_sr(findings, point, algorithms, "1.2.3.9"))
    seen = []
    for group in sr.content.get_image_measurement_groups():
        evaluations = {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()}
        values = {m.name.value: m.value for m in group.get_measurements()}
        seen.append((evaluations["Outside validated conditions"], values["FRACOOD"]))
    assert seen == [("Absent", 0.9), ("Present", 3.2)]
    plain = build_secondary_capture(findings[0], "1.2.3.4", 1)
    flagged = build_secondary_capture(findings[1], "1.2.3.4", 2)
    # the flagged capture carries one more line of burned-in text
    rows = [
        int((label_rows(c.pixel_array, 0, c.Columns // 2, 0, c.Rows // 2)).size)
        for c in (plain, flagged)
    ]
    assert rows[1] > rows[0]
