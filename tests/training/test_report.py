"""The evaluation report renders in a real browser with every figure loaded."""

from __future__ import annotations

from tests.browser import chromium
from tests.conftest import FRACATLAS, REPO, need


def test_report_renders_with_every_image(tmp_path):
    need(FRACATLAS)
    from training.data import load_records
    from training.evaluate import evaluate

    records = [r for r in load_records(FRACATLAS) if r.split == "val"]
    picked = [r for r in records if r.fractured][:10] + [r for r in records if not r.fractured][:20]
    result = evaluate(picked, report_dir=tmp_path)
    page = tmp_path / "report.html"
    assert page.exists() and result["classifier_ci95"]["auroc"]
    with chromium() as browser:
        browser.get(page.as_uri())
        images = browser.execute_script(
            "return [...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0])"
        )
        assert len(images) == 7 and all(ok for _, ok in images), images
        text = browser.find_element("tag name", "body").text
        for needle in ("AUROC", "95% CI", "By body region", "fp_per_image", "sha256"):
            assert needle in text
        out = REPO / "reports" / "report.png"
        out.parent.mkdir(exist_ok=True)
        browser.save_screenshot(str(out))


def test_a_box_is_drawn_on_its_region_of_a_reduced_image(tmp_path):
    """A working image reduced 4x with boxes in frame pixels: the grid draws the image over the
    frame, so the box's outline falls on the bright square it marks, not 4x off."""
    import numpy as np
    from PIL import Image

    from training import plots

    frame_w, frame_h = 800, 600
    reduced = np.full((frame_h // 4, frame_w // 4), 128, np.uint8)  # mid grey
    reduced[0, 0] = 0  # sets black, so the grey stays grey
    reduced[100:120, 150:170] = 255  # the square at frame pixels x 600-680, y 400-480
    box = np.array([[600.0, 400.0, 680.0, 480.0]])
    path = plots.detection_grid(
        [(reduced, box, np.zeros((0, 4)), np.zeros(0), (frame_w, frame_h), "img-1")],
        tmp_path / "grid.png",
    )
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    grey = (np.abs(rgb - 128).max(axis=2) < 40) & (np.ptp(rgb, axis=2) < 10)
    rows, cols = np.nonzero(grey.sum(axis=1) > 50)[0], np.nonzero(grey.sum(axis=0) > 50)[0]
    y0, y1, x0, x1 = rows.min(), rows.max(), cols.min(), cols.max()  # the drawn image
    inside = np.zeros(grey.shape, bool)
    inside[y0 : y1 + 1, x0 : x1 + 1] = True
    white = inside & (rgb.min(axis=2) > 230)
    red = inside & (rgb[..., 0] > 180) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    wy, wx = np.nonzero(white)
    ry, rx = np.nonzero(red)
    assert len(wx) and len(rx)
    # the outline's centre sits within a few pixels of the bright square's centre
    assert abs(rx.mean() - wx.mean()) < 4 and abs(ry.mean() - wy.mean()) < 4
