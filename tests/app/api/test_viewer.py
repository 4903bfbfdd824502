"""The viewer page in a real browser (Debian's chromium) against a real server with API keys on:
a FracAtlas radiograph and a shared DICOM are uploaded, drawn, and redrawn at another operating
point; what the page shows is what the API answers."""

from __future__ import annotations

import json
import time

import pytest

from tests.browser import chromium
from tests.conftest import DICOM_DIR, FRACATLAS, REPO, need
from tests.live import ServiceProcess, free_port

KEY = "viewer-test-key-1"


def wait_rendered(browser, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rendered = browser.execute_script("return Number(document.body.dataset.rendered || 0)")
        if rendered >= count:
            return
        status = browser.find_element("id", "status")
        if "error" in (status.get_attribute("class") or ""):
            raise AssertionError(f"the page reports an error: {status.text}")
        time.sleep(0.3)
    raise AssertionError("the page did not draw the answer")


def test_viewer_draws_the_answer_and_follows_the_operating_point(tmp_path):
    need(FRACATLAS)
    need(DICOM_DIR)
    jpeg = next((FRACATLAS / "images" / "Fractured").glob("*.jpg"))
    dicom = DICOM_DIR / "RG2_JPLY_fixed.dcm"
    service = ServiceProcess(free_port(), FRACTURE_API_KEYS=json.dumps([KEY]))
    try:
        base = str(service.http.base_url).rstrip("/")
        page = service.http.get("/viewer")
        assert page.status_code == 200  # the page itself is open
        policy = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
        with chromium(1400, 1800) as browser:
            from selenium.webdriver import ActionChains

            browser.get(f"{base}/viewer")
            browser.find_element("id", "key").send_keys(KEY)
            browser.find_element("id", "files").send_keys(f"{jpeg}\n{dicom}")
            wait_rendered(browser, 1)
            cards = browser.find_elements("css selector", "article.card")
            assert len(cards) == 2

            def api_answer(fp: str) -> dict:
                return service.http.post(
                    f"/v1/predict?fp_per_image={fp}",
                    files=[
                        ("files", (jpeg.name, jpeg.read_bytes(), "image/jpeg")),
                        ("files", (dicom.name, dicom.read_bytes(), "application/dicom")),
                    ],
                    headers={"Authorization": f"Bearer {KEY}"},
                ).json()

            answer = api_answer("0.40")
            for card, image in zip(cards, answer["images"], strict=True):
                assert int(card.get_attribute("data-boxes")) == len(image["detections"])
                shown = f"{100 * image['fracture_probability']:.1f}%"
                assert shown in card.text
                # the three-level verdict per image, in words
                verdict = card.find_element("css selector", ".verdict")
                assert verdict.get_attribute("data-verdict") == image["verdict"]
                words = {"fracture": "Fracture likely", "doubt": "Doubtful", "no_fracture": "No"}
                assert verdict.text.startswith(words[image["verdict"]])
                size = browser.execute_script(
                    "const c = arguments[0].querySelector('canvas'); return [c.width, c.height]",
                    card,
                )
                assert size[0] > 100 and size[1] > 100
            study = browser.find_element("id", "study")
            assert "Study:" in study.text
            assert study.get_attribute("data-verdict") == answer["study"]["verdict"]
            browser.save_screenshot(str(tmp_path / "viewer-0.4.png"))

            # A reader's second look: zoom, window, overlays, reset, next image, by mouse and keys.
            canvas = cards[0].find_element("css selector", "canvas")

            def data(name: str, element=canvas) -> str:
                return element.get_attribute(f"data-{name}")

            browser.execute_script(
                "const c = arguments[0], r = c.getBoundingClientRect();"
                "c.dispatchEvent(new WheelEvent('wheel', {deltaY: -100, clientX: r.left + r.width / 2,"
                " clientY: r.top + r.height / 2, bubbles: true, cancelable: true}));",
                canvas,
            )
            assert float(data("zoom")) > 1
            body = browser.find_element("tag name", "body")
            body.send_keys("w")
            assert int(data("window")) < 255
            body.send_keys("o")
            assert data("overlays") == "false"
            body.send_keys("o")
            assert data("overlays") == "true"
            body.send_keys("0")
            assert float(data("zoom")) == 1 and int(data("window")) == 255
            rects = json.loads(data("label-rects") or "[]")
            for i, (x, y, w, h) in enumerate(rects):  # labels never cover one another
                for x2, y2, w2, h2 in rects[i + 1 :]:
                    assert x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y
            body.send_keys("n")
            assert data("current", body) == "1"

            # The reader's reading: agree, judge a box, draw a missed fracture, save; the
            # service keeps it with the reader's key id and the answer's models.
            body.send_keys("p")
            first = answer["images"][0]
            body.send_keys("a")
            if first["detections"]:
                dx, dy = browser.execute_script(
                    "const v = views[0], s = scaleOf(v), r = v.canvas.getBoundingClientRect();"
                    "const k = r.width / v.canvas.width, b = v.result.detections[0].box;"
                    "return [((b[0] + b[2]) / 2 * s + v.ox) * k - r.width / 2,"
                    " ((b[1] + b[3]) / 2 * s + v.oy) * k - r.height / 2];"
                )
                ActionChains(browser).move_to_element_with_offset(
                    canvas, int(dx), int(dy)
                ).click().perform()
                assert True in json.loads(data("judged", cards[0]))
            body.send_keys("m")
            ActionChains(browser).move_to_element_with_offset(
                canvas, -120, -120
            ).click_and_hold().move_by_offset(60, 50).release().perform()
            assert data("missed", cards[0]) == "1"
            body.send_keys("s")
            deadline = time.monotonic() + 20
            while not data("feedback-id", cards[0]) and time.monotonic() < deadline:
                time.sleep(0.2)
            page_request = browser.execute_script("return state.answer.request_id")
            stored = service.http.get(
                "/v1/feedback",
                params={"request_id": page_request},
                headers={"Authorization": f"Bearer {KEY}"},
            ).json()["feedback"]
            assert [f["feedback_id"] for f in stored] == [data("feedback-id", cards[0])]
            reading = stored[0]
            assert reading["reader"].startswith("key:") and KEY not in reading["reader"]
            assert reading["models"] == answer["models"]
            if first["verdict"] == "doubt":
                assert reading["fractured"] is True
            else:
                assert reading["agree"] is True
            ((x1, y1, x2, y2),) = reading["missed"]
            assert 0 <= x1 < x2 <= first["width"] and 0 <= y1 < y2 <= first["height"]
            assert [b["correct"] for b in reading["boxes"]] == (
                [True] if first["detections"] else []
            )

            # Move the operating point: the page asks again and redraws.
            browser.execute_script(
                "const s = document.getElementById('fp'); s.value = '0.1';"
                "s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change'));"
            )
            wait_rendered(browser, 2)
            strict = api_answer("0.10")
            cards = browser.find_elements("css selector", "article.card")
            for card, image in zip(cards, strict["images"], strict=True):
                assert int(card.get_attribute("data-boxes")) == len(image["detections"])
            assert "0.1 false positives per image" in browser.find_element("id", "study").text
            browser.execute_script("window.scrollTo(0, 0)")
            out = REPO / "reports" / "viewer.png"
            out.parent.mkdir(exist_ok=True)
            browser.save_screenshot(str(out))
    finally:
        service.stop()


def test_preview_is_the_decoded_image(app_client):
    need(DICOM_DIR)
    data = (DICOM_DIR / "RG2_JPLY_fixed.dcm").read_bytes()
    r = app_client.post("/v1/preview", content=data, headers={"content-type": "application/dicom"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert int(r.headers["x-image-width"]) > 0 and r.headers["cache-control"] == "no-store"
    bad = app_client.post("/v1/preview", content=b"nope", headers={"content-type": "image/png"})
    assert bad.status_code == 422


@pytest.mark.parametrize("asset", ["viewer.js", "viewer.css"])
def test_viewer_assets_are_served(app_client, asset):
    assert app_client.get(f"/viewer/{asset}").status_code == 200
    assert app_client.get("/viewer/secrets.txt").status_code == 404
