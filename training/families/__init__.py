"""One module per model family, each with `train(recipe, out_dir) -> card`: the entry points of
`python -m training <family>` (training/__main__.py). What they share lives one level up:
classifier (the crop fine-tune), detection, data, augment, export, metrics."""

# family -> (its module, what it trains): the registry the CLI and the ensemble family read
FAMILIES = {
    "cropper": ("training.families.cropper", "U-Net bone cropper (Xie et al.)"),
    "simclr": ("training.families.simclr", "SimCLR ResNet-18 classifier (Thorat et al.)"),
    "dino": ("training.families.dino", "DINO ViT-S/14 classifier (FractuVision)"),
    "mobilenet": ("training.families.mobilenet", "ImageNet MobileNetV2 classifier, box-supervised"),
    "efficientnet": (
        "training.families.efficientnet",
        "ImageNet EfficientNet-Lite classifier, box-supervised",
    ),
    "bam": ("training.families.bam", "MobileNetV2 + Bottleneck Attention Modules classifier"),
    "yolo": ("training.families.yolo", "YOLOv8 detector (FractuVision)"),
    "frcnn": ("training.families.frcnn", "Faster R-CNN detector (Xie et al.)"),
    "orienter": ("training.families.orienter", "quarter-turn classifier (which way up a crop is)"),
    "ensemble": (
        "training.families.ensemble",
        "mean-logit ensemble of classifier recipes, one graph",
    ),
}
