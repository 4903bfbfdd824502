"""The classifier networks: a probability head, or the localising model (image head + per-cell
head on the stride-32 map, trained against the fracture boxes), and their export-time folding."""

from __future__ import annotations

from typing import Any


def image_head(feature_dim: int) -> Any:
    """Pooled features -> one logit. Non-affine BatchNorm first: the linear probe works whatever
    the feature scale (folded into the Linear at export, see fold_head)."""
    from torch import nn

    return nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False), nn.Linear(feature_dim, 1))


def build_probability_model(backbone: Any, feature_dim: int) -> Any:
    """backbone -> linear head -> sigmoid, the exported graph (N x 3 x S x S -> N x 1)."""
    import torch
    from torch import nn

    class ProbabilityModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = image_head(feature_dim)

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.backbone(x))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.logits(x))

    return ProbabilityModel()


def resnet_feature_map(net: Any, x: Any) -> Any:
    """Last feature map (stride 32) of a torchvision ResNet."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def mobilenet_feature_map(net: Any, x: Any) -> Any:
    """Last feature map (stride 32) of a torchvision MobileNet (its `features`)."""
    return net.features(x)


def timm_feature_map(net: Any, x: Any) -> Any:
    """Last feature map (stride 32) of a timm CNN (EfficientNet-Lite: after conv_head)."""
    return net.forward_features(x)


FEATURE_MAPS = {
    "resnet": resnet_feature_map,
    "mobilenet": mobilenet_feature_map,
    "timm": timm_feature_map,
}


def build_localising_model(backbone: Any, feature_dim: int, feature_map: str = "resnet") -> Any:
    """A CNN classifier that also learns where the fracture is (box supervision).

    Besides the image head on the pooled features, a 1x1 convolution turns the last feature map
    (stride 32) into per-cell fracture logits trained against the fracture boxes: dense targets
    give far more signal per radiograph than one image label, which matters with ~600 fractured
    training images. The image logit is fusion * image head + (1 - fusion) * max cell logit;
    fusion is chosen on val after training. Exported graph: N x 3 x S x S -> N x 1 probability.
    `feature_map` names how the backbone's last map is read (FEATURE_MAPS).
    """
    import torch
    from torch import nn

    read_map = FEATURE_MAPS[feature_map]

    class LocalisingModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = image_head(feature_dim)
            self.map_head = nn.Conv2d(feature_dim, 1, kernel_size=1)
            # Set after training (choose_fusion); the export bakes them into the graph.
            self.fusion = 0.5
            self.hflip_tta = False

        def feature_map(self, x: torch.Tensor) -> torch.Tensor:
            return read_map(self.backbone, x)

        def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(image logits N, cell logits N x h x w)."""
            fmap = self.feature_map(x)
            return self.head(fmap.mean(dim=(2, 3)))[:, 0], self.map_head(fmap)[:, 0]

        def fused(self, x: torch.Tensor) -> torch.Tensor:
            image, cells = self.outputs(x)
            return self.fusion * image + (1 - self.fusion) * cells.amax(dim=(1, 2))

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            out = self.fused(x)
            if self.hflip_tta:  # mean logit over the image and its mirror
                out = (out + self.fused(x.flip(-1))) / 2
            return out[:, None]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.logits(x))

    return LocalisingModel()


def localisation_loss(
    model: Any, x: Any, y: Any, masks: Any, pos_weight: Any, cell_pos_weight: float
) -> Any:
    """Image BCE + BCE of every cell against the boxes + BCE of the max cell (MIL) against the
    image label. Cells touched by a box are positive."""
    import torch.nn.functional as F

    image, cells = model.outputs(x)
    targets = F.adaptive_max_pool2d(masks.float().unsqueeze(1), cells.shape[-2:])[:, 0]
    cell_weight = cells.new_tensor(cell_pos_weight)
    return (
        F.binary_cross_entropy_with_logits(image, y, pos_weight=pos_weight)
        + F.binary_cross_entropy_with_logits(cells, targets, pos_weight=cell_weight)
        + F.binary_cross_entropy_with_logits(cells.amax(dim=(1, 2)), y, pos_weight=pos_weight)
    )


def fold_head(model: Any) -> None:
    """Fold the head's BatchNorm (running statistics) into its Linear: same outputs in eval
    mode, and a graph every exporter handles."""
    import torch
    from torch import nn

    bn, linear = model.head[0], model.head[1]
    scale = torch.rsqrt(bn.running_var + bn.eps)
    folded = nn.Linear(linear.in_features, linear.out_features)
    with torch.no_grad():
        folded.weight.copy_(linear.weight * scale)
        folded.bias.copy_(linear.bias - (linear.weight * scale * bn.running_mean).sum(dim=1))
    model.head = folded
    model.eval()
