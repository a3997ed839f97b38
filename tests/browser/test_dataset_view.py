"""The dataset view in a real browser (Debian chromium) against the real app and efficientnet_lite0.

The server serves two datasets: ``photos``, an ImageFolder of scikit-image photos (Chelsea the cat
and a cup of coffee, flipped and cropped, two of them filed under the wrong class, and one file
that is not an image), and ``many``, 240 small random pictures whose predictions stay stopped (the
grid and its virtualisation only). Each test opens the page in a fresh browser context; the
expected answers come from the JSON API. Screenshots go to artifacts/screenshots/dataset-*.png.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image, ImageOps
from werkzeug.serving import make_server

from playwright.sync_api import expect

from insights.app import create_app
from test_dashboard import SHOTS, browser  # noqa: F401  (the shared chromium)

MODEL = "efficientnet_lite0"
MISLABELLED = {"tabby/coffee_wrong.jpg", "n07920052/chelsea_wrong.jpg"}  # coffee filed as a cat, and back
BROKEN = "n07920052/broken.jpg"
COFFEES = {"n07920052/coffee.jpg", "n07920052/coffee_flip.jpg", "n07920052/coffee_crop.jpg"}


def make_photos(root: str) -> None:
    """An ImageFolder named by ImageNet label and by WordNet id (n07920052 = espresso)."""
    from skimage import data

    cat, coffee = Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())
    files = {
        "Egyptian cat/chelsea.jpg": cat,
        "Egyptian cat/chelsea_flip.jpg": ImageOps.mirror(cat),
        "tabby/chelsea_crop.jpg": cat.crop((60, 20, 360, 300)),
        "tabby/coffee_wrong.jpg": coffee,
        "n07920052/coffee.jpg": coffee,
        "n07920052/coffee_flip.jpg": ImageOps.mirror(coffee),
        "n07920052/coffee_crop.jpg": coffee.crop((100, 50, 500, 400)),
        "n07920052/chelsea_wrong.jpg": cat,
    }
    for name, img in files.items():
        os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
        img.save(os.path.join(root, name), quality=90)
    with open(os.path.join(root, BROKEN), "wb") as f:
        f.write(b"these bytes are not a picture")


def make_many(root: str, n: int = 240) -> None:
    rng = np.random.default_rng(0)
    for cls in ("tabby", "espresso", "goldfish"):
        os.makedirs(os.path.join(root, cls))
    for i in range(n):
        cls = ("tabby", "espresso", "goldfish")[i % 3]
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, cls, f"{i:04d}.png"))


SERVED: dict = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real app with the two datasets on a free loopback port; the photos scored once."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    photos, many = tmp_path_factory.mktemp("photos"), tmp_path_factory.mktemp("many")
    make_photos(str(photos))
    make_many(str(many))
    config = tmp_path_factory.mktemp("models") / "models.py"
    config.write_text(  # a second model to show side by side: the same weights seeing a closer crop
        "from insights.models import _efficientnet_lite0\n"
        "register('lite0_zoomed', _efficientnet_lite0, Preprocessing(resize=288, crop=224, mean=(127 / 255,) * 3,"
        " std=(128 / 255,) * 3), imagenet_labels(), label='Lite0 zoomed')\n")
    bad = tmp_path_factory.mktemp("bad")  # a class folder no label matches: listed as not served
    (bad / "kumquat").mkdir()
    Image.new("RGB", (8, 8)).save(bad / "kumquat" / "k.png")
    app = create_app({"INSTANCE_PATH": str(tmp_path_factory.mktemp("instance")), "MODELS_CONFIG": str(config),
                      "DATASETS": [f"photos={photos}", f"many={many}", f"kumquats={bad}"]})
    svc = app.extensions["insights"]
    svc.dataset_work.stop(svc.datasets.get("many"), MODEL)  # the grid only: no scoring of noise
    httpd = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_port}"
    SERVED.update(app=app, svc=svc, base=base)
    yield base
    httpd.shutdown()
    svc.dataset_work.shutdown()
    svc.jobs.shutdown()


@pytest.fixture(scope="module")
def scored(server):
    """The photos' predictions, all in (what the page shows, the API answers the same)."""
    svc = SERVED["svc"]
    ds = svc.datasets.get("photos")
    svc.dataset_work.start(ds, MODEL)
    assert svc.dataset_work.wait(ds, MODEL, timeout=120)["status"] == "done"
    return server


def get(path: str):
    with urllib.request.urlopen(SERVED["base"] + path, timeout=30) as r:
        return json.load(r)


@pytest.fixture
def context(browser, server):
    ctx = browser.new_context(viewport={"width": 1440, "height": 900}, base_url=server)
    yield ctx
    ctx.close()


def watch(page):
    """Fails the test on an uncaught script error or a Content-Security-Policy refusal."""
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: "Content Security Policy" in m.text and errors.append(m.text))
    page.errors = errors
    return page


@pytest.fixture
def page(context):
    page = watch(context.new_page())
    yield page
    assert page.errors == [], page.errors


def shot(page, name: str, **kw) -> None:
    os.makedirs(SHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SHOTS, f"dataset-{name}.png"), **kw)


def open_view(page, hash_: str = "#datasets?ds=photos") -> None:
    page.goto("/" + hash_)
    page.wait_for_selector("body[data-ready=true]")
    expect(page.locator("#view-datasets")).to_be_visible()


SCORED_GRID = """(n) => {
  const cards = document.querySelectorAll('#ds-grid .ds-card');
  return cards.length === n && !document.querySelector('#ds-grid .ds-model.pending')
    && document.querySelector('#ds-grid').getAttribute('aria-busy') === 'false';
}"""


def wait_grid(page, n: int) -> None:
    page.wait_for_function(SCORED_GRID, arg=n, timeout=60000)


def keys(page) -> list[str]:
    """The cards' item keys in grid order (row by row)."""
    return page.evaluate("""() => [...document.querySelectorAll('#ds-grid .ds-card')]
      .map((c) => { const m = /translate\\((\\d+)px, (\\d+)px\\)/.exec(c.style.transform); return [+m[2], +m[1], c.dataset.key]; })
      .sort((a, b) => a[0] - b[0] || a[1] - b[1]).map((x) => x[2])""")


def card(page, key: str):
    return page.locator(f'.ds-card[data-key="{key}"]')


def test_switch_lists_the_dataset_and_the_grid_shows_labels_predictions_badges_and_errors(page, server):
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    expect(page.locator("#view-image")).to_be_visible()
    page.click("#tab-view-datasets")
    expect(page.locator("#view-datasets")).to_be_visible()
    assert "#datasets" in page.url
    expect(page.locator("#ds-name option")).to_have_count(2)
    expect(page.locator("#ds-name")).to_have_value("photos")  # the first dataset the server lists
    expect(page.locator("#ds-notes")).to_contain_text("Dataset kumquats is not served: dataset folder")
    expect(page.locator("#ds-notes")).to_contain_text("class folder 'kumquat'")
    wait_grid(page, 9)  # the grid fills as the background predictions come in
    expect(page.locator("#ds-total")).to_have_text("9 items")
    api = get(f"/api/datasets/photos/items?model={MODEL}&per_page=200")
    for item in api["items"]:
        c = card(page, item["key"])
        expect(c.locator(".ds-true strong")).to_have_text(item["true"]["label"])
        entry = item["models"][MODEL]
        if item["key"] == BROKEN:
            expect(c.locator(".ds-broken")).to_contain_text("Unreadable image")
            expect(c).to_have_attribute("data-state", "error")
            expect(c.locator(".ds-model.error")).to_have_text("Could not be read")
            continue
        expect(c.locator(".ds-pred")).to_have_text(entry["predicted"]["label"])
        expect(c.locator(".ds-prob")).to_have_text(re.compile(rf"^{round(entry['prob'] * 100)}(\.\d)?%$"))
        badge = ".ds-badge.ok" if entry["correct"] else ".ds-badge.bad"
        expect(c.locator(badge)).to_have_count(1)
        expect(c.locator(badge)).to_have_text("✓correct" if entry["correct"] else "✗incorrect")
    for key in COFFEES:
        expect(card(page, key).locator(".ds-pred")).to_have_text("espresso")
        expect(card(page, key).locator(".ds-badge.ok")).to_have_count(1)
    for key in MISLABELLED:
        expect(card(page, key).locator(".ds-badge.bad")).to_have_count(1)
    # Every thumbnail that can be read has loaded, in a box of fixed size.
    page.wait_for_function("""() => [...document.querySelectorAll('.ds-thumb img')].length === 8
        && [...document.querySelectorAll('.ds-thumb img')].every((i) => i.complete && i.naturalWidth > 0)""")
    # The summary's accuracy is the API's.
    summary = get(f"/api/datasets/photos/summary?model={MODEL}")["models"][MODEL]
    page.wait_for_function("(a) => document.querySelector('.ds-acc-value')?.dataset.accuracy === String(a)",
                           arg=summary["accuracy"])
    expect(page.locator(".ds-acc-value")).to_have_text(f"{summary['accuracy'] * 100:.1f}%")
    expect(page.locator(".ds-acc-detail")).to_contain_text(f"{summary['correct']} of {summary['evaluated']} correct")
    shot(page, "desktop")
    assert page.evaluate(UNNAMED) == []  # every control of the view has an accessible name
    page.locator("#ds-method > summary").click()  # the method panel, moved here, included
    assert page.evaluate(UNNAMED) == []


UNNAMED = """() => Array.from(document.querySelectorAll('#view-datasets input, #view-datasets select, #view-datasets button, #view-datasets [role=radiogroup], #view-datasets [role=gridcell], #viewswitch button'))
  .filter((el) => !el.closest('[hidden]'))
  .filter((el) => !(el.getAttribute('aria-label') || el.getAttribute('aria-labelledby') || (el.labels && el.labels.length)
    || (el.tagName === 'BUTTON' && el.textContent.trim())))
  .map((el) => el.outerHTML.slice(0, 120))"""


def test_incorrect_filter_loss_sort_and_the_url_restore_them(page, scored):
    open_view(page)
    wait_grid(page, 9)
    page.click('[data-name="ds-correct"] [data-value="false"]')
    wrong = get(f"/api/datasets/photos/items?model={MODEL}&correct=false&per_page=200")
    want = [i["key"] for i in wrong["items"]]
    assert MISLABELLED <= set(want)
    wait_grid(page, len(want))
    assert keys(page) == want
    expect(page.locator("#ds-total")).to_have_text(f"{len(want)} of 9 items match")
    page.select_option("#ds-sort", "-loss")
    by_loss = get(f"/api/datasets/photos/items?model={MODEL}&correct=false&sort=-loss&per_page=200")
    want = [i["key"] for i in by_loss["items"]]
    page.wait_for_function("(k) => document.querySelector('#ds-grid .ds-card')?.dataset.key === k", arg=want[0])
    assert keys(page) == want
    assert want[0] in MISLABELLED  # a coffee filed as a cat is the worst mistake
    assert "correct=false" in page.url and "sort=-loss" in page.url
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    wait_grid(page, len(want))
    assert keys(page) == want
    expect(page.locator('[data-name="ds-correct"] [aria-checked="true"]')).to_have_attribute("data-value", "false")
    expect(page.locator("#ds-sort")).to_have_value("-loss")
    # A link followed while the view shows (the hash changes) is read as well.
    right = [i["key"] for i in get(f"/api/datasets/photos/items?model={MODEL}&correct=true")["items"]]
    page.evaluate("() => { location.hash = '#datasets?ds=photos&correct=true'; }")
    page.wait_for_function("(k) => document.querySelector('#ds-grid .ds-card')?.dataset.key === k && document.querySelectorAll('#ds-grid .ds-card').length === %d" % len(right), arg=right[0])
    assert keys(page) == right
    expect(page.locator("#ds-sort")).to_have_value("index")


def test_true_class_search_and_confidence_range_filter_like_the_api(page, scored):
    open_view(page)
    wait_grid(page, 9)
    combo = page.locator("#ds-true-slot input")
    combo.fill("espr")
    expect(page.locator("#ds-true-slot [role=option]")).to_have_count(1)
    expect(page.locator("#ds-true-slot [role=option]")).to_contain_text("espresso")
    combo.press("ArrowDown")
    combo.press("Enter")
    expect(combo).to_have_value("espresso")
    want = [i["key"] for i in get(f"/api/datasets/photos/items?model={MODEL}&true=967")["items"]]
    page.wait_for_function("(n) => document.querySelectorAll('#ds-grid .ds-card').length === n", arg=len(want))
    assert keys(page) == want
    page.fill("#ds-min", "80")
    page.locator("#ds-min").blur()
    want = [i["key"] for i in get(f"/api/datasets/photos/items?model={MODEL}&true=967&min_prob=0.8")["items"]]
    assert 0 < len(want) < 4
    page.wait_for_function("(n) => document.querySelectorAll('#ds-grid .ds-card').length === n", arg=len(want))
    assert keys(page) == want
    assert "min=80" in page.url and "true=967" in page.url
    expect(page.locator("#ds-filter-count")).to_have_text("2")
    page.fill("#ds-max", "50")
    expect(page.locator("#ds-conf-error")).to_have_text("The lowest confidence is above the highest.")
    page.click("#ds-reset")
    page.wait_for_function("() => document.querySelectorAll('#ds-grid .ds-card').length === 9")
    expect(combo).to_have_value("")
    expect(page.locator("#ds-conf-error")).to_be_hidden()


def test_a_confusion_cell_sets_the_true_and_predicted_filters(page, scored):
    open_view(page)
    wait_grid(page, 9)
    cm = get(f"/api/datasets/photos/summary?model={MODEL}")["models"][MODEL]["confusion"]
    names = [c["label"] for c in cm["classes"]]
    r, c = names.index("tabby"), names.index("Egyptian cat")
    cell = page.locator(f'.ds-cm-cell[data-row="{r}"][data-col="{c}"]')
    expect(cell).to_have_attribute("data-count", str(cm["matrix"][r][c]))
    cell.hover()
    expect(page.locator(".ds-cm-readout")).to_have_text(
        re.compile(rf"True tabby, predicted Egyptian cat: {cm['matrix'][r][c]}"))
    page.locator("#ds-summary").screenshot(path=os.path.join(SHOTS, "dataset-confusion.png"))
    cell.click()
    want = [i["key"] for i in get(f"/api/datasets/photos/items?model={MODEL}&true=281&predicted=285")["items"]]
    assert len(want) == cm["matrix"][r][c] > 0
    page.wait_for_function("(n) => document.querySelectorAll('#ds-grid .ds-card').length === n", arg=len(want))
    assert keys(page) == want
    expect(page.locator("#ds-true-slot input")).to_have_value("tabby")
    expect(page.locator("#ds-pred-slot input")).to_have_value("Egyptian cat")
    assert "true=281" in page.url and "predicted=285" in page.url
    # The last column: predicted as a class none of the dataset's items has.
    r = names.index("espresso")
    page.locator(f'.ds-cm-cell[data-row="{r}"][data-col="{len(names)}"]').click()
    want = [i["key"] for i in get(f"/api/datasets/photos/items?model={MODEL}&true=967&predicted=other")["items"]]
    assert len(want) == cm["matrix"][r][len(names)]
    page.wait_for_function("() => location.hash.includes('predicted=other')")
    expect(page.locator("#ds-pred-slot input")).to_have_value("Not one of the dataset's classes")
    page.wait_for_function("(n) => document.querySelectorAll('#ds-grid .ds-card').length === n", arg=len(want))
    assert keys(page) == want


def pick_method(page, method: str) -> None:
    page.locator("#ds-method > summary").click()
    page.locator(f'label[for="method-{method}"]').click()
    expect(page.locator("#ds-method-name")).to_have_text(re.compile(".+"))


def test_batch_explain_two_items_shows_their_overlays_in_the_grid(page, scored):
    open_view(page)
    wait_grid(page, 9)
    chosen = ["n07920052/coffee.jpg", "Egyptian cat/chelsea.jpg"]
    for key in chosen:
        card(page, key).locator(".ds-check input").check()
    expect(page.locator("#ds-explain")).to_have_text("Explain 2 selected")
    pick_method(page, "grad_cam")
    expect(page.locator("#ds-method-name")).to_have_text("Grad-CAM")
    with page.expect_response(lambda r: r.url.endswith("/api/datasets/photos/explain")) as posted:
        page.keyboard.press("Control+Enter")  # the shortcut explains the selection in this view
    body = posted.value.request.post_data_json
    assert sorted(body["items"]) == sorted(int(card(page, k).get_attribute("data-index")) for k in chosen)
    assert body["method"] == "grad_cam" and body["target"] == "predicted" and body["model"] == MODEL
    job = posted.value.json()["job"]
    expect(page.locator("#ds-job-counts")).to_have_text(re.compile(r"^\d explained · \d cached · 0 failed$"), timeout=60000)
    final = get(f"/api/jobs/{job['id']}")
    assert final["status"] == "done"
    rows = {r["key"]: r["result"] for r in final["result"]["rows"]}
    # The grid switched to overlays: each explained card shows its result's overlay, loaded.
    expect(page.locator('[data-name="ds-show"] [aria-checked="true"]')).to_have_attribute("data-value", "overlay")
    for key in chosen:
        img = card(page, key).locator(".ds-thumb img")
        # the overlay as the single view's display settings draw it (mode, opacity, …)
        expect(img).to_have_attribute("src", re.compile(rf"^/api/results/{rows[key]}/overlay\.png\?mode=blended_heat_map&"))
        page.wait_for_function("(k) => { const i = document.querySelector(`.ds-card[data-key=\"${k}\"] .ds-thumb img`); return i.complete && i.naturalWidth > 0; }", arg=key)
    other = card(page, "n07920052/coffee_flip.jpg").locator(".ds-thumb img")
    expect(other).to_have_attribute("src", re.compile(r"/thumb\?size=160$"))  # not explained: the photo
    assert "show=overlay" in page.url
    page.locator("#ds-method > summary").click()  # folded again, for the picture
    page.mouse.move(0, 0)
    page.evaluate("() => window.scrollTo(0, 0)")
    expect(page.locator("#toast")).not_to_have_class(re.compile("show"), timeout=5000)
    shot(page, "overlays")
    page.set_viewport_size({"width": 390, "height": 844})
    page.locator("#ds-toolbar").scroll_into_view_if_needed()
    page.wait_for_function("() => [...document.querySelectorAll('.ds-card.showing-overlay img')].some((i) => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().top < innerHeight)")
    shot(page, "phone-overlays")
    page.set_viewport_size({"width": 1440, "height": 900})
    page.reload()  # the tab keeps its batch results: the overlays come back with the address
    page.wait_for_selector("body[data-ready=true]")
    expect(card(page, chosen[0]).locator(".ds-thumb img")).to_have_attribute("src", re.compile(rf"^/api/results/{rows[chosen[0]]}/overlay\.png"))
    page.click('[data-name="ds-show"] [data-value="image"]')
    expect(card(page, chosen[0]).locator(".ds-thumb img")).to_have_attribute("src", re.compile(r"/thumb\?size=160$"))


def test_a_slow_batch_shows_progress_and_cancel_stops_it(page, scored):
    open_view(page)
    wait_grid(page, 9)
    page.click("#ds-select-all")
    expect(page.locator("#ds-explain")).to_have_text("Explain 9 selected")
    pick_method(page, "occlusion")
    with page.expect_response(lambda r: r.url.endswith("/api/datasets/photos/explain")) as posted:
        page.click("#ds-explain")
    assert posted.value.request.post_data_json["filter"] == {"model": MODEL}  # all matching the filter
    job = posted.value.json()["job"]
    expect(page.locator("#ds-job")).to_be_visible()
    expect(page.locator("#ds-job-status")).to_have_text(re.compile(r"^(Queued|Explaining · \d+%)$"))
    page.click("#ds-job-cancel")
    expect(page.locator("#ds-job-status")).to_have_text("Cancelled", timeout=30000)
    expect(page.locator("#ds-job-cancel")).to_be_hidden()
    expect(page.locator("#ds-explain")).to_be_enabled()
    end = time.time() + 30
    while get(f"/api/jobs/{job['id']}")["status"] not in ("cancelled", "done", "failed") and time.time() < end:
        time.sleep(0.2)  # the server's side of the cancel: a poll of the API, not of the page
    assert get(f"/api/jobs/{job['id']}")["status"] == "cancelled"


def test_over_budget_is_shown_in_the_panel(page, scored):
    app = SERVED["app"]
    before = app.config.get("BATCH_MAX_ITEMS")
    app.config["BATCH_MAX_ITEMS"] = 1
    try:
        open_view(page)
        wait_grid(page, 9)
        page.click("#ds-select-page")
        page.click("#ds-explain")
        expect(page.locator("#ds-explain-error")).to_contain_text("Too much for one batch")
        expect(page.locator("#ds-explain-error")).to_contain_text("BATCH_MAX_ITEMS")
    finally:
        app.config["BATCH_MAX_ITEMS"] = before


def test_clicking_an_item_opens_it_with_its_true_label_and_back_keeps_the_filters(page, scored):
    open_view(page, "#datasets?ds=photos&correct=false")
    page.wait_for_function("() => document.querySelectorAll('#ds-grid .ds-card').length >= 2")
    wait_grid(page, page.locator("#ds-grid .ds-card").count())
    card(page, "tabby/coffee_wrong.jpg").locator(".ds-open").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#view-image")).to_be_visible()
    expect(page.locator("#view-datasets")).to_be_hidden()
    expect(page.locator("#target-label")).to_have_text("tabby")  # the true label, not the top guess
    expect(page.locator("#hero-title")).to_have_text("tabby/coffee_wrong.jpg")
    expect(page.locator("#predictions .pred").first).to_contain_text("espresso")
    expect(page.locator("#thumb")).to_have_attribute("src", re.compile(r"^/api/images/"))
    page.wait_for_function("() => document.querySelector('#preview')?.naturalWidth > 0")
    expect(page.locator("#run")).to_be_enabled()
    shot(page, "opened-item")
    page.go_back()
    expect(page.locator("#view-datasets")).to_be_visible()
    expect(page.locator('[data-name="ds-correct"] [aria-checked="true"]')).to_have_attribute("data-value", "false")
    assert "correct=false" in page.url


def test_two_models_side_by_side_with_their_accuracy(page, scored):
    open_view(page)
    wait_grid(page, 9)
    page.locator('label[for="ds-model-lite0_zoomed"]').click()
    page.wait_for_function("() => document.querySelectorAll('#ds-grid .ds-card').length === 9 && [...document.querySelectorAll('#ds-grid .ds-card')].every((c) => c.querySelectorAll('.ds-model').length === 2) && !document.querySelector('.ds-model.pending')", timeout=60000)
    assert f"model={MODEL}&model=lite0_zoomed" in page.url
    api = get(f"/api/datasets/photos/items?model={MODEL}&model=lite0_zoomed&per_page=200")
    for item in api["items"]:
        if item["error"]:
            continue
        lines = card(page, item["key"]).locator(".ds-model")
        for k, name in enumerate((MODEL, "lite0_zoomed")):
            entry = item["models"][name]
            expect(lines.nth(k).locator(".ds-model-name")).to_have_text(("EfficientNet-Lite0", "Lite0 zoomed")[k])
            if entry.get("error"):
                continue
            expect(lines.nth(k).locator(".ds-pred")).to_have_text(entry["predicted"]["label"])
            expect(lines.nth(k)).to_have_attribute("data-correct", str(entry["correct"]).lower())
    summary = get(f"/api/datasets/photos/summary?model={MODEL}&model=lite0_zoomed")["models"]
    page.wait_for_function("() => document.querySelectorAll('.ds-acc').length === 2 && !document.querySelector('.ds-acc-value.none')")
    for name in (MODEL, "lite0_zoomed"):
        expect(page.locator(f'.ds-acc[data-model="{name}"] .ds-acc-value')).to_have_text(f"{summary[name]['accuracy'] * 100:.1f}%")
    shot(page, "two-models")


def test_a_page_of_200_renders_only_the_rows_in_view(page, server):
    t0 = time.perf_counter()
    open_view(page, "#datasets?ds=many&per=200")
    page.wait_for_function("""() => { const imgs = [...document.querySelectorAll('.ds-thumb img')];
      return imgs.length > 0 && imgs.slice(0, 6).every((i) => i.complete && i.naturalWidth > 0); }""")
    first_thumbs = time.perf_counter() - t0
    expect(page.locator("#ds-page-info")).to_have_text("Page 1 of 2 · 1–200 of 240")
    in_dom = page.locator("#ds-grid .ds-card").count()
    assert 10 <= in_dom <= 72, in_dom  # the rows in view and a margin, not 200 cards
    height = page.evaluate("() => document.querySelector('#ds-grid').getBoundingClientRect().height")
    assert height > 200 / 7 * 200  # the spacer is as tall as the whole page
    # Predictions were stopped: the bar says so and offers to resume.
    expect(page.locator("#ds-pred-status .long")).to_have_text("Scoring paused at 0/240")
    expect(page.locator("#ds-pred-toggle")).to_have_text("Resume")
    page.click("#ds-pred-toggle")  # resume: the bar runs with an ETA and the cards fill in
    expect(page.locator("#ds-pred-toggle")).to_have_text("Stop")
    expect(page.locator("#ds-pred-status .long")).to_have_text(re.compile(r"^Scoring \d+/240"))
    page.wait_for_function("() => document.querySelectorAll('.ds-card .ds-model:not(.pending)').length > 0", timeout=30000)
    page.click("#ds-pred-toggle")  # stop again: what was scored stays
    expect(page.locator("#ds-pred-toggle")).to_have_text("Resume", timeout=30000)
    done = get(f"/api/datasets/many/predictions?model={MODEL}")
    assert done["status"] in ("cancelled", "stopped") and 0 < done["done"] < 240
    expect(page.locator("#ds-pred-status .long")).to_have_text(f"Scoring paused at {done['done']}/240")
    page.evaluate("() => window.scrollTo(0, document.body.scrollHeight)")
    expect(page.locator('.ds-card[data-index="199"]')).to_be_attached()
    expect(page.locator('.ds-card[data-index="0"]')).to_have_count(0)
    assert page.locator("#ds-grid .ds-card").count() <= 72
    print(f"first thumbnails {first_thumbs:.2f} s, {in_dom} cards in the DOM of 200")


def test_phone_width_has_two_columns_and_the_filters_in_a_drawer(browser, scored):
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, base_url=scored, is_mobile=True,
                              has_touch=True, device_scale_factor=2)
    page = watch(ctx.new_page())
    try:
        open_view(page)
        expect(page.locator("#ds-total")).to_have_text("9 items")
        page.wait_for_function("() => document.querySelectorAll('#ds-grid .ds-card').length >= 4")
        widths = page.evaluate("() => [...document.querySelectorAll('.ds-card')].slice(0, 2).map((c) => c.getBoundingClientRect().width)")
        grid_w = page.evaluate("() => document.querySelector('#ds-grid').clientWidth")
        assert all(grid_w / 2 - 12 <= w <= grid_w / 2 for w in widths), (widths, grid_w)
        expect(page.locator("#ds-side")).not_to_be_in_viewport()
        page.wait_for_function("() => [...document.querySelectorAll('.ds-thumb img')].slice(0, 2).every((i) => i.complete && i.naturalWidth > 0)")
        shot(page, "phone")
        page.click("#ds-filters-open")
        expect(page.locator("#ds-side")).to_be_in_viewport()
        page.wait_for_function("() => getComputedStyle(document.querySelector('#ds-side')).transform === 'none'")
        shot(page, "phone-filters")
        page.click('[data-name="ds-correct"] [data-value="false"]')
        page.click("#ds-drawer-close")
        expect(page.locator("#ds-filter-count")).to_have_text("1")
        assert "correct=false" in page.url
        page.locator(".ds-card .ds-check input").first.check()  # a selection: the toolbar offers the batch
        page.click("#ds-explain-quick")
        expect(page.locator("#ds-explain")).to_be_in_viewport()
        expect(page.locator("#ds-explain")).to_have_text("Explain 1 selected")
        expect(page.locator("#ds-explain")).to_be_focused()
        assert page.errors == [], page.errors
    finally:
        ctx.close()
