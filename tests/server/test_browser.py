"""The editor page in a real browser (Debian's chromium driven by Playwright) against a real server.

Reposition: upload the bundled photo, click the subject, drag it in several steps, release; the
previews must update the canvas during the drag, the final must arrive, and it may differ from
the photo only where the subject was and where it went (dilated by the pipeline's paste-back
radius + 2 px for the sub-pixel shift). Undo must bring back the photo's bytes. Elements: the
partition overlay, select an element, drag it, release: the final render arrives. No console
errors anywhere. Screenshots go to the test's tmp dir.
"""
from __future__ import annotations

from importlib import resources

import httpx
import numpy as np
import pytest
from needs import need, need_file
from PIL import Image
from scipy import ndimage
from serving import decode, start_server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
sync_api = need("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
need_file(CHROMIUM, "Debian's chromium is absent (apt-get install -y chromium)")

TIMEOUT_MS = 60_000


def photo_path() -> str:
    return str(resources.files("editrt").joinpath("assets", "chelsea.png"))


@pytest.fixture
def browser_page(reposition, elements_pipe, tmp_path):
    with start_server(reposition, elements_pipe) as server, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            yield page, errors, tmp_path
        finally:
            browser.close()


def page_xy(page, x: float, y: float) -> tuple[float, float]:
    """Image pixel -> page coordinates through the canvas's on-screen box."""
    box = page.locator("#view").bounding_box()
    width, height = page.evaluate("[document.getElementById('view').width, document.getElementById('view').height]")
    return box["x"] + (x + 0.5) * box["width"] / width, box["y"] + (y + 0.5) * box["height"] / height


def data_url_pixels(url: str) -> np.ndarray:
    return decode(url.split(",", 1)[1])


def test_reposition_in_the_browser(browser_page):
    page, errors, tmp = browser_page
    original = np.asarray(Image.open(photo_path()).convert("RGB"))
    h, w = original.shape[:2]
    page.set_input_files("#file", photo_path())
    page.wait_for_function("window.editrt.session !== null && !window.editrt.busy")
    page.screenshot(path=tmp / "1-opened.png")

    page.mouse.click(*page_xy(page, 225, 150))
    page.wait_for_function("window.editrt.mask !== null && !window.editrt.busy")
    mask = decode(page.evaluate("window.editrt.maskB64"), "L") > 127
    assert mask.shape == (h, w) and mask.any()
    page.screenshot(path=tmp / "2-selected.png")

    # grab the subject at a pixel inside its mask, nearest the centre of mass
    ys, xs = np.nonzero(mask)
    k = np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2)
    gx, gy = int(xs[k]), int(ys[k])
    page.mouse.move(*page_xy(page, gx, gy))
    page.mouse.down()
    shown_before = page.evaluate("window.editrt.shown")
    for step in range(1, 7):  # 6 steps of 3 px right, 1 px down
        page.mouse.move(*page_xy(page, gx + 3 * step, gy + step), steps=2)
        if step == 3:  # still dragging: a preview must replace the canvas before the release
            page.wait_for_function("window.editrt.previews >= 1")
            assert page.evaluate("window.editrt.shown") != shown_before
            page.screenshot(path=tmp / "3-dragging.png")
    page.mouse.up()
    page.wait_for_function("window.editrt.finals >= 1 && !window.editrt.busy")
    page.screenshot(path=tmp / "4-final.png")
    dx, dy = page.evaluate("window.editrt.lastMove")
    assert abs(dx - 18) < 1.5 and abs(dy - 6) < 1.5

    final = data_url_pixels(page.evaluate("window.editrt.current"))
    assert final.shape == original.shape
    changed = (final != original).any(axis=2)
    moved = ndimage.shift(mask.astype(np.uint8), (dy, dx), order=0, mode="constant") > 0
    radius = max(1, round(0.01 * min(h, w)))
    expected = ndimage.binary_dilation(mask | moved, iterations=radius + 2)
    assert changed.any(), "the final equals the photo"
    assert not (changed & ~expected).any(), f"{int((changed & ~expected).sum())} px changed outside the edited regions"
    assert (changed & moved).any(), "nothing changed where the subject went"

    page.click("#undo")
    page.wait_for_function("document.getElementById('undo').disabled")
    back = data_url_pixels(page.evaluate("window.editrt.current"))
    assert np.array_equal(back, original)
    page.screenshot(path=tmp / "5-undone.png")
    assert not errors, errors
    assert not page.evaluate("window.editrt.errors")


def _drag_subject_and_release(page, mask, finals_before: int) -> np.ndarray:
    """Grab the subject nearest its centre of mass, drag 18 px right and 6 down, release; the final's pixels."""
    ys, xs = np.nonzero(mask)
    k = np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2)
    gx, gy = int(xs[k]), int(ys[k])
    page.mouse.move(*page_xy(page, gx, gy))
    page.mouse.down()
    page.mouse.move(*page_xy(page, gx + 18, gy + 6), steps=4)
    page.mouse.up()
    page.wait_for_function(f"window.editrt.finals >= {finals_before + 1} && !window.editrt.busy")
    return data_url_pixels(page.evaluate("window.editrt.current"))


def test_reposition_stages_from_the_page(browser_page):
    """The page's SEELE toggles (depth occlusion, perspective scale, matting) reach the session: the same
    drag with them on gives another final than with them off, and no error."""
    page, errors, tmp = browser_page
    page.set_input_files("#file", photo_path())
    page.wait_for_function("window.editrt.session !== null && !window.editrt.busy")
    page.mouse.click(*page_xy(page, 225, 150))
    page.wait_for_function("window.editrt.mask !== null && !window.editrt.busy")
    mask = decode(page.evaluate("window.editrt.maskB64"), "L") > 127
    plain = _drag_subject_and_release(page, mask, 0)
    page.click("#undo")
    page.wait_for_function("document.getElementById('undo').disabled")
    for toggle in ("#occlusion", "#auto-scale", "#matting"):
        page.check(toggle)
    page.mouse.click(*page_xy(page, 225, 150))  # a final clears the page's selection: select the subject again
    page.wait_for_function("window.editrt.mask !== null && !window.editrt.busy")
    staged = _drag_subject_and_release(page, mask, 1)
    page.screenshot(path=tmp / "stages-final.png")
    assert staged.shape == plain.shape and not np.array_equal(staged, plain)
    assert not errors, errors
    assert not page.evaluate("window.editrt.errors")


def test_elements_in_the_browser(browser_page):
    page, errors, tmp = browser_page
    page.check("input[name=mode][value=elements]")
    page.set_input_files("#file", photo_path())
    page.wait_for_function("window.editrt.session !== null && window.editrt.items.length > 0 && !window.editrt.busy")
    page.screenshot(path=tmp / "1-elements.png")
    items = page.evaluate("window.editrt.items")
    big = max(items, key=lambda e: e["w"] * e["h"])
    page.mouse.click(*page_xy(page, big["x"], big["y"]))
    page.wait_for_function(f"window.editrt.selected === {big['id']}")
    start = page_xy(page, big["x"], big["y"])
    page.mouse.move(*start)
    page.mouse.down()
    for step in range(1, 4):
        page.mouse.move(start[0] + 4 * step, start[1], steps=2)
    page.wait_for_function("window.editrt.previews >= 1")
    page.mouse.up()
    page.wait_for_function("window.editrt.finals >= 1 && !window.editrt.busy")
    page.screenshot(path=tmp / "2-moved-rendered.png")
    moved = next(e for e in page.evaluate("window.editrt.items") if e["id"] == big["id"])
    assert abs(moved["x"] - big["x"] - 12) < 1.5
    page.click("#delete")
    page.wait_for_function(f"!window.editrt.items.some(e => e.id === {big['id']})")
    assert not errors, errors
    assert not page.evaluate("window.editrt.errors")


def test_a_token_never_reaches_a_log_line(reposition, tmp_path):
    """With --token, the page given #token=... opens a session, selects and drags over the WebSocket (the token
    as a subprotocol); no log line of the run (uvicorn's access and error logs, editrt's) holds the token."""
    import logging

    token = "browser-secret-token-4f9a"
    lines: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())
    loggers = [logging.getLogger(n) for n in ("uvicorn.access", "uvicorn.error", "uvicorn", "editrt")]
    with start_server(reposition, token=token, access_log=True) as server, sync_api.sync_playwright() as p:
        for logger in loggers:
            logger.addHandler(handler)
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"{server.url}/?token={token}#token={token}")  # both ways a user might paste it
            page.set_input_files("#file", photo_path())
            page.wait_for_function("window.editrt.session !== null && !window.editrt.busy")
            page.mouse.click(*page_xy(page, 225, 150))
            page.wait_for_function("window.editrt.mask !== null && !window.editrt.busy")
            mask = decode(page.evaluate("window.editrt.maskB64"), "L") > 127
            _drag_subject_and_release(page, mask, 0)  # the WebSocket authenticated: its final arrived
        finally:
            browser.close()
            for logger in loggers:
                logger.removeHandler(handler)
    assert any("/v1/sessions" in line for line in lines), lines[:5]  # the access log was on
    assert not [line for line in lines if token in line]



def test_the_api_docs_render_offline_and_keep_the_schema_behind_the_token(reposition):
    """/docs is public and served from the server's own copy of Swagger UI: with every request that leaves the
    server refused (an air-gapped browser), the page given #token=... renders the API's operations, the schema
    fetched with the token; /openapi.json itself stays behind the token."""
    token = "docs-secret-token-7c1e"
    with start_server(reposition, token=token) as server, sync_api.sync_playwright() as p:
        assert httpx.get(server.url + "/openapi.json").status_code == 401
        assert httpx.get(server.url + "/docs").status_code == 200
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            elsewhere: list[str] = []

            def this_server_only(route):
                if route.request.url.startswith(server.url + "/"):
                    route.continue_()
                else:
                    elsewhere.append(route.request.url)
                    route.abort()

            page.route("**/*", this_server_only)
            page.goto(f"{server.url}/docs#token={token}")
            page.wait_for_selector(".opblock-summary-path")
            paths = page.locator(".opblock-summary-path").all_inner_texts()
        finally:
            browser.close()
    assert elsewhere == []
    assert any(path.startswith("/v1/sessions") for path in paths), paths
