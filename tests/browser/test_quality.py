"""The Quality panel in a real browser (Debian chromium) against the real app and efficientnet_lite0:
faithfulness curves, the sanity strip, the box check drawn with the mouse, scores in the compare
grid, cancel, and the stored measurements on the share page. Every number the page shows is
checked against the API's answer for the same result.

One page is shared by the tests of this module (they build on each other's stored measurements,
as a person would); screenshots go to artifacts/screenshots/quality-*.png.
"""
from __future__ import annotations

import math
import os

import pytest

from test_dashboard import SHOTS, browser, chelsea, chelsea_b64, server  # noqa: F401  (the shared app and chromium)

SLOW = 120_000  # ms: a measurement on two shared cores


def open_grad_cam(ctx, chelsea_b64: str):
    """A page of `ctx` with the dashboard showing a Grad-CAM of chelsea; `page.errors` collects
    script errors and CSP refusals."""
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: "Content Security Policy" in m.text and errors.append(m.text))
    page.goto("/")
    page.wait_for_selector("body[data-ready=true]")
    page.evaluate("""(b64) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const dt = new DataTransfer();
      dt.items.add(new File([bytes], 'chelsea.png', { type: 'image/png' }));
      document.querySelector('#dropzone').dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
    }""", chelsea_b64)
    page.wait_for_function("() => document.querySelectorAll('#predictions button.pred').length >= 5", timeout=30_000)
    page.click("label[for=method-grad_cam]")
    page.click("#run")
    page.wait_for_function("() => document.querySelector('#overlay').dataset.painted", timeout=60_000)
    page.wait_for_selector("#quality:not([hidden])")
    page.errors = errors
    page.rid = page.evaluate("document.querySelector('#overlay').dataset.painted")
    return page


@pytest.fixture(scope="module")
def page(browser, server, chelsea_b64):
    """The dashboard with a Grad-CAM of chelsea shown; fails on any script error or CSP refusal."""
    ctx = browser.new_context(viewport={"width": 1440, "height": 900}, base_url=server)
    page = open_grad_cam(ctx, chelsea_b64)
    yield page
    ctx.close()
    assert page.errors == [], page.errors


def shot(page, name: str, **kw) -> None:
    os.makedirs(SHOTS, exist_ok=True)
    page.screenshot(path=os.path.join(SHOTS, f"quality-{name}.png"), **kw)


def shown(text: str, value: float) -> None:
    """`text` is `value` written to three significant figures (as the page writes every score)."""
    assert math.isclose(float(text), value, rel_tol=6e-3, abs_tol=1e-9), (text, value)


def wait_for(page, selector: str) -> None:
    """Waits for `selector`, failing at once with the panel's error message if one shows instead."""
    page.wait_for_function("""(sel) => document.querySelector(sel) || !document.querySelector('#q-error').hidden""",
                           arg=selector, timeout=SLOW)
    assert page.locator("#q-error").is_hidden(), page.locator("#q-error").inner_text()


def stored(page, rid: str | None = None) -> dict:
    """The newest stored measurement of each metric (GET …/quality), by metric id."""
    answer = page.request.get(f"/api/results/{rid or page.rid}/quality").json()["quality"]
    return {q["metric"]: q for q in answer}


def test_measure_faithfulness_draws_both_curves_with_the_apis_areas(page):
    page.click("#q-measure")
    wait_for(page, "#q-cards .qcard[data-metric=insertion]")
    qs = stored(page)
    for metric in ("deletion", "insertion"):
        q = qs[metric]
        card = page.locator(f"#q-cards .qcard[data-metric={metric}]")
        shown(card.locator(".q-value").inner_text(), q["answer"]["area"])
        ref = q["answer"]["reference"]
        compare = card.locator(".q-compare").inner_text()
        low, _, spread = compare.removeprefix("vs random ").partition(" ± ")
        shown(low, ref["mean"][0])
        shown(spread, ref["std"][0])
        gain = (ref["mean"][0] - q["answer"]["area"]) * (1 if q["better"] == "lower" else -1)
        expected = ("No better than a random map" if abs(gain) <= ref["std"][0]
                    else "Better than a random map" if gain > 0 else "Worse than a random map")
        assert card.locator(".q-verdict").inner_text() == expected
        # One curve for the map with a point per step, and the random maps' mean curve.
        path = card.locator("path.q-curve-map").get_attribute("d")
        assert path.count("L") == len(q["answer"]["fractions"]) - 1
        assert card.locator("circle.q-dot").count() == len(q["answer"]["fractions"])
        assert card.locator("path.q-curve-ref").count() == 1
    assert page.locator("#q-job").is_hidden()
    page.locator("#quality").screenshot(path=os.path.join(SHOTS, "quality-panel.png"))


def test_sanity_strip_shows_each_stage_with_its_spearman(page):
    page.click("#q-sanity-run")
    wait_for(page, "#q-sanity .sanity-stage:not(.original)")
    q = stored(page)["sanity_check"]
    stages = q["answer"]["stages"]
    figures = page.locator("#q-sanity .sanity-stage")
    assert figures.count() == 1 + len(stages)
    for i, stage in enumerate(stages):
        fig = figures.nth(i + 1)
        shown(fig.locator(".sanity-rho").inner_text().removeprefix("ρ "), stage["spearman"][0])
        assert fig.locator(".sanity-blocks").inner_text().startswith("+ ")
        assert stage["blocks"][-1] in fig.locator(".sanity-blocks").inner_text()
    # Each stage's map is drawn on its canvas like the main map.
    page.wait_for_function("() => [...document.querySelectorAll('#q-sanity canvas')].every((c) => c.dataset.painted)")
    # Flagged when the map at stage flag_after still correlates above the threshold.
    a = q["answer"]
    flagged = stages[a["flag_after"] - 1]["spearman"][0] > a["threshold"]
    assert a["flagged"] == [flagged]
    assert page.locator("#q-sanity .sanity-warning").count() == (1 if flagged else 0)
    assert page.locator("#q-sanity .sanity-ok").count() == (0 if flagged else 1)
    page.locator("#q-sanity").screenshot(path=os.path.join(SHOTS, "quality-sanity.png"))


def test_a_box_drawn_with_the_mouse_is_measured_here_and_on_every_compare_card(page):
    for box in page.locator("#compare-method-list input").all():
        box.set_checked(box.get_attribute("value") in ("saliency", "grad_cam"), force=True)
    page.click("#compare-run")
    page.wait_for_function("() => document.querySelectorAll('#compare-grid .card-scores dd[data-score=insertion]').length === 2",
                           timeout=SLOW)
    page.locator("#hero").scroll_into_view_if_needed()
    page.click("#box-toggle")
    stage = page.locator("#canvas-stage").bounding_box()
    x, y, w, h = stage["x"], stage["y"], stage["width"], stage["height"]
    page.mouse.move(x + 0.2 * w, y + 0.15 * h)
    page.mouse.down()
    page.mouse.move(x + 0.5 * w, y + 0.4 * h, steps=5)
    page.mouse.move(x + 0.75 * w, y + 0.7 * h, steps=5)
    page.mouse.up()
    corners = [int(page.input_value(f"#box-{k}")) for k in ("x0", "y0", "x1", "y1")]
    assert corners == [pytest.approx(v, abs=2) for v in (0.2 * 224, 0.15 * 224, 0.75 * 224, 0.7 * 224)]
    assert page.get_attribute("#box-toggle", "aria-pressed") == "false"  # one box, then back to viewing
    shot(page, "box", clip={"x": x - 20, "y": y - 20, "width": w + 40, "height": h + 40})
    wait_for(page, "#q-cards .qcard[data-metric=pointing]")
    card = page.locator("#q-cards .qcard[data-metric=pointing]")
    q = stored(page)["pointing"]
    assert q["params"]["box"] == corners
    assert card.locator(".q-value").inner_text() == f"{100 * q['answer']['energies'][0]:.1f}%"
    assert card.locator(".q-compare").inner_text() == f"vs {100 * q['answer']['chance']:.1f}% for a uniform map"
    assert card.locator(".q-verdict").inner_text().startswith("Hit" if q["answer"]["hits"][0] else "Miss")

    # Every compare card gets the same box (same input size) and its own pointing score.
    page.wait_for_function("() => document.querySelectorAll('#compare-grid .card-scores dd[data-score=pointing]').length === 2",
                           timeout=SLOW)
    cards = page.locator("#compare-grid .ccard")
    for i in range(2):
        rid = cards.nth(i).locator("a.card-link").get_attribute("href").rsplit("/", 1)[1]
        answer = stored(page, rid)
        dd = cards.nth(i).locator(".card-scores dd")
        shown(dd.nth(0).inner_text(), answer["deletion"]["answer"]["area"])
        shown(dd.nth(1).inner_text(), answer["insertion"]["answer"]["area"])
        point = answer["pointing"]
        assert point["params"]["box"] == corners
        assert dd.nth(2).inner_text() == f"{100 * point['answer']['energies'][0]:.1f}% {'hit' if point['answer']['hits'][0] else 'miss'}"

    # Ranking: best deletion (lowest area) first, then best insertion (highest) first.
    page.select_option("#compare-sort", "deletion")
    values = [float(v) for v in page.eval_on_selector_all("#compare-grid .card-scores dd[data-score=deletion]", "e => e.map(d => d.dataset.value)")]
    assert values == sorted(values)
    assert page.locator("#compare-grid .card-rank").all_inner_texts() == ["#1", "#2"]
    assert "lower" in page.locator("#compare-why").inner_text()
    page.select_option("#compare-sort", "insertion")
    values = [float(v) for v in page.eval_on_selector_all("#compare-grid .card-scores dd[data-score=insertion]", "e => e.map(d => d.dataset.value)")]
    assert values == sorted(values, reverse=True)
    page.locator("#compare").screenshot(path=os.path.join(SHOTS, "quality-compare.png"))

    # The keyboard moves the box too: four pixels right per press, then measured again.
    page.focus(".box-rect")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.wait_for_function(f"() => Number(document.querySelector('#box-x0').value) === {corners[0] + 8}")


def test_another_metric_from_its_schema_form_shows_the_apis_value(page):
    page.click("#q-more summary")
    page.select_option("#q-metric", "infidelity")
    assert page.locator("#q-form [data-field=n_perturb_samples] input").input_value() == "10"  # the schema's default
    page.fill("#param-q-infidelity-n_perturb_samples", "6")
    page.click("#q-other-run")
    wait_for(page, "#q-cards .qcard[data-metric=infidelity]")
    q = stored(page)["infidelity"]
    assert q["params"]["n_perturb_samples"] == 6
    card = page.locator("#q-cards .qcard[data-metric=infidelity]")
    shown(card.locator(".q-value").inner_text(), q["answer"]["values"][0])
    assert card.locator(".q-better").inner_text().lower() == "lower is better"
    page.fill("#param-q-infidelity-n_perturb_samples", "0")  # below the schema's bounds: marked, not sent
    page.click("#q-other-run")
    assert page.locator("#q-form [data-field=n_perturb_samples] .field-error").is_visible()
    page.click("#q-more summary")


def test_a_long_measurement_shows_progress_and_can_be_cancelled(page):
    page.click("#q-more summary")
    page.select_option("#q-metric", "deletion")
    page.fill("#param-q-deletion-steps", "96")  # 96 × 17 forward passes: long enough to cancel
    page.fill("#param-q-deletion-reference_seeds", "16")
    page.click("#q-other-run")
    page.wait_for_function("() => Number(document.querySelector('#q-job-progress').getAttribute('aria-valuenow')) > 0",
                           timeout=SLOW)
    assert page.locator("#q-job-status").inner_text().startswith("Deletion · ")
    shot(page, "job-running")
    page.click("#q-job-cancel")
    page.wait_for_selector("#q-job[data-status=cancelled]", timeout=30_000)
    assert page.locator("#q-job-status").inner_text() == "Cancelled"
    assert not page.locator("#q-job-cancel").is_visible()
    assert stored(page)["deletion"]["params"].get("steps") != 96  # nothing stored for it


def test_the_share_page_shows_the_stored_measurements(page, browser, server):
    qs = stored(page)
    other = browser.new_context(viewport={"width": 1440, "height": 900}).new_page()
    try:
        other.goto(f"{server}/r/{page.rid}")
        other.wait_for_selector("body[data-ready=true]")
        for metric in ("deletion", "insertion"):
            card = other.locator(f"#share-quality-cards .qcard[data-metric={metric}]")
            shown(card.locator(".q-value").inner_text(), qs[metric]["answer"]["area"])
            assert card.locator("path.q-curve-map").count() == 1
        assert other.locator("#share-quality-cards .qcard[data-metric=pointing] .q-value").inner_text() == \
            f"{100 * qs['pointing']['answer']['energies'][0]:.1f}%"
        # The stored box is outlined on the image, where it was drawn (the stage shows the 224×224 input).
        x0, y0, x1, y1 = qs["pointing"]["params"]["box"]
        stage = other.locator(".canvas-stage").bounding_box()
        box = other.locator(".box-rect.static").bounding_box()
        k = stage["width"] / 224
        assert box["x"] - stage["x"] == pytest.approx(x0 * k, abs=2) and box["width"] == pytest.approx((x1 - x0) * k, abs=2)
        assert box["y"] - stage["y"] == pytest.approx(y0 * k, abs=2) and box["height"] == pytest.approx((y1 - y0) * k, abs=2)
        assert other.locator("#share-sanity .sanity-stage").count() == 1 + len(qs["sanity_check"]["answer"]["stages"])
        shot(other, "share-top")
        other.evaluate("window.scrollTo(0, document.querySelector('#share-quality').getBoundingClientRect().top + scrollY - 80)")
        shot(other, "share")
    finally:
        other.context.close()


def test_stored_measurements_show_when_the_result_is_opened_again(page):
    page.click("label[for=method-saliency]")
    page.click("#run")
    page.wait_for_function("() => document.querySelector('#result-method').textContent === 'Saliency'", timeout=SLOW)
    posts: list[str] = []
    listener = lambda r: r.method == "POST" and posts.append(r.post_data or "")  # noqa: E731
    page.on("request", listener)
    page.click("label[for=method-grad_cam]")
    page.click("#run")  # the same explanation: the stored result, and its stored measurements
    page.wait_for_function(f"() => document.querySelector('#overlay').dataset.painted === '{page.rid}'", timeout=SLOW)
    wait_for(page, "#q-cards .qcard[data-metric=insertion]")
    qs = stored(page)
    shown(page.locator("#q-cards .qcard[data-metric=deletion] .q-value").inner_text(), qs["deletion"]["answer"]["area"])
    assert page.locator("#q-sanity .sanity-stage").count() == 1 + len(qs["sanity_check"]["answer"]["stages"])
    page.remove_listener("request", listener)
    remeasured = [b for b in posts if '"metric"' in b and '"pointing"' not in b]
    assert remeasured == []  # only the drawn box is measured again for the new result (stored: cached)


LABELS = """() => Array.from(document.querySelectorAll(
    '#quality :is(input, select, button, [tabindex]), #canvas-stage :is(button, [tabindex]), #compare :is(select, button)'))
  .filter((el) => !el.closest('[hidden]'))
  .filter((el) => !(el.getAttribute('aria-label') || el.getAttribute('aria-labelledby') || (el.labels && el.labels.length)
                    || (el.tagName === 'BUTTON' && el.textContent.trim())))
  .map((el) => el.outerHTML.slice(0, 120))"""


def test_every_control_is_labelled_and_the_panel_stacks_at_phone_width(page):
    page.locator("#q-more summary").click()  # closes the other metrics' form
    assert page.evaluate(LABELS) == []
    page.evaluate("window.scrollTo(0, document.querySelector('#quality').getBoundingClientRect().top + scrollY - 300)")
    shot(page, "desktop")  # 1440×900, as a person sees it: the image above, the panel below
    page.set_viewport_size({"width": 390, "height": 844})
    page.locator("#quality").scroll_into_view_if_needed()
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390, f"the page scrolls sideways at phone width ({width} px)"
    cards = page.locator("#q-cards .qcard")
    boxes = [cards.nth(i).bounding_box() for i in range(cards.count())]
    assert all(b["x"] >= 0 and b["x"] + b["width"] <= 390 for b in boxes)
    shot(page, "phone")
    page.evaluate("window.scrollTo(0, document.querySelector('#hero').getBoundingClientRect().top + scrollY - 60)")
    shot(page, "phone-hero")
    page.locator("#quality").screenshot(path=os.path.join(SHOTS, "quality-phone-panel.png"))
    page.set_viewport_size({"width": 1440, "height": 900})


def test_a_box_drawn_with_a_finger_on_a_phone(browser, server, chelsea_b64):
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, base_url=server, has_touch=True, is_mobile=True)
    try:
        page = open_grad_cam(ctx, chelsea_b64)
        page.wait_for_timeout(300)  # the result's stored measurements come back (an earlier test's box)
        if page.locator("#box-clear").is_enabled():
            page.locator("#box-clear").tap()
        page.locator("#canvas-stage").scroll_into_view_if_needed()
        stage, before = page.locator("#canvas-stage").bounding_box(), None
        while stage != before:  # the phone layout scrolls the result into view smoothly: let it settle
            page.wait_for_timeout(150)
            before, stage = stage, page.locator("#canvas-stage").bounding_box()
        page.locator("#box-toggle").tap()
        stage = page.locator("#canvas-stage").bounding_box()
        x, y, w, h = stage["x"], stage["y"], stage["width"], stage["height"]
        cdp = ctx.new_cdp_session(page)
        touch = lambda kind, pts: cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": pts})  # noqa: E731
        touch("touchStart", [{"x": x + 0.25 * w, "y": y + 0.3 * h}])
        for f in (0.4, 0.55, 0.7):
            touch("touchMove", [{"x": x + f * w, "y": y + f * h}])
        touch("touchEnd", [])
        corners = [int(page.input_value(f"#box-{k}")) for k in ("x0", "y0", "x1", "y1")]
        assert corners == [pytest.approx(v, abs=2) for v in (0.25 * 224, 0.3 * 224, 0.7 * 224, 0.7 * 224)]
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        wait_for(page, "#q-cards .qcard[data-metric=pointing]")
        q = stored(page)["pointing"]
        assert q["params"]["box"] == corners
        assert page.locator("#q-cards .qcard[data-metric=pointing] .q-value").inner_text() == \
            f"{100 * q['answer']['energies'][0]:.1f}%"
        assert page.errors == [], page.errors
    finally:
        ctx.close()
