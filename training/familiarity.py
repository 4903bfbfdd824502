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

Grey images that are no radiograph but look no stranger to the PCA than a heavily processed
radiograph (a page of code scores below some shifted FracAtlas images) are told apart by a
second, supervised look at the same features: a logistic probe fitted on radiographs (train
images, plain and under the source shifts) against grey images of six kinds that are none
(training/non_radiographs.py: pages, dark editors, windows, spreadsheets, charts, photographs).
The rule, fixed before it was scored: refuse an image both flagged and with a probe logit more
than PROBE_MARGIN above the highest logit of any val radiograph, plain or shifted. Each family
of non-radiographs is also left out of the probe's fit in turn and measured as unseen; radiographs
under shifts the probe never saw (`markers`, `contrast`, `all-rotate`) measure the false refusals.
Features are cached under runs/familiarity/features/ by graph digest, so a rerun costs minutes.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from app.inference.decoding import decode
from app.inference.familiarity import FeatureReference, RadiographProbe
from app.inference.model_card import Familiarity
from app.inference.pipeline import ImageWork, classify_with_features, orient_crops, take_crops
from app.inference.plan import Plan
from app.inference.preprocessing import model_input
from app.inference.runtime import OnnxModel, choose_providers, sha256_of
from training import export, metrics, non_radiographs
from training.common import MODELS_DIR, REPO
from training.data import Record, load_records
from training.evaluate import decode_record, served_plan
from training.progress import progress

DIMS = 64
FLAG_QUANTILE = 0.95
REPORT_SHIFTS = ("processing", "lowres", "all-rotate-512")
REFUSE_MARGIN = 1.5
OUT = REPO / "runs" / "familiarity"
# The radiograph probe: its positives (train images, plain and under these shifts), negatives (per
# family of non-radiographs), its L2 strength, the margin of its refusal rule (in logits above
# the highest val radiograph) and the shifts that check it for false refusals (val, first N).
PROBE_TRAIN_IMAGES = 300
PROBE_SHIFTS = ("processing", "all-rotate-512", "lowres")
PROBE_NEGATIVES = 120
PROBE_C = 0.1
PROBE_MARGIN = 2.0
CHECK_SHIFTS = ("markers", "contrast", "all-rotate")
CHECK_IMAGES = 150


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


def non_radiographs_named() -> dict[str, bytes]:
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


def _cached(plan: Plan, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Features computed once per classifier graph (its sha256) and key."""
    digest = plan.classifier.card.sha256[:12] if plan.classifier.card else "nocard"
    path = OUT / "features" / f"{digest}-{key}.npy"
    if path.is_file():
        return np.load(path)
    rows = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, rows)
    return rows


def features_of(plan: Plan, records: list[Record], shift: str = "none") -> np.ndarray:
    """The classifier's pooled features of each record's served crop (cached: the records'
    split, count and shift name the entry)."""
    splits = "+".join(sorted({r.split for r in records}))
    key = f"{splits}-{len(records)}-{records[0].image_id if records else 'none'}-{shift}"
    return _cached(plan, key, lambda: _features_of(plan, records, shift))


def _features_of(plan: Plan, records: list[Record], shift: str) -> np.ndarray:
    rows = []
    for start in progress(range(0, len(records), 8), f"features ({shift})"):
        works = [
            ImageWork(image=decode_record(r, shift)[0], decode_ms=0.0)
            for r in records[start : start + 8]
        ]
        rows.append(_features(plan, works))
    return np.concatenate(rows)


def features_of_images(
    plan: Plan, images: dict[str, bytes] | list[tuple[bytes, str]]
) -> np.ndarray:
    """Pooled features of encoded images: {name: PNG bytes}, or (bytes, content type) pairs."""
    items = (
        [(data, "image/png", name) for name, data in images.items()]
        if isinstance(images, dict)
        else [(data, ctype, f"image-{i}") for i, (data, ctype) in enumerate(images)]
    )
    rows = []
    for start in progress(range(0, len(items), 8), "features (non-radiographs)"):
        works = [
            ImageWork(image=decode(data, ctype, name, 10**9, []), decode_ms=0.0)
            for data, ctype, name in items[start : start + 8]
        ]
        rows.append(_features(plan, works))
    return np.concatenate(rows)


def fit_probe(radiographs: np.ndarray, others: np.ndarray) -> RadiographProbe:
    """Logistic regression (L2, classes balanced) of 'no radiograph' on standardised features,
    folded back onto the raw features."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([radiographs, others]).astype(np.float64)
    y = np.r_[np.zeros(len(radiographs)), np.ones(len(others))]
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    model = LogisticRegression(C=PROBE_C, class_weight="balanced", max_iter=5000)
    model.fit((x - mean) / scale, y)
    weights = model.coef_[0] / scale
    return RadiographProbe(weights, float(model.intercept_[0] - weights @ mean))


def probe_limit(probe: RadiographProbe, held_out_radiographs: np.ndarray) -> float:
    """The refusal rule's logit: PROBE_MARGIN above the highest held-out radiograph's."""
    return float(max(0.0, probe.logit(held_out_radiographs).max()) + PROBE_MARGIN)


def _probe_summary(
    plan: Plan,
    reference: FeatureReference,
    flag: float,
    val_sets: dict[str, np.ndarray],
    train: list[Record],
    train_plain: np.ndarray,
    val: list[Record],
) -> tuple[RadiographProbe, float, dict[str, Any]]:
    """Fit the probe on everything, then measure it: each family left out, radiographs under
    unseen shifts, the fixed probes."""
    # every train radiograph as it is (hardware, casts, odd exposures: an external fixator's
    # rods scored close to the limit when only the first 300 were here), and the first
    # PROBE_TRAIN_IMAGES under each shift
    positives = np.concatenate(
        [train_plain]
        + [features_of(plan, train[:PROBE_TRAIN_IMAGES], shift) for shift in PROBE_SHIFTS]
    )
    families = {
        family: _cached(
            plan,
            f"non-radiographs-{family}-{PROBE_NEGATIVES}",
            lambda family=family: features_of_images(
                plan, non_radiographs.draw(family, PROBE_NEGATIVES)
            ),
        )
        for family in non_radiographs.FAMILIES
    }
    held_out = np.concatenate(list(val_sets.values()))

    def refused(probe: RadiographProbe, limit: float, feats: np.ndarray) -> np.ndarray:
        return (probe.logit(feats) > limit) & (reference.score(feats) > flag)

    left_out = {}
    for family, feats in families.items():
        others = np.concatenate([f for name, f in families.items() if name != family])
        probe = fit_probe(positives, others)
        left_out[family] = round(
            float(refused(probe, probe_limit(probe, held_out), feats).mean()), 4
        )
    probe = fit_probe(positives, np.concatenate(list(families.values())))
    limit = probe_limit(probe, held_out)
    checks = {}
    for shift in CHECK_SHIFTS:
        feats = features_of(plan, val[:CHECK_IMAGES], shift)
        checks[shift] = round(float(refused(probe, limit, feats).mean()), 4)
    summary = {
        "rule": f"flagged and logit above {PROBE_MARGIN} + the highest of val radiographs "
        f"({', '.join(val_sets)})",
        "refuse_above": round(limit, 4),
        "positives": f"{len(positives)}: {len(train_plain)} train images, and the first "
        f"{min(PROBE_TRAIN_IMAGES, len(train))} under " + ", ".join(PROBE_SHIFTS),
        "negatives": f"{PROBE_NEGATIVES} per family: " + ", ".join(families),
        "family_left_out_refused": left_out,
        "val_radiographs_highest_logit": round(float(probe.logit(held_out).max()), 4),
        "unseen_shift_refused": {f"val[:{CHECK_IMAGES}] {k}": v for k, v in checks.items()},
    }
    return probe, limit, summary


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
    # the same card, new file, and no reference yet (a refit replaces the one it ships with)
    card = clf.card.model_copy(update={"sha256": sha256_of(graph), "familiarity": None})
    exposed = OnnxModel(graph, clf.input, None, card, feature_output=tensor)
    exposed.load(choose_providers("cpu"), 0)
    plan = Plan.of(plan.cropper, exposed, plan.detector, plan.point, plan.orienter, plan.options)
    records = load_records()
    train = [r for r in records if r.split == "train"][:limit]
    val = [r for r in records if r.split == "val"][:limit]
    train_features = features_of(plan, train)
    reference = FeatureReference.fit(train_features, DIMS)
    val_features = features_of(plan, val)
    val_scores = reference.score(val_features)
    threshold = float(np.quantile(val_scores, FLAG_QUANTILE))
    summary: dict[str, Any] = {
        "feature_output": tensor,
        "train_images": len(train),
        "val_images": len(val),
        "threshold": round(threshold, 6),
        "val_flagged": round(float(np.mean(val_scores > threshold)), 4),
        "train_median_score": round(float(np.median(reference.score(train_features[:200]))), 4),
        "val_median_score": round(float(np.median(val_scores)), 4),
        "shifts": {},
    }
    highest = float(val_scores.max())
    val_sets = {"none": val_features}
    for shift in shifts:
        val_sets[shift] = features_of(plan, val, shift)
        shifted = reference.score(val_sets[shift])
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
    probe, probe_refuse_above, summary["probe"] = _probe_summary(
        plan, reference, threshold, val_sets, train, train_features, val
    )
    probe.save_with(reference, OUT / "reference.npz")
    summary["probe_refuse_above"] = round(probe_refuse_above, 4)
    probes = non_radiographs_named()
    feats = features_of_images(plan, probes)
    ood, logits = reference.score(feats), probe.logit(feats)
    summary["non_radiographs"] = {
        name: {
            "ood_score": round(float(o), 4),
            "probe_logit": round(float(g), 4),
            "refused": bool(o > refuse_above or (o > threshold and g > probe_refuse_above)),
        }
        for name, o, g in zip(probes, ood, logits, strict=True)
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
        probe_refuse_above=summary.get("probe_refuse_above"),
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
