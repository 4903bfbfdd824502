"""What the models were made for: radiographs of the limbs and the pelvis. An image whose DICOM
header names another region (a chest film), or a colour picture (a photograph: radiographs are
grey), is refused before any model runs, with the reason, rather than answered with a
confidence nobody validated. Grey images that are no radiograph are caught after the models,
by their features (app/inference/familiarity.py)."""

from __future__ import annotations

from collections.abc import Sequence

from app.core.errors import ApiError
from app.inference.decoding import DecodedImage

# Above this share of coloured pixels a PNG or JPEG is a photograph or a drawing, not a
# radiograph: FracAtlas has none; a radiograph with a few coloured annotations stays far below.
MAX_COLOURED_SHARE = 0.05


def refuse_out_of_scope(image: DecodedImage, allowed_body_parts: Sequence[str]) -> None:
    """422 out_of_scope when the image names a body part outside `allowed_body_parts`
    (Settings.allowed_body_parts); an image that names none is analysed."""
    if image.coloured_share is not None and image.coloured_share > MAX_COLOURED_SHARE:
        raise ApiError(
            422,
            "out_of_scope",
            f"{image.coloured_share:.0%} of the image's pixels are coloured: a photograph or a "
            "drawing, not a radiograph (radiographs are grey): not analysed",
        )
    part = image.body_part
    if part and part not in {p.strip().upper() for p in allowed_body_parts}:
        raise ApiError(
            422,
            "out_of_scope",
            f"the image shows {part} (BodyPartExamined), not a limb or pelvis region the models "
            "were validated on: not analysed",
        )
