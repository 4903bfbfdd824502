"""Setting a tilted radiograph's bone axis upright before the models see it (upright.py)."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest

from app.core.config import PipelineOptions
from app.inference.decoding import decode
from app.inference.pipeline import ImageWork, image_answer, run_study
from app.inference.plan import Plan, Scoring
from app.inference.upright import (
    MIN_TURN_DEGREES,
    residual_tilt,
    turn_for,
    turned_crop_box,
    upright_turn,
)

MODALITIES = ["CR", "DX", "RG", "OT"]


def bar(height: int, width: int, degrees: float, length: float = 120, thickness: float = 20):
    """A filled bar through the centre whose long axis lies `degrees` from the x axis (y down)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    a = np.radians(degrees)
    dx, dy = xx - width / 2, yy - height / 2
    along = dx * np.cos(a) + dy * np.sin(a)
    across = -dx * np.sin(a) + dy * np.cos(a)
    return (np.abs(along) < length) & (np.abs(across) < thickness)


@pytest.mark.parametrize("degrees", [-40, -25, 0, 12, 30, 70, 100, 160])
def test_the_residual_tilt_is_the_long_axis_folded_into_a_quarter_turn(degrees):
    residual, elongation = residual_tilt(bar(300, 400, degrees))
    expected = (degrees + 45) % 90 - 45
    assert abs(residual - expected) < 1.0
    assert elongation > 10


def test_a_small_tilt_or_a_round_mask_is_left_alone():
    assert upright_turn(bar(300, 400, MIN_TURN_DEGREES - 5), 300, 400) is None
    yy, xx = np.mgrid[0:300, 0:400]
    disc = (xx - 200) ** 2 + (yy - 150) ** 2 < 80**2
    assert upright_turn(disc, 300, 400) is None
    assert upright_turn(np.zeros((300, 400), bool), 300, 400) is None


def test_a_tilted_bar_is_turned_onto_the_nearest_axis_and_no_pixel_is_lost():
    mask = bar(300, 400, 30)
    turn = upright_turn(mask, 300, 400)
    assert turn is not None and turn.degrees == pytest.approx(30, abs=1)
    image = np.where(mask, 3000, 0).astype(np.uint16)
    turned = turn.image(image)
    assert turned.dtype == np.uint16 and turned.shape == turn.size
    assert turned.shape[0] > 300 and turned.shape[1] > 400  # the canvas grew
    assert turned.astype(np.int64).sum() == pytest.approx(image.astype(np.int64).sum(), rel=0.02)
    residual, _ = residual_tilt(turned > 1500)
    assert abs(residual) < 1.0
    # the crop box of the turned mask holds the turned bar, with the margin, inside the canvas
    x1, y1, x2, y2 = turned_crop_box(turn, mask, 0.1)
    ys, xs = np.nonzero(turned > 1500)
    assert x1 <= xs.min() and y1 <= ys.min() and x2 > xs.max() and y2 > ys.max()
    assert x1 >= 0 and y1 >= 0 and x2 <= turn.size[1] and y2 <= turn.size[0]
    # only the crop made: the same pixels as the whole turned canvas cut to the box
    part = turn.image(image, (x1, y1, x2, y2)).astype(np.int64)
    whole = turned[y1:y2, x1:x2].astype(np.int64)
    assert part.shape == whole.shape and np.abs(part - whole).max() <= 1


def test_a_mask_at_a_lower_resolution_gives_the_same_turn():
    full = bar(600, 800, 35, length=240, thickness=40)
    half = full[::2, ::2]
    a, b = upright_turn(full, 600, 800), upright_turn(half, 600, 800)
    assert a is not None and b is not None
    assert a.degrees == pytest.approx(b.degrees, abs=0.5) and a.size == b.size


def test_boxes_come_back_as_the_upright_box_around_the_turned_box():
    turn = turn_for(-30.0, 300, 400)
    box = np.array([100.0, 120.0, 160.0, 150.0])
    corners = np.array([[box[0], box[1]], [box[2], box[1]], [box[0], box[3]], [box[2], box[3]]])
    turned = turn.points(corners)
    around = np.array([[*turned.min(axis=0), *turned.max(axis=0)]])
    back = turn.boxes_back(around)[0]
    assert back[0] <= box[0] and back[1] <= box[1] and back[2] >= box[2] and back[3] >= box[3]
    # a turn and its inverse: the box around the box around the box, no further
    assert back[2] - back[0] < 2.5 * (box[2] - box[0])
    assert turn.boxes_back(np.zeros((0, 4))).shape == (0, 4)
    far = turn.boxes_back(np.array([[-50.0, -50.0, 1e4, 1e4]]))[0]
    assert far.tolist() == [0.0, 0.0, 400.0, 300.0]  # clipped to the working image


def test_a_radiograph_set_down_at_an_angle_is_turned_back_in_the_served_pipeline(
    chain, fracatlas_dir
):
    """A val radiograph and the same one set down 45 degrees off (its bone axis then lies 25-45
    degrees off an image axis): the pipeline finds the tilt, says so, keeps its boxes in the
    frame as sent, and its score stays nearer the upright image's than without the turn."""
    from PIL import Image

    crp, clf, det, point = chain
    names = (fracatlas_dir / "splits" / "val.txt").read_text().split()
    fractured = [p for n in names for p in (fracatlas_dir / "images" / "Fractured").glob(n)][:12]
    near, far = [], []
    for path in fractured:
        grey = Image.open(path).convert("L")
        tilted = grey.rotate(45, resample=Image.Resampling.BILINEAR, expand=True)
        pngs = []
        for im in (grey, tilted):
            buf = BytesIO()
            im.save(buf, format="PNG")
            pngs.append(buf.getvalue())
        upright_image, tilted_image = (
            decode(b, "image/png", path.name, 60_000_000, MODALITIES) for b in pngs
        )
        base = [ImageWork(image=upright_image, decode_ms=0.0)]
        run_study(base, Plan.of(crp, clf, det, point, options=PipelineOptions(upright=True)))
        if base[0].turn is not None:
            continue  # FracAtlas's own tilt: not the case this test is about
        turned, plain = ([ImageWork(image=tilted_image, decode_ms=0.0)] for _ in range(2))
        run_study(turned, Plan.of(crp, clf, det, point, options=PipelineOptions(upright=True)))
        run_study(plain, Plan.of(crp, clf, det, point))
        w = turned[0]
        if w.turn is None:  # a mask without a long axis (a hand spread flat) is not turned
            continue
        assert MIN_TURN_DEGREES <= abs(w.turn.degrees) <= 45, path.name
        assert any("turned" in note for note in image_answer(0, w, Scoring(None, 0.5, "")).notes)
        h, wd = tilted_image.height, tilted_image.width
        assert (w.boxes[:, [0, 2]] <= wd + 1e-3).all() and (w.boxes[:, [1, 3]] <= h + 1e-3).all()
        assert (w.boxes >= 0).all()
        x1, y1, x2, y2 = w.crop_box
        assert 0 <= x1 < x2 <= wd and 0 <= y1 < y2 <= h
        near.append(abs(w.probability - base[0].probability))
        far.append(abs(plain[0].probability - base[0].probability))
    assert len(near) >= 4
    assert np.mean(near) < np.mean(far), (near, far)


def test_the_service_turns_only_when_configured_to(fracatlas_dir):
    """FRACTURE_UPRIGHT reaches the served pipeline: the same tilted radiograph is turned (and
    the answer says so) with it, and analysed as sent without it."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from app.core.config import Settings
    from app.main import create_app

    names = (fracatlas_dir / "splits" / "val.txt").read_text().split()
    paths = [p for n in names for p in (fracatlas_dir / "images" / "Fractured").glob(n)][:12]
    notes = {}
    for upright in (True, False):
        with TestClient(create_app(Settings(upright=upright))) as client:
            found = []
            for path in paths:
                buf = BytesIO()
                tilted = Image.open(path).convert("L").rotate(45, expand=True)
                tilted.save(buf, format="PNG")
                r = client.post(
                    "/v1/predict", content=buf.getvalue(), headers={"content-type": "image/png"}
                )
                assert r.status_code == 200, r.text
                image = r.json()["images"][0]
                width, height = tilted.size
                for d in image["detections"]:
                    x1, y1, x2, y2 = d["box"]
                    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
                found.append(any("turned" in n for n in image["notes"]))
            notes[upright] = found
    assert sum(notes[True]) >= 4 and not any(notes[False])
