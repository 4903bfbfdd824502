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
