"""One ONNX graph that averages classifiers' logits (training.export.average_logit_graph)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from training.export import average_logit_graph  # noqa: E402


def _save(path, nodes: list, inits: list, side: int) -> None:
    """A classifier graph image (n, 3, side, side) -> probability (n, 1), as ours are."""
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, side, side])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


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
    _save(path, nodes, inits, side=4)


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


def _conv_classifier(path, seed: int) -> None:
    """image (n, 3, 16, 16) -> conv, relu6, conv -> mean -> logit -> sigmoid (n, 1)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["image", "k1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="relu6"),
        helper.make_node("Conv", ["r1", "k2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("ReduceMean", ["c2"], ["pooled"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Mul", ["pooled", "w"], ["scaled"], name="head_mul"),
        helper.make_node("Add", ["scaled", "b"], ["logit"], name="head_add"),
        helper.make_node("Unsqueeze", ["logit", "axis"], ["logit_column"]),
        helper.make_node("Sigmoid", ["logit_column"], ["probability"], name="sigmoid"),
    ]
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "k1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 3, 3)).astype(np.float32), "k2"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
        numpy_helper.from_array(np.array(3.0, np.float32), "w"),
        numpy_helper.from_array(np.array(0.1, np.float32), "b"),
        numpy_helper.from_array(np.array([1], np.int64), "axis"),
    ]
    _save(path, nodes, inits, side=16)


def test_an_int8_classifier_keeps_its_head_float_and_merges(tmp_path):
    from training.export import quantize_static_int8

    rng = np.random.default_rng(1)
    calibration = rng.normal(size=(32, 3, 16, 16)).astype(np.float32)
    x = rng.normal(size=(8, 3, 16, 16)).astype(np.float32)
    floats, quantised = [], []
    for seed in (0, 1):
        floats.append(tmp_path / f"f{seed}.onnx")
        _conv_classifier(floats[-1], seed)
        quantised.append(quantize_static_int8(floats[-1], tmp_path / f"q{seed}.onnx", calibration))
        graph = onnx.load(str(quantised[-1])).graph
        ops = [n.op_type for n in graph.node]
        # integer convolutions: each Conv's weights and input pass through Q/DQ pairs
        assert ops.count("QuantizeLinear") >= 2 and ops.count("DequantizeLinear") >= 4
        # the feature map is the last quantised tensor: the pooled head stays float, and the
        # graph still ends in its Sigmoid
        assert "QuantizeLinear" not in ops[ops.index("ReduceMean") :] and ops[-1] == "Sigmoid"
        assert np.abs(_run(quantised[-1], x) - _run(floats[-1], x)).max() < 0.05
    merged = average_logit_graph(quantised, tmp_path / "merged.onnx")
    logits = [np.log(p / (1 - p)) for p in (_run(q, x)[:, 0] for q in quantised)]
    assert np.allclose(_run(merged, x)[:, 0], 1 / (1 + np.exp(-np.mean(logits, axis=0))), atol=1e-5)
