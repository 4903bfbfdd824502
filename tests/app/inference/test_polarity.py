"""A PNG or JPEG shown bone-dark is inverted before the models look (polarity.py)."""

from __future__ import annotations

import numpy as np
import pytest

from app.core.config import PipelineOptions
from app.inference.decoding import decode
from app.inference.pipeline import ImageWork, image_answer, run_study
from app.inference.plan import Plan, Scoring
from app.inference.polarity import MAX_SKEWNESS, grey_skewness, inverted, looks_inverted
from tests.conftest import bone_phantom, png_bytes
from tests.dicom_factory import make_dataset, to_bytes

MODALITIES = ["CR", "DX", "RG"]


def test_a_radiograph_leans_right_and_its_inversion_left():
    img = bone_phantom()
    assert grey_skewness(img) > 1.0
    assert grey_skewness(inverted(img)) == pytest.approx(-grey_skewness(img), abs=1e-6)
    assert not looks_inverted(img) and looks_inverted(inverted(img))


def test_a_flat_or_balanced_image_is_left_alone():
    assert grey_skewness(np.full((40, 50), 90, np.uint8)) == 0.0
    assert not looks_inverted(np.full((40, 50), 90, np.uint8))
    halves = np.zeros((64, 64), np.uint8)
    halves[:, 32:] = 200  # symmetric grey levels: no lean either way
    assert abs(grey_skewness(halves)) < 1e-9 and not looks_inverted(halves)
    assert MAX_SKEWNESS < 0


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_inverting_keeps_the_range_and_type_and_undoes_itself(dtype):
    img = (bone_phantom().astype(np.float32) * 0.5 + 30).astype(dtype)
    out = inverted(img)
    assert out.dtype == img.dtype
    assert (out.min(), out.max()) == (img.min(), img.max())
    assert np.array_equal(inverted(out), img)


def _served(chain, data: bytes, ctype: str) -> tuple[ImageWork, list[str]]:
    crp, clf, det, point = chain
    work = [ImageWork(image=decode(data, ctype, "x", 60_000_000, MODALITIES), decode_ms=0.0)]
    run_study(work, Plan.of(crp, clf, det, point, options=PipelineOptions(polarity=True)))
    return work[0], image_answer(0, work[0], Scoring(None, 0.5, "")).notes


def test_the_pipeline_sees_a_bone_dark_png_as_the_bone_bright_one(chain):
    """Same pixels for the models, same answer; the note says why, the image as sent is kept."""
    bright = bone_phantom()
    dark = 255 - bright
    w_bright, notes_bright = _served(chain, png_bytes(bright), "image/png")
    w_dark, notes_dark = _served(chain, png_bytes(dark), "image/png")
    assert not w_bright.inverted and not any("inverted" in n for n in notes_bright)
    assert w_dark.inverted and any("inverted for analysis" in n for n in notes_dark)
    assert (w_dark.image.pixels == dark).all()  # the answer refers to the image as sent
    assert w_dark.crop_box == w_bright.crop_box
    assert w_dark.probability == pytest.approx(w_bright.probability, abs=1e-6)


def test_a_dicom_keeps_the_polarity_its_header_declares(chain):
    """A MONOCHROME2 file whose content leans the other way is not second-guessed."""
    dark = (255 - bone_phantom()).astype(np.uint16) * 16
    w, notes = _served(chain, to_bytes(make_dataset(dark, bits_stored=12)), "application/dicom")
    assert not w.inverted and not any("inverted" in n for n in notes)


def test_the_service_inverts_only_when_configured_to():
    """FRACTURE_FIX_POLARITY reaches the served pipeline."""
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.main import create_app

    dark = png_bytes(255 - bone_phantom())
    for fix in (True, False):
        with TestClient(create_app(Settings(fix_polarity=fix))) as client:
            r = client.post("/v1/predict", content=dark, headers={"content-type": "image/png"})
            assert r.status_code == 200, r.text
            notes = r.json()["images"][0]["notes"]
            assert any("inverted for analysis" in n for n in notes) is fix
