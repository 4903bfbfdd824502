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
        fracture=True,
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


def report(probabilities: list[float], threshold: float):
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
                fracture=p >= threshold,
                boxes=np.zeros((0, 4), np.float32),
                scores=np.zeros(0, np.float32),
            )
        )
    point = {"detector_threshold": 0.667, "fp_per_image": 0.4, "decision_threshold": threshold}
    algorithms = Algorithms(("cropper-unet", "2"), ("classifier-x", "1"), ("detector-y", "1"))
    return build_sr(findings, point, algorithms, "1.2.3.9")


def test_the_sr_says_present_or_absent_for_every_image_with_its_threshold():
    """Read back as a reporting tool would (highdicom): one verdict per image, negatives too,
    and the decision threshold the probability was judged by."""
    import highdicom as hd

    sr = hd.sr.ComprehensiveSR.from_dataset(report([0.81, 0.12], threshold=0.4))
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 2
    verdicts = []
    for group in groups:
        evaluations = group.get_qualitative_evaluations()
        assert len(evaluations) == 1 and evaluations[0].name.meaning == "Fracture"
        verdicts.append(evaluations[0].value.meaning)
        thresholds = [m.value for m in group.get_measurements() if m.name.value == "FRACTHR"]
        assert thresholds == [0.4]
    assert verdicts == ["Present", "Absent"]


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
        fracture=False,
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
