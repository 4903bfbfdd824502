"""The radiograph probe's negatives: every family draws grey images that decode as the service
decodes them, the same bytes from the same seed, and an unknown family is named."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from app.inference.decoding import decode
from training import non_radiographs


@pytest.mark.parametrize("family", list(non_radiographs.FAMILIES))
def test_each_family_draws_grey_images_the_service_decodes(family):
    if family == "photograph":
        pytest.importorskip("skimage.data")
    drawn = non_radiographs.draw(family, 2, seed=3)
    assert drawn == non_radiographs.draw(family, 2, seed=3)  # reproducible from its seed
    for data, ctype in drawn:
        pixels = np.asarray(Image.open(io.BytesIO(data)))
        assert pixels.ndim == 2 and min(pixels.shape) >= 64
        assert pixels.std() > 5  # something drawn, not a blank page
        image = decode(data, ctype, f"{family}.png", 10**9, [])
        assert image.pixels.ndim == 2
    assert drawn[0][0] != drawn[1][0]


def test_an_unknown_family_is_named():
    with pytest.raises(ValueError, match="unknown family 'fax'"):
        non_radiographs.draw("fax", 1)
