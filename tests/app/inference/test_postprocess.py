"""The service's YOLO post-processing: NMS and decoding, against ultralytics' own."""

from __future__ import annotations

import numpy as np
import pytest

from app.inference.postprocess import nms, yolo_detections


def test_nms_and_yolo_decoding():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert list(nms(boxes, scores, 0.7)) == [0, 2]
    raw = np.array(
        [[5, 5.5, 25], [5, 5.5, 25], [10, 9, 10], [10, 9, 10], [0.9, 0.8, 0.05]], np.float32
    )
    out_boxes, out_scores = yolo_detections(raw, 0.1, 0.7)
    assert np.allclose(out_boxes, [[0, 0, 10, 10]]) and np.allclose(out_scores, [0.9])


def test_yolo_postprocessing_equals_ultralytics_nms():
    """The service's numpy NMS against ultralytics' non_max_suppression on the same raw output
    (random boxes, tie-free scores, heavy overlap): the same boxes, the same scores."""
    torch = pytest.importorskip("torch")
    nms_module = pytest.importorskip("ultralytics.utils.nms")
    rng = np.random.default_rng(3)
    anchors = 2000
    centres = rng.uniform(20, 300, (2, anchors))
    sizes = rng.uniform(5, 80, (2, anchors))
    scores = rng.permutation(np.linspace(0.0005, 0.99, anchors))  # distinct: no ties
    raw = np.concatenate([centres, sizes, scores[None]]).astype(np.float32)  # 5 x anchors
    for threshold in (0.001, 0.25, 0.6):
        ours_boxes, ours_scores = yolo_detections(raw, threshold, 0.7)
        ref = nms_module.non_max_suppression(
            torch.from_numpy(raw[None]), conf_thres=threshold, iou_thres=0.7
        )[0]
        ref = ref.numpy()
        assert len(ours_boxes) == len(ref) > 0
        assert np.allclose(ours_boxes, ref[:, :4], atol=1e-3) and np.allclose(
            ours_scores, ref[:, 4], atol=1e-6
        )
