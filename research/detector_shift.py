"""Does a detector trained for other sites make the fused score rank better under a source shift?

    python -m research.detector_shift score --shift all-rotate@10 [--limit N]
    python -m research.detector_shift summary
    python -m research.detector_shift score --shift none \
        --candidate runs/detector-proposals/proposals-100.onnx   # detector_proposals.py's rule

`score` runs the served pipeline (default models: crop, upright turn, classifier, detector) on val
under one shift, then the candidate detector (by default candidates/frcnn-mobilenet-shift.yaml's,
from its run's export; `--candidate` another graph with the served detector's input and output)
on the very same crops, and writes one CSV per shift to runs/detector-shift/<candidate>/: the
classifier's raw probability and each detector's best box (boxes down to the service's fusion
floor, as served). `summary` fuses each with the classifier at the served weight and pairs the
candidate's fused score against the served one's on the same images, condition by condition as
the rule in the candidate recipe's header asks (frcnn-mobilenet-shift.yaml, -shift-mild.yaml).
A measurement, not shipped.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from app.core.config import PipelineOptions, Settings
from app.inference.model_card import fused_score
from app.inference.pipeline import (
    FUSION_BOX_FLOOR,
    ImageWork,
    detect_crops,
    run_study,
)
from app.inference.runtime import OnnxModel
from training import metrics
from training.common import MODELS_DIR, REPO, read_rows, write_rows
from training.data import HAND_SHOULDER, load_records
from training.evaluate import decode_record, served_plan
from training.progress import progress
from training.shifts import shift_name

CANDIDATE = "detector-frcnn-mobilenetv2-shift"
CANDIDATE_DIR = REPO / "runs" / CANDIDATE / "export"
CANDIDATE_FILE = CANDIDATE_DIR / f"{CANDIDATE}.onnx"
OUT = REPO / "runs" / "detector-shift"
# Each candidate's rule (its recipe's header): the shifts it is judged on, draws no choice had seen
SHIFTED = {
    "detector-frcnn-mobilenetv2-shift": ("processing", "all-rotate-512@10", "all-rotate@10"),
    "detector-frcnn-mobilenetv2-shift-mild": (
        "processing@11",
        "all-rotate-512@11",
        "all-rotate@11",
    ),
}
# the candidate's own val metrics unshifted (training's detector evaluation), as the rule asks
MIN_FROC_CPM, MIN_RECALL_AT_04 = 0.620, 0.534


def candidate_detector(path: Path, served: OnnxModel) -> OnnxModel:
    """The candidate graph, with the served detector's input and output spec."""
    card = served.card
    model = OnnxModel.unshipped(path, card.input, dict(card.output))
    model.load(["CPUExecutionProvider"], 0)
    return model


def score(shift: str, limit: int | None, candidate: Path = CANDIDATE_FILE, out: Path = OUT) -> Path:
    # as the lab always measured it: the upright turn only, every box above the collection floor
    plan = served_plan(MODELS_DIR)
    plan = replace(plan, options=PipelineOptions(upright=Settings().upright), orienter=None)
    det = plan.detector
    assert plan.scoring.fusion is not None, "the served classifier fuses with its detector"
    cand = candidate_detector(candidate, det)
    records = [r for r in load_records() if r.split == "val"][:limit]
    rows = []
    for start in progress(range(0, len(records), 8), f"detector ({shift})"):
        chunk = records[start : start + 8]
        works = [ImageWork(image=decode_record(r, shift)[0], decode_ms=0.0) for r in chunk]
        run_study(works, plan)
        found = detect_crops(
            cand, [w.crop for w in works], FUSION_BOX_FLOOR, [w.crop_levels for w in works]
        )
        for rec, w, (_, scores) in zip(chunk, works, found, strict=True):
            rows.append(
                {
                    "image_id": rec.image_id,
                    "region": rec.region,
                    "fractured": int(rec.fractured),
                    "classifier": w.classifier_probability,
                    "served_box": w.max_box_score,
                    "candidate_box": float(scores.max()) if len(scores) else 0.0,
                }
            )
    path = out / candidate.stem / f"scores-{shift}.csv"
    return write_rows(path, rows)


def paired(rows: list[dict], weight: float, keep: np.ndarray | None = None) -> dict:
    """The candidate's fused score against the served one's on the same images (and the
    classifier and each best box alone)."""
    y = np.array([int(r["fractured"]) for r in rows])
    p = np.array([float(r["classifier"]) for r in rows])
    served, cand = (np.array([float(r[k]) for r in rows]) for k in ("served_box", "candidate_box"))
    if keep is not None:
        y, p, served, cand = y[keep], p[keep], served[keep], cand[keep]
    d = metrics.paired_auroc_difference(
        y, fused_score(p, served, weight), fused_score(p, cand, weight)
    )
    boxes = metrics.paired_auroc_difference(y, served, cand)
    return {
        "classifier_alone": metrics.classification_metrics(y, p, 0.5)["auroc"],
        "served": d["auroc_a"],
        "candidate": d["auroc_b"],
        "delta": d["delta"],
        "ci95": d["delta_ci95"],
        "best_box_served": boxes["auroc_a"],
        "best_box_candidate": boxes["auroc_b"],
    }


def summary(candidate: Path = CANDIDATE_FILE) -> dict:
    weight = served_plan(MODELS_DIR).scoring.fusion.classifier_weight
    out: dict = {"weight": weight, "shifts": {}, "hand_shoulder": {}}
    for path in sorted((OUT / candidate.stem).glob("scores-*.csv")):
        rows = read_rows(path)
        shift = path.stem.removeprefix("scores-")
        upper = np.array([r["region"] in HAND_SHOULDER for r in rows])
        out["shifts"][shift] = paired(rows, weight)
        out["hand_shoulder"][shift] = paired(rows, weight, upper)
    shifted = SHIFTED.get(candidate.stem, ())
    if shifted and all(s in out["shifts"] for s in ("none", *shifted)):
        out["rule"] = rule(out, candidate, shifted)
    return out


def rule(out: dict, candidate: Path, shifted: tuple[str, ...]) -> dict:
    """The candidate recipe's rule, condition by condition."""
    card = json.loads(candidate.with_suffix(".json").read_text())["metrics"]["val"]
    gain = float(np.mean([out["shifts"][s]["delta"] for s in shifted]))
    hs = float(np.mean([out["hand_shoulder"][s]["delta"] for s in shifted]))
    checks = {
        "none >= -0.005": out["shifts"]["none"]["delta"] >= -0.005,
        "shifted mean gain >= 0.010": gain >= 0.010,
        "hand-and-shoulder shifted mean not lower": hs >= 0.0,
        f"val FROC CPM >= {MIN_FROC_CPM}": card["froc_cpm"] >= MIN_FROC_CPM,
        f"val recall at 0.4 FP/image >= {MIN_RECALL_AT_04}": card["recall_at_0.4_fp"]
        >= MIN_RECALL_AT_04,
    }
    return {
        "none": out["shifts"]["none"]["delta"],
        "shifted_gain": gain,
        "hand_shoulder_gain": hs,
        "froc_cpm": card["froc_cpm"],
        "recall_at_0.4_fp": card["recall_at_0.4_fp"],
        "checks": checks,
        "ships": all(checks.values()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("score")
    sc.add_argument("--shift", type=shift_name, required=True)
    sc.add_argument("--limit", type=int, default=None)
    sm = sub.add_parser("summary")
    for p in (sc, sm):
        p.add_argument("--candidate", type=Path, default=CANDIDATE_FILE, help="a detector graph")
    args = ap.parse_args()
    candidate = args.candidate.resolve()
    if args.command == "score":
        # a smoke run must not overwrite a shift's real scores
        out = OUT if args.limit is None else OUT / "smoke"
        print(score(args.shift, args.limit, candidate, out))
    else:
        print(json.dumps(summary(candidate), indent=1))


if __name__ == "__main__":
    main()
