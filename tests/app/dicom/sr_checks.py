"""What the SR must say about a study's JSON findings, shared by the STOW and Orthanc tests."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset


def assert_regions_match(sr: Dataset, detections: list[dict], source_sop_uid: str) -> None:
    """Each detection is a closed SCOORD polyline on the source instance with the same score.
    The SR carries the exact boxes; the JSON rounds them to 0.1 px."""
    rois = hd.sr.ComprehensiveSR.from_dataset(sr).content.get_planar_roi_measurement_groups()
    assert len(rois) == len(detections)
    for roi, det in zip(rois, detections, strict=True):
        x1, y1, x2, y2 = det["box"]
        assert np.allclose(
            roi.roi.value, [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], atol=0.051
        )
        referenced = roi.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        assert referenced == source_sop_uid
        assert roi.get_measurements()[0].value == pytest.approx(det["score"], abs=1e-4)


def measurement_algorithms(item: Dataset, out: dict[str, list[str]] | None = None) -> dict:
    """Concept code of every measurement in the SR tree -> the Algorithm Names (DCM 111001)
    attached to it (read from the raw dataset, as a PACS would)."""
    out = {} if out is None else out
    for child in item.get("ContentSequence", []):
        code = child.ConceptNameCodeSequence[0].CodeValue
        if child.ValueType == "NUM":
            names = [
                str(g.TextValue)
                for g in child.get("ContentSequence", [])
                if g.ConceptNameCodeSequence[0].CodeValue == "111001"
            ]
            out.setdefault(code, []).append(names)
        measurement_algorithms(child, out)
    return out


def assert_provenance(sr: Dataset, models: dict[str, dict]) -> None:
    """Each measurement names the model that made it; every model's version is in the SR; the
    local coding scheme is declared."""
    found = measurement_algorithms(sr)
    assert found["FRACPROB"] and all(n == [models["classifier"]["name"]] for n in found["FRACPROB"])
    for code in ("FRACSCORE", "DETTHR"):
        assert all(n == [models["detector"]["name"]] for n in found.get(code, []))
    versions = list(sr.SoftwareVersions)
    for role in ("cropper", "classifier", "detector"):
        assert f"{models[role]['name']} {models[role]['version']}" in versions
    schemes = [s.CodingSchemeDesignator for s in sr.CodingSchemeIdentificationSequence]
    assert "99FRACTURE" in schemes
