"""The served pipeline, for the decoded images of one or more studies, a batch per model:
crop (polarity fix, markers painted out, bone mask, crop box, upright turn) -> orient ->
classify (test-time views, calibration) -> detect (boxes back in the frame as sent, the fused
image score), then each image's answer.

Each stage stacks the inputs of every image and runs its model once, so the micro-batcher
(app/batching.py) stacks the images of several requests into one call. What runs is the Plan's
(app/inference/plan.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.core.config import PipelineOptions
from app.inference.answers import Detection, ImageResult
from app.inference.decoding import DecodedImage
from app.inference.familiarity import OUTSIDE_NOTE
from app.inference.markers import Painted, suppress_markers
from app.inference.plan import Plan, Scoring
from app.inference.polarity import inverted, looks_inverted
from app.inference.postprocess import rcnn_detections, yolo_detections
from app.inference.preprocessing import (
    GreyLevels,
    Placement,
    bone_mask,
    crop_box_from_mask,
    grey_levels,
    model_input,
)
from app.inference.runtime import OnnxModel
from app.inference.upright import Turn, turn_for, turned_crop_box, upright_turn

StageTimer = Callable[[str, float, int], None]


@dataclass
class ImageWork:
    image: DecodedImage
    decode_ms: float
    index: int | None = None  # position in the request, where files before it were refused
    crop_box: tuple[int, int, int, int] = (0, 0, 0, 0)  # in the frame as sent
    working_box: tuple[int, int, int, int] = (0, 0, 0, 0)  # the same in working pixels
    crop_fallback: bool = False
    turn: Turn | None = None  # the working image turned to set its bone axis upright
    painted: Painted | None = None  # burned-in annotations painted out of what the models see
    inverted: bool = False  # shown bone-dark: the models saw it inverted
    seen: np.ndarray | None = None  # the working pixels as the models see them
    turned_box: tuple[int, int, int, int] = (0, 0, 0, 0)  # the crop in the turned image
    quarter_turns: int = 0  # clockwise quarter turns the orienter added to set it proximal end up
    crop: np.ndarray | None = None  # raw grey pixels of the crop box (a view of `seen`)
    crop_levels: GreyLevels | None = None  # the crop's own grey stretch
    probability: float = 0.0
    classifier_probability: float = 0.0  # uncalibrated, what a fusion mixes
    features: np.ndarray | None = None  # the classifier's pooled features, where it exposes them
    ood_score: float | None = None  # unlike the validated images (app/inference/familiarity.py)
    probe_logit: float | None = None  # log-odds of no radiograph at all (the same module)
    max_box_score: float = 0.0  # under a fusion: the best box down to its floor
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    timings: dict[str, float] = field(default_factory=dict)

    def take_turned_crop(self, turn: Turn, turned_box: tuple[int, int, int, int]) -> None:
        """Analyse `turned_box` of the working image turned by `turn` (only that part is
        rendered); the crop box is what the models look at, as the upright box around it."""
        self.turn, self.turned_box = turn, turned_box
        self.crop = turn.image(self.seen, turned_box)
        bx1, by1, bx2, by2 = (int(v) for v in turn.boxes_back(np.array([turned_box]))[0])
        self.working_box = (bx1, by1, bx2, by2)
        self.crop_box = self.image.crop_box_to_frame(self.working_box)
        self.crop_levels = grey_levels(self.crop)


@contextmanager
def _timed(stage: str, works: list[ImageWork], on_stage: StageTimer | None) -> Iterator[None]:
    """Time one stage over a batch: each image gets its share, the batch goes to on_stage."""
    t0 = time.perf_counter()
    yield
    seconds = time.perf_counter() - t0
    for w in works:
        w.timings[stage] = round(1000 * seconds / max(len(works), 1), 2)
    if on_stage is not None:
        on_stage(stage, seconds, len(works))


def run_study(works: list[ImageWork], plan: Plan, on_stage: StageTimer | None = None) -> None:
    """Fill crop boxes, probabilities and detections of every image in place, as `plan` says
    (the crop margin is the cropper card's). Its options: `upright` turns an image whose bone
    axis lies between quarter turns onto the nearest axis first (app/inference/upright.py);
    `markers` paints burned-in annotations out of what the models see (app/inference/markers.py);
    with an orienter, a crop it finds a quarter or half turn from FracAtlas's way up is turned
    back; `polarity` inverts a PNG or JPEG shown bone-dark first (app/inference/polarity.py)."""
    crop_margin = float(plan.cropper.card.crop_margin)
    with _timed("crop", works, on_stage):
        masks = take_crops(works, plan.cropper, plan.options)
    if plan.orienter is not None:
        with _timed("orient", works, on_stage):
            orient_crops(works, masks, plan.orienter, crop_margin)
    classifier, detector, fusion = plan.classifier, plan.detector, plan.scoring.fusion
    with _timed("classify", works, on_stage):
        batch = np.stack([model_input(w.crop, classifier.spec, w.crop_levels)[0] for w in works])
        probs, features = classify_with_features(classifier, batch)
        if classifier.site_head is not None and features is not None:  # the site's last layer
            probs = classifier.site_head.apply(probs, features)
        calibration = classifier.card.calibration if classifier.card else None
        for w, p in zip(works, probs, strict=True):
            raw = w.classifier_probability = float(np.clip(p, 0.0, 1.0))
            w.probability = calibration.apply(raw) if calibration else raw
        if features is not None:
            scores = classifier.reference.score(features) if classifier.reference else None
            logits = classifier.probe.logit(features) if classifier.probe else None
            for i, w in enumerate(works):
                w.features = features[i]
                w.ood_score = None if scores is None else float(scores[i])
                w.probe_logit = None if logits is None else float(logits[i])
    threshold = plan.point.detector_threshold
    with _timed("detect", works, on_stage):
        found = detect_crops(
            detector,
            [w.crop for w in works],
            min(threshold, FUSION_BOX_FLOOR) if fusion else threshold,
            [w.crop_levels for w in works],
        )
        for w, (boxes, scores) in zip(works, found, strict=True):
            if fusion:  # every box down to the floor scored; the answer keeps the requested
                w.max_box_score = float(scores.max()) if len(scores) else 0.0
                keep = scores >= threshold
                boxes, scores = boxes[keep], scores[keep]
                w.probability = fusion.apply(w.classifier_probability, w.max_box_score)
            x1, y1 = (w.turned_box if w.turn else w.working_box)[:2]
            if len(boxes):
                boxes[:, [0, 2]] += x1  # crop pixels -> working pixels -> the frame as sent
                boxes[:, [1, 3]] += y1
                if w.turn:  # turned pixels -> the upright box around each in working pixels
                    boxes = w.turn.boxes_back(boxes)
                boxes = w.image.to_frame(boxes)
            w.boxes, w.scores = boxes, scores


def take_crops(
    works: list[ImageWork], cropper: OnnxModel, options: PipelineOptions = PipelineOptions()
) -> list[np.ndarray | None]:
    """The crop stage of run_study: invert a PNG or JPEG shown bone-dark (`options.polarity`),
    paint markers out (`options.markers`), find the bone mask, take the crop (turned onto the
    nearest axis with `options.upright`); each image's mask, None where it was empty and the
    whole image is analysed."""
    crop_margin = float(cropper.card.crop_margin)
    masks: list[np.ndarray | None] = []
    for w in works:
        w.seen, w.painted = w.image.pixels, None
        # a DICOM's header says how it is shown (MONOCHROME1 is inverted on decoding)
        w.inverted = options.polarity and w.image.source != "dicom" and looks_inverted(w.seen)
        if w.inverted:
            w.seen = inverted(w.seen)
        if options.markers:
            w.seen, w.painted = suppress_markers(w.seen)
    batch = np.stack([model_input(w.seen, cropper.spec, grey_levels(w.seen))[0] for w in works])
    logits = cropper.run(batch)[0]
    for w, lg in zip(works, logits, strict=True):
        h, wd = w.seen.shape
        mask = bone_mask(lg[0], h, wd)
        box = crop_box_from_mask(mask, h, wd, crop_margin)
        masks.append(mask if box else None)
        w.crop_fallback = box is None
        w.working_box = box or (0, 0, wd, h)
        x1, y1, x2, y2 = w.working_box
        # The crop is stretched on its own, as the models were trained; the stretch itself
        # runs on each model's input, after the resize.
        w.crop = w.seen[y1:y2, x1:x2]
        turn = upright_turn(mask, h, wd) if options.upright and box else None
        turned = turned_crop_box(turn, mask, crop_margin) if turn else None
        if turn and turned:
            w.take_turned_crop(turn, turned)
        else:
            w.crop_box = w.image.crop_box_to_frame(w.working_box)
            w.crop_levels = grey_levels(w.crop)
    return masks


def turn_probabilities(logits: np.ndarray) -> np.ndarray:
    """An orienter's N x 4 logits as probabilities (softmax over the four turns)."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def turns_to_undo(probs: np.ndarray, min_confidence: float) -> np.ndarray:
    """Per crop, the quarter turns (counter-clockwise, the orienter's classes) to undo: the most
    probable one when its probability reaches `min_confidence`, else 0 (left as it is). Training
    chooses min_confidence with this very rule (training/families/orienter.py)."""
    return np.where(probs.max(axis=1) >= min_confidence, probs.argmax(axis=1), 0)


def quarter_turns_needed(orienter: OnnxModel, batch: np.ndarray) -> np.ndarray:
    """Per input, the clockwise quarter turns that bring it to the orienter's way up (see
    turns_to_undo), at the card's min_confidence."""
    probs = turn_probabilities(orienter.run(batch)[0].astype(np.float64))
    return turns_to_undo(probs, float(orienter.card.min_confidence))


def orient_crops(
    works: list[ImageWork], masks: list[np.ndarray | None], orienter: OnnxModel, margin: float
) -> None:
    """Turn each crop the orienter finds a quarter or half turn off, composing the turn with the
    upright one so that boxes map back through one Turn (crop-fallback images stay as they are)."""
    batch = np.stack([model_input(w.crop, orienter.spec, w.crop_levels)[0] for w in works])
    for w, mask, k in zip(works, masks, quarter_turns_needed(orienter, batch), strict=True):
        if k == 0 or mask is None:
            continue
        h, wd = w.seen.shape
        degrees_cw = (-w.turn.degrees if w.turn else 0.0) + 90.0 * int(k)
        degrees_cw = (degrees_cw + 180.0) % 360.0 - 180.0  # three quarter turns: one back
        turn = turn_for(degrees_cw, h, wd)
        turned = turned_crop_box(turn, mask, margin)
        if turned is None:
            continue
        w.take_turned_crop(turn, turned)
        w.quarter_turns = int(k)


# A fused image score takes the best box down to this score (Faster R-CNN graphs stop here
# themselves; the fusion was chosen and calibrated with boxes down to it).
FUSION_BOX_FLOOR = 0.001


def tta_views(batch: np.ndarray, tta: str) -> list[np.ndarray]:
    """The test-time views of an N x C x H x W batch: itself, its quarter turns (rot4), and
    their mirrors (d4). Square inputs only, so every view has the graph's shape."""
    if tta == "none":
        return [batch]
    if batch.shape[-1] != batch.shape[-2]:
        raise ValueError("rotation test-time views need a square input")
    turns = [np.rot90(batch, k, axes=(-2, -1)) for k in range(4)]
    if tta == "d4":
        turns += [t[..., ::-1] for t in turns]
    return [np.ascontiguousarray(t) for t in turns]


def mean_logit(probs: np.ndarray) -> np.ndarray:
    """Sigmoid of the mean logit over the first axis (views x N probabilities -> N)."""
    q = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    return 1.0 / (1.0 + np.exp(-np.log(q / (1 - q)).mean(axis=0)))


def classify(classifier: OnnxModel, batch: np.ndarray) -> np.ndarray:
    """Fracture probability per input (N,): the graph's probability, or under the card's
    test-time views the sigmoid of their mean logit (one run over all views when batched)."""
    return classify_with_features(classifier, batch)[0]


def classify_with_features(
    classifier: OnnxModel, batch: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """classify's probabilities and, where the graph exposes them (OnnxModel.features_at), the
    pooled features of the same forward pass, averaged over the test-time views (N x D)."""
    views = tta_views(batch, classifier.spec.tta)
    stacked = views[0] if len(views) == 1 else np.concatenate(views)
    at, n = classifier.features_at, len(batch)
    features = None
    if classifier.batched:
        outputs = classifier.run(stacked)
        probs = outputs[0].reshape(len(views), n)
        if at is not None:
            features = outputs[at].reshape(len(views), n, -1).mean(axis=0)
    else:
        outputs = classifier.run(stacked)
        probs = np.array([o[0].reshape(-1)[0] for o in outputs]).reshape(len(views), n)
        if at is not None:
            features = np.stack([o[at].reshape(-1) for o in outputs]).reshape(len(views), n, -1)
            features = features.mean(axis=0)
    probs = probs[0].astype(np.float64) if len(views) == 1 else mean_logit(probs)
    return probs, features


Decoder = Callable[[OnnxModel, list[Any], int, float], tuple[np.ndarray, np.ndarray]]


def _decode_yolo(
    detector: OnnxModel, outputs: list[Any], i: int, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    iou = float(detector.detector_output.nms_iou or 0.0)
    return yolo_detections(outputs[0][i], threshold, iou_threshold=iou)


def _decode_rcnn(
    detector: OnnxModel, outputs: list[Any], i: int, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    # unbatched graphs: one output list per image, read by name
    named = dict(zip(detector.output_names, outputs[i], strict=True))
    return rcnn_detections(named["boxes"], named["scores"], threshold)


# Card `output.postprocess` -> decoder of one image's raw outputs.
DECODERS: dict[str, Decoder] = {"yolo": _decode_yolo, "rcnn": _decode_rcnn}


def detect_crops(
    detector: OnnxModel,
    crops: list[np.ndarray],
    threshold: float,
    levels: list[GreyLevels] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Boxes (xyxy in crop pixels, clipped, empty ones dropped) and scores of each crop at a
    score threshold: the detect stage, also what training evaluates. Crops are stretched to
    [0, 1] already, or raw with the `levels` that stretch each."""
    if detector.detector_output is None:  # checked before any work is spent
        raise ValueError(f"{detector.name} is not a detector")
    decode = DECODERS[detector.detector_output.postprocess]
    inputs: list[np.ndarray] = []
    placements: list[Placement] = []
    for i, crop in enumerate(crops):
        x, placement = model_input(crop, detector.spec, levels[i] if levels else None)
        inputs.append(x)
        placements.append(placement)
    outputs = detector.run(np.stack(inputs))
    found = []
    for i, (crop, placement) in enumerate(zip(crops, placements, strict=True)):
        boxes, scores = decode(detector, outputs, i, threshold)
        if len(boxes):
            h, w = crop.shape
            boxes = placement.to_image(boxes)
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores = boxes[keep], scores[keep]
        found.append((boxes, scores))
    return found


# What a turn was for, as the answer's note says (by whether the orienter added quarter turns).
TURN_PURPOSE = {
    False: "set the bone axis upright for analysis",
    True: "show the bone proximal end up for analysis",
}


def image_answer(index: int, w: ImageWork, scoring: Scoring) -> ImageResult:
    """One image's answer, its probability judged as `scoring` says."""
    img, level = w.image, scoring.level(w.probability)
    unfamiliar = scoring.unfamiliar(w.ood_score)
    return ImageResult(
        index=index,
        filename=img.filename,
        sop_instance_uid=img.sop_instance_uid,
        study_instance_uid=img.study_instance_uid,
        series_instance_uid=img.series_instance_uid,
        source=img.source,
        width=img.width,
        height=img.height,
        pixel_spacing=img.pixel_spacing,
        crop_box=[int(v) for v in w.crop_box],
        crop_fallback=w.crop_fallback,
        notes=img.notes
        + (["bone dark on a bright background: inverted for analysis"] if w.inverted else [])
        + ([] if not w.crop_fallback else ["bone mask empty: the whole image was analysed"])
        + (
            [f"turned {w.turn.degrees:+.0f} degrees to {TURN_PURPOSE[bool(w.quarter_turns)]}"]
            if w.turn
            else []
        )
        + (
            [f"{w.painted.count} burned-in annotation(s) painted out for analysis"]
            if w.painted and w.painted.count
            else []
        )
        + ([OUTSIDE_NOTE] if unfamiliar else []),
        fracture_probability=round(w.probability, 6),
        verdict=level,
        fracture=level == "fracture",
        ood_score=None if w.ood_score is None else round(w.ood_score, 4),
        out_of_distribution=None if w.ood_score is None else unfamiliar,
        detections=[
            Detection(box=[round(float(v), 1) for v in b], score=round(float(s), 6))
            for b, s in zip(w.boxes, w.scores, strict=True)
        ],
        timings_ms={"decode": w.decode_ms, **w.timings},
    )
