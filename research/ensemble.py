"""Would an ensemble of the classifiers we already trained rank better under a source shift?

    python -m research.ensemble score --shift all-rotate@3 [--limit N]
    python -m research.ensemble summary [--round 2.1.0]

`score` runs the served pipeline (default models, crop, upright turn, detector) on val under one
shift and scores the same classifier input with every member below (rot4 views; `default-d4`
with d4 views), writing one CSV per shift to runs/ensemble/<served classifier version>/.
`summary` combines them: a candidate's probability is the sigmoid of its members' mean logit,
fused with the best box at the served weight, and each is paired against the default on the
same images. The rule that says which candidate is chosen and when it ships is in
runs/ensemble/RULE.txt (written before any score). A measurement, not shipped.

Measured (val, 523 images; paired against the served default on the same images, 95% CI):
chosen on the draw-0 shifts (highest mean AUROC over none, all, all-rotate): default-d4 + ref,
none 0.921 (+0.007 [-0.001, 0.015]), all 0.854 (+0.007), all-rotate 0.846 (+0.004). On draws no
choice saw: all-rotate-512@3 0.859 against 0.853 (+0.007 [-0.007, 0.022]), all-rotate@3 0.800
against 0.797 (+0.003 [-0.011, 0.016]); mean +0.005, below the +0.010 the rule asked: not shipped.
Adding the light arm lowers every shifted figure (all-rotate -0.031 [-0.052, -0.012]); d4 views
alone +0.002 to +0.004; default + bam the best on all-rotate@3 (+0.014 [0.000, 0.027]) but
-0.005 on all-rotate@0. Two MobileNetV2s of one data set and similar recipes make the same
mistakes under a shift: averaging them returns little.

Second round (training/configs/mobilenet-member.yaml, rule in its header, fixed before training):
a member trained for other sites (every orientation, another vendor's processing, every robust
change at once) beside 2.1.0's classifier: none +0.001 [-0.005, 0.006], processing +0.019 [0.006,
0.032], all-rotate-512@8 +0.003 [-0.006, 0.011], all-rotate@8 +0.012 [0.003, 0.022]; mean +0.011,
hand and shoulder +0.012: shipped as classifier-mobilenetv2 2.2.0 (mobilenet-ensemble.yaml). A
member that errs differently returns what similar ones did not. `default` in these figures is
2.1.0; `default-d4` now reads the served 2.2.0 graph, and the member's graph comes from
runs/classifier-mobilenetv2-member/export.

Third round (served 2.2.0; scores in runs/ensemble/2.2.0/, summary --served 2.2.0): a member
balanced within each body region (candidates/mobilenet-region.yaml, rule in its header) fails
its rule (ref + balanced: none -0.006, hand and shoulder +0.005); 2.2.0's networks quantised to
int8 (`quantise`, mobilenet-ensemble.yaml's int8 rule) stay within 0.003 of float on every shift.

Fourth round (served 2.2.0 with detector 1.2.0; scores in runs/ensemble/site/, summary --round
site): a third member from other ImageNet weights, every robust change at once on half its crops
(candidates/mobilenet-site.yaml, rule in its header) fails its rule: in place of 2.2.0's member
the shifted mean is +0.004 (all-rotate@13 +0.008 [-0.006, 0.021]), all three networks +0.003;
+0.010 was asked. Draws alone move the served figure under all-rotate by up to 0.04 (@9 0.840
with detector 1.1.0, @11 0.804, @13 0.814), more than any member has added.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from app.core.config import PipelineOptions, Settings
from app.inference.model_card import fused_score
from app.inference.pipeline import (
    ImageWork,
    classify,
    mean_logit,
    run_study,
)
from app.inference.preprocessing import model_input
from app.inference.runtime import OnnxModel
from training import metrics
from training.common import MODELS_DIR, REPO, read_rows, write_rows
from training.data import HAND_SHOULDER, load_records
from training.evaluate import decode_record, served_plan
from training.progress import progress
from training.shifts import shift_name

OUT = REPO / "runs" / "ensemble"
# Members besides the served classifier: (graph, test-time views).
MEMBERS = {
    "default-d4": (MODELS_DIR / "classifier-mobilenetv2.onnx", "d4"),
    "ref": (REPO / "runs/classifier-mobilenetv2/export/classifier-mobilenetv2.onnx", "rot4"),
    "light": (
        REPO / "runs/classifier-mobilenetv2-light/export/classifier-mobilenetv2-light.onnx",
        "rot4",
    ),
    "bam": (MODELS_DIR / "classifier-bam-mobilenetv2.onnx", "rot4"),
    "member": (
        REPO / "runs/classifier-mobilenetv2-member/export/classifier-mobilenetv2-member.onnx",
        "rot4",
    ),
    "balanced": (  # candidates/mobilenet-region.yaml
        REPO / "runs/classifier-mobilenetv2-region/export/classifier-mobilenetv2-region.onnx",
        "rot4",
    ),
    "site": (  # candidates/mobilenet-site.yaml
        REPO / "runs/classifier-mobilenetv2-site/export/classifier-mobilenetv2-site.onnx",
        "rot4",
    ),
}
# int8 twins of the float members (`quantise`; mobilenet-ensemble.yaml's int8 rule)
QUANTISED = ("ref", "member", "balanced", "site")
MEMBERS |= {f"{name}-int8": (OUT / "int8" / f"{name}.onnx", "rot4") for name in QUANTISED}
CHOOSE_ON = ("none", "all", "all-rotate")
# candidates/mobilenet-member.yaml's rule: its candidate, and the shifts it is judged on
MEMBER_CANDIDATE = "default+member"
MEMBER_SHIFTS = ("processing", "all-rotate-512@8", "all-rotate@8")
# candidates/mobilenet-region.yaml's rule (judged against 2.2.0): candidates, preferred first
REGION_CANDIDATES = ("ref+balanced", "ref+member+balanced")
REGION_SHIFTS = ("none", "processing", "all-rotate-512@9", "all-rotate@9")
# candidates/mobilenet-site.yaml's rule (judged against 2.2.0): candidates, preferred first
SITE_CANDIDATES = ("ref+site", "ref+member+site")
SITE_SHIFTS = ("none", "processing@13", "all-rotate-512@13", "all-rotate@13")


def scores_dir(round_name: str) -> Path:
    """Where one round's scores go: named by the classifier served then (`default`; 2.1.0: the
    member round, 2.2.0: the region round) unless a round names itself (the site round: 2.2.0
    with detector 1.2.0, whose best box differs from the region round's 1.1.0)."""
    return OUT / round_name


def quantise() -> list[Path]:
    """The int8 twin of every float member in QUANTISED whose graph exists here, quantised as
    the ensemble family does (the same 128 seeded train crops)."""
    from training.classifier import int8_calibration_inputs
    from training.data import load_cache
    from training.export import quantize_static_int8

    clf = served_plan(MODELS_DIR).classifier
    inputs = int8_calibration_inputs(load_cache(splits=["train"]), clf.card.input)
    written = []
    for name in QUANTISED:
        if MEMBERS[name][0].exists():
            out = MEMBERS[f"{name}-int8"][0]
            out.parent.mkdir(parents=True, exist_ok=True)
            written.append(quantize_static_int8(MEMBERS[name][0], out, inputs))
    return written


def score(
    shift: str, limit: int | None, only: set[str] | None = None, round_name: str | None = None
) -> Path:
    # as the lab always measured it: the upright turn only, every box above the collection floor
    plan = served_plan(MODELS_DIR)
    plan = replace(plan, options=PipelineOptions(upright=Settings().upright), orienter=None)
    clf, fusion = plan.classifier, plan.scoring.fusion
    assert fusion is not None, "the served classifier fuses with the default detector"
    wanted = only or set(MEMBERS)
    members = {
        name: OnnxModel.unshipped(path, clf.card.input.model_copy(update={"tta": tta}))
        for name, (path, tta) in MEMBERS.items()
        # runs/ of another machine: its members are scored where they exist
        if name in wanted and path.exists()
    }
    if missing := sorted(wanted - set(members)):
        print(f"not scored (no graph here): {', '.join(missing)}", file=sys.stderr)
    for m in members.values():
        m.load(["CPUExecutionProvider"], 0)
    records = [r for r in load_records() if r.split == "val"][:limit]
    rows = []
    for start in progress(range(0, len(records), 8), f"ensemble ({shift})"):
        chunk = records[start : start + 8]
        works = [ImageWork(image=decode_record(r, shift)[0], decode_ms=0.0) for r in chunk]
        run_study(works, plan)
        batch = np.stack([model_input(w.crop, clf.spec, w.crop_levels)[0] for w in works])
        extra = {name: classify(m, batch) for name, m in members.items()}
        for i, (rec, w) in enumerate(zip(chunk, works, strict=True)):
            row = {"image_id": rec.image_id, "region": rec.region, "fractured": int(rec.fractured)}
            row |= {"max_box": w.max_box_score, "default": w.classifier_probability}
            row |= {name: float(p[i]) for name, p in extra.items()}
            rows.append(row)
    # a run on the first images only (--limit) is a smoke test: kept apart from the round's files
    folder = scores_dir(round_name or clf.card.version) / ("smoke" if limit else "")
    path = folder / f"scores-{shift}.csv"
    return write_rows(path, with_earlier_members(path, rows))


def with_earlier_members(path: Path, rows: list[dict]) -> list[dict]:
    """`rows` with the columns of members an earlier score of the same images wrote to `path`
    and this one did not score (a round adds members to the files of the shifts it shares with
    another, e.g. `none`); a file of other images is replaced."""
    if not path.exists():
        return rows
    earlier = read_rows(path)
    if [r["image_id"] for r in earlier] != [r["image_id"] for r in rows]:
        return rows
    return [old | new for old, new in zip(earlier, rows, strict=True)]


def candidates(scored: set[str]) -> dict[str, tuple[str, ...]]:
    """Every candidate whose members were all scored: each member alone, the default with any
    subset of the first round's others, and the later rounds' own candidates."""
    out: dict[str, tuple[str, ...]] = {"default": ("default",)}
    out |= {name: (name,) for name in MEMBERS}
    others = [m for m in ("ref", "light", "bam", "member") if m in scored]
    for k in range(1, len(others) + 1):
        for subset in itertools.combinations(others, k):
            out["+".join(("default", *subset))] = ("default", *subset)
    out["default-d4+ref"] = ("default-d4", "ref")
    for name in ("ref+member", *REGION_CANDIDATES, *SITE_CANDIDATES):
        out[name] = tuple(name.split("+"))
        out[int8_twin(name)] = tuple(int8_twin(name).split("+"))
    return {name: members for name, members in out.items() if set(members) <= scored}


def ensemble_scores(rows: list[dict], members: tuple[str, ...], weight: float) -> np.ndarray:
    probs = np.array([[float(r[m]) for r in rows] for m in members])  # members x images
    return fused_score(mean_logit(probs), np.array([float(r["max_box"]) for r in rows]), weight)


def summary(round_name: str) -> dict:
    weight = served_plan(MODELS_DIR).scoring.fusion.classifier_weight
    tables = {}
    for path in sorted(scores_dir(round_name).glob("scores-*.csv")):
        tables[path.stem.removeprefix("scores-")] = read_rows(path)
    out: dict = {"weight": weight, "shifts": {}}
    for shift, rows in tables.items():
        y = [int(r["fractured"]) for r in rows]
        hs = [i for i, r in enumerate(rows) if r["region"] in HAND_SHOULDER]
        base = ensemble_scores(rows, ("default",), weight)
        per = {}
        for name, members in candidates(set(rows[0])).items():
            s = ensemble_scores(rows, members, weight)
            d = metrics.paired_auroc_difference(y, base, s)
            per[name] = {
                "auroc": d["auroc_b"],
                "vs_default": d["delta"],
                "ci95": d["delta_ci95"],
                "hand_shoulder": metrics.classification_metrics([y[i] for i in hs], s[hs], 0.5)[
                    "auroc"
                ],
            }
        out["shifts"][shift] = per
    if all(s in out["shifts"] for s in CHOOSE_ON):
        # the first round chose among the default's own combinations
        names = set.intersection(*(set(out["shifts"][s]) for s in CHOOSE_ON)) - {"default"}
        names = {name for name in names if name.startswith("default")}
        means = {
            name: float(np.mean([out["shifts"][s][name]["auroc"] for s in CHOOSE_ON]))
            for name in sorted(names)
        }
        out["choice"] = {"mean_auroc_on_draw_0": means, "chosen": max(means, key=means.get)}
    if all(MEMBER_CANDIDATE in out["shifts"].get(s, {}) for s in ("none", *MEMBER_SHIFTS)):
        out["member_rule"] = member_rule(out["shifts"])
    for key, names, conditions, gains in (
        ("region_rule", REGION_CANDIDATES, REGION_SHIFTS, {"hand_shoulder": 0.010, "shifted": 0.0}),
        ("site_rule", SITE_CANDIDATES, SITE_SHIFTS, {"hand_shoulder": 0.0, "shifted": 0.010}),
    ):
        if all(c in out["shifts"].get(s, {}) for c in names for s in conditions):
            out[key] = {c: against_served(out["shifts"], c, conditions, gains) for c in names}
    for key, names, conditions in (
        ("int8_rule", ("ref+member", *REGION_CANDIDATES), REGION_SHIFTS),
        ("int8_rule_site", SITE_CANDIDATES, SITE_SHIFTS),
    ):
        out[key] = {
            name: int8_rule(tables, name, weight, conditions)
            for name in names
            if all(int8_twin(name) in out["shifts"].get(s, {}) for s in conditions)
        }
    return out


def int8_twin(candidate: str) -> str:
    return "+".join(f"{m}-int8" for m in candidate.split("+"))


def int8_rule(
    tables: dict[str, list[dict]], candidate: str, weight: float, conditions: tuple[str, ...]
) -> dict:
    """mobilenet-ensemble.yaml's int8 rule for one candidate on `conditions` (none first): its
    int8 twin paired against it in float on the same images (the latency condition is
    bench/latency.py's, checked apart)."""
    members, twins = tuple(candidate.split("+")), tuple(int8_twin(candidate).split("+"))
    per, hs = {}, {}
    for shift in conditions:
        rows = tables[shift]
        y = np.array([int(r["fractured"]) for r in rows])
        a, b = ensemble_scores(rows, members, weight), ensemble_scores(rows, twins, weight)
        per[shift] = metrics.paired_auroc_difference(y, a, b)
        upper = np.array([r["region"] in HAND_SHOULDER for r in rows])
        hs[shift] = metrics.paired_auroc_difference(y[upper], a[upper], b[upper])["delta"]
    shifted = float(np.mean([per[s]["delta"] for s in conditions[1:]]))
    checks = {
        "none >= -0.005": per["none"]["delta"] >= -0.005,
        "shifted all-region mean >= -0.005": shifted >= -0.005,
        "hand-and-shoulder mean >= -0.005": float(np.mean(list(hs.values()))) >= -0.005,
    }
    return {
        "per_shift": {s: {"delta": d["delta"], "ci95": d["delta_ci95"]} for s, d in per.items()},
        "hand_shoulder": hs,
        "checks": checks,
        "passes": all(checks.values()),
    }


def member_rule(shifts: dict) -> dict:
    """candidates/mobilenet-member.yaml's rule, condition by condition."""
    cand = [shifts[s][MEMBER_CANDIDATE] for s in MEMBER_SHIFTS]
    base = [shifts[s]["default"] for s in MEMBER_SHIFTS]
    gain = float(np.mean([c["auroc"] for c in cand]) - np.mean([b["auroc"] for b in base]))
    hs = float(
        np.mean([c["hand_shoulder"] for c in cand]) - np.mean([b["hand_shoulder"] for b in base])
    )
    none = shifts["none"][MEMBER_CANDIDATE]["vs_default"]
    checks = {"none >= -0.005": none >= -0.005, "mean gain >= 0.010": gain >= 0.010}
    checks["hand-and-shoulder mean not lower"] = hs >= 0.0
    return {
        "none": none,
        "mean_gain": gain,
        "hand_shoulder_gain": hs,
        "checks": checks,
        "ships": all(checks.values()),
    }


def against_served(
    shifts: dict, candidate: str, conditions: tuple[str, ...], gains: dict[str, float]
) -> dict:
    """A rule against the served classifier (`default`) on `conditions` (none first), condition
    by condition: none >= -0.005; the hand-and-shoulder AUROC averaged over every condition and
    the all-region AUROC averaged over the shifted ones each at least `gains` above the
    default's (candidates/mobilenet-region.yaml and mobilenet-site.yaml; a latency condition is
    bench/latency.py's, checked apart)."""

    def mean(name: str, key: str, names: tuple[str, ...]) -> float:
        return float(np.mean([shifts[s][name][key] for s in names]))

    none = shifts["none"][candidate]["vs_default"]
    hs = mean(candidate, "hand_shoulder", conditions) - mean("default", "hand_shoulder", conditions)
    shifted = mean(candidate, "auroc", conditions[1:]) - mean("default", "auroc", conditions[1:])
    checks = {
        "none >= -0.005": none >= -0.005,
        f"hand-and-shoulder mean gain >= {gains['hand_shoulder']:.3f}": hs
        >= gains["hand_shoulder"],
        f"shifted all-region mean gain >= {gains['shifted']:.3f}": shifted >= gains["shifted"],
    }
    return {
        "none": none,
        "hand_shoulder_gain": hs,
        "shifted_gain": shifted,
        "checks": checks,
        "passes": all(checks.values()),
    }


ROUND_HELP = "the round's folder under runs/ensemble/"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("score")
    sc.add_argument("--shift", type=shift_name, required=True)
    sc.add_argument("--limit", type=int, default=None)
    sc.add_argument("--members", default=None, help="comma-separated: score only these")
    sc.add_argument("--round", default=None, help=ROUND_HELP + " (default: served version)")
    sub.add_parser("quantise")
    sm = sub.add_parser("summary")
    sm.add_argument("--round", "--served", dest="round", default="2.2.0", help=ROUND_HELP)
    args = ap.parse_args()
    if args.command == "score":
        only = set(args.members.split(",")) if args.members else None
        print(score(args.shift, args.limit, only, args.round))
    elif args.command == "quantise":
        print("\n".join(str(p) for p in quantise()))
    else:
        print(json.dumps(summary(args.round), indent=1))


if __name__ == "__main__":
    main()
