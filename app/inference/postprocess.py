"""Detector post-processing in numpy: the service's copy of ultralytics' NMS, and Faster R-CNN.

YOLOv8 graphs are exported without NMS (output N x (4 + classes) x anchors, boxes as cx cy w h
in input pixels) so that the batch axis stays dynamic and the threshold stays a request
parameter; NMS runs here. It follows ultralytics' non_max_suppression for one class: drop
scores below the threshold, greedy IoU suppression, keep at most max_det boxes.
"""

from __future__ import annotations

import numpy as np

MAX_DETECTIONS = 300


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices in descending score order."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def yolo_detections(
    output: np.ndarray,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int = MAX_DETECTIONS,
) -> tuple[np.ndarray, np.ndarray]:
    """One image's raw YOLOv8 output (4 + nc, anchors) -> (boxes xyxy (k, 4), scores (k,))."""
    preds = output.T  # anchors x (4 + nc)
    scores = preds[:, 4:].max(axis=1)
    keep = scores > score_threshold
    preds, scores = preds[keep], scores[keep]
    if preds.shape[0] == 0:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
    cx, cy, w, h = preds[:, 0], preds[:, 1], preds[:, 2], preds[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    # ultralytics caps the candidates before NMS (max_nms = 30000); same here.
    top = np.argsort(-scores, kind="stable")[:30000]
    boxes, scores = boxes[top], scores[top]
    kept = nms(boxes, scores, iou_threshold)[:max_detections]
    return boxes[kept].astype(np.float32), scores[kept].astype(np.float32)


def rcnn_detections(
    boxes: np.ndarray, scores: np.ndarray, score_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Faster R-CNN graphs carry their own NMS; only the operating-point threshold is applied."""
    keep = scores > score_threshold
    order = np.argsort(-scores[keep], kind="stable")
    return boxes[keep][order].astype(np.float32), scores[keep][order].astype(np.float32)
