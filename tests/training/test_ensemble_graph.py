"""One ONNX graph that averages classifiers' logits (training.export.average_logit_graph)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from training.export import average_logit_graph  # noqa: E402


def _classifier(path, weight: float, bias: float, last: str = "Sigmoid") -> None:
    """image (n, 3, 4, 4) -> sigmoid(weight * mean pixel + bias), shaped (n, 1) as ours are."""
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["pooled"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Mul", ["pooled", "w"], ["scaled"]),
        helper.make_node("Add", ["scaled", "b"], ["logit"]),
        helper.make_node("Unsqueeze", ["logit", "axis"], ["logit_column"]),
        helper.make_node(last, ["logit_column"], ["probability"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(weight, np.float32), "w"),
        numpy_helper.from_array(np.array(bias, np.float32), "b"),
        numpy_helper.from_array(np.array([1], np.int64), "axis"),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 4, 4])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})[0]


def test_the_merged_graph_is_the_mean_logit_of_its_members(tmp_path):
    members = [(2.0, -0.5), (-3.0, 1.0), (0.5, 0.25)]
    paths = []
    for i, (w, b) in enumerate(members):
        paths.append(tmp_path / f"m{i}.onnx")
        _classifier(paths[-1], w, b)
    merged = average_logit_graph(paths, tmp_path / "merged.onnx")
    x = np.random.default_rng(0).normal(size=(5, 3, 4, 4)).astype(np.float32)
    out = _run(merged, x)
    mean_pixel = x.mean(axis=(1, 2, 3))
    logits = np.mean([w * mean_pixel + b for w, b in members], axis=0)
    assert out.shape == (5, 1)
    assert np.allclose(out[:, 0], 1 / (1 + np.exp(-logits)), atol=1e-6)
    # each member's own answer is untouched by the merge (names do not collide)
    assert np.allclose(_run(paths[1], x)[:, 0], 1 / (1 + np.exp(-(-3.0 * mean_pixel + 1.0))))


def test_a_graph_without_a_final_sigmoid_is_refused(tmp_path):
    _classifier(tmp_path / "a.onnx", 1.0, 0.0)
    _classifier(tmp_path / "b.onnx", 1.0, 0.0, last="Identity")
    with pytest.raises(ValueError, match="final Sigmoid"):
        average_logit_graph([tmp_path / "a.onnx", tmp_path / "b.onnx"], tmp_path / "m.onnx")
