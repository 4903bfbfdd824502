"""ONNX export, parity check and model card for every family: torch graphs go through
export_onnx (YOLOv8 alone through ultralytics' exporter, which knows its head), and every card
through write_card, validated against the service's schema."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.inference.model_card import InputSpec, ModelCard, validate_card
from app.inference.runtime import sha256_of

# The fields every card has (app.inference.model_card.ModelCard says what each must hold).
CARD_FIELDS = tuple(n for n, f in ModelCard.model_fields.items() if f.is_required())


def input_spec(
    size: int,
    *,
    resize: str = "letterbox",
    channels: int = 3,
    mean: float = 0.0,
    std: float = 1.0,
    pad_value: float = 0.0,
    batch: bool = True,
    tta: str = "none",
) -> InputSpec:
    """A card's input block (square input, one mean/std for every channel), as the service
    reads it."""
    return InputSpec(
        size=(size, size),
        resize=resize,
        pad_value=pad_value,
        channels=channels,
        mean=[mean] * channels,
        std=[std] * channels,
        batch=batch,
        tta=tta,
    )


def export_onnx(
    model: Any,
    example: Any,
    path: Path,
    input_names: Sequence[str] = ("input",),
    output_names: Sequence[str] = ("output",),
    dynamic_batch: bool = True,
    opset: int = 17,
) -> Path:
    """Export a torch module to ONNX (legacy tracer: stable for CNNs, opset >= 17)."""
    import torch

    model.eval()
    axes = {n: {0: "batch"} for n in (*input_names, *output_names)} if dynamic_batch else None
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            model,
            example,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    return path


def check_parity(model: Any, path: Path, batch: np.ndarray, tolerance: float) -> float:
    """Max abs difference between torch and onnxruntime on `batch`; raises above tolerance."""
    import onnxruntime as ort
    import torch

    model.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(batch))
    refs = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = session.run(None, {session.get_inputs()[0].name: batch})
    diff = max(
        float(np.max(np.abs(r.numpy() - o))) if r.numel() else 0.0
        for r, o in zip(refs, outs, strict=True)
    )
    if diff > tolerance:
        raise RuntimeError(
            f"ONNX parity failed for {path.name}: max abs diff {diff:.3g} > {tolerance}"
        )
    return diff


def onnx_outputs(path: Path, batch: np.ndarray, chunk: int = 64) -> np.ndarray:
    """First output of an ONNX graph on a batch, on the CPU."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: batch[i : i + chunk]})[0] for i in range(0, len(batch), chunk)]
    )


def quantize_int8(model: Any, path: Path, batch: np.ndarray, tolerance: float) -> float:
    """Replace an fp32 ONNX file by its dynamically int8-quantised version; checks the drift."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = path.with_suffix(".fp32.onnx")
    path.replace(fp32)
    quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8)
    fp32.unlink()
    return check_parity(model, path, batch, tolerance)


def _head_nodes(model: Any) -> list[str]:
    """Names of the nodes after a classifier's backbone: everything after the last Conv (or its
    activation) whose output is, at that point, the only tensor still to be read (the feature
    map that the pooled head and the per-cell head both read)."""
    nodes = list(model.graph.node)
    remaining: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            remaining[name] = remaining.get(name, 0) + 1
    live = {x.name for x in model.graph.input}
    cut = -1
    for i, node in enumerate(nodes):
        for name in node.input:
            if name in live:
                remaining[name] -= 1
                if remaining[name] == 0:
                    live.discard(name)
        if node.op_type != "Constant":
            live |= {name for name in node.output if remaining.get(name, 0) > 0}
        if node.op_type in ("Conv", "Clip", "Relu") and live == set(node.output):
            cut = i
    if cut < 0:
        raise ValueError("no Conv feature map that every path to the output passes through")
    return [node.name for node in nodes[cut + 1 :]]


def quantize_static_int8(source: Path, out: Path, calibration: np.ndarray) -> Path:
    """A convolutional classifier with int8 weights (per channel) and uint8 activations whose
    ranges are read from `calibration` (model inputs, n x c x h x w): QDQ format, which
    onnxruntime runs as integer kernels on the CPU (VNNI) and the GPU providers. The backbone's
    feature map is the last quantised tensor: the heads, the logit and the Sigmoid stay float
    (an 8-bit logit would tie scores that the float graph ranks apart), and the graph still ends
    in its Sigmoid (average_logit_graph merges such graphs)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self.name, self.start = name, 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.start >= len(calibration):
                return None
            batch = calibration[self.start : self.start + 16].astype(np.float32)
            self.start += 16
            return {self.name: batch}

    with tempfile.TemporaryDirectory() as tmp:
        folded = Path(tmp) / "folded.onnx"
        # constant folding and shapes first; onnxruntime's symbolic shape pass cannot read
        # the exported Constant nodes, and every input size here is fixed anyway
        quant_pre_process(str(source), str(folded), skip_symbolic_shape=True)
        model = onnx.load(str(folded))
        for i, node in enumerate(model.graph.node):  # exclusion goes by node name
            node.name = node.name or f"{node.op_type}_{i}"
        onnx.save(model, str(folded))
        quantize_static(
            str(folded),
            str(out),
            Batches(model.graph.input[0].name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=_head_nodes(model),
        )
    return out


INTENDED_USE = (
    "Research and engineering evaluation of fracture detection on musculoskeletal radiographs "
    "(CR/DX/RG, one view per image, adult and paediatric limbs, hip, shoulder as in FracAtlas): "
    "a second reader's prompt that a radiologist reviews. Not a medical device; not for primary "
    "diagnosis or triage without a radiologist."
)
OUT_OF_SCOPE = [
    "other modalities (CT, MRI, mammography) and body regions outside FracAtlas (spine, skull, "
    "chest, pelvis beyond the hip)",
    "ruling a fracture out: a low probability does not exclude one",
    "images from a site whose operating points have not been checked (see site calibration)",
]
LIMITATIONS = [
    "trained on one public data set (FracAtlas, 3,471 images of a few Bangladeshi hospitals): "
    "other scanners, processing and populations shift the scores; measured under simulated "
    "source shifts in the evaluation, and sites should calibrate on their own labelled images",
    "the splits are by image, not by patient (FracAtlas has no patient ids): views of one study "
    "can fall in train and test, which flatters the test figures",
    "small fractured counts (about 90 per val/test split): every figure carries a bootstrap 95% "
    "interval; differences below about 0.02 AUROC are within noise",
    "trained on a 2-core CPU: far shorter schedules than the published systems",
]


def standard_sections(card: dict[str, Any]) -> dict[str, Any]:
    """What every card says besides its numbers (Hugging Face / MONAI bundle practice): intended
    and out-of-scope use, limitations, creation time and the library versions that made it."""
    import platform
    from datetime import UTC, datetime
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for package in ("torch", "torchvision", "onnx", "onnxruntime", "ultralytics", "timm"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {
        "intended_use": INTENDED_USE,
        "out_of_scope": OUT_OF_SCOPE,
        "limitations": LIMITATIONS,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "software_versions": versions,
        "changelog": [{"version": str(card.get("version")), "change": "first release"}],
        **card,
    }


def ship_card(
    onnx_path: Path,
    recipe: dict[str, Any],
    log: Any,
    *,
    task: str,
    spec: InputSpec,
    output: dict[str, Any],
    data: str,
    licence: str,
    metrics: dict[str, Any],
    name: str | None = None,
    train_time_s: float | None = None,
    **role_fields: Any,
) -> dict[str, Any]:
    """The one card builder every family uses: identity from the recipe (`name` overrides it),
    the input spec as the service reads it, the family's role fields (decision threshold,
    operating points, crop margin, architecture, ...), the measured metrics, the hardware and
    training time of the run (`log`, a common.RunLog; `train_time_s` when the model's training
    was spent elsewhere, e.g. an ensemble's members); validated and written beside the graph
    (write_card), and the run's `done` line logged."""
    from training import common

    card = {
        "name": name or recipe["name"],
        "version": recipe["version"],
        "task": task,
        "input": spec.model_dump(mode="json"),
        "output": output,
        "data": data,
        "recipe": recipe,
        "licence": licence,
        **role_fields,
        "metrics": metrics,
        "trained_on": common.hardware(),
        "train_time_s": log.training_seconds() if train_time_s is None else train_time_s,
    }
    write_card(onnx_path, card)
    log.write(event="done", metrics=metrics)
    return card


def save_card(path: Path, card: dict[str, Any]) -> Path:
    """A card changed after training (calibration, verdict, familiarity, a site's adaptation)
    written back, validated first against the schema the service loads it with."""
    validate_card(card, path.name)
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


def write_card(onnx_path: Path, card: dict[str, Any]) -> Path:
    """Write <model>.json next to the ONNX file, with the file's sha256, after validating it
    against the schema the service loads it with (app.inference.model_card.CardError otherwise)."""
    card = {**standard_sections(card), "file": onnx_path.name, "sha256": sha256_of(onnx_path)}
    text = json.dumps(card, indent=2, default=_jsonable) + "\n"
    out = onnx_path.with_suffix(".json")
    validate_card(json.loads(text), out.name)
    out.write_text(text)
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value)}")


def average_logit_graph(paths: Sequence[Path], out: Path) -> Path:
    """One classifier graph from several that share an input: each network's logit (the input of
    its final Sigmoid), their mean, then the Sigmoid. The service runs it as any classifier, and
    its probability is exactly the mean-logit ensemble of the members."""
    import onnx
    from onnx import compose, helper

    members = [onnx.load(str(p)) for p in paths]
    first = members[0].graph
    image, probability = first.input[0].name, first.output[0].name
    nodes, initializers, logits = [], [], []
    for i, model in enumerate(members):
        g = model.graph
        if [x.name for x in g.input] != [image] or [o.name for o in g.output] != [probability]:
            raise ValueError(
                f"{paths[i]}: not a classifier graph with {image!r} -> {probability!r}"
            )
        if model.opset_import != members[0].opset_import:
            raise ValueError(f"{paths[i]}: another opset than {paths[0]}")
        last = g.node[-1]
        if last.op_type != "Sigmoid" or list(last.output) != [probability]:
            raise ValueError(f"{paths[i]}: its probability is not a final Sigmoid")
        body = helper.make_graph(list(g.node[:-1]), g.name, g.input, [], g.initializer)
        prefix = f"member{i}_"
        body = compose.add_prefix_graph(body, prefix, inplace=False)
        for node in body.node:  # every member reads the one shared image
            node.input[:] = [image if x == prefix + image else x for x in node.input]
        nodes += body.node
        initializers += body.initializer
        logits.append(prefix + last.input[0])
    nodes += [
        helper.make_node("Sum", logits, ["logit_sum"]),
        helper.make_node("Constant", [], ["member_count"], value_float=float(len(logits))),
        helper.make_node("Div", ["logit_sum", "member_count"], ["mean_logit"]),
        helper.make_node("Sigmoid", ["mean_logit"], [probability]),
    ]
    graph = helper.make_graph(nodes, "mean_logit", first.input, first.output, initializers)
    merged = helper.make_model(graph, opset_imports=members[0].opset_import)
    merged.ir_version = members[0].ir_version
    onnx.checker.check_model(merged)
    onnx.save(merged, str(out))
    return out
