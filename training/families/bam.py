"""BAM-attention classifier (the attention-based transfer-learning system on FracAtlas).

Bottleneck Attention Module (Park et al., BMVC 2018): a channel branch (global average pool, MLP
with reduction ratio r) and a spatial branch (1x1 reduce, two dilated 3x3 convolutions, 1x1 to one
map) are summed (broadcast), passed through a sigmoid to M(F), and applied as F * (1 + M(F)).
The paper placed one BAM at each bottleneck between stages of its ImageNet backbone
(InceptionV3 / DenseNet-121 in the FracAtlas paper; neither has weights here). We put them into
the converted ImageNet MobileNetV2 after the last block of each resolution that the network
then halves (stride 4, 8 and 16: features[3], [6] and [13]), as the paper did for ResNets.

Where the paper is silent or cannot apply: so that the network starts exactly as the pretrained
one, each module's output is F * (1 + g * M(F)) with a learnable scalar g that starts at 0 (the
paper's form is g = 1); the hidden width is max(C / r, 8) because MobileNet stages are narrow
(24-96 channels); r = 16 and dilation 4 as in the paper.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training import common
from training.families import mobilenet

# MobileNetV2 `features` indices after which the resolution halves, and their widths.
BOTTLENECKS = {3: 24, 6: 32, 13: 96}


def bam_module(channels: int, reduction: int = 16, dilation: int = 4, min_hidden: int = 8) -> Any:
    """One BAM: x -> x * (1 + gate * sigmoid(channel(x) + spatial(x))), gate = 0 at start."""
    import torch
    from torch import nn

    hidden = max(channels // reduction, min_hidden)

    class BAM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.channel = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(channels, hidden, 1),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, channels, 1),
            )
            self.spatial = nn.Sequential(
                nn.Conv2d(channels, hidden, 1),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, 1, 1),
            )
            self.gate = nn.Parameter(torch.zeros(1))

        def attention(self, x: torch.Tensor) -> torch.Tensor:
            """M(F), N x C x H x W in (0, 1)."""
            return torch.sigmoid(self.channel(x) + self.spatial(x))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * (1 + self.gate * self.attention(x))

    return BAM()


def insert_bam(net: Any, reduction: int = 16, dilation: int = 4) -> Any:
    """Put a BAM after each bottleneck block of a torchvision MobileNetV2's `features`."""
    from torch import nn

    blocks = []
    for i, block in enumerate(net.features):
        blocks.append(block)
        if i in BOTTLENECKS:
            blocks.append(bam_module(BOTTLENECKS[i], reduction, dilation))
    net.features = nn.Sequential(*blocks)
    return net


# where --device may put the training loop (training/__main__.py; the fit in training.classifier)
DEVICES = ("cpu", "cuda")


def train(recipe: dict[str, Any], out_dir: Path = common.MODELS_DIR) -> dict[str, Any]:
    run = common.start_run(recipe)  # seeded before the attention modules are initialised
    backbone, source = mobilenet.build_backbone(recipe)
    cfg = recipe.get("bam", {})
    insert_bam(backbone, cfg.get("reduction", 16), cfg.get("dilation", 4))
    return mobilenet.train_with(
        run,
        backbone,
        source,
        "MobileNetV2 1.0 + 3 BAM modules (stride 4/8/16 bottlenecks), ImageNet init, box-supervised",
        out_dir,
    )
