"""Real ImageNet weights from the 8-bit TFLite files in ../shared/pretrained, as float torch modules.

The files are quantised and their BatchNorms are folded into each convolution (weights and bias).
Conversion: read every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED weight in graph order with the
pure-Python `tflite` flatbuffer reader, dequantise it (per tensor or per channel:
(q - zero_point) * scale), and copy it onto the torchvision module's convolutions in module order;
shapes are checked at every step, so a wrong order fails loudly. Each torchvision BatchNorm starts as
identity plus the folded bias. TensorFlow pads stride-2 layers "SAME" (nothing before, one pixel
after on even sizes); torch pads symmetrically, so those convolutions are wrapped in `SamePad`.

`calibrate_batchnorm` then re-expresses each identity BatchNorm with statistics measured on our own
images (same function in eval mode), so that fine-tuning in train mode starts from the pretrained
network instead of renormalising every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.weights import verify_sha256

PRETRAINED_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "pretrained"


@dataclass(frozen=True)
class PretrainedFile:
    """A TFLite file in ../shared/pretrained with what a model card must say about it."""

    file: str
    sha256: str
    architecture: str
    origin: str
    licence: str = "Apache-2.0"

    @property
    def path(self) -> Path:
        return PRETRAINED_DIR / self.file

    def card(self) -> dict[str, str]:
        return {
            "file": self.file,
            "sha256": self.sha256,
            "architecture": self.architecture,
            "origin": self.origin,
            "licence": self.licence,
            "data": "ImageNet-1k (ILSVRC 2012)",
        }


MOBILENET_V2 = PretrainedFile(
    file="mobilenet_v2_1.0_224_quant.tflite",
    sha256="7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776",
    architecture="MobileNetV2 1.0 (ImageNet-1k, 1001 classes, quantisation-aware trained)",
    origin="google-coral/test_data @ 104342d2",
)
MOBILENET_V2_PTQ = PretrainedFile(
    file="tf2_mobilenet_v2_1.0_224_ptq.tflite",
    sha256="5d3137241276e79c86d14a74fe43581398ae0e815191d3dba45495b810840e8c",
    architecture="MobileNetV2 1.0 (ImageNet-1k, TF2, post-training quantised per channel)",
    origin="google-coral/test_data @ 104342d2",
)
FILES = {f.file: f for f in (MOBILENET_V2, MOBILENET_V2_PTQ)}

_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


@dataclass
class TfliteLayer:
    """One dequantised weight layer of a TFLite graph, in torch layout (out, in/groups, kh, kw)."""

    op: str
    name: str
    weight: np.ndarray
    bias: np.ndarray | None
    stride: int


def _dequantise(model: Any, tensor: Any) -> np.ndarray:
    import tflite

    dtypes = {
        tflite.TensorType.UINT8: np.uint8,
        tflite.TensorType.INT8: np.int8,
        tflite.TensorType.INT32: np.int32,
        tflite.TensorType.FLOAT32: np.float32,
    }
    raw = model.Buffers(tensor.Buffer()).DataAsNumpy()
    values = np.frombuffer(raw.tobytes(), dtype=dtypes[tensor.Type()])
    values = values.reshape(tensor.ShapeAsNumpy()).astype(np.float64)
    q = tensor.Quantization()
    if q is None or q.ScaleLength() == 0:
        return values.astype(np.float32)
    scale = q.ScaleAsNumpy().astype(np.float64)
    zero = q.ZeroPointAsNumpy().astype(np.float64) if q.ZeroPointLength() else np.zeros(1)
    if scale.size > 1:  # per channel along quantized_dimension
        shape = [1] * values.ndim
        shape[q.QuantizedDimension()] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return ((values - zero) * scale).astype(np.float32)


def read_tflite_layers(path: str | Path, sha256: str) -> list[TfliteLayer]:
    """Every weight layer of a TFLite file in execution order, dequantised to float32.
    The file's sha256 is checked before anything is read."""
    import tflite

    buf = verify_sha256(path, sha256).read_bytes()
    model = tflite.Model.GetRootAsModel(buf, 0)
    graph = model.Subgraphs(0)
    names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
    layers = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        kind = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()))
        if kind not in _WEIGHT_OPS:
            continue
        inputs = [graph.Tensors(j) for j in op.InputsAsNumpy() if j >= 0]
        weight = _dequantise(model, inputs[1])
        bias = _dequantise(model, inputs[2]) if len(inputs) > 2 else None
        stride = 1
        if kind == "CONV_2D":
            opts = tflite.Conv2DOptions()
            opts.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
            stride = opts.StrideH()
            weight = weight.transpose(0, 3, 1, 2)  # OHWI -> OIHW
        elif kind == "DEPTHWISE_CONV_2D":
            opts = tflite.DepthwiseConv2DOptions()
            opts.Init(op.BuiltinOptions().Bytes, op.BuiltinOptions().Pos)
            stride = opts.StrideH()
            weight = weight.transpose(3, 0, 1, 2)  # 1HWC -> C1HW
        layers.append(TfliteLayer(kind, inputs[1].Name().decode(), weight, bias, stride))
    return layers


def input_quantisation(path: str | Path) -> tuple[float, int]:
    """(scale, zero_point) of the graph's uint8 input: float input = (q - zero) * scale."""
    import tflite

    model = tflite.Model.GetRootAsModel(Path(path).read_bytes(), 0)
    graph = model.Subgraphs(0)
    q = graph.Tensors(int(graph.InputsAsNumpy()[0])).Quantization()
    return float(q.ScaleAsNumpy()[0]), int(q.ZeroPointAsNumpy()[0])


def same_pad(conv: Any) -> Any:
    """Wrap a strided convolution so it pads like TensorFlow's SAME (extra pixel after)."""
    import torch.nn.functional as F
    from torch import nn

    class SamePad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv
            self.kernel = conv.kernel_size[0]
            self.stride = conv.stride[0]
            conv.padding = (0, 0)

        def forward(self, x: Any) -> Any:
            pads = []
            for size in (x.shape[-1], x.shape[-2]):
                total = max(
                    (-(-int(size) // self.stride) - 1) * self.stride + self.kernel - int(size), 0
                )
                pads += [total // 2, total - total // 2]
            return self.conv(F.pad(x, pads))

    return SamePad()


def _load_layers(net: Any, layers: list[TfliteLayer], head: Any | None) -> None:
    """Copy `layers` onto every Conv2d of `net` in module order (then the head, if given), each
    Conv2d's following BatchNorm set to identity plus the folded bias; SAME padding on stride 2."""
    import torch
    from torch import nn

    convs: list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]] = []
    modules = list(net.named_modules())
    for i, (name, module) in enumerate(modules):
        if isinstance(module, nn.Conv2d):
            bn = modules[i + 1][1] if i + 1 < len(modules) else None
            convs.append((name, module, bn if isinstance(bn, nn.BatchNorm2d) else None))
    wanted = len(convs) + (1 if head is not None else 0)
    if len(layers) != wanted:
        raise ValueError(f"TFLite graph has {len(layers)} weight layers, the network {wanted}")
    with torch.no_grad():
        for (name, conv, bn), layer in zip(convs, layers, strict=False):
            if tuple(conv.weight.shape) != layer.weight.shape or conv.stride[0] != layer.stride:
                raise ValueError(
                    f"{name}: torch {tuple(conv.weight.shape)}/s{conv.stride[0]} vs "
                    f"{layer.name} {layer.weight.shape}/s{layer.stride}"
                )
            conv.weight.copy_(torch.from_numpy(layer.weight))
            bias = torch.from_numpy(layer.bias) if layer.bias is not None else None
            if bn is not None:
                bn.weight.fill_(1.0)
                bn.bias.copy_(bias if bias is not None else torch.zeros_like(bn.bias))
                bn.running_mean.zero_()
                bn.running_var.fill_(1.0 - bn.eps)  # eval: x / sqrt(var + eps) == x
            elif bias is not None:
                conv.bias = nn.Parameter(bias.clone())
        if head is not None:
            last = layers[-1]
            head.weight.copy_(torch.from_numpy(last.weight.reshape(head.weight.shape)))
            head.bias.copy_(torch.from_numpy(last.bias))
    for name, conv, _ in convs:
        if conv.stride[0] == 2:
            parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
            setattr(parent, name.rpartition(".")[2], same_pad(conv))


def mobilenet_v2(source: PretrainedFile = MOBILENET_V2, with_classifier: bool = False) -> Any:
    """torchvision MobileNetV2 with the ImageNet weights of `source`.

    with_classifier: keep the 1001-class ImageNet head (for the conversion test); otherwise the
    network ends at the 1280-channel feature map's global average (N x 1280)."""
    import torchvision
    from torch import nn

    net = torchvision.models.mobilenet_v2(weights=None, num_classes=1001)
    net.classifier = nn.Sequential(nn.Dropout(0.0), net.classifier[1])
    layers = read_tflite_layers(source.path, source.sha256)
    _load_layers(net.features, layers, net.classifier[1])
    if not with_classifier:
        net.classifier = nn.Identity()
    return net


def calibrate_batchnorm(net: Any, batches: Any) -> None:
    """Give every BatchNorm the input statistics of `batches` while keeping its eval-mode function:
    weight = sqrt(var + eps), bias += mean, running stats = (mean, var). Train-mode batches of
    similar images then normalise close to what the pretrained network computes."""
    import torch
    from torch import nn

    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    sums: dict[nn.Module, list[torch.Tensor]] = {bn: [] for bn in bns}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], _: Any) -> None:
        x = inputs[0].transpose(0, 1).flatten(1)
        sums[module].append(torch.stack([x.mean(1), (x * x).mean(1)]))

    handles = [bn.register_forward_hook(hook) for bn in bns]
    net.eval()
    with torch.no_grad():
        for x in batches:
            net(x)
    for h in handles:
        h.remove()
    with torch.no_grad():
        for bn in bns:
            mean, sq = torch.stack(sums[bn]).mean(0)
            var = (sq - mean * mean).clamp_min(1e-6)
            # current eval function: y = w * (x - m) / s + b; keep it with new (mean, var)
            s_old = torch.sqrt(bn.running_var + bn.eps)
            slope = bn.weight / s_old
            offset = bn.bias - slope * bn.running_mean
            s_new = torch.sqrt(var + bn.eps)
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.weight.copy_(slope * s_new)
            bn.bias.copy_(offset + slope * mean)
