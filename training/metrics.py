"""Metrics of every family: Dice, classification at a threshold, AUROC, AP (COCO), FROC.

Boxes are xyxy in one frame per image. A detection "hits" a lesion when their IoU reaches
`iou_threshold` (0.5, as AP50). FROC: lesion recall against mean false positives per image,
over all images (negatives count: that is where most false positives happen).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.inference.model_card import FP_RATES, Verdict
from app.inference.operating_point import fit_row


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two binary masks; two empty masks agree perfectly."""
    p, t = pred.astype(bool), target.astype(bool)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2 * np.logical_and(p, t).sum() / denom)


def youden_threshold(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Threshold maximising sensitivity + specificity - 1 (the rule our cards use, on val)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(np.asarray(labels), np.asarray(scores))
    best = int(np.argmax(tpr - fpr))
    return float(min(1.0, thr[best]))


def classification_metrics(
    labels: Sequence[int], scores: Sequence[float], threshold: float
) -> dict:
    """Accuracy, precision, recall (sensitivity), specificity, F1, AUROC, confusion matrix."""
    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=float)
    pred = (s >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    out = {
        "n": int(len(y)),
        "threshold": float(threshold),
        "accuracy": (tp + tn) / len(y) if len(y) else 0.0,
        "precision": precision,
        "recall": recall,
        "sensitivity": recall,
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "auroc": None,
    }
    if 0 < y.sum() < len(y):
        from sklearn.metrics import roc_auc_score

        out["auroc"] = float(roc_auc_score(y, s))
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes, shape (len(a), len(b))."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


@dataclass
class Froc:
    """FROC as step functions of the score threshold (descending)."""

    thresholds: np.ndarray
    recall: np.ndarray
    fp_per_image: np.ndarray
    precision: np.ndarray
    n_images: int
    n_lesions: int

    def operating_point(self, fp_rate: float) -> dict:
        """Lowest threshold whose mean false positives per image stay within fp_rate (the rule
        the service reads back: app.inference.operating_point)."""
        return fit_row(self.thresholds, self.recall, self.fp_per_image, self.precision, fp_rate)

    def at_threshold(self, threshold: float) -> dict:
        """Recall, precision and mean FP/image of the boxes scoring at least `threshold`."""
        ok = np.flatnonzero(self.thresholds >= threshold - 1e-12)
        if ok.size == 0:
            return {"threshold": threshold, "recall": 0.0, "precision": 1.0, "fp_per_image": 0.0}
        i = int(ok[-1])
        return {
            "threshold": threshold,
            "recall": float(self.recall[i]),
            "precision": float(self.precision[i]),
            "fp_per_image": float(self.fp_per_image[i]),
        }

    def table(self, rates: Sequence[float] = FP_RATES) -> list[dict]:
        return [self.operating_point(r) for r in rates]

    def recall_at(self, fp_rate: float) -> float:
        return self.operating_point(fp_rate)["recall"]

    def cpm(self, rates: Sequence[float] = (0.125, 0.25, 0.5, 1, 2, 4, 8)) -> float:
        """Competition performance metric: mean recall at the standard FP rates."""
        return float(np.mean([self.recall_at(r) for r in rates]))


def froc(
    predictions: Sequence[tuple[np.ndarray, np.ndarray]],
    ground_truth: Sequence[np.ndarray],
    iou_threshold: float = 0.5,
) -> Froc:
    """predictions[i] = (boxes (k, 4), scores (k,)); ground_truth[i] = boxes (m, 4)."""
    pred_scores, pred_hit, lesion_best = [], [], []
    for (boxes, scores), gt in zip(predictions, ground_truth, strict=True):
        boxes = np.asarray(boxes).reshape(-1, 4)
        scores = np.asarray(scores, dtype=float).reshape(-1)
        gt = np.asarray(gt).reshape(-1, 4)
        iou = box_iou(boxes, gt) if len(gt) else np.zeros((len(boxes), 0))
        hits = iou >= iou_threshold
        pred_scores.append(scores)
        pred_hit.append(hits.any(axis=1) if len(gt) else np.zeros(len(boxes), bool))
        for j in range(len(gt)):
            lesion_best.append(scores[hits[:, j]].max() if hits[:, j].any() else -np.inf)
    scores = np.concatenate(pred_scores) if pred_scores else np.zeros(0)
    hit = np.concatenate(pred_hit) if pred_hit else np.zeros(0, bool)
    best = np.asarray(lesion_best, dtype=float)
    n_images, n_lesions = len(ground_truth), len(best)
    thresholds = np.unique(scores)[::-1]
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_hit = scores[order], hit[order]
    # Counts of predictions with score >= t, for each threshold t.
    upto = np.searchsorted(-sorted_scores, -thresholds, side="right")
    cum_fp = np.concatenate([[0], np.cumsum(~sorted_hit)])[upto]
    cum_tp = np.concatenate([[0], np.cumsum(sorted_hit)])[upto]
    lesion_sorted = np.sort(best)
    found = len(best) - np.searchsorted(lesion_sorted, thresholds, side="left")
    recall = found / n_lesions if n_lesions else np.zeros_like(thresholds)
    precision = np.where(upto > 0, cum_tp / np.maximum(upto, 1), 1.0)
    return Froc(
        thresholds=thresholds,
        recall=np.asarray(recall, dtype=float),
        fp_per_image=cum_fp / max(n_images, 1),
        precision=precision,
        n_images=n_images,
        n_lesions=n_lesions,
    )


def coco_ap(
    predictions: Sequence[tuple[np.ndarray, np.ndarray]],
    ground_truth: Sequence[np.ndarray],
    sizes: Sequence[tuple[int, int]],
) -> dict:
    """AP50 and AP50-95 (COCO definition, one class) with faster-coco-eval."""
    from faster_coco_eval import COCO, COCOeval_faster

    images, gts, dts = [], [], []
    for i, ((boxes, scores), gt, (w, h)) in enumerate(
        zip(predictions, ground_truth, sizes, strict=True)
    ):
        images.append({"id": i, "width": int(w), "height": int(h)})
        for b in np.asarray(gt).reshape(-1, 4):
            bw, bh = float(b[2] - b[0]), float(b[3] - b[1])
            gts.append(
                {
                    "id": len(gts) + 1,
                    "image_id": i,
                    "category_id": 1,
                    "iscrowd": 0,
                    "bbox": [float(b[0]), float(b[1]), bw, bh],
                    "area": bw * bh,
                }
            )
        for b, s in zip(
            np.asarray(boxes).reshape(-1, 4), np.asarray(scores).reshape(-1), strict=True
        ):
            dts.append(
                {
                    "image_id": i,
                    "category_id": 1,
                    "score": float(s),
                    "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                }
            )
    if not gts:
        return {"ap50": None, "ap50_95": None}
    coco_gt = COCO(
        {"images": images, "annotations": gts, "categories": [{"id": 1, "name": "fracture"}]}
    )
    if not dts:
        return {"ap50": 0.0, "ap50_95": 0.0}
    coco_dt = coco_gt.loadRes(dts)
    ev = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=lambda *a, **k: None)
    ev.params.maxDets = [1, 10, 100]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return {"ap50": max(0.0, float(ev.stats[1])), "ap50_95": max(0.0, float(ev.stats[0]))}


def bootstrap_classification(
    labels: Sequence[int],
    scores: Sequence[float],
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """95% percentile-bootstrap intervals (images resampled with replacement) of AUROC, accuracy,
    sensitivity and specificity at `threshold`: {metric: [low, high]}."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).astype(int)
    s = np.asarray(scores, dtype=float)
    rng = np.random.default_rng(seed)
    rows: dict[str, list[float]] = {
        "auroc": [],
        "accuracy": [],
        "sensitivity": [],
        "specificity": [],
    }
    pred = s >= threshold
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        yb, sb, pb = y[idx], s[idx], pred[idx]
        pos, neg = yb == 1, yb == 0
        if pos.any() and neg.any():
            rows["auroc"].append(roc_auc_score(yb, sb))
        rows["accuracy"].append(float((pb == pos).mean()))
        if pos.any():
            rows["sensitivity"].append(float(pb[pos].mean()))
        if neg.any():
            rows["specificity"].append(float((~pb[neg]).mean()))
    return {
        k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None
        for k, v in rows.items()
    }


def paired_auroc_difference(
    labels: Sequence[int],
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """AUROC of two scorings of the same images and a 95% paired-bootstrap interval of b - a
    (the same resampled images score both, so what the images share cancels); `b_better`: the
    share of resamples in which b ranks better."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).astype(int)
    a, b = np.asarray(scores_a, dtype=float), np.asarray(scores_b, dtype=float)
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):
            deltas.append(roc_auc_score(y[idx], b[idx]) - roc_auc_score(y[idx], a[idx]))
    auroc_a, auroc_b = float(roc_auc_score(y, a)), float(roc_auc_score(y, b))
    return {
        "n": int(len(y)),
        "auroc_a": auroc_a,
        "auroc_b": auroc_b,
        "delta": auroc_b - auroc_a,
        "delta_ci95": [float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5))],
        "b_better": float(np.mean(np.asarray(deltas) > 0)),
    }


def auroc_by_group(labels: Sequence[int], scores: Sequence[float], groups: Sequence[str]) -> dict:
    """AUROC with its bootstrap interval per group (e.g. body region); None where a group lacks
    one of the classes."""
    y, s, g = np.asarray(labels).astype(int), np.asarray(scores, dtype=float), np.asarray(groups)
    out = {}
    for name in sorted(set(g.tolist())):
        m = g == name
        point = classification_metrics(y[m], s[m], 0.5)["auroc"]
        ci = bootstrap_classification(y[m], s[m], 0.5, n_boot=500)["auroc"] if point else None
        out[name] = {"n": int(m.sum()), "fractured": int(y[m].sum()), "auroc": point, "ci95": ci}
    return out


def detection_counts(
    predictions: Sequence[tuple[np.ndarray, np.ndarray]],
    ground_truth: Sequence[np.ndarray],
    threshold: float,
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: (lesions found, lesions, false boxes) by the boxes scoring >= threshold, a
    lesion found by a box overlapping it at iou_threshold (FROC's definitions)."""
    hits, lesions, fps = [], [], []
    for (boxes, scores), gt in zip(predictions, ground_truth, strict=True):
        keep = np.asarray(scores, dtype=float).reshape(-1) >= threshold
        boxes = np.asarray(boxes).reshape(-1, 4)[keep]
        gt = np.asarray(gt).reshape(-1, 4)
        iou = box_iou(boxes, gt) >= iou_threshold if len(gt) and len(boxes) else None
        hits.append(int(iou.any(axis=0).sum()) if iou is not None else 0)
        lesions.append(len(gt))
        fps.append(int((~iou.any(axis=1)).sum()) if iou is not None else len(boxes))
    return tuple(np.asarray(v, dtype=float) for v in (hits, lesions, fps))  # type: ignore[return-value]


def paired_recall_difference(
    ground_truth: Sequence[np.ndarray],
    predictions_a: Sequence[tuple[np.ndarray, np.ndarray]],
    threshold_a: float,
    predictions_b: Sequence[tuple[np.ndarray, np.ndarray]],
    threshold_b: float,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Lesion recall of two detectors on the same images, each at its own threshold, and a 95%
    paired-bootstrap interval of b - a (images resampled, both counted on the same draw);
    `b_better`: the share of resamples in which b finds more lesions. FP/image of each."""
    ha, n, fa = detection_counts(predictions_a, ground_truth, threshold_a)
    hb, _, fb = detection_counts(predictions_b, ground_truth, threshold_b)
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(n), len(n))
        if n[idx].sum():
            deltas.append((hb[idx].sum() - ha[idx].sum()) / n[idx].sum())
    total = float(n.sum())
    return {
        "n": int(len(n)),
        "lesions": int(total),
        "recall_a": float(ha.sum() / total) if total else None,
        "recall_b": float(hb.sum() / total) if total else None,
        "delta": float((hb.sum() - ha.sum()) / total) if total else None,
        "delta_ci95": [float(np.percentile(deltas, q)) for q in (2.5, 97.5)] if deltas else None,
        "b_better": float(np.mean(np.asarray(deltas) > 0)) if deltas else 0.0,
        "fp_per_image_a": float(fa.mean()) if len(fa) else 0.0,
        "fp_per_image_b": float(fb.mean()) if len(fb) else 0.0,
    }


def bootstrap_detection_at(
    predictions: Sequence[tuple[np.ndarray, np.ndarray]],
    ground_truth: Sequence[np.ndarray],
    threshold: float,
    iou_threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Lesion recall and mean FP/image of the boxes scoring >= threshold (FROC's definitions),
    with 95% percentile-bootstrap intervals over images."""
    h, n, f = detection_counts(predictions, ground_truth, threshold, iou_threshold)
    rng = np.random.default_rng(seed)
    recalls, rates = [], []
    for _ in range(n_boot):
        idx = rng.integers(0, len(h), len(h))
        if n[idx].sum():
            recalls.append(h[idx].sum() / n[idx].sum())
        rates.append(f[idx].mean())
    return {
        "threshold": float(threshold),
        "recall": float(h.sum() / n.sum()) if n.sum() else None,
        "recall_ci95": [float(np.percentile(recalls, q)) for q in (2.5, 97.5)] if recalls else None,
        "fp_per_image": float(f.mean()) if len(f) else 0.0,
        "fp_per_image_ci95": [float(np.percentile(rates, q)) for q in (2.5, 97.5)],
    }


# The three-level verdict (training/verdict.py fits its thresholds): which level each score gets,
# and the shares and rates it gives.
VERDICT_LEVELS = ("fracture", "doubt", "no_fracture")


def levels_of(scores: np.ndarray, verdict: Verdict) -> np.ndarray:
    """Each score's level, by the card's own rule (Verdict.level, what the service answers)."""
    return np.array([verdict.level(float(s)) for s in np.asarray(scores, dtype=float)])


def verdict_rates(y: np.ndarray, level: np.ndarray) -> dict[str, float]:
    pos, neg = y == 1, y == 0
    out = {f"share_{name}": float(np.mean(level == name)) for name in VERDICT_LEVELS}
    out["sensitivity_fracture_or_doubt"] = float(np.mean(level[pos] != "no_fracture"))
    out["specificity_fracture"] = float(np.mean(level[neg] != "fracture"))
    out["sensitivity_fracture"] = float(np.mean(level[pos] == "fracture"))
    out["specificity_no_fracture"] = float(np.mean(level[neg] == "no_fracture"))
    return out


def verdict_figures(
    labels: np.ndarray, scores: np.ndarray, verdict: Verdict, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Shares of each level, the sensitivity of fracture-or-doubt and the specificity of
    fracture (and their two counterparts), with bootstrap 95% intervals over images."""
    y, level = np.asarray(labels).astype(int), levels_of(scores, verdict)
    point = verdict_rates(y, level)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(idx):
            draws.append(verdict_rates(y[idx], level[idx]))
    return {
        key: {
            "value": round(value, 4),
            "ci95": [
                round(float(np.quantile([d[key] for d in draws], q)), 4) for q in (0.025, 0.975)
            ],
        }
        for key, value in point.items()
    }
