"""Partial maps in the page: occlusion refines on the stage, integrated gradients shows a preview,
and a cancelled run keeps its partial map, labelled (real app, EfficientNet-Lite0, chromium)."""
from __future__ import annotations

from test_dashboard import (SERVED, browser, chelsea, chelsea_b64, context, drop_image, explain, page,  # noqa: F401
                            server, shot)

# Clicks Explain inside the page and records, on the page's clock, when the partial canvas and then
# the result canvas were first painted.
TIME_TO_MAPS = """async () => {
  const t0 = performance.now();
  let first = null;
  document.querySelector('#run').click();
  const end = t0 + 120000;
  while (performance.now() < end) {
    const partial = document.querySelector('#partial');
    if (first === null && partial && !partial.hidden && partial.dataset.painted) {
      first = { t: performance.now() - t0, kind: partial.dataset.kind, busy: document.querySelector('#stage-busy-text').textContent };
    }
    const overlay = document.querySelector('#overlay');
    if (!overlay.hidden && overlay.dataset.painted && document.querySelector('#stage-busy').hidden) {
      return { first, final: performance.now() - t0, partialHidden: document.querySelector('#partial').hidden };
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error('no final map');
}"""


def test_occlusion_paints_a_refining_map_before_the_final_one(page, chelsea_b64):
    drop_image(page, chelsea_b64)
    page.click("label[for=method-occlusion]")
    for run in ("first run (the model's twin is traced)", "warm, another class"):
        timing = page.evaluate(TIME_TO_MAPS)
        print(f"occlusion on EfficientNet-Lite0 in the page, {run}: first map {timing['first']['t']:.0f} ms, "
              f"final {timing['final']:.0f} ms")
        assert timing["first"] is not None and timing["first"]["kind"] == "refining"
        assert timing["first"]["busy"].startswith("Refining…")
        assert timing["first"]["t"] < timing["final"]
        assert timing["partialHidden"]  # the result took the stage
        assert page.locator("#result-method").inner_text() == "Occlusion"
        page.locator("#predictions button.pred").nth(2).click()


def test_integrated_gradients_shows_its_preview_first(page, chelsea_b64):
    drop_image(page, chelsea_b64)
    page.click("label[for=method-integrated_gradients]")
    timing = page.evaluate(TIME_TO_MAPS)
    assert timing["first"] is not None and timing["first"]["kind"] == "preview"
    assert timing["first"]["busy"].startswith("Preview")
    assert timing["partialHidden"] and page.locator("#result-method").inner_text() == "Integrated Gradients"


def test_a_cancelled_run_keeps_its_partial_map_labelled_and_stores_nothing(page, chelsea_b64):
    explain(page, chelsea_b64)  # a saliency result first
    page.click("label[for=method-occlusion]")
    page.fill("#param-occlusion-strides", "3, 4, 4")  # 2,401 windows: long enough to cancel
    page.click("#run")
    page.wait_for_selector("#partial[data-painted]:not([hidden])", timeout=60_000)
    shot(page, "progressive-refining")
    page.click("#job-cancel")
    page.wait_for_selector("#job[data-status=cancelled]", timeout=30_000)
    note = page.locator("#partial-note")
    assert note.is_visible() and note.inner_text().startswith("Cancelled · partial map at ")
    assert note.inner_text().endswith("%, not saved")
    assert page.locator("#partial").is_visible() and page.locator("#overlay").is_hidden()
    # Changing the display redraws the partial map too (it follows the page's settings).
    before = page.evaluate("() => document.querySelector('#partial').toDataURL()")
    page.click(".segmented[data-name=mode] [data-value=heat_map]")
    page.wait_for_function("(b) => document.querySelector('#partial').toDataURL() !== b", arg=before)
    shot(page, "progressive-cancelled")
    # Nothing was stored: the image has its saliency result only.
    image = page.evaluate("() => document.querySelector('#preview').src").rsplit("/", 1)[-1]
    stored = SERVED["app"].extensions["insights"].store.results_for_image(image)
    assert [3, 4, 4] not in [r["params"].get("strides") for r in stored if r["method"] == "occlusion"]
