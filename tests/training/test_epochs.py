"""Which crops one training epoch draws (training/classifier.py epoch_indices), and which train
images a learning-curve run keeps (train_subset)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pathlib import Path  # noqa: E402

from training.classifier import epoch_indices, train_subset  # noqa: E402
from training.data import CachedImage  # noqa: E402


def _labels_and_regions() -> tuple[object, np.ndarray]:
    # hand: 30 fractured of 60; leg: 10 fractured of 140 (region alone predicts the label)
    y = [1.0] * 30 + [0.0] * 30 + [1.0] * 10 + [0.0] * 130
    regions = np.array(["hand"] * 60 + ["leg"] * 140)
    return torch.tensor(y), regions


def test_an_epoch_holds_every_fracture_and_twice_as_many_unfractured():
    y, _ = _labels_and_regions()
    picked = epoch_indices(y, 2)
    assert len(picked) == len(set(picked.tolist())) == 40 + 80
    assert int(y[picked].sum()) == 40


def test_balancing_by_region_gives_each_region_the_same_share_of_fractures():
    y, regions = _labels_and_regions()
    torch.manual_seed(0)
    picked = epoch_indices(y, 1, regions).numpy()
    for region in ("hand", "leg"):
        inside = picked[regions[picked] == region]
        assert y[inside].mean().item() == pytest.approx(0.5)
    # without the regions the draw follows the data: most unfractured crops are legs
    unbalanced = epoch_indices(y, 1).numpy()
    leg_negatives = (regions[unbalanced] == "leg") & (y[unbalanced].numpy() == 0)
    assert leg_negatives.sum() > 20


def _images(fractured: int, unfractured: int) -> list[CachedImage]:
    flags = [True] * fractured + [False] * unfractured
    return [
        CachedImage(
            f"IMG{i:04d}", "train", f, "hand", np.zeros((0, 4)), (0, 0, 1, 1), Path("x"), Path("y")
        )
        for i, f in enumerate(flags)
    ]


def test_a_train_fraction_keeps_the_share_of_fractures_and_the_same_images_for_a_seed():
    images = _images(40, 160)
    half = train_subset(images, 0.5, seed=17)
    assert len(half) == 100 and sum(it.fractured for it in half) == 20
    assert [it.image_id for it in half] == [
        it.image_id for it in train_subset(images, 0.5, seed=17)
    ]
    assert [it.image_id for it in half] != [
        it.image_id for it in train_subset(images, 0.5, seed=18)
    ]
    # order kept, nothing repeated
    ids = [it.image_id for it in half]
    assert ids == sorted(set(ids))
