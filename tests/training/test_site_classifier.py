"""The served classifier rebuilt in torch from its own graph (training/site_classifier.py): the
rebuilt members answer as the graph does, weights written back fold every BatchNorm change
into the graph exactly, the first member (the familiarity's features) is left as served, and
a classifier that is no MobileNetV2 ensemble is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import REPO
from training.site import SiteDataError

GRAPH = REPO / "models" / "classifier-mobilenetv2.onnx"


def run(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def inputs(n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).normal(0, 0.5, (n, 3, 288, 288)).astype(np.float32)


def test_the_rebuilt_members_answer_as_the_graph(tmp_path):
    import torch

    from training.site_classifier import read_member, rebuild

    members = [rebuild(read_member(GRAPH, p)) for p in ("member0_", "member1_")]
    x = inputs()
    with torch.no_grad():
        logit = sum(m.logits(torch.from_numpy(x)) for m in members) / 2
    expected = run(GRAPH, x)[0].ravel()
    assert np.abs(torch.sigmoid(logit)[:, 0].numpy() - expected).max() < 1e-4


def test_trained_weights_are_folded_back_into_the_same_graph(tmp_path):
    """Change the second member's BatchNorm affine, a convolution and the heads as training
    would: the rewritten graph answers as the changed torch members, and its first member's
    pooled features are the served ones."""
    import torch

    from training.site_classifier import read_member, rebuild, write_member

    first, second = read_member(GRAPH, "member0_"), read_member(GRAPH, "member1_")
    a, b = rebuild(first), rebuild(second)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in b.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.mul_(1 + 0.05 * torch.randn(module.weight.shape, generator=generator))
                module.bias.add_(0.01 * torch.randn(module.bias.shape, generator=generator))
        b.map_head.bias.add_(0.3)
        b.head.weight.mul_(1.1)
    out = write_member(GRAPH, tmp_path / "tuned.onnx", second, b)
    x = inputs()
    with torch.no_grad():
        logit = (a.logits(torch.from_numpy(x)) + b.logits(torch.from_numpy(x))) / 2
    tuned, served = run(out, x), run(GRAPH, x)
    assert np.abs(tuned[0].ravel() - torch.sigmoid(logit)[:, 0].numpy()).max() < 1e-4
    assert np.abs(tuned[0] - served[0]).max() > 1e-3  # the change reached the graph
    assert np.array_equal(tuned[1], served[1])  # member0's features untouched


def test_a_graph_without_the_member_is_refused():
    from training.site_classifier import read_member

    with pytest.raises(SiteDataError, match="no localising member"):
        read_member(REPO / "models" / "classifier-dino-vits14.onnx", "member1_")


def test_a_classifier_that_cannot_be_fine_tuned_is_said_before_any_scoring(tmp_path):
    from tests.training.test_adapt import refused_before_scoring

    refused_before_scoring(
        tmp_path,
        "--classifier-epochs",
        {"FRACTURE_DEFAULT_CLASSIFIER": "classifier-simclr-resnet18"},
        "only the MobileNetV2 ensemble",
    )


def test_adapt_fine_tunes_the_classifier_on_the_crops_the_service_takes(tmp_path, monkeypatch):
    """--classifier-epochs: the second member trained on the site's served crops and
    FracAtlas's, guarded and, past the guard (made to pass here, to exercise what ships),
    written into OUT: the graph's sha256 in its card, no site head, the familiarity as it was."""
    import training.adapt as adapting
    from app.inference.runtime import ModelRegistry, sha256_of
    from tests.training.test_adapt import adapted_past_the_guard

    summary, out = adapted_past_the_guard(
        tmp_path, monkeypatch, "MAX_FRACATLAS_LOSS", classifier_epochs=1
    )
    tuned = summary["classifier_fine_tune"]
    assert tuned["site_crops"] > 0 and tuned["fracatlas_crops"] > 0 and len(tuned["losses"]) == 1
    assert summary["adapted_shipped"] and "second member" in adapting.table(summary)
    registry = ModelRegistry(out)
    registry.load_all("cpu", 1)
    card = registry.models["classifier-mobilenetv2"].card
    base = ModelRegistry(REPO / "models").models["classifier-mobilenetv2"].card
    assert card.sha256 == sha256_of(out / card.file) != base.sha256
    assert card.site_adaptation.file is None and "second member" in card.site_adaptation.method
    assert card.familiarity.file == base.familiarity.file
