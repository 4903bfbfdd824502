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
