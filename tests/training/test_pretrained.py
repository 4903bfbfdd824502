"""The TFLite -> torch conversion of the ImageNet weights in ../shared/pretrained is proven against
the LiteRT interpreter on real photographs (scikit-image's samples), never the network."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import REPO
from training import pretrained
from training.weights import WeightsMismatchError

PRETRAINED = REPO.parent / "shared" / "pretrained"


def need_pretrained() -> None:
    if not (PRETRAINED / pretrained.MOBILENET_V2.file).exists():
        pytest.skip(f"{PRETRAINED} is absent (the shared weights lie next to the checkout)")


def litert_logits(source: pretrained.PretrainedFile, image_u8: np.ndarray) -> np.ndarray:
    """Pre-softmax logits (1001) of the quantised network, dequantised, from LiteRT itself."""
    interpreter_mod = pytest.importorskip("ai_edge_litert.interpreter")
    it = interpreter_mod.Interpreter(
        model_path=str(source.path), experimental_preserve_all_tensors=True
    )
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], image_u8[None])
    it.invoke()
    logits = [
        d
        for d in it.get_tensor_details()
        if tuple(d["shape"]) == (1, 1001) and "Squeeze" in d["name"]
    ][-1]
    scale, zero = logits["quantization"]
    return (it.get_tensor(logits["index"]).astype(np.float64) - zero) * scale


@pytest.mark.parametrize("source", [pretrained.MOBILENET_V2, pretrained.MOBILENET_V2_PTQ])
def test_converted_mobilenet_v2_agrees_with_litert(source):
    need_pretrained()
    skimage_data = pytest.importorskip("skimage.data")
    import torch
    from PIL import Image

    net = pretrained.mobilenet_v2(source, with_classifier=True).eval()
    scale, zero = pretrained.input_quantisation(source.path)
    expected_top1 = {"chelsea": range(281, 287), "coffee": [968]}  # cats; espresso
    for name, classes in expected_top1.items():
        photo = getattr(skimage_data, name)()
        image = np.asarray(Image.fromarray(photo).resize((224, 224), Image.BILINEAR))
        lite = litert_logits(source, image)[0]
        x = torch.from_numpy(((image.astype(np.float32) - zero) * scale).transpose(2, 0, 1)[None])
        with torch.no_grad():
            ours = net(x.contiguous())[0].double().numpy()
        assert int(np.argmax(ours)) in classes
        assert set(np.argsort(-ours)[:5]) == set(np.argsort(-lite)[:5])
        assert np.corrcoef(ours, lite)[0, 1] > 0.98


def test_same_padding_matches_tensorflow_rule():
    """TF SAME on a stride-2 3x3 layer: nothing before, one pixel after on even sizes."""
    import torch
    from torch import nn

    conv = nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False)
    nn.init.ones_(conv.weight)
    wrapped = pretrained.same_pad(conv)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = wrapped(x)
    assert out.shape == (1, 1, 2, 2)
    # the first output sums rows/cols 0..2 (no padding before)
    assert out[0, 0, 0, 0].item() == x[0, 0, :3, :3].sum().item()


def test_batchnorm_calibration_keeps_the_function():
    need_pretrained()
    import torch

    torch.manual_seed(0)
    net = pretrained.mobilenet_v2().eval()
    x = torch.randn(4, 3, 96, 96)
    with torch.no_grad():
        before = net(x)
    pretrained.calibrate_batchnorm(net, [torch.randn(8, 3, 96, 96) for _ in range(2)])
    with torch.no_grad():
        after = net.eval()(x)
    assert torch.allclose(before, after, atol=1e-3, rtol=1e-3)


def test_a_wrong_sha256_is_refused(tmp_path):
    need_pretrained()
    wrong = pretrained.PretrainedFile(
        file=pretrained.MOBILENET_V2.file, sha256="0" * 64, architecture="x", origin="x"
    )
    with pytest.raises(WeightsMismatchError):
        pretrained.read_tflite_layers(wrong.path, wrong.sha256)
