"""What would more labelled radiographs be worth? Val AUROC of the default recipe on fewer of them.

    python -m training mobilenet --config training/configs/candidates/mobilenet-data-fraction.yaml \
      --set finetune.train_fraction=0.5 --set name=classifier-mobilenetv2-fraction50   # and 0.25
    python -m research.learning_curve \
      runs/classifier-mobilenetv2-fraction50 runs/classifier-mobilenetv2-fraction25

The full-data point is the shipped default's first network (classifier-mobilenetv2 2.2.0 holds
2.0.0's weights beside the member; taken out of the merged graph here, its mean over one network),
trained by the same recipe and seed on every train image. Each network scores the val weak-mask
crops (the crops each run's card measures val on) with the rot4 views it is served with; AUROC
over all images and over hand and shoulder, each paired against the full-data network on the same
images (95% paired bootstrap). Each run chose its epoch on val, so every point is equally
optimistic; a measurement, no choice.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from training.classifier import crops_as_array, input_spec, onnx_scores
from training.data import DEFAULT_CACHE, HAND_SHOULDER, load_cache
from training.metrics import paired_auroc_difference

SHIPPED = Path("models/classifier-mobilenetv2.onnx")


def first_network(ensemble: Path, out: Path) -> Path:
    """The merged classifier with only its first network feeding the mean (training/families/
    ensemble.py names the members' nodes member0_, member1_ ... and sums their logits)."""
    import onnx

    model = onnx.load(str(ensemble))
    for node in model.graph.node:
        if node.op_type == "Sum" and list(node.output) == ["logit_sum"]:
            kept = [name for name in node.input if name.startswith("member0_")]
            del node.input[:]
            node.input.extend(kept)
        if node.op_type == "Constant" and list(node.output) == ["member_count"]:
            node.attribute[0].f = 1.0  # value_float: the count of networks averaged
    onnx.save(model, str(out))
    onnx.utils.extract_model(str(out), str(out), ["image"], ["probability"])  # member1 pruned
    return out


def val_crops() -> tuple[Any, dict[str, Any], np.ndarray, np.ndarray]:
    """The val weak-mask crops at 288 px with the rot4 views' spec, their labels and which are
    hand or shoulder: what every classifier card measures val on."""
    import torch

    items = load_cache(DEFAULT_CACHE, ["val"])
    x = torch.from_numpy(crops_as_array(items, 288, use_boxes=False))
    spec = input_spec(288, 0.5, 0.5, "rot4")
    y = np.array([int(it.fractured) for it in items])
    upper = np.array([it.region in HAND_SHOULDER for it in items])
    return x, spec, y, upper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders with export/*.onnx")
    args = parser.parse_args()
    x, spec, y, upper = val_crops()
    with tempfile.TemporaryDirectory() as tmp:
        full = onnx_scores(first_network(SHIPPED, Path(tmp) / "first.onnx"), x, spec)
    for run in args.runs:
        onnx_path = next((run / "export").glob("*.onnx"))
        scores = onnx_scores(onnx_path, x, spec)
        for name, keep in (("all", np.ones_like(upper)), ("hand and shoulder", upper)):
            d = paired_auroc_difference(y[keep], full[keep], scores[keep])
            lo, hi = d["delta_ci95"]
            print(
                f"{run.name:36s} {name:18s} n={d['n']:4d} full data {d['auroc_a']:.3f} "
                f"this run {d['auroc_b']:.3f} ({d['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}])"
            )


if __name__ == "__main__":
    main()
