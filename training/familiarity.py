"""The classifier's out-of-distribution reference (app/inference/familiarity.py), fitted on the
served crops of the training images and thresholded on val.

    python -m training familiarity                 # fit and report into runs/familiarity/
    python -m training familiarity --write-card    # and ship it with the default classifier

The classifier graph is re-written with its pooled features (the first member's global average,
the layer under the head) as a second output: the same weights, the probability unchanged, a new
file and sha256 in the card. The reference is a probabilistic PCA of those features over the
training crops (averaged over the card's test-time views, as served); the flag threshold is the
95th percentile of val, so 5% of FracAtlas val is flagged by construction. The summary says how
many images each source shift (training/shifts.py) gets flagged and how well the score separates
each from unshifted val.

An image scoring far beyond anything FracAtlas gives, shifted or not, is no radiograph the models
could read (a screenshot, a photograph, a document): the service refuses it (422 out_of_scope).
The rule, fixed before any such image was scored: refuse above 1.5 times the highest score of val
and of val under every reported shift. The summary scores scikit-image's sample photographs and a
rendered screenshot of source code against it.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from app.inference.decoding import decode
from app.inference.familiarity import FeatureReference
from app.inference.model_card import Familiarity
from app.inference.pipeline import ImageWork, classify_with_features, orient_crops, take_crops
from app.inference.plan import Plan
from app.inference.preprocessing import model_input
from app.inference.runtime import OnnxModel, choose_providers, sha256_of
from training import export, metrics
from training.common import MODELS_DIR, REPO
from training.data import Record, load_records
from training.evaluate import decode_record, served_plan
from training.progress import progress

DIMS = 64
FLAG_QUANTILE = 0.95
REPORT_SHIFTS = ("processing", "lowres", "all-rotate-512")
REFUSE_MARGIN = 1.5
OUT = REPO / "runs" / "familiarity"


def pooled_feature_tensor(path: Path) -> str:
    """The first global average (ReduceMean / GlobalAveragePool) that feeds a dense layer: the
    pooled features under the classifier's head (the first member's in an ensemble)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    for node in graph.node:
        if node.op_type in ("ReduceMean", "GlobalAveragePool"):
            out = node.output[0]
            if any(op in ("Gemm", "MatMul", "Flatten") for op in consumers.get(out, [])):
                return out
    raise ValueError(f"{path.name}: no pooled feature tensor under a dense head")


def with_feature_output(path: Path, tensor: str, out: Path) -> Path:
    """`path`'s graph with `tensor` added to its outputs, written to `out` (weights unchanged)."""
    import onnx

    model = onnx.load(str(path))
    if tensor not in [o.name for o in model.graph.output]:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    onnx.save(model, str(out))
    return out


def code_screenshot() -> bytes:
    """A PNG of source code as an editor shows it: dark text on a white page."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("L", (1200, 900), 255)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=22)
    for i, line in enumerate(Path(__file__).read_text().splitlines()[:34]):
        draw.text((30, 20 + 25 * i), line, fill=20, font=font)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def non_radiographs() -> dict[str, bytes]:
    """PNGs of things that are no radiograph: a code screenshot, and scikit-image's sample
    photographs and documents where scikit-image is installed (the test extra)."""
    from PIL import Image

    out = {"code-screenshot": code_screenshot()}
    try:
        import skimage.data
    except ImportError:
        return out
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "text", "page", "brick"):
        buf = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).save(buf, format="PNG")
        out[name] = buf.getvalue()
    return out


def _features(plan: Plan, works: list[ImageWork]) -> np.ndarray:
    """The pipeline's crop and orient stages, then the classifier's pooled features (views
    averaged; the detector is not needed)."""
    masks = take_crops(works, plan.cropper, plan.options)
    if plan.orienter is not None:
        orient_crops(works, masks, plan.orienter, float(plan.cropper.card.crop_margin))
    batch = np.stack([model_input(w.crop, plan.classifier.spec, w.crop_levels)[0] for w in works])
    features = classify_with_features(plan.classifier, batch)[1]
    if features is None:
        raise ValueError(f"{plan.classifier.name} exposes no features")
    return features


def features_of(plan: Plan, records: list[Record], shift: str = "none") -> np.ndarray:
    """The classifier's pooled features of each record's served crop."""
    rows = []
    for start in progress(range(0, len(records), 8), f"features ({shift})"):
        works = [
            ImageWork(image=decode_record(r, shift)[0], decode_ms=0.0)
            for r in records[start : start + 8]
        ]
        rows.append(_features(plan, works))
    return np.concatenate(rows)


def features_of_images(plan: Plan, images: dict[str, bytes]) -> np.ndarray:
    works = [
        ImageWork(image=decode(data, "image/png", name, 10**9, []), decode_ms=0.0)
        for name, data in images.items()
    ]
    return _features(plan, works)


def fit(
    models_dir: Path, limit: int | None = None, shifts: tuple[str, ...] = REPORT_SHIFTS
) -> dict[str, Any]:
    """Fit on train, threshold on val, check under shifts and on non-radiographs; the summary,
    the reference and the graph with features written to runs/familiarity/."""
    plan = served_plan(models_dir)
    clf = plan.classifier
    tensor = pooled_feature_tensor(clf.path)
    OUT.mkdir(parents=True, exist_ok=True)
    graph = with_feature_output(clf.path, tensor, OUT / clf.path.name)
    card = clf.card.model_copy(update={"sha256": sha256_of(graph)})  # the same card, new file
    exposed = OnnxModel(graph, clf.input, None, card, feature_output=tensor)
    exposed.load(choose_providers("cpu"), 0)
    plan = Plan.of(plan.cropper, exposed, plan.detector, plan.point, plan.orienter, plan.options)
    records = load_records()
    train = [r for r in records if r.split == "train"][:limit]
    val = [r for r in records if r.split == "val"][:limit]
    reference = FeatureReference.fit(features_of(plan, train), DIMS)
    reference.save(OUT / "reference.npz")
    val_scores = reference.score(features_of(plan, val))
    threshold = float(np.quantile(val_scores, FLAG_QUANTILE))
    summary: dict[str, Any] = {
        "feature_output": tensor,
        "train_images": len(train),
        "val_images": len(val),
        "threshold": round(threshold, 6),
        "val_flagged": round(float(np.mean(val_scores > threshold)), 4),
        "train_median_score": round(
            float(np.median(reference.score(features_of(plan, train[:200])))), 4
        ),
        "val_median_score": round(float(np.median(val_scores)), 4),
        "shifts": {},
    }
    highest = float(val_scores.max())
    for shift in shifts:
        shifted = reference.score(features_of(plan, val, shift))
        highest = max(highest, float(shifted.max()))
        labels = [0] * len(val_scores) + [1] * len(shifted)
        auroc = metrics.classification_metrics(labels, [*val_scores, *shifted], 0.5)["auroc"]
        summary["shifts"][shift] = {
            "flagged": round(float(np.mean(shifted > threshold)), 4),
            "auroc_against_val": round(float(auroc), 4),
            "max_score": round(float(shifted.max()), 4),
        }
    refuse_above = REFUSE_MARGIN * highest
    summary["refuse_above"] = round(refuse_above, 4)
    summary["refuse_rule"] = f"{REFUSE_MARGIN} x the highest score of val and of val under " + (
        ", ".join(shifts)
    )
    probes = non_radiographs()
    summary["non_radiographs"] = {
        name: {"ood_score": round(float(s), 4), "refused": bool(s > refuse_above)}
        for name, s in zip(probes, reference.score(features_of_images(plan, probes)), strict=True)
    }
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_into_card(models_dir: Path, classifier: str, fitted: Path = OUT) -> Path:
    """Ship a fit (runs/familiarity/) with the classifier: the feature-exposing graph replaces
    its file, the reference goes beside it, and the card names both with their sha256, the
    thresholds and how each was made."""
    summary = json.loads((fitted / "summary.json").read_text())
    path = models_dir / f"{classifier}.json"
    card = json.loads(path.read_text())
    shutil.copy2(fitted / card["file"], models_dir / card["file"])
    card["sha256"] = sha256_of(models_dir / card["file"])
    ref_file = f"{classifier}.familiarity.npz"
    shutil.copy2(fitted / "reference.npz", models_dir / ref_file)
    card["familiarity"] = Familiarity(
        feature_output=summary["feature_output"],
        file=ref_file,
        sha256=sha256_of(models_dir / ref_file),
        threshold=summary["threshold"],
        refuse_above=summary["refuse_above"],
        fitted_on=f"probabilistic PCA ({DIMS} components) of the pooled features of "
        f"{summary['train_images']} FracAtlas train crops through the served pipeline",
        threshold_rule=f"{FLAG_QUANTILE:.0%} quantile of {summary['val_images']} FracAtlas val "
        "crops: 5% of val flagged",
    ).model_dump(mode="json")
    card.setdefault("metrics", {})["familiarity"] = summary
    export.save_card(path, card)
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training familiarity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    parser.add_argument("--limit", type=int, help="first N images of each split (a smoke run)")
    parser.add_argument("--write-card", action="store_true", help="ship it with the classifier")
    args = parser.parse_args(argv)
    if args.write_card and args.limit:
        parser.error("--write-card needs every image (no --limit)")
    summary = fit(args.models_dir, args.limit)
    if args.write_card:
        classifier = served_plan(args.models_dir).classifier.name
        written = write_into_card(args.models_dir, classifier)
        summary["written"] = str(written)
    print(json.dumps(summary, indent=2))
    return 0
