"""Source shifts move the fracture boxes with the pixels and are the same on every run."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from training.shifts import SHIFTS, shift_image


def bright_box_image() -> tuple[np.ndarray, np.ndarray]:
    img = np.full((120, 200), 40, np.uint8)
    img[30:60, 120:180] = 250  # the "lesion": x 120..180, y 30..60
    return img, np.array([[120 / 200, 30 / 120, 180 / 200, 60 / 120]], np.float32)


@pytest.mark.parametrize(
    "kind", [s for s in SHIFTS if s not in ("none", "markers", "invert", "monochrome1")]
)
def test_boxes_follow_the_pixels(kind):
    img, boxes = bright_box_image()
    data, ctype, moved = shift_image(img, boxes, kind, "IMG0000001")
    out = np.asarray(Image.open(io.BytesIO(data)).convert("L")).astype(float)
    assert ctype == (
        "image/jpeg" if kind in ("jpeg", "all", "all-rotate", "all-rotate-512") else "image/png"
    )
    h, w = out.shape
    x1, y1, x2, y2 = (moved[0] * [w, h, w, h]).round().astype(int)
    inside = out[y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].mean()
    outside = np.delete(out, np.s_[max(0, y1 - 3) : y2 + 3], axis=0).mean()
    assert inside > outside + 60


def test_invert_reverses_the_polarity_and_keeps_the_boxes():
    img, boxes = bright_box_image()
    data, ctype, moved = shift_image(img, boxes, "invert", "IMG0000001")
    out = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    assert ctype == "image/png" and np.array_equal(out, 255 - img)
    assert np.array_equal(moved, np.asarray(boxes, np.float32).reshape(-1, 4))


def test_monochrome1_decodes_to_the_image_as_it_was():
    """The DICOM path's inversion: stored dark-high, shown as the grey image we started from."""
    from app.inference.decoding import decode

    img, boxes = bright_box_image()
    data, ctype, moved = shift_image(img, boxes, "monochrome1", "IMG0000001")
    assert ctype == "application/dicom" and data[128:132] == b"DICM"
    shown = decode(data, ctype, "x.dcm", 10**9, ["DX"]).pixels
    assert np.corrcoef(shown.ravel(), img.ravel())[0, 1] > 0.999
    assert shown[40, 150] > shown[100, 20]  # the bright box is still the bright part
    assert np.array_equal(moved, boxes)


def test_shifts_are_deterministic_per_image():
    img, boxes = bright_box_image()
    a = shift_image(img, boxes, "all", "IMG0000007")
    b = shift_image(img, boxes, "all", "IMG0000007")
    assert a[0] == b[0] and np.array_equal(a[2], b[2])


def test_any_angle_keeps_every_pixel_and_boxes_the_rotated_lesion():
    img, boxes = bright_box_image()
    data, _, moved = shift_image(img, boxes, "rotate", "IMG0000003")
    out = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    h, w = out.shape
    assert h * w > img.size  # the canvas grew: no corner of the film was cut
    assert (out > 200).sum() >= 0.9 * 30 * 60  # the lesion is all there
    x1, y1, x2, y2 = (moved[0] * [w, h, w, h]).round().astype(int)
    ys, xs = np.nonzero(out > 200)
    assert x1 - 2 <= xs.min() and xs.max() <= x2 + 2 and y1 - 2 <= ys.min() and ys.max() <= y2 + 2

    assert out[0, 0] == 0 and out[-1, -1] == 0  # the corners the turn added are black


def test_the_turn_can_fill_its_corners_with_another_level():
    from training.shifts import rotate_grown

    img, boxes = bright_box_image()
    black, moved = rotate_grown(img, boxes, 30.0)
    grey, moved_too = rotate_grown(img, boxes, 30.0, fill=40)
    assert black[0, 0] == 0 and grey[0, 0] == 40  # the background's own level
    assert np.array_equal(moved, moved_too)  # the boxes do not depend on the fill


def test_lowres512_brings_the_long_side_to_512_and_keeps_smaller_images():
    big = np.full((1536, 1229), 90, np.uint8)
    data, _, _ = shift_image(big, np.zeros((0, 4), np.float32), "lowres512", "IMG0000002")
    assert Image.open(io.BytesIO(data)).size == (410, 512)  # (width, height), aspect kept
    small = np.full((300, 400), 90, np.uint8)
    data, _, _ = shift_image(small, np.zeros((0, 4), np.float32), "lowres512", "IMG0000002")
    assert Image.open(io.BytesIO(data)).size == (400, 300)


def test_a_draw_is_the_same_shift_with_other_random_numbers():
    img, boxes = bright_box_image()
    first = shift_image(img, boxes, "rotate", "IMG0000005")
    again = shift_image(img, boxes, "rotate@1", "IMG0000005")
    assert first[0] != again[0]  # another angle
    assert again[0] == shift_image(img, boxes, "rotate@1", "IMG0000005")[0]
    for bad in ("rotate@0", "rotate@x", "spin", "rotate@"):
        with pytest.raises(ValueError, match="unknown shift"):
            shift_image(img, boxes, bad, "IMG0000005")


def test_command_line_names_take_draws_and_refuse_unknown_ones():
    import argparse

    from training.shifts import shift_names

    assert shift_names("all-rotate@2,none") == ("all-rotate@2", "none")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown shift 'all-rotate@0'"):
        shift_names("none,all-rotate@0")


def test_vendor_processing_raises_local_contrast_and_replays_without_it():
    import random

    from training.augment import robust_photometric

    # a faint dark line (a crack) inside a bright band (a bone): the other console shows it more
    img = np.full((200, 300), 40, np.uint8)
    img[:, 100:200] = 150
    img[:, 148:152] = 140
    data, _, _ = shift_image(img, np.zeros((0, 4), np.float32), "processing", "IMG0000004")
    out = np.asarray(Image.open(io.BytesIO(data)).convert("L")).astype(float)
    assert out.shape == img.shape
    crack = lambda a: a[:, 120:140].mean() - a[:, 148:152].mean()  # noqa: E731
    assert crack(out) > 1.5 * crack(img.astype(float))
    # at processing_p=0 the augmentation draws nothing extra: existing recipes replay exactly
    plain = robust_photometric(img, random.Random(3))
    assert np.array_equal(plain, robust_photometric(img, random.Random(3), processing_p=0.0))
    assert not np.array_equal(plain, robust_photometric(img, random.Random(3), processing_p=1.0))


def test_a_squeezed_axis_keeps_the_content_and_moves_the_mask_with_it():
    """aspect_p (augment.squeeze_axis): one axis shrunk about the centre, the rest black; a box
    mask shrinks exactly with the pixels it covers."""
    import torch

    from training.augment import augment_batch, squeeze_axis

    img = torch.zeros((1, 100, 100), dtype=torch.uint8)
    img[0, 20:80, 40:60] = 200
    out = squeeze_axis(img, 0.5, vertical=False)
    cols = torch.nonzero(out[0].amax(0) > 100).flatten()
    assert (int(cols.min()), int(cols.max())) in ((45, 54), (44, 55))  # 20 px wide -> 10
    rows = torch.nonzero(out[0].amax(1) > 100).flatten()
    assert (int(rows.min()), int(rows.max())) == (20, 79)  # the other axis untouched
    assert out[0, :, :20].max() == 0  # outside the squeezed image: black
    mask = (img[0] > 0)[None]
    moved = squeeze_axis(mask, 0.5, vertical=False, nearest=True)
    assert moved.dtype == torch.bool and torch.equal(moved[0], out[0] > 100)

    batch = torch.from_numpy(np.stack([img[0].numpy()] * 4))
    torch.manual_seed(0)
    plain = augment_batch(batch, strength="light", rotate_degrees=0)
    torch.manual_seed(0)
    again = augment_batch(batch, strength="light", rotate_degrees=0, aspect_p=0.0)
    assert torch.equal(plain, again)  # off: the same draws as a recipe without it
    torch.manual_seed(0)
    squeezed, masks = augment_batch(
        batch, torch.stack([mask[0]] * 4), strength="light", rotate_degrees=0, aspect_p=1.0
    )
    assert squeezed.shape == batch.shape and masks.shape == (4, 100, 100)
    assert masks.sum() < 4 * mask.sum()  # every box mask squeezed along one axis
