"""Augmentations on uint8 grey batches, shared by the classifier families.

`ssl_views`: the two random views of self-supervised pretraining (SimCLR, DINO).
`light`: flips, a small affine, brightness/contrast (the 1.0/2.0 recipes).
`robust`: what other hospitals' radiographs differ by (issue: generalisation beyond FracAtlas):
any-angle rotation, gamma and window changes, lower resolution (downsample and back), JPEG
re-compression, blur and noise, burned-in markers (white text and tabs). Box masks move with the
geometry only; photometric changes never move a box.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from app.inference.upright import enclosing_boxes

STRENGTHS = ("light", "robust")


def _geometry(rotate_degrees: float) -> Any:
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(0.2),
            v2.RandomAffine(degrees=rotate_degrees, translate=(0.08, 0.08), scale=(0.85, 1.15)),
        ]
    )


def squeeze_axis(img: Any, squeeze: float, vertical: bool, nearest: bool = False) -> Any:
    """A (c, h, w) torch image with one axis shrunk by `squeeze` (< 1) about the centre, the
    rest filled black: the crop of a radiograph that an export stretched along the other axis
    (as data sets stretched to a square are), letterboxed again. `nearest` for masks."""
    import torch
    import torch.nn.functional as F

    _, h, w = img.shape
    size = (max(1, round(h * squeeze)), w) if vertical else (h, max(1, round(w * squeeze)))
    mode = "nearest" if nearest else "bilinear"
    kwargs = {} if nearest else {"align_corners": False, "antialias": True}
    small = F.interpolate(img[None].float(), size=size, mode=mode, **kwargs)[0]
    out = torch.zeros_like(img)
    y0, x0 = (h - size[0]) // 2, (w - size[1]) // 2
    out[:, y0 : y0 + size[0], x0 : x0 + size[1]] = small.round().to(img.dtype)
    return out


def burn_marker(img: np.ndarray, rng: random.Random) -> None:
    """A side marker or annotation burned into the pixels, as many sites do (in place)."""
    import cv2

    h, w = img.shape
    text = rng.choice(["L", "R", "LT", "RT", "AP", "LAT", "PA", "OBL", "15", "WB"])
    scale = max(h, w) / rng.uniform(180, 400)
    x, y = rng.randrange(0, max(1, w // 2)), rng.randrange(max(2, h // 8), h)
    if rng.random() < 0.3:  # a solid tab behind the text
        cv2.rectangle(img, (x, y - int(25 * scale)), (x + int(40 * scale), y + 4), 255, -1)
        colour = 0
    else:
        colour = 255
    thickness = max(1, round(2 * scale))
    cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness)


def vendor_processing(grey: np.ndarray, rng: random.Random) -> np.ndarray:
    """Another vendor's rendering of the same exposure: local contrast equalised (CLAHE, clip
    limit 2-4 on 8 x 8 tiles) and edges enhanced (unsharp mask at 1% of the long side, amount
    0.5-1.5), as CR/DX consoles process before they send; FracAtlas's look is one of many."""
    import cv2

    clip, amount = rng.uniform(2.0, 4.0), rng.uniform(0.5, 1.5)
    out = cv2.createCLAHE(clipLimit=clip, tileGridSize=(8, 8)).apply(grey)
    blurred = cv2.GaussianBlur(out, (0, 0), max(1.0, max(out.shape) / 100))  # uint8, as shipped
    level = out.astype(np.float32)
    return np.clip(level + amount * (level - blurred), 0, 255).astype(np.uint8)


# The groups of robust_photometric, each of which a recipe may leave out (`augment_skip`) to
# measure what it brings.
ROBUST_GROUPS = ("intensity", "resolution", "blur", "noise", "jpeg", "markers")


def robust_photometric(
    img: np.ndarray,
    rng: random.Random,
    skip: frozenset[str] = frozenset(),
    compound_p: float = 0.0,
    processing_p: float = 0.0,
) -> np.ndarray:
    """One grey uint8 image (h, w) as another device or site might have produced it. A group in
    `skip` draws its random numbers but is not applied, so the others see the same draws. With
    probability `compound_p` every group applies at once (drawn alone they rarely meet, while
    another source's images differ in all of them together); with `processing_p`, another
    vendor's local contrast and edge enhancement (vendor_processing). Either at 0 draws nothing
    extra, so a recipe without them replays exactly."""
    import cv2

    unknown = skip - set(ROBUST_GROUPS)
    if unknown:
        raise ValueError(f"unknown augmentation groups {sorted(unknown)}; known: {ROBUST_GROUPS}")
    every = compound_p > 0 and rng.random() < compound_p
    out = img.astype(np.float32) / 255.0
    if rng.random() < 0.8 or every:  # gamma and window (the draw is taken either way)
        gamma = rng.uniform(0.6, 1.7)
        lo, hi = rng.uniform(0.0, 0.15), rng.uniform(0.85, 1.0)
        window = rng.random() < 0.5
        contrast, offset = rng.uniform(0.55, 1.15), rng.uniform(-0.1, 0.1)
        if "intensity" not in skip:
            out = out**gamma
            out = np.clip((out - lo) / (hi - lo), 0, 1) if window else out
            out = np.clip(0.5 + (out - 0.5) * contrast + offset, 0, 1)
    out = (out * 255).astype(np.uint8)
    if processing_p > 0 and rng.random() < processing_p:
        out = vendor_processing(out, rng)
    h, w = out.shape
    if rng.random() < 0.5 or every:  # lower resolution: down and back up
        f = rng.uniform(0.3, 0.8)
        if "resolution" not in skip:
            small = cv2.resize(out, (max(8, round(w * f)), max(8, round(h * f))), cv2.INTER_AREA)
            out = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    if rng.random() < 0.3 or every:
        sigma = rng.uniform(0.5, 1.5)
        if "blur" not in skip:
            out = cv2.GaussianBlur(out, (0, 0), sigma)
    if rng.random() < 0.3 or every:
        seed, sigma = rng.randrange(1 << 30), rng.uniform(2, 8)
        if "noise" not in skip:
            noise = np.random.default_rng(seed).normal(0, sigma, out.shape)
            out = np.clip(out + noise, 0, 255).astype(np.uint8)
    if rng.random() < 0.4 or every:
        quality = rng.randrange(25, 90)
        if "jpeg" not in skip:
            ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])
            out = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) if ok else out
    if rng.random() < 0.3 or every:
        burn_marker(out if "markers" not in skip else out.copy(), rng)
    return out


def _tilt(img: Any, boxes: Any, degrees: float) -> tuple[Any, Any]:
    """Rotate a square uint8 torch image counter-clockwise about its centre on the same canvas
    (corners cut, black fill); each box becomes the upright box around its rotated corners,
    clipped, and one left with under half of that box inside the canvas is dropped."""
    import cv2
    import torch

    s = img.shape[-1]
    m = cv2.getRotationMatrix2D((s / 2, s / 2), degrees, 1.0)
    out = cv2.warpAffine(img.numpy(), m, (s, s), flags=cv2.INTER_LINEAR, borderValue=0)
    upright = enclosing_boxes(boxes.numpy(), m)
    clipped = np.clip(upright, 0, s)

    def area(x: np.ndarray) -> np.ndarray:
        return (x[:, 2] - x[:, 0]).clip(0) * (x[:, 3] - x[:, 1]).clip(0)

    keep = area(clipped) >= 0.5 * area(upright)
    return torch.from_numpy(out), torch.from_numpy(clipped[keep].astype(np.float32))


def detection_pair(
    img: Any,
    boxes: Any,
    rng: random.Random,
    rot90_p: float,
    photometric: bool,
    tilt_p: float = 0.0,
    tilt_degrees: float = 45.0,
    compound_p: float = 0.0,
    processing_p: float = 0.0,
) -> tuple[Any, Any]:
    """One detector training pair, a square uint8 (s, s) torch image and its xyxy pixel boxes
    (k, 4): a quarter turn with probability rot90_p, then with probability tilt_p any angle
    within +-tilt_degrees (together: any orientation; the box becomes the upright box around
    the turned one), mirrors, and the robust photometric changes when asked (with compound_p and
    processing_p as in robust_photometric). Quarter turns and mirrors move boxes exactly."""
    import torch

    s = img.shape[-1]
    k = rng.randrange(1, 4) if rng.random() < rot90_p else 0
    for _ in range(k):  # counter-clockwise: (x, y) -> (y, s - x)
        img = img.rot90(1, (0, 1))
        boxes = torch.stack([boxes[:, 1], s - boxes[:, 2], boxes[:, 3], s - boxes[:, 0]], dim=1)
    if tilt_p > 0 and rng.random() < tilt_p:  # no draw otherwise: older recipes replay exactly
        img, boxes = _tilt(img.contiguous(), boxes, rng.uniform(-tilt_degrees, tilt_degrees))
    if rng.random() < 0.5:
        img = img.flip(-1)
        boxes = torch.stack([s - boxes[:, 2], boxes[:, 1], s - boxes[:, 0], boxes[:, 3]], dim=1)
    if rng.random() < 0.2:
        img = img.flip(-2)
        boxes = torch.stack([boxes[:, 0], s - boxes[:, 3], boxes[:, 2], s - boxes[:, 1]], dim=1)
    img = img.contiguous()
    if photometric:
        img = torch.from_numpy(
            robust_photometric(img.numpy(), rng, compound_p=compound_p, processing_p=processing_p)
        )
    return img, boxes.contiguous()


def augment_batch(
    x_u8: Any,
    masks: Any = None,
    strength: str = "light",
    rotate_degrees: float = 15.0,
    rot90_p: float = 0.0,
    skip: frozenset[str] = frozenset(),
    compound_p: float = 0.0,
    processing_p: float = 0.0,
    aspect_p: float = 0.0,
    min_squeeze: float = 0.6,
) -> Any:
    """Augment a uint8 (n, h, w) torch batch; with masks, (images, moved masks). `skip`: groups
    of the robust photometric changes left out (ROBUST_GROUPS); `compound_p`: how often all of
    them apply together; `processing_p`: how often another vendor's processing (both
    robust_photometric); `aspect_p`: how often one axis is squeezed by a factor drawn from
    [min_squeeze, 1] (squeeze_axis), the masks with it. At 0 nothing extra is drawn, so a
    recipe without it replays exactly."""
    import torch
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    if strength not in STRENGTHS:
        raise ValueError(f"augmentation strength {strength!r} is not one of {STRENGTHS}")
    geometry = _geometry(rotate_degrees)
    light = v2.ColorJitter(brightness=0.2, contrast=0.2)
    rng = random.Random(int(torch.randint(0, 1 << 30, ())))
    images, moved = [], []
    for i, img in enumerate(x_u8):
        k = rng.randrange(1, 4) if rng.random() < rot90_p else 0
        img_t = tv_tensors.Image(img.unsqueeze(0).rot90(k, (-2, -1)))
        mask = masks[i].rot90(k, (-2, -1)) if masks is not None else None
        if aspect_p > 0 and rng.random() < aspect_p:
            squeeze, vertical = rng.uniform(min_squeeze, 1.0), rng.random() < 0.5
            img_t = tv_tensors.Image(squeeze_axis(img_t, squeeze, vertical))
            if mask is not None:
                mask = squeeze_axis(mask[None], squeeze, vertical, nearest=True)[0]
        if mask is not None:
            img_t, mask_t = geometry(img_t, tv_tensors.Mask(mask))
            moved.append(mask_t)
        else:
            img_t = geometry(img_t)
        if strength == "robust":
            img_t = torch.from_numpy(
                robust_photometric(img_t[0].numpy(), rng, skip, compound_p, processing_p)
            )
        else:
            img_t = light(img_t)[0]
        images.append(img_t)
    if masks is None:
        return torch.stack(images)
    return torch.stack(images), torch.stack(moved)


def ssl_views(x_u8: Any, size: int) -> tuple[Any, Any]:
    """Two independent augmentations of each uint8 image, as float tensors in [0, 1]."""
    import torch
    from torchvision.transforms import v2

    aug = v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.3, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(0.3),
            v2.RandomAffine(degrees=20, translate=(0.1, 0.1)),
            v2.ColorJitter(brightness=0.4, contrast=0.4),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.4),
        ]
    )

    def one() -> Any:
        return torch.stack([aug(img.unsqueeze(0)) for img in x_u8]).float() / 255.0

    return one(), one()
