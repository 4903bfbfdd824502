"""Metric code against small cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from training import metrics


def test_dice_by_hand():
    a = np.array([[1, 1, 0, 0]])
    b = np.array([[0, 1, 1, 0]])
    assert metrics.dice(a, b) == pytest.approx(2 * 1 / 4)
    assert metrics.dice(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_classification_metrics_by_hand():
    labels = [1, 1, 1, 0, 0, 0, 0, 0]
    scores = [0.9, 0.6, 0.2, 0.7, 0.3, 0.1, 0.05, 0.4]
    m = metrics.classification_metrics(labels, scores, threshold=0.5)
    # predicted positive: 0.9 (tp), 0.6 (tp), 0.7 (fp); negatives: 0.2 (fn), four tn
    assert m["confusion_matrix"] == {"tn": 4, "fp": 1, "fn": 1, "tp": 2}
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 / 3)
    # AUROC: of 15 positive/negative pairs the positive wins 5 (0.9) + 4 (0.6) + 2 (0.2) = 11
    assert m["auroc"] == pytest.approx(11 / 15)


def test_youden_threshold_separates_a_separable_set():
    t = metrics.youden_threshold([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.8])
    assert 0.3 < t <= 0.6


def test_box_iou_by_hand():
    iou = metrics.box_iou(np.array([[0, 0, 2, 2]]), np.array([[1, 1, 3, 3], [5, 5, 6, 6]]))
    assert iou[0, 0] == pytest.approx(1 / 7)
    assert iou[0, 1] == 0.0


def test_froc_by_hand():
    # Image 0: one lesion, hit by a 0.9 box; a 0.5 false positive.
    # Image 1: one lesion, hit only by a 0.3 box.
    # Image 2: no lesion, a 0.8 false positive.
    preds = [
        (np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), np.array([0.9, 0.5])),
        (np.array([[0, 0, 10, 10]]), np.array([0.3])),
        (np.array([[0, 0, 10, 10]]), np.array([0.8])),
    ]
    gts = [np.array([[0, 0, 10, 10]]), np.array([[1, 1, 10, 10]]), np.zeros((0, 4))]
    f = metrics.froc(preds, gts)
    assert list(f.thresholds) == [0.9, 0.8, 0.5, 0.3]
    assert list(f.recall) == [0.5, 0.5, 0.5, 1.0]
    assert np.allclose(f.fp_per_image, [0, 1 / 3, 2 / 3, 2 / 3])
    assert np.allclose(f.precision, [1.0, 0.5, 1 / 3, 0.5])
    op = f.operating_point(0.4)  # lowest threshold with at most 0.4 FP per image: 0.8
    assert op["threshold"] == 0.8 and op["recall"] == 0.5
    assert f.operating_point(0.7)["threshold"] == 0.3
    assert f.operating_point(0.0)["threshold"] == 0.9


def test_coco_ap_perfect_and_empty():
    gts = [np.array([[10, 10, 50, 50]]), np.zeros((0, 4))]
    perfect = [(np.array([[10, 10, 50, 50]]), np.array([0.9])), (np.zeros((0, 4)), np.zeros(0))]
    ap = metrics.coco_ap(perfect, gts, [(100, 100), (100, 100)])
    assert ap["ap50"] == pytest.approx(1.0) and ap["ap50_95"] == pytest.approx(1.0)
    miss = [(np.array([[60, 60, 90, 90]]), np.array([0.9])), (np.zeros((0, 4)), np.zeros(0))]
    assert metrics.coco_ap(miss, gts, [(100, 100), (100, 100)])["ap50"] == 0.0


def test_froc_at_a_threshold():
    preds = [(np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), np.array([0.9, 0.5]))]
    f = metrics.froc(preds, [np.array([[0, 0, 10, 10]])])
    assert f.at_threshold(0.6) == {
        "threshold": 0.6,
        "recall": 1.0,
        "precision": 1.0,
        "fp_per_image": 0.0,
    }
    assert f.at_threshold(0.5)["fp_per_image"] == 1.0
    assert f.at_threshold(0.95)["recall"] == 0.0


def test_bootstrap_detection_at_a_threshold():
    from training.metrics import bootstrap_detection_at

    preds = [
        (np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), np.array([0.9, 0.8])),  # hit + one FP
        (np.array([[0, 0, 10, 10]]), np.array([0.2])),  # below the threshold
        (np.zeros((0, 4)), np.zeros(0)),
    ]
    gts = [np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10]]), np.zeros((0, 4))]
    out = bootstrap_detection_at(preds, gts, 0.5, n_boot=200)
    assert out["recall"] == 0.5 and out["fp_per_image"] == 1 / 3
    lo, hi = out["recall_ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0


def test_paired_auroc_difference_sees_a_better_scoring_and_no_difference_in_the_same():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    weak = labels + rng.normal(0, 1.5, 300)
    strong = labels + rng.normal(0, 0.4, 300)
    same = metrics.paired_auroc_difference(labels, weak, weak, n_boot=300)
    assert same["delta"] == 0 and same["delta_ci95"] == [0.0, 0.0]
    better = metrics.paired_auroc_difference(labels, weak, strong, n_boot=300)
    assert better["auroc_b"] > better["auroc_a"] and better["delta_ci95"][0] > 0
    assert better["b_better"] == 1.0


def test_compare_pairs_two_reports_by_image(tmp_path):
    from training.data import Record
    from training.evaluate import compare, write_scores

    rng = np.random.default_rng(1)
    records = [
        Record(f"IMG{i:04d}", f"{i}.jpg", "val", bool(i % 3 == 0), "hand" if i % 2 else "leg")
        for i in range(120)
    ]
    labels = np.array([r.fractured for r in records], dtype=float)
    for name, noise in (("a", 2.0), ("b", 0.3)):
        (tmp_path / name).mkdir()
        scores = list(labels + rng.normal(0, noise, len(records)))
        write_scores(tmp_path / name / "scores.csv", records, scores, [0.0] * len(records))
    out = compare(tmp_path / "a", tmp_path / "b")
    assert out["all"]["n"] == 120 and out["all"]["delta"] > 0
    assert set(out) >= {"hand", "leg"}
    write_scores(tmp_path / "a" / "scores.csv", records[:-1], [0.0] * 119, [0.0] * 119)
    with pytest.raises(SystemExit, match="different images"):
        compare(tmp_path / "a", tmp_path / "b")
