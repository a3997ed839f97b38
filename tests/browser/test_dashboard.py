"""The dashboard in a real browser (Debian chromium) against the real app and efficientnet_lite0.

Each test opens the page in a fresh browser context and gets there as a person would (upload,
choose a class, explain); the server and the browser are shared. Results are stored, so a test
that needs one the previous test made gets it back from the cache. Screenshots of the main
states go to artifacts/screenshots/.
"""
from __future__ import annotations

import base64
import io
import logging
import os
import threading

import numpy as np
import pytest
from PIL import Image
from werkzeug.serving import make_server

from playwright.sync_api import expect, sync_playwright

from insights.app import create_app

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHOTS = os.path.join(ROOT, "artifacts", "screenshots")
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update"]


@pytest.fixture(scope="module")
def chelsea(tmp_path_factory) -> str:
    from skimage import data

    path = tmp_path_factory.mktemp("img") / "chelsea.png"
    Image.fromarray(data.chelsea()).save(path)
    return str(path)


SERVED: dict = {}  # "app": the app the server fixture serves (tests that change its limits)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real app on a free loopback port, with its model loaded and warmed up."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log in the test output
    app = create_app({"INSTANCE_PATH": str(tmp_path_factory.mktemp("instance"))})
    SERVED["app"] = app
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_port}"
    # Link previews and copied share links take their address from PUBLIC_URL, never the Host header.
    app.config["PUBLIC_URL"] = base
    warm = app.test_client()  # a warm model: the timing below is about the page, not loading weights
    image = warm.post("/api/samples/coffee").get_json()["id"]
    answer = warm.post("/api/explain", json={"model": "efficientnet_lite0", "image": image, "method": "saliency",
                                              "target": 967})
    if answer.status_code == 202:  # a busy machine: loading the model took longer than INLINE_TIMEOUT_S
        job = answer.get_json()["job"]["id"]
        app.extensions["insights"].jobs.get(job).wait(120)
        answer = warm.get(f"/api/jobs/{job}")
        assert answer.get_json()["status"] == "done", answer.get_json()
    assert answer.status_code == 200, answer.get_json()
    yield base
    httpd.shutdown()
    app.extensions["insights"].jobs.shutdown()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def context(browser, server):
    """A fresh browser context per test: no cookies, cache or page state from another test."""
    ctx = browser.new_context(viewport={"width": 1440, "height": 1100}, base_url=server,
                              permissions=["clipboard-read", "clipboard-write"])
    yield ctx
    ctx.close()


@pytest.fixture
def page(context, server):
    """The dashboard, freshly loaded; the test fails on any uncaught script error or anything
    the Content-Security-Policy refused."""
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: "Content Security Policy" in m.text and errors.append(m.text))  # CSP violations
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    page.errors = errors
    yield page
    assert errors == [], errors


@pytest.fixture(scope="module")
def chelsea_b64(chelsea) -> str:
    with open(chelsea, "rb") as f:
        return base64.b64encode(f.read()).decode()


def shot(page, name: str, **kw) -> None:
    os.makedirs(SHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SHOTS, name + ".png"), **kw)


CANVAS_STATS = """(sel) => {
  const c = document.querySelector(sel);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0, s = 0, s2 = 0, sum = 0;
  for (let i = 0; i < d.length; i += 4) { const v = d[i] + d[i + 1] + d[i + 2]; s += v; s2 += v * v; n++; }
  for (let i = 0; i < d.length; i += 97) sum = (sum * 31 + d[i]) % 1000000007;
  return { w: c.width, h: c.height, variance: s2 / n - (s / n) ** 2, hash: sum };
}"""


def canvas_stats(page, selector: str) -> dict:
    return page.evaluate(CANVAS_STATS, selector)


# The drop, the click on a class and the click on Explain all happen inside the page, so the
# measured time is the dashboard's own: upload + predict + explain + decode + paint.
DROP_AND_EXPLAIN = """async ([b64, pick]) => {
  const wait = async (test, what) => {
    const end = performance.now() + 30000;
    while (!test()) {
      if (performance.now() > end) throw new Error('timed out waiting for ' + what + ': ' + document.querySelector('#image-error').textContent + document.querySelector('#run-error').textContent);
      await new Promise((r) => setTimeout(r, 5));
    }
  };
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], 'chelsea.png', { type: 'image/png' }));
  performance.clearMarks();
  const t0 = performance.now();
  document.querySelector('#dropzone').dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
  await wait(() => document.querySelectorAll('#predictions button.pred').length >= 5, 'predictions');
  const t1 = performance.now();
  const chosen = document.querySelectorAll('#predictions button.pred')[pick];
  chosen.click();
  document.querySelector('#run').click();
  await wait(() => document.querySelector('#overlay').dataset.painted, 'the overlay');
  const t2 = performance.now();
  const mark = (n) => (performance.getEntriesByName('insights:' + n)[0] || {}).startTime - t0;
  return { total: t2 - t0, predictions: t1 - t0, uploaded: mark('uploaded'), predicted: mark('predicted'),
           explained: mark('explained'), painted: mark('painted'), explainStart: mark('explain-start'),
           chosen: chosen.querySelector('.pred-label').textContent };
}"""


def explain(page, b64: str, method: str = "saliency") -> dict:
    """Drops chelsea, picks the second guess and explains it with ``method``; answers the timing."""
    if method != "saliency":
        page.click(f"label[for=method-{method}]")
    return page.evaluate(DROP_AND_EXPLAIN, [b64, 1])


def drop_image(page, b64: str) -> None:
    """Drops chelsea and waits for the predictions (the second guess becomes the target)."""
    page.evaluate("""(b64) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const dt = new DataTransfer();
      dt.items.add(new File([bytes], 'chelsea.png', { type: 'image/png' }));
      document.querySelector('#dropzone').dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
    }""", b64)
    page.wait_for_function("() => document.querySelectorAll('#predictions button.pred').length >= 5", timeout=30_000)
    page.locator("#predictions button.pred").nth(1).click()


def test_drop_predict_choose_class_and_explain(page, chelsea_b64):
    shot(page, "01-empty")
    timing = explain(page, chelsea_b64)
    print(f"\ndrop → overlay painted: {timing['total']:.0f} ms (upload {timing['uploaded']:.0f}, "
          f"predictions shown {timing['predicted']:.0f}, explain answered {timing['explained']:.0f} "
          f"[request {timing['explained'] - timing['explainStart']:.0f}], painted {timing['painted']:.0f})")
    labels = page.locator("#predictions .pred-label").all_inner_texts()
    assert len(labels) == 5
    assert any("cat" in label.lower() for label in labels[:3]), labels  # chelsea is a tabby cat
    widths = page.eval_on_selector_all("#predictions .pred-fill", "els => els.map(e => e.getBoundingClientRect().width)")
    probs = [float(t.rstrip("%")) for t in page.locator("#predictions .pred-prob").all_inner_texts()]
    track = page.locator("#predictions .pred-bar").first.bounding_box()["width"]
    for width, prob in zip(widths, probs):  # each bar is as long as its probability
        assert abs(width - track * prob / 100) <= 1.5, (widths, probs)
    chosen = timing["chosen"]
    assert page.locator("#predictions .pred[aria-pressed=true] .pred-label").inner_text() == chosen
    assert page.locator("#target-label").inner_text() == chosen
    assert page.locator("#hero-title").inner_text().lower() == chosen.lower()
    assert page.locator("#result-method").inner_text() == "Saliency"
    stats = canvas_stats(page, "#overlay")
    assert (stats["w"], stats["h"]) == (224, 224)
    assert stats["variance"] > 100, stats
    colorbar = page.locator(".colorbar-ticks span").all_inner_texts()
    assert colorbar[0] == "0" and float(colorbar[2]) > 0
    shot(page, "02-saliency")


def test_view_changes_redraw_locally_without_requests(page, chelsea_b64):
    explain(page, chelsea_b64)
    requests: list[str] = []
    listener = lambda r: requests.append(r.url)  # noqa: E731
    page.on("request", listener)
    before = canvas_stats(page, "#overlay")
    page.fill("#view-alpha", "0.9")
    after = canvas_stats(page, "#overlay")
    for _ in range(20):
        if after["hash"] != before["hash"]:
            break
        page.wait_for_timeout(50)
        after = canvas_stats(page, "#overlay")
    assert after["hash"] != before["hash"], "the opacity change did not redraw the canvas"
    assert page.locator("output[for=view-alpha]").inner_text() == "90%"
    page.click("#view-slot [data-name=mode] [data-value=heat_map]")
    page.select_option("#view-cmap", "inferno")
    page.fill("#view-outlier", "10")
    page.wait_for_timeout(100)
    heat = canvas_stats(page, "#overlay")
    assert heat["hash"] != after["hash"] and heat["variance"] > 100
    assert page.locator(".colorbar-caption").inner_text().startswith("positive attribution, clipped at the top 10")
    shot(page, "03-heatmap-inferno")
    page.click("#view-slot [data-name=mode] [data-value=blended_heat_map]")
    page.select_option("#view-cmap", "auto")
    page.fill("#view-outlier", "2")
    page.wait_for_timeout(100)
    assert requests == [], requests
    page.remove_listener("request", listener)


def test_occlusion_runs_as_a_job_with_progress_and_can_be_cancelled(page, chelsea_b64):
    explain(page, chelsea_b64)
    page.click("label[for=method-occlusion]")
    page.fill("#param-occlusion-strides", "3, 4, 4")  # 2,401 windows: long enough to cancel
    page.click("#run")
    page.wait_for_selector("#job:not([hidden])")
    page.wait_for_function("() => Number(document.querySelector('#job-progress').getAttribute('aria-valuenow')) > 0",
                           timeout=60_000)
    assert page.locator("#job-status").inner_text().startswith("Running")
    assert "left" in page.locator("#job-eta").inner_text()
    shot(page, "04-job-running")
    page.click("#job-cancel")
    page.wait_for_selector("#job[data-status=cancelled]", timeout=30_000)
    assert page.locator("#job-status").inner_text() == "Cancelled"
    assert page.locator("#job-cancel").is_hidden()
    assert page.locator("#result-method").inner_text() == "Saliency"  # the earlier result stays
    shot(page, "05-job-cancelled")


def test_bad_parameter_is_marked_before_sending(page, chelsea_b64):
    drop_image(page, chelsea_b64)
    page.click("label[for=method-occlusion]")
    requests: list[str] = []
    listener = lambda r: requests.append(r.url)  # noqa: E731
    page.on("request", listener)
    page.fill("#param-occlusion-strides", "3, 4")
    page.click("#run")
    error = page.locator("[data-field=strides] .field-error")
    assert error.is_visible()
    assert error.inner_text() == "Needs exactly 3 whole numbers, got 2."
    assert requests == []
    page.remove_listener("request", listener)


def test_grad_cam_and_two_methods_side_by_side(page, chelsea_b64):
    explain(page, chelsea_b64)
    page.click("label[for=method-grad_cam]")
    page.click("#run")
    page.wait_for_function("() => document.querySelector('#result-method').textContent === 'Grad-CAM'", timeout=60_000)
    assert canvas_stats(page, "#overlay")["variance"] > 100
    for box in page.locator("#compare-method-list input").all():
        box.set_checked(box.get_attribute("value") in ("saliency", "grad_cam"), force=True)
    page.click("#compare-run")
    page.wait_for_function("() => document.querySelectorAll('#compare-grid .ccard.done').length === 2", timeout=60_000)
    titles = page.locator("#compare-grid .ccard h3").all_inner_texts()
    assert titles == ["Saliency", "Grad-CAM"]
    a = canvas_stats(page, "#compare-grid .ccard:nth-child(1) canvas")
    b = canvas_stats(page, "#compare-grid .ccard:nth-child(2) canvas")
    assert a["variance"] > 100 and b["variance"] > 100
    assert a["hash"] != b["hash"]
    page.locator("#compare").screenshot(path=os.path.join(SHOTS, "06-compare.png"))

    page.click("#tab-models")  # one method (the selected Grad-CAM) across the available models
    assert page.locator("#compare-model-list input:disabled").count() >= 1  # unavailable ones stay off
    page.click("#compare-run")
    page.wait_for_function("() => document.querySelectorAll('#compare-grid .ccard.done').length === 1", timeout=60_000)
    assert page.locator("#compare-grid .ccard h3").all_inner_texts() == ["efficientnet_lite0"]
    assert page.locator("#compare-grid .ccard header p").inner_text() == "Grad-CAM"
    assert canvas_stats(page, "#compare-grid .ccard canvas") == b
    page.click("#tab-methods")


def test_share_link_opens_the_same_result_in_a_fresh_context(page, browser, server, chelsea_b64):
    explain(page, chelsea_b64, "grad_cam")
    page.locator("#hero").scroll_into_view_if_needed()
    page.click("#share")
    page.wait_for_selector("#share.confirmed")
    assert page.locator("#share span").inner_text() == "Link copied"
    url = page.evaluate("navigator.clipboard.readText()")
    assert url.startswith(f"{server}/r/") and len(url.rsplit("/", 1)[1]) == 64
    assert page.locator("#toast").inner_text().startswith("Share link copied")
    expected = {"model": page.locator("#result-model").inner_text(), "class": page.locator("#hero-title").inner_text()}

    fresh = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        other = fresh.new_page()
        other.goto(url)
        other.wait_for_selector("body[data-ready=true]")
        assert other.locator("#result-method").inner_text() == "Grad-CAM"
        assert other.locator("#result-model").inner_text() == "efficientnet_lite0"
        assert expected["model"] in ("EfficientNet-Lite0", "efficientnet_lite0")
        assert other.locator("#hero-title").inner_text().lower() == expected["class"].lower()
        assert other.locator("#fact-method").inner_text() == "grad_cam"
        assert canvas_stats(other, "#overlay")["variance"] > 100
        rid = url.rsplit("/", 1)[1]
        og_image = other.locator('meta[property="og:image"]').get_attribute("content")
        assert og_image == f"{server}/api/results/{rid}/card.png"
        assert "Grad-CAM" in other.locator('meta[property="og:title"]').get_attribute("content")
        png = other.request.get(og_image)
        assert png.status == 200 and png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.body())).size == (1200, 630)
        npy = other.request.get(server + other.locator("#download-npy").get_attribute("href"))
        assert npy.status == 200 and npy.body()[:6] == b"\x93NUMPY"
        shot(other, "07-share-page")
    finally:
        fresh.close()


def test_text_file_named_png_shows_error_next_to_upload(page, chelsea_b64):
    explain(page, chelsea_b64, "grad_cam")
    page.set_input_files("#file-input", files=[{"name": "notes.png", "mimeType": "image/png",
                                                 "buffer": b"these are my shopping notes, not a picture\n"}])
    error = page.locator("#step-image #image-error")
    error.wait_for(state="visible")
    assert "not an image" in error.inner_text().lower()
    expect(error).to_be_in_viewport()
    assert page.locator("#result-method").inner_text() == "Grad-CAM"  # the result is kept
    shot(page, "08-bad-upload", clip={"x": 0, "y": 0, "width": 460, "height": 520})


def test_a_picture_over_the_upload_limit_is_refused_by_the_page_with_the_servers_words(page, chelsea_b64):
    """Found in review: through python app.py, waitress refuses a body over MAX_CONTENT_LENGTH
    before reading it (413 in plain text, often a reset connection while the browser still sends),
    so the page said "Could not reach the server. Is it still running?". The page knows the limit
    (a meta tag) and refuses the file itself, sending nothing."""
    app = SERVED["app"]
    saved = app.config["MAX_CONTENT_LENGTH"]
    posts: list = []
    app.config["MAX_CONTENT_LENGTH"] = 50_000  # the cat's PNG is several times that
    try:
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        page.on("request", lambda r: r.method == "POST" and "/api/images" in r.url and posts.append(r.url))
        page.set_input_files("#file-input", files=[{"name": "cat.png", "mimeType": "image/png",
                                                     "buffer": base64.b64decode(chelsea_b64)}])
        error = page.locator("#step-image #image-error")
        error.wait_for(state="visible")
        assert "larger than the limit of 50000 bytes (MAX_CONTENT_LENGTH)" in error.inner_text()
        assert posts == []
    finally:
        app.config["MAX_CONTENT_LENGTH"] = saved


def test_phone_width_stacks_the_layout(page, chelsea_b64):
    explain(page, chelsea_b64)
    page.set_viewport_size({"width": 390, "height": 844})
    page.wait_for_timeout(100)
    side = page.locator(".sidebar").bounding_box()
    hero = page.locator("#hero").bounding_box()
    assert hero["y"] > side["y"] + side["height"] - 1  # stacked, not side by side
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.locator("#hero").scroll_into_view_if_needed()
    shot(page, "09-phone")


LABELS = """() => Array.from(document.querySelectorAll('input, select, textarea, button, [role=button], [role=radiogroup]'))
  .filter((el) => !el.closest('[hidden]') && el.type !== 'hidden')
  .filter((el) => {
    const named = el.getAttribute('aria-label') || el.getAttribute('aria-labelledby') || (el.labels && el.labels.length)
      || (el.tagName === 'BUTTON' && el.textContent.trim());
    return !named;
  })
  .map((el) => el.outerHTML.slice(0, 120))"""


def test_every_control_has_a_label(page, chelsea_b64):
    explain(page, chelsea_b64)  # the view controls and the result's buttons are on show
    page.click("label[for=method-occlusion]")  # a generated form with numbers, lists and choices
    assert page.evaluate(LABELS) == []
    page.click("label[for=method-saliency]")  # switches and selects
    assert page.evaluate(LABELS) == []


def test_keyboard_file_chooser_paste_and_class_search(page, chelsea, chelsea_b64):
    explain(page, chelsea_b64)  # a result and a comparison that a new image must clear
    for box in page.locator("#compare-method-list input").all():
        box.set_checked(box.get_attribute("value") in ("saliency", "grad_cam"), force=True)
    page.click("#compare-run")
    page.wait_for_function("() => document.querySelectorAll('#compare-grid .ccard.done').length === 2", timeout=60_000)
    # Listen before pressing: file chooser interception is switched on by the first listener.
    choosers = []
    on_chooser = lambda chooser: choosers.append(chooser)  # noqa: E731
    page.on("filechooser", on_chooser)
    page.wait_for_timeout(300)
    page.focus("#dropzone")
    page.keyboard.press("Enter")
    for _ in range(100):
        if choosers:
            break
        page.wait_for_timeout(50)
    assert choosers, "Enter on the drop zone did not open the file chooser"
    page.remove_listener("filechooser", on_chooser)
    choosers[0].set_files(chelsea)
    page.wait_for_selector("#image-error", state="hidden")
    page.wait_for_function("() => document.querySelectorAll('#predictions button.pred').length === 5")

    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.coffee()).save(buf, "PNG")
    page.evaluate("""(b64) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const dt = new DataTransfer();
      dt.items.add(new File([bytes], 'image.png', { type: 'image/png' }));
      document.dispatchEvent(new ClipboardEvent('paste', { clipboardData: dt, bubbles: true }));
    }""", base64.b64encode(buf.getvalue()).decode())
    page.wait_for_function("() => document.querySelector('#predictions button.pred .pred-label')?.textContent === 'espresso'")
    assert page.locator("#overlay").is_hidden()  # a new image: the old maps are not shown with it
    assert page.locator("#compare-grid .ccard").count() == 0

    page.fill("#class-search", "golden ret")
    option = page.locator("#class-results [role=option]").first
    option.wait_for()
    assert option.inner_text().startswith("golden retriever")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    assert page.locator("#target-label").inner_text() == "golden retriever"
    assert page.locator("#class-results").is_hidden()
    page.focus("#run")
    page.keyboard.press("Space")
    page.wait_for_selector("#overlay:not([hidden])", timeout=60_000)
    assert page.locator("#hero-title").inner_text() == "Golden retriever"
    shot(page, "10-keyboard-target-search")


def canvas_pixels(page, selector: str) -> np.ndarray:
    """The canvas at its natural size, read losslessly (a PNG data URL) as RGBA."""
    url = page.evaluate("(sel) => document.querySelector(sel).toDataURL('image/png')", selector)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))


def test_canvas_is_the_overlay_png_for_every_mode_and_sign(context, chelsea):
    """The share page's canvas and its PNG download (overlay.png with the page's own URL) agree
    pixel for pixel for a signed map, in every display mode and sign."""
    api = context.request
    with open(chelsea, "rb") as f:
        upload = api.post("/api/images", multipart={"image": {"name": "chelsea.png", "mimeType": "image/png",
                                                              "buffer": f.read()}})
    answer = api.post("/api/explain", data={"model": "efficientnet_lite0", "image": upload.json()["id"],
                                            "method": "saliency", "target": 281, "params": {"abs": False}})
    meta = answer.json()["result"]
    assert meta["signed"] and meta["range"]["min"] < 0 < meta["range"]["max"]
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: "Content Security Policy" in m.text and errors.append(m.text))  # CSP violations
    page.goto(meta["links"]["share"])
    page.wait_for_selector("body[data-ready=true]")
    spec = page.evaluate("JSON.parse(document.getElementById('overlay-spec').textContent)")
    modes = [m["value"] for m in spec["modes"]]
    signs = [s["value"] for s in spec["signs"]]
    views = [("default", None, None, {})] + [(f"{m}/{s}", m, s, {}) for m in modes for s in signs] + [
        ("blend/viridis", "blended_heat_map", "all", {"cmap": "viridis", "alpha": "0.3", "outlier": "10"}),
        ("heat/negative/turbo", "heat_map", "negative", {"cmap": "turbo", "alpha": "0.3", "outlier": "0"}),
    ]
    worst = {}
    for name, mode, sign, extra in views:
        if mode:
            page.click(f"#view-slot [data-name=mode] [data-value={mode}]")
            page.click(f"#view-slot [data-name=sign] [data-value={sign}]")
        if "cmap" in extra:
            page.select_option("#share-cmap", extra["cmap"])
            page.fill("#share-alpha", extra["alpha"])
            page.fill("#share-outlier", extra["outlier"])
        page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
        canvas = canvas_pixels(page, "#overlay")
        href = page.get_attribute("#download-png", "href")
        served = api.get(href)
        assert served.status == 200, (name, href, served.text()[:200])
        png = np.asarray(Image.open(io.BytesIO(served.body())).convert("RGB")).astype(int)
        assert canvas.shape[:2] == png.shape[:2] == tuple(meta["size"])
        assert canvas[..., 3].min() == 255, name  # opaque: alpha scaling is shown over white
        worst[name] = int(np.abs(canvas[..., :3].astype(int) - png).max())
        if mode and sign == "all":
            shot(page, f"11-share-{mode}")
    print(f"\ncanvas vs overlay.png, largest channel difference: {max(worst.values())}/255 over {len(worst)} views")
    assert max(worst.values()) <= 2, worst
    assert errors == [], errors


def test_a_map_that_misses_its_score_difference_shows_the_warning_here_and_on_the_share_page(page, browser, chelsea_b64):
    drop_image(page, chelsea_b64)
    page.click("label[for=method-integrated_gradients]")
    page.fill("#param-integrated_gradients-n_steps", "1")  # one point: far from the path integral
    page.click("#run")
    page.wait_for_function("() => document.querySelector('#result-method')?.textContent === 'Integrated Gradients'",
                           timeout=60_000)
    warning = page.locator("#completeness-warning")
    expect(warning).to_be_visible()
    assert "not reliable" in warning.inner_text() and "n_steps" in warning.inner_text()
    facts = page.locator("#result-meta").inner_text()
    assert "Completeness" in facts and "% off" in facts
    page.locator("#hero").scroll_into_view_if_needed()
    shot(page, "12-completeness-warning")
    rid = page.locator("#download-npy").get_attribute("href").split("/")[3]
    fresh = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        other = fresh.new_page()
        other.goto(page.evaluate("location.origin") + f"/r/{rid}")
        other.wait_for_selector("body[data-ready=true]")
        expect(other.locator("#completeness-warning")).to_be_visible()
        assert other.locator("#fact-completeness").inner_text().endswith("% off")
        shot(other, "13-share-completeness-warning")
    finally:
        fresh.close()


def test_a_complete_map_shows_its_completeness_without_a_warning(page, chelsea_b64):
    explain(page, chelsea_b64, "deeplift")
    assert page.locator("#result-method").inner_text() == "DeepLIFT"
    facts = page.locator("#result-meta").inner_text()
    assert "Completeness" in facts and "% off" in facts, facts
    assert page.locator("#completeness-warning").count() == 0
    page.click("label[for=method-saliency]")  # no such property: no line, no warning
    page.click("#run")
    page.wait_for_function("() => document.querySelector('#result-method').textContent === 'Saliency'", timeout=60_000)
    assert "Completeness" not in page.locator("#result-meta").inner_text()
    assert page.locator("#completeness-warning").count() == 0


def test_a_result_stays_while_its_upload_does_and_goes_for_another(page, chelsea_b64):
    """Result metadata no longer names its upload: the page remembers which one a result is of."""
    explain(page, chelsea_b64)
    expect(page.locator("#overlay")).to_be_visible()
    drop = """([b64, name]) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const dt = new DataTransfer();
      dt.items.add(new File([bytes], name, { type: 'image/png' }));
      document.querySelector('#dropzone').dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
    }"""
    with page.expect_response(lambda r: r.url.endswith("/api/predict"), timeout=30_000):
        page.evaluate(drop, [chelsea_b64, "again.png"])  # the same picture: the same id, the result stays
    expect(page.locator("#overlay")).to_be_visible()
    expect(page.locator("#preview")).to_be_hidden()
    buf = io.BytesIO()
    from skimage import data

    Image.fromarray(data.coffee()).save(buf, "PNG")
    page.evaluate(drop, [base64.b64encode(buf.getvalue()).decode(), "coffee.png"])
    expect(page.locator("#preview")).to_be_visible(timeout=30_000)
    expect(page.locator("#overlay")).to_be_hidden()


def test_a_busy_server_answers_202_and_the_page_follows_the_jobs_by_polling(page, chelsea):
    """With no time to wait inline (INLINE_TIMEOUT_S 0) and every event-stream place taken, the
    prediction and the explanation come back as jobs (202), whose streams are refused (503): the
    page follows both by polling and shows the predictions and the map as usual."""
    import re
    from urllib.parse import urlparse

    from insights.admission import Slots

    app = SERVED["app"]
    service = app.extensions["insights"]
    saved = service.streams, app.config["INLINE_TIMEOUT_S"]
    img = Image.open(chelsea)
    out = io.BytesIO()
    img.crop((20, 10, img.width - 10, img.height)).save(out, format="PNG")  # a picture not seen yet
    seen: list = []
    page.on("response", lambda r: seen.append((r.request.method, urlparse(r.url).path, r.status)))
    service.streams = Slots(1)
    held = service.streams.take()
    app.config["INLINE_TIMEOUT_S"] = 0
    try:
        drop_image(page, base64.b64encode(out.getvalue()).decode())
        page.click("#run")
        page.wait_for_function("() => document.querySelector('#overlay').dataset.painted", timeout=60_000)
    finally:
        held.release()
        service.streams, app.config["INLINE_TIMEOUT_S"] = saved
    assert ("POST", "/api/predict", 202) in seen and ("POST", "/api/explain", 202) in seen, seen
    assert any(p.endswith("/events") and s == 503 for _m, p, s in seen), seen
    assert any(m == "GET" and re.fullmatch(r"/api/jobs/[0-9a-f]+", p) and s == 200 for m, p, s in seen), seen
    assert page.locator("#predictions .pred-label").count() == 5
    assert page.locator("#result-method").inner_text() == "Saliency"
    assert canvas_stats(page, "#overlay")["variance"] > 100
