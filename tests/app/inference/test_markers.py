"""Painting burned-in annotations out of what the models see (markers.py)."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from app.core.config import PipelineOptions
from app.inference.decoding import decode
from app.inference.markers import suppress_markers
from app.inference.pipeline import ImageWork, image_answer, run_study
from app.inference.plan import Plan, Scoring

MODALITIES = ["CR", "DX", "RG", "OT"]


def radiograph(height: int = 400, width: int = 300) -> np.ndarray:
    """Dark background, a soft-tissue band and a bright bone shaft with a dense spot inside."""
    img = np.full((height, width), 20, np.uint8)
    img[40:360, 90:210] = 110  # soft tissue
    img[60:340, 130:170] = 200  # bone
    img[190:196, 146:152] = 250  # a dense spot (a screw head, a sesamoid) inside bone
    img[120:140, 60:80] = 150  # a soft-tissue island, bright but not the top level
    return img


def burn_text(img: np.ndarray, text: str, at: tuple[int, int], level: int = 255) -> np.ndarray:
    """The letters as a site burns them: the top grey level, pixels replaced."""
    plane = Image.fromarray(img)
    ImageDraw.Draw(plane).text(at, text, fill=level, font=ImageFont.load_default(size=28))
    return np.asarray(plane).copy()


def test_letters_on_the_background_are_painted_with_the_background():
    clean = radiograph()
    marked = burn_text(clean, "LT", (20, 300))
    letters = marked != clean
    assert letters.sum() > 50
    out, painted = suppress_markers(marked)
    assert painted.count >= 1
    assert np.abs(out[letters].astype(int) - 20).max() <= 5  # the background's level
    # the anatomy, the dense spot in bone and the soft-tissue island are untouched
    assert (out[40:360, 90:210] == marked[40:360, 90:210]).all()


def test_a_label_tab_with_dark_letters_goes_whole():
    img = radiograph()
    img[300:330, 10:60] = 255  # a white tab...
    img = burn_text(img, "R", (25, 298), level=0)  # ...with its letter in black
    out, painted = suppress_markers(img)
    assert painted.count == 1
    assert np.abs(out[300:330, 10:60].astype(int) - 20).max() <= 5


def test_an_image_without_annotations_comes_back_as_it_was():
    img = radiograph()
    out, painted = suppress_markers(img)
    assert out is img and painted.count == 0
    flat = np.full((50, 60), 7, np.uint16)
    assert suppress_markers(flat)[0] is flat


def test_strips_along_the_film_edge_are_not_annotations():
    img = radiograph()
    img[:, 295:] = 255  # a collimator or film edge running off the image
    out, painted = suppress_markers(img)
    assert painted.count == 0 and out is img


def test_the_grey_range_and_type_of_a_dicom_frame_are_kept():
    clean = radiograph().astype(np.uint16) * 16  # 12-bit levels
    marked = clean.copy()
    text = burn_text(np.zeros_like(radiograph()), "AP", (20, 300)) > 0
    marked[text] = 4095
    out, painted = suppress_markers(marked)
    assert out.dtype == np.uint16 and painted.count >= 1
    assert np.abs(out[text].astype(int) - 20 * 16).max() <= 5 * 16
    assert (out[~text] == marked[~text]).sum() >= (~text).sum() - 4 * text.sum()


@pytest.mark.parametrize("markers", [True, False])
def test_the_pipeline_paints_only_when_asked_and_says_so(chain, markers):
    """What the models see loses the letters; the answer keeps the frame as sent and notes it."""
    crp, clf, det, point = chain
    marked = burn_text(radiograph(), "LT", (20, 300))
    buf = BytesIO()
    Image.fromarray(marked).save(buf, format="PNG")
    image = decode(buf.getvalue(), "image/png", "marked.png", 60_000_000, MODALITIES)
    work = [ImageWork(image=image, decode_ms=0.0)]
    run_study(work, Plan.of(crp, clf, det, point, options=PipelineOptions(markers=markers)))
    w = work[0]
    notes = image_answer(0, w, Scoring(None, 0.5, "")).notes
    assert (w.image.pixels == marked).all()  # the image as sent is never changed
    if markers:
        assert (w.seen != marked).sum() > 50
        assert any("painted out" in n for n in notes)
    else:
        assert w.seen is w.image.pixels
        assert not any("painted out" in n for n in notes)


def test_the_service_paints_only_when_configured_to(test_split_images):
    """FRACTURE_PAINT_OUT_MARKERS reaches the served pipeline, and the answer says so: a real
    radiograph with a side marker burned into its background corner (a drawing of one would be
    refused as no radiograph)."""
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    grey = np.asarray(Image.open(test_split_images[0]).convert("L"))
    height, width = grey.shape
    buf = BytesIO()
    Image.fromarray(burn_text(grey, "LT", (8, height - 40))).save(buf, format="PNG")
    for paint in (True, False):
        with TestClient(create_app(Settings(paint_out_markers=paint))) as client:
            r = client.post(
                "/v1/predict", content=buf.getvalue(), headers={"content-type": "image/png"}
            )
            assert r.status_code == 200, r.text
            image = r.json()["images"][0]
            assert (image["width"], image["height"]) == (width, height)
            assert any("painted out" in n for n in image["notes"]) is paint
