"""Fracture classifiers shared by the classifier families (MobileNetV2, EfficientNet-Lite, SimCLR,
DINO, BAM): data, networks, fine-tuning, export and card, a module per job.

Stages (Thorat et al.): a linear head on the frozen backbone, then the whole network fine-tuned.
Class imbalance: BCE with pos_weight = negatives / positives (or class-balanced epochs). The
decision threshold is chosen on val (Youden's J) and written into the card; test is only
reported.

    inputs.py    crops, input spec, test-time views, model inputs, balanced epochs
    models.py    probability and localising networks, their loss, head folding
    fit.py       linear probe + fine-tune with checkpoints, fusion on val, served scores
    card.py      ONNX export with parity, threshold, metrics with CIs, the card
    finetune.py  fit -> calibrate -> export: what a family calls
"""

from training.classifier.card import CI95_METHOD, export_with_card, split_metrics
from training.classifier.finetune import finetune
from training.classifier.fit import (
    FUSION_GRID,
    calibrate,
    choose_fusion,
    fit,
    onnx_scores,
    served_scores,
)
from training.classifier.inputs import (
    CropData,
    crop_data,
    crops_and_box_masks,
    crops_as_array,
    epoch_indices,
    input_spec,
    int8_calibration_inputs,
    to_input,
    train_subset,
    views,
)
from training.classifier.models import (
    FEATURE_MAPS,
    build_localising_model,
    build_probability_model,
    fold_head,
    image_head,
    localisation_loss,
)

__all__ = [
    "CI95_METHOD",
    "FEATURE_MAPS",
    "FUSION_GRID",
    "CropData",
    "build_localising_model",
    "build_probability_model",
    "calibrate",
    "choose_fusion",
    "crop_data",
    "crops_and_box_masks",
    "crops_as_array",
    "epoch_indices",
    "export_with_card",
    "finetune",
    "fit",
    "fold_head",
    "image_head",
    "input_spec",
    "int8_calibration_inputs",
    "localisation_loss",
    "onnx_scores",
    "served_scores",
    "split_metrics",
    "to_input",
    "train_subset",
    "views",
]
