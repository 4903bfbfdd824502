"""Adapt the served models to a site from its own labelled images, and prove it.

    python -m training adapt --folder /data/site --out models-site [--site "St Elsewhere"]
    python -m training adapt --folder /data/site --out models-site --detector-epochs 3
    python -m training adapt --folder /data/site --out models-site --classifier-epochs 4

SITE is the release layout or a folder of DICOM/PNG/JPEG files with a manifest (training/site.py).
A seeded, stratified part of the site's images (HOLD_OUT, by patient where the DICOMs say) is kept
out; the rest ("tune") adapts:

1. the classifier's last layer (app/inference/site_head.py): a logistic regression on the base
   classifier's logit and its pooled features, fitted on the tune images mixed with FracAtlas
   training images of equal total weight (so FracAtlas is not forgotten), its L2 strength chosen
   by cross-validation on the tune images;
2. the probability's calibration, the decision threshold, the three-level verdict and the
   detector's FP/image table, refitted on the tune images (as `calibrate` does), at the base
   card's fusion weight;
3. the familiarity reference's threshold, so that 95% of the site's tune images pass;
4. with `--detector-epochs N`, the detector (Faster R-CNN only): fine-tuned N epochs from the
   served graph on the tune images' crops as the service takes them, mixed with as many
   FracAtlas crops (training/site_detector.py); it ships only if its lesion recall at the
   0.4 FP/image threshold fitted on the tune images beats the base's on the held-out site
   images in SHIP_CERTAINTY of paired resamples and its FracAtlas val FROC recall falls at
   most MAX_FRACATLAS_RECALL_LOSS; steps 1-3 are then fitted with its answers (the fused score
   follows the new file).
5. with `--classifier-epochs N`, in place of step 1: the ensemble's second member fine-tuned N
   epochs from the served graph on the tune images' crops (box supervision where boxes are
   known), mixed with as many FracAtlas crops (training/site_classifier.py); the first member,
   whose features the familiarity reads, stays as served. Guarded as step 1 is.

The guard: the adapted models ship in OUT only if, on the held-out site images, their served
AUROC beats the base's in at least 95% of paired bootstrap resamples, and on FracAtlas val they
lose at most MAX_FRACATLAS_LOSS; otherwise OUT holds the base models with the site's
recalibration only, and the summary says why. OUT is a complete models folder: serve it with
FRACTURE_MODELS_DIR=OUT. Its classifier card names the site, the images (count and a digest of
their list), the base models and the paired figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.inference.model_card import (
    Calibration,
    Fusion,
    SiteAdaptation,
)
from app.inference.pipeline import ImageWork, run_study
from app.inference.plan import Plan
from app.inference.runtime import sha256_of
from app.inference.site_head import SiteHead
from training import export, metrics
from training.calibrate import fit_scores
from training.common import MODELS_DIR
from training.data import Record, load_records
from training.detection import froc_operating_points
from training.evaluate import decode_record, served_plan
from training.familiarity import PROBE_MARGIN
from training.progress import progress
from training.site import SiteDataError, SiteImages, load_site
from training.site_classifier import LR_FRACTION
from training.verdict import fit_verdict

HOLD_OUT = 0.3
FRACATLAS_MIX = 600  # FracAtlas train images the head also sees
MAX_FRACATLAS_LOSS = 0.01
SHIP_CERTAINTY = 0.95  # share of paired resamples in which an adaptation must beat the base
MAX_FRACATLAS_RECALL_LOSS = 0.03  # the detector's: FROC recall at DETECTOR_FP_RATE on val
DETECTOR_FP_RATE = 0.4
C_GRID = (0.003, 0.01, 0.03, 0.1)
LOGIT_SCALE = 1.0


@dataclass
class Scored:
    """What the served pipeline said about images: raw classifier probability, best box, the
    pooled features, the served probability, boxes; and the labels and truth."""

    raw: list[float] = field(default_factory=list)
    max_box: list[float] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    served: list[float] = field(default_factory=list)
    preds: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    gts: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    patients: list[str | None] = field(default_factory=list)

    def take(self, idx: np.ndarray) -> Scored:
        out = Scored()
        for name in ("raw", "max_box", "features", "served", "preds", "gts", "labels", "patients"):
            values = getattr(self, name)
            setattr(out, name, [values[i] for i in idx])
        return out


def score(
    plan: Plan,
    records: list[Record],
    what: str,
    deadline: float | None = None,
    on_work: Callable[[Record, ImageWork, np.ndarray], None] | None = None,
) -> Scored:
    """Run the served pipeline (every box down to the plan's floor) on `records`; `on_work`
    sees each analysed image with its truth boxes in frame pixels (while its crop exists)."""
    out = Scored()
    for start in progress(range(0, len(records), 8), what):
        if deadline is not None and time.monotonic() > deadline:
            raise SiteDataError(f"--minutes ran out while scoring {what}")
        chunk = records[start : start + 8]
        works, boxes = [], []
        for rec in chunk:
            image, normalised = decode_record(rec, "none")
            works.append(ImageWork(image=image, decode_ms=0.0))
            boxes.append(normalised)
        run_study(works, plan)
        for rec, w, b in zip(chunk, works, boxes, strict=True):
            if w.features is None:
                raise SiteDataError(
                    f"{plan.classifier.name} exposes no pooled features: ship its familiarity "
                    "first (python -m training familiarity --write-card)"
                )
            h, wd = w.image.height, w.image.width
            out.raw.append(w.classifier_probability)
            out.max_box.append(w.max_box_score)
            out.features.append(w.features)
            out.served.append(w.probability)
            out.preds.append((w.boxes, w.scores))
            out.gts.append(b * np.array([wd, h, wd, h], np.float32))
            out.labels.append(int(rec.fractured))
            out.patients.append(w.image.patient_key)
            if on_work is not None:
                on_work(rec, w, out.gts[-1])
    return out


def split_tune_check(
    labels: list[int], patients: list[str | None], seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the tune and held-out images: HOLD_OUT of the patients (an image without a
    PatientID is its own patient), drawn within fractured and unfractured apart."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        groups.setdefault(p or f"image-{i}", []).append(i)
    check: list[int] = []
    for positive in (True, False):
        keys = [k for k, idx in groups.items() if any(labels[i] for i in idx) == positive]
        rng.shuffle(keys)
        for k in keys[: max(1, round(HOLD_OUT * len(keys)))]:
            check += groups[k]
    held = np.zeros(len(labels), bool)
    held[check] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def fit_head(
    tune: Scored, mix: Scored, logit_scale: float | None = None
) -> tuple[SiteHead, dict[str, Any]]:
    """The site's last layer: L2 logistic regression on [logit of the base raw probability,
    standardised pooled features] over the tune images and the FracAtlas mix (equal total
    weight), C chosen by 5-fold cross-validated AUROC on the tune images. The logit column is
    multiplied by `logit_scale` (LOGIT_SCALE) while fitting, so the penalty that holds the
    features back barely holds back the base's own judgement."""
    scale_logit = LOGIT_SCALE if logit_scale is None else logit_scale
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    feats = np.vstack([np.stack(tune.features), np.stack(mix.features)])
    mean, scale = feats.mean(axis=0), feats.std(axis=0) + 1e-6
    probe = SiteHead(mean, scale, np.zeros(feats.shape[1]), 1.0, 0.0)
    x_tune = probe.inputs(np.asarray(tune.raw), np.stack(tune.features))
    x_mix = probe.inputs(np.asarray(mix.raw), np.stack(mix.features))
    x_tune[:, 0] *= scale_logit
    x_mix[:, 0] *= scale_logit
    y_tune, y_mix = np.asarray(tune.labels), np.asarray(mix.labels)
    w_mix = len(y_tune) / max(len(y_mix), 1)

    def fitted(c: float, idx: np.ndarray) -> Any:
        model = LogisticRegression(C=c, max_iter=2000)
        x = np.vstack([x_tune[idx], x_mix])
        y = np.concatenate([y_tune[idx], y_mix])
        weights = np.concatenate([np.ones(len(idx)), np.full(len(y_mix), w_mix)])
        return model.fit(x, y, sample_weight=weights)

    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    cv = {}
    for c in C_GRID:
        scores = np.zeros(len(y_tune))
        for train, test in folds.split(x_tune, y_tune):
            scores[test] = fitted(c, train).decision_function(x_tune[test])
        cv[c] = metrics.classification_metrics(y_tune, scores, 0.0)["auroc"]
    best = max(C_GRID, key=lambda c: cv[c])
    model = fitted(best, np.arange(len(y_tune)))
    coef = model.coef_[0]
    head = SiteHead(mean, scale, coef[1:], float(coef[0]) * scale_logit, float(model.intercept_[0]))
    return head, {
        "C": best,
        "logit_scale": scale_logit,
        "cv_auroc_by_C": {str(c): round(a, 4) for c, a in cv.items()},
    }


def served_probability(
    raw: np.ndarray, max_box: np.ndarray, fusion: Fusion | None, calibration: Calibration | None
) -> np.ndarray:
    """The served probability from raw classifier probabilities and best boxes."""
    if fusion is not None:
        return np.array([fusion.apply(p, m) for p, m in zip(raw, max_box, strict=True)])
    return np.array([calibration.apply(p) if calibration else p for p in raw])


def recalibrate(
    raw: np.ndarray, run: Scored, base_fusion: Fusion | None, source: str
) -> dict[str, Any]:
    """Calibration, decision threshold, fusion (at the base weight) and verdict on `run`, fitted
    as `calibrate` fits them."""
    fit = fit_scores(
        run.labels,
        raw,
        np.asarray(run.max_box),
        source,
        base_fusion.classifier_weight if base_fusion else None,
        (base_fusion.detector, base_fusion.detector_sha256) if base_fusion else None,
        f"the base card's weight; calibrated on {source}",
    )
    try:
        verdict = fit_verdict(np.asarray(run.labels), fit.served, source)
    except ValueError:  # fewer than 10 of a class: the base card's verdict is not carried over
        verdict = None
    fused = fit.fusion is not None  # the verdict then lives in the fusion, on its score
    return {
        "calibration": fit.calibration,
        "decision_threshold": fit.decision_threshold,
        "fusion": fit.fusion.model_copy(update={"verdict": verdict}) if fit.fusion else None,
        "verdict": None if fused else verdict,
    }


def tune_threshold(run: Scored, fp_rate: float = DETECTOR_FP_RATE) -> float:
    """The detector threshold holding `fp_rate` false positives per image on `run` (its FROC)."""
    return float(metrics.froc(run.preds, run.gts).operating_point(fp_rate)["threshold"])


def copy_models(models_dir: Path, into: Path) -> None:
    """Every file of a models folder (cards, graphs, references) into `into`."""
    into.mkdir(parents=True, exist_ok=True)
    for path in models_dir.iterdir():
        if path.is_file():
            shutil.copy2(path, into / path.name)


def serve_detector_file(folder: Path, plan: Plan, sha: str) -> None:
    """Point the detector's card in `folder` at its graph file's new sha256, and the
    classifier's fusion too where it fuses this detector's best box."""
    det = plan.detector
    card_path = folder / f"{det.name}.json"
    export.save_card(card_path, {**json.loads(card_path.read_text()), "sha256": sha})
    clf_path = folder / f"{plan.classifier.name}.json"
    clf_card = json.loads(clf_path.read_text())
    if (clf_card.get("fusion") or {}).get("detector") == det.name:  # its max box still counts
        clf_card["fusion"]["detector_sha256"] = sha
        export.save_card(clf_path, clf_card)


@dataclass
class DetectorAdaptation:
    """The fine-tuned detector (site_detector.fine_tune), its guard's figures, and the served
    pipeline's answers with it; `onnx` only when it passed its guard."""

    summary: dict[str, Any]
    passed: bool = False
    onnx: bytes | None = None
    sha256: str = ""
    site: Scored | None = None
    val: Scored | None = None


def adapt_detector(
    plan: Plan,
    models_dir: Path,
    name: str,
    records: tuple[list[Record], list[Record]],
    pairs: tuple[list[Any], list[Any]],
    split: tuple[np.ndarray, np.ndarray],
    base: tuple[Scored, Scored],
    epochs: int,
    deadline: float | None,
) -> DetectorAdaptation:
    """Fine-tune the served detector on the tune images' crops, score the site and FracAtlas
    val with it, and guard it as the classifier is guarded: lesion recall at the 0.4 FP/image
    threshold fitted on the tune images, on the held-out site images (paired bootstrap, 95%),
    and FracAtlas val's FROC recall at 0.4 FP/image no more than MAX_FRACATLAS_RECALL_LOSS lower."""
    from training.site_detector import fine_tune

    (site_records, val_records), (tune_idx, check_idx), (site_run, val) = records, split, base
    site_pairs_all, mix_pairs = pairs
    det = plan.detector
    assert det.card is not None
    chosen = [site_pairs_all[i] for i in tune_idx if site_pairs_all[i] is not None]
    positives = [p for p in chosen if len(p[1])]
    negatives = [p for p in chosen if not len(p[1])]
    if not positives:
        return DetectorAdaptation({"skipped": "no fracture boxes among the tune images"})
    share = float(det.card.recipe.get("negatives_per_positive", 0.25))
    keep = np.random.default_rng(0).permutation(len(negatives))[: round(share * len(positives))]
    site_pairs = positives + [negatives[i] for i in sorted(keep)]
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "site"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copy_models(models_dir, work)
        fit = fine_tune(
            det,
            site_pairs,
            [p for p in mix_pairs if p is not None],
            epochs,
            work / det.card.file,
            f"adapt-{slug}",
            deadline,
        )
        sha = sha256_of(work / det.card.file)
        serve_detector_file(work, plan, sha)
        tuned_plan = served_plan(work)
        site2 = score(tuned_plan, site_records, "site, fine-tuned detector", deadline)
        val2 = score(tuned_plan, val_records, "FracAtlas val, fine-tuned detector")
        onnx = (work / det.card.file).read_bytes()
    tune, check = site_run.take(tune_idx), site_run.take(check_idx)
    tune2, check2 = site2.take(tune_idx), site2.take(check_idx)
    thresholds = [tune_threshold(run) for run in (tune, tune2)]
    site_pair = metrics.paired_recall_difference(
        check.gts, check.preds, thresholds[0], check2.preds, thresholds[1]
    )
    val_recall = [
        metrics.froc(run.preds, run.gts).recall_at(DETECTOR_FP_RATE) for run in (val, val2)
    ]
    reasons = []
    if site_pair["b_better"] < SHIP_CERTAINTY:
        reasons.append(
            f"on the held-out site images its lesion recall beats the base in "
            f"{site_pair['b_better']:.0%} of paired resamples (needs {SHIP_CERTAINTY:.0%})"
        )
    if val_recall[1] - val_recall[0] < -MAX_FRACATLAS_RECALL_LOSS:
        reasons.append(
            f"on FracAtlas val its recall at {DETECTOR_FP_RATE} FP/image falls "
            f"{val_recall[0] - val_recall[1]:.3f} (at most {MAX_FRACATLAS_RECALL_LOSS} allowed)"
        )
    summary = {
        **fit,
        "held_out_site_recall": site_pair,
        "fracatlas_val_recall_at_0.4": {"base": val_recall[0], "adapted": val_recall[1]},
        "adapted_shipped": not reasons,
        "why_not": reasons,
    }
    passed = not reasons
    return DetectorAdaptation(
        summary,
        passed,
        onnx if passed else None,
        sha,
        site2 if passed else None,
        val2 if passed else None,
    )


@dataclass
class ClassifierAdaptation:
    """The fine-tuned classifier graph (site_classifier.fine_tune), what it did, and the served
    pipeline's answers with it on the site and FracAtlas val; guarded by the caller as the
    last layer is."""

    summary: dict[str, Any]
    onnx: bytes
    sha256: str
    site: Scored
    val: Scored


def adapt_classifier(
    plan: Plan,
    models_dir: Path,
    detector: DetectorAdaptation | None,
    records: tuple[list[Record], list[Record]],
    crops: tuple[list[Any], list[Any]],
    tune_idx: np.ndarray,
    epochs: int,
    deadline: float | None,
    lr_fraction: float,
) -> ClassifierAdaptation:
    """Fine-tune the served classifier on the tune images' crops (and FracAtlas's), then score
    the site and FracAtlas val with it (and with the fine-tuned detector where it passed)."""
    from training.site_classifier import CropSet, fine_tune

    clf = plan.classifier
    assert clf.card is not None

    def crop_set(rows: list[Any]) -> CropSet:
        return CropSet(*(list(column) for column in zip(*rows, strict=True)))

    site_crops = crop_set([crops[0][i] for i in tune_idx])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        copy_models(models_dir, work)
        if detector is not None and detector.onnx is not None:  # the detector as it ships
            assert plan.detector.card is not None
            (work / plan.detector.card.file).write_bytes(detector.onnx)
            serve_detector_file(work, plan, detector.sha256)
        fit = fine_tune(
            clf, site_crops, crop_set(crops[1]), epochs, work / clf.card.file, deadline, lr_fraction
        )
        sha = sha256_of(work / clf.card.file)
        card_path = work / f"{clf.name}.json"
        export.save_card(card_path, {**json.loads(card_path.read_text()), "sha256": sha})
        tuned_plan = served_plan(work)
        site2 = score(tuned_plan, records[0], "site, fine-tuned classifier", deadline)
        val2 = score(tuned_plan, records[1], "FracAtlas val, fine-tuned classifier")
        onnx = (work / clf.card.file).read_bytes()
    return ClassifierAdaptation(fit, onnx, sha, site2, val2)


def adapt(
    folder: Path,
    out: Path,
    site_name: str | None = None,
    minutes: float | None = None,
    models_dir: Path = MODELS_DIR,
    mix_limit: int = FRACATLAS_MIX,
    val_limit: int | None = None,
    detector_epochs: int = 0,
    classifier_epochs: int = 0,
    classifier_rate: float = LR_FRACTION,
) -> dict[str, Any]:
    """Adapt, guard, write OUT; the summary a site's physicist signs."""
    deadline = time.monotonic() + 60 * minutes if minutes else None
    site: SiteImages = load_site(folder)
    name = site_name or Path(folder).name
    plan = served_plan(models_dir)
    family = plan.detector.card.recipe.get("family") if plan.detector.card else None
    if detector_epochs and family != "frcnn":  # said before minutes of scoring, not after
        raise SiteDataError(
            f"--detector-epochs: {plan.detector.name} is a {family or 'unknown'} detector; "
            "only a Faster R-CNN (frcnn) can be fine-tuned"
        )
    clf_family = plan.classifier.card.recipe.get("family") if plan.classifier.card else None
    if classifier_epochs and clf_family != "ensemble":
        raise SiteDataError(
            f"--classifier-epochs: {plan.classifier.name} is a {clf_family or 'unknown'} "
            "classifier; only the MobileNetV2 ensemble can be fine-tuned"
        )
    # the detector's training pairs and the classifier's crops, one per site and FracAtlas mix
    # image (None: unusable)
    pairs: tuple[list[Any], list[Any]] = ([], [])
    crops: tuple[list[Any], list[Any]] = ([], [])

    def keeper(
        into: list[Any], crops_into: list[Any]
    ) -> Callable[[Record, ImageWork, np.ndarray], None] | None:
        from training.site_classifier import training_crop
        from training.site_detector import frame_boxes_to_crop, training_pair

        def keep(rec: Record, w: ImageWork, truth: np.ndarray) -> None:
            usable = len(truth) or not rec.fractured  # a fracture without boxes: no boxes taught
            if detector_epochs:
                into.append(training_pair(w, truth, plan.detector.spec) if usable else None)
            if classifier_epochs:
                plane, mask = training_crop(w, frame_boxes_to_crop(w, truth), plan.classifier.spec)
                crops_into.append((plane, mask, int(rec.fractured), bool(usable)))

        return keep if detector_epochs or classifier_epochs else None

    site_run = score(
        plan, site.records, f"site ({len(site.records)})", deadline, keeper(pairs[0], crops[0])
    )
    tune_idx, check_idx = split_tune_check(site_run.labels, site_run.patients)
    tune, check = site_run.take(tune_idx), site_run.take(check_idx)
    records = load_records()
    rng = np.random.default_rng(0)
    train = [r for r in records if r.split == "train"]
    mix_records = [train[i] for i in sorted(rng.permutation(len(train))[:mix_limit])]
    mix = score(plan, mix_records, "FracAtlas train mix", deadline, keeper(pairs[1], crops[1]))
    # FracAtlas val images the site folder holds too (a proxy site made of them) stay out of
    # the forgetting check: the head has seen them
    site_ids = {r.image_id for r in site.records}
    val_records = [r for r in records if r.split == "val" and r.image_id not in site_ids]
    val = score(plan, val_records[:val_limit], "FracAtlas val")
    base_fusion = plan.scoring.fusion
    # what the classifier is fitted and measured with: the fine-tuned detector's answers when
    # it ships (its best box feeds the fused score), else the base's
    detector = None
    a_site, a_val, a_fusion = site_run, val, base_fusion
    if detector_epochs:
        detector = adapt_detector(
            plan,
            models_dir,
            name,
            (site.records, val_records[:val_limit]),
            pairs,
            (tune_idx, check_idx),
            (site_run, val),
            detector_epochs,
            deadline,
        )
        if detector.passed and detector.site is not None and detector.val is not None:
            a_site, a_val = detector.site, detector.val
            if base_fusion is not None:
                a_fusion = base_fusion.model_copy(update={"detector_sha256": detector.sha256})
    # the base classifier with the detector as it ships (recalibrated when nothing else passes)
    d_tune, d_check = a_site.take(tune_idx), a_site.take(check_idx)
    classifier = None
    if classifier_epochs:
        classifier = adapt_classifier(
            plan,
            models_dir,
            detector if detector is not None and detector.passed else None,
            (site.records, val_records[:val_limit]),
            crops,
            tune_idx,
            classifier_epochs,
            deadline,
            classifier_rate,
        )
        a_site, a_val = classifier.site, classifier.val
    a_tune, a_check = a_site.take(tune_idx), a_site.take(check_idx)
    head: SiteHead | None = None
    if classifier is None:
        head, head_fit = fit_head(tune, mix)
    else:
        head_fit = {"skipped": "the classifier's second member was fine-tuned in its place"}
    source = f"{name}: {len(tune.labels)} tune images ({sum(tune.labels)} fractured)"

    def adapted_raw(run: Scored) -> np.ndarray:
        if head is None:  # the fine-tuned classifier's own probability
            return np.asarray(run.raw)
        return head.apply(np.asarray(run.raw), np.stack(run.features))

    adapted_fields = recalibrate(adapted_raw(a_tune), a_tune, a_fusion, source)
    base_fields = recalibrate(np.asarray(d_tune.raw), d_tune, a_fusion, source)

    def served(run: Scored, fields: dict[str, Any], raw: np.ndarray) -> np.ndarray:
        return served_probability(
            raw, np.asarray(run.max_box), fields["fusion"], fields["calibration"]
        )

    # the base as served today against the adaptation, on the same held-out images
    site_pair = metrics.paired_auroc_difference(
        check.labels, check.served, served(a_check, adapted_fields, adapted_raw(a_check))
    )
    val_pair = metrics.paired_auroc_difference(
        val.labels, val.served, served(a_val, adapted_fields, adapted_raw(a_val))
    )
    passed = site_pair["b_better"] >= SHIP_CERTAINTY and val_pair["delta"] >= -MAX_FRACATLAS_LOSS
    reasons = []
    if site_pair["b_better"] < SHIP_CERTAINTY:
        reasons.append(
            f"on the held-out site images the adapted AUROC beats the base in "
            f"{site_pair['b_better']:.0%} of paired resamples (needs {SHIP_CERTAINTY:.0%})"
        )
    if val_pair["delta"] < -MAX_FRACATLAS_LOSS:
        reasons.append(
            f"on FracAtlas val it loses {-val_pair['delta']:.3f} AUROC (at most "
            f"{MAX_FRACATLAS_LOSS} allowed)"
        )
    at_check = {}
    for label, fields, raw, run in (
        ("base_recalibrated", base_fields, np.asarray(d_check.raw), d_check),
        ("adapted", adapted_fields, adapted_raw(a_check), a_check),
    ):
        s = served(run, fields, raw)
        threshold = (
            fields["fusion"].decision_threshold
            if fields["fusion"]
            else fields["decision_threshold"]
        )
        at_check[label] = metrics.bootstrap_classification(run.labels, s, threshold)
    summary: dict[str, Any] = {
        "site": name,
        "images": len(site.records),
        "skipped": site.skipped,
        "tune_images": len(tune.labels),
        "held_out_images": len(check.labels),
        "held_out_fractured": int(sum(check.labels)),
        "head": head_fit,
        "held_out_site_auroc": site_pair,
        "fracatlas_val_auroc": val_pair,
        "held_out_site_at_threshold_ci95": at_check,
        "adapted_shipped": passed,
        "why_not": reasons,
    }
    if detector is not None:
        summary["detector"] = detector.summary
    if classifier is not None:
        summary["classifier_fine_tune"] = classifier.summary
    write_models(
        out,
        models_dir,
        plan,
        site,
        name,
        head if passed else None,
        adapted_fields if passed else base_fields,
        a_tune,
        summary,
        detector if detector is not None and detector.passed else None,
        classifier if passed else None,
    )
    return summary


def write_models(
    out: Path,
    models_dir: Path,
    plan: Plan,
    site: SiteImages,
    name: str,
    head: SiteHead | None,
    fields: dict[str, Any],
    tune: Scored,
    summary: dict[str, Any],
    detector: DetectorAdaptation | None = None,
    classifier: ClassifierAdaptation | None = None,
) -> None:
    """OUT: a copy of the models folder with the classifier card adapted (the head or the
    fine-tuned graph when it ships, the recalibration always), the fine-tuned detector when it
    passed its guard, and the detector's FP/image table refitted."""
    copy_models(models_dir, out)
    clf, det = plan.classifier, plan.detector
    card_path = out / f"{clf.name}.json"
    card = json.loads(card_path.read_text())
    for key in ("calibration", "fusion", "verdict"):
        value = fields.get(key)
        card[key] = value.model_dump(mode="json") if value is not None else None
    card["decision_threshold"] = fields["decision_threshold"]
    if card.get("familiarity") and clf.reference is not None:
        # the site's images are what the adapted models are validated on: 95% of them pass
        scores = clf.reference.score(np.stack(tune.features))
        card["familiarity"]["threshold"] = round(float(np.quantile(scores, 0.95)), 6)
        card["familiarity"]["threshold_rule"] = f"95% quantile of {name}'s tune images"
        limit = card["familiarity"].get("probe_refuse_above")
        if limit is not None and clf.probe is not None:
            # the site's own radiographs are never refused as no radiograph: the probe's limit
            # stays PROBE_MARGIN above the highest of them, as above FracAtlas val's
            highest = float(clf.probe.logit(np.stack(tune.features)).max()) + PROBE_MARGIN
            card["familiarity"]["probe_refuse_above"] = round(max(limit, highest), 4)
    adaptation: dict[str, Any] = {
        "site": name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "images": len(site.records),
        "fractured": int(sum(r.fractured for r in site.records)),
        "images_digest": site.digest,
        "base": {
            m.role: {"name": m.name, "version": m.version, "sha256": m.card.sha256}
            for m in (plan.cropper, clf, det)
        },
        "method": "last-layer logistic regression on the base logit and pooled features"
        if head is not None
        else classifier.summary["method"]
        if classifier is not None
        else "recalibration only (the adapted classifier did not pass the guard)",
        "figures": summary,
    }
    if head is not None:
        head_file = f"{clf.name}.site-head.npz"
        head.save(out / head_file)
        adaptation |= {"file": head_file, "sha256": sha256_of(out / head_file)}
    if classifier is not None:
        (out / card["file"]).write_bytes(classifier.onnx)
        card["sha256"] = classifier.sha256
    card["site_adaptation"] = SiteAdaptation.model_validate(adaptation).model_dump(mode="json")
    card = {k: v for k, v in card.items() if v is not None}
    export.save_card(card_path, card)
    det_path = out / f"{det.name}.json"
    if detector is not None and detector.onnx is not None:
        det_card = json.loads(det_path.read_text())
        (out / det_card["file"]).write_bytes(detector.onnx)
        det_card["sha256"] = detector.sha256
        det_card["site_adaptation"] = SiteAdaptation.model_validate(
            {
                **{k: adaptation[k] for k in ("site", "created", "images", "fractured")},
                "images_digest": site.digest,
                "base": {"detector": adaptation["base"]["detector"]},
                "method": detector.summary["method"],
                "figures": detector.summary,
            }
        ).model_dump(mode="json", exclude_none=True)
        export.save_card(det_path, det_card)
    if any(len(g) for g in tune.gts):  # boxes known: the site's own FP/image table
        det_card = json.loads(det_path.read_text())
        froc = metrics.froc(tune.preds, tune.gts)
        det_card["operating_points"] = froc_operating_points({"froc_table": froc.table()})
        det_card["operating_points_rule"] = f"FROC on {name}'s tune images, IoU >= 0.5"
        export.save_card(det_path, det_card)


def table(summary: dict[str, Any]) -> str:
    """The comparison a site's physicist signs, in plain text."""
    s, v = summary["held_out_site_auroc"], summary["fracatlas_val_auroc"]

    def row(label: str, pair: dict[str, Any]) -> str:
        lo, hi = pair["delta_ci95"]
        return (
            f"{label:<34} {pair['auroc_a']:.3f}   {pair['auroc_b']:.3f}   "
            f"{pair['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}]  n={pair['n']}"
        )

    lines = [
        f"site {summary['site']}: {summary['images']} images ({len(summary['skipped'])} skipped), "
        f"{summary['tune_images']} tune, {summary['held_out_images']} held out",
        "adapted classifier: "
        + (summary.get("classifier_fine_tune") or {}).get("method", "the last layer"),
        f"{'AUROC':<34} base    adapted  difference [95% CI]",
        row("held-out site images", s),
        row("FracAtlas val", v),
        *_detector_lines(summary.get("detector")),
        "adapted models shipped"
        if summary["adapted_shipped"]
        else "adapted models NOT shipped: "
        + "; ".join(summary["why_not"])
        + " (OUT holds the base models, recalibrated on the site)",
    ]
    return "\n".join(lines)


def _detector_lines(detector: dict[str, Any] | None) -> list[str]:
    if not detector:
        return []
    if "skipped" in detector:
        return [f"detector not fine-tuned: {detector['skipped']}"]
    r, v = detector["held_out_site_recall"], detector["fracatlas_val_recall_at_0.4"]
    ci = r["delta_ci95"] or [float("nan")] * 2
    return [
        f"{'lesion recall @0.4 FP/image':<34} base    adapted  difference [95% CI]",
        f"{'held-out site images':<34} {r['recall_a'] or 0:.3f}   {r['recall_b'] or 0:.3f}   "
        f"{r['delta'] or 0:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]  lesions={r['lesions']}",
        f"{'FracAtlas val (FROC)':<34} {v['base']:.3f}   {v['adapted']:.3f}",
        "fine-tuned detector shipped"
        if detector["adapted_shipped"]
        else "fine-tuned detector NOT shipped: " + "; ".join(detector["why_not"]),
    ]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training adapt",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--folder", type=Path, required=True, help="the site's labelled images")
    parser.add_argument("--out", type=Path, required=True, help="the adapted models folder")
    parser.add_argument("--site", help="the site's name in the cards (default: the folder's)")
    parser.add_argument("--minutes", type=float, help="give up when scoring takes longer")
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument(
        "--detector-epochs",
        type=int,
        default=0,
        help="also fine-tune the detector (Faster R-CNN) this many epochs on the site's boxes",
    )
    parser.add_argument(
        "--classifier-epochs",
        type=int,
        default=0,
        help="fine-tune the classifier ensemble's second member this many epochs (in place of "
        "the last layer)",
    )
    parser.add_argument(
        "--classifier-rate",
        type=float,
        default=LR_FRACTION,
        help="its learning rate, as a fraction of the member recipe's full fine-tune rate",
    )
    args = parser.parse_args(argv)
    if args.out.resolve() == args.models_dir.resolve():
        parser.error("--out must be another folder than the models it adapts")
    if args.detector_epochs < 0 or args.classifier_epochs < 0:
        parser.error("--detector-epochs and --classifier-epochs must be 0 or more")
    if not 0 < args.classifier_rate <= 10:
        parser.error("--classifier-rate must be above 0 and at most 10")
    summary = adapt(
        args.folder,
        args.out,
        args.site,
        args.minutes,
        args.models_dir,
        detector_epochs=args.detector_epochs,
        classifier_epochs=args.classifier_epochs,
        classifier_rate=args.classifier_rate,
    )
    (args.out / "adaptation.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(table(summary), flush=True)
    return 0
