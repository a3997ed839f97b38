"""Accessibility and layout stability of the dashboard in a real browser (Debian chromium).

axe-core checks the page when loaded, with an image and its predictions, with a result and the
Quality panel open, and the share page; any serious or critical violation fails. A layout-shift
PerformanceObserver (buffered, shifts right after input left out, as the metric defines) watches a
desktop and a phone viewport through load, upload, predictions and a result: panels reserve their
space, so the cumulative shift stays under 0.05 (Lighthouse's "good" is under 0.1).
"""
from __future__ import annotations

import re

import pytest
from axe_playwright_python.sync_playwright import Axe

from test_dashboard import browser, chelsea, chelsea_b64, server, shot  # noqa: F401  (the shared server and chromium)

SERIOUS = {"serious", "critical"}
# axe's default rules and its experimental ones, which Lighthouse runs too (label-content-name-mismatch).
AXE_OPTIONS = {"resultTypes": ["violations"],
               "runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa",
                                                     "best-practice", "experimental"]}}
CLS_LIMIT = 0.05

# Every layout shift from the start of the page, as the Layout Instability API reports it.
OBSERVE_SHIFTS = """window.__shifts = [];
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) {
    if (e.hadRecentInput) continue;
    window.__shifts.push({ value: e.value, time: e.startTime,
      sources: e.sources.map((s) => { const n = s.node; const r = s.previousRect, c = s.currentRect;
        const name = !n ? '?' : n.id ? '#' + n.id : n.nodeType === 1 ? n.tagName.toLowerCase() + '.' + n.classList[0] : n.nodeName;
        return `${name} ${Math.round(r.y)}→${Math.round(c.y)} (h ${Math.round(r.height)}→${Math.round(c.height)})`; }) });
  }
}).observe({ type: 'layout-shift', buffered: true });"""

DROP = """(b64) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], 'chelsea.png', { type: 'image/png' }));
  document.querySelector('#dropzone').dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true }));
}"""

VIEWPORTS = {
    "desktop": {"viewport": {"width": 1440, "height": 900}},
    "phone": {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True, "device_scale_factor": 3},
}


def axe_check(page, where: str) -> list[str]:
    """Runs axe on the page as it is; prints every violation and answers the serious or critical ones."""
    results = Axe().run(page, options=AXE_OPTIONS).response
    found = []
    for v in results["violations"]:
        nodes = [" ".join(n["target"]) if isinstance(n["target"], list) else str(n["target"]) for n in v["nodes"]]
        line = f"[{where}] {v['impact']} {v['id']}: {v['help']} — {len(nodes)} node(s): {'; '.join(nodes)}"
        print(line)
        if v["impact"] in SERIOUS:
            found.append(line)
    if not results["violations"]:
        print(f"[{where}] no violation")
    return found


def drop_and_predict(page, b64: str) -> None:
    """Drops chelsea on the drop zone from inside the page (no input event) and waits for the guesses."""
    page.evaluate(DROP, b64)
    page.wait_for_function("() => document.querySelectorAll('#predictions button.pred').length >= 5", timeout=30_000)


def explain_and_wait(page) -> str:
    """Presses Explain from inside the page and waits for the painted map and the Quality panel; answers
    the result's id."""
    page.evaluate("document.querySelector('#run').click()")
    page.wait_for_function("() => document.querySelector('#overlay').dataset.painted", timeout=60_000)
    page.wait_for_selector("#quality:not([hidden])", timeout=30_000)
    href = page.locator("#download-png").get_attribute("href")
    found = re.search(r"[0-9a-f]{64}", href or "")
    assert found, f"the PNG link names no result id: {href!r}"
    return found.group(0)


def settle(page, ms: int = 700) -> None:
    """Waits until the page has fetched what it asked for, then a little longer for late renders."""
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(ms)


def test_axe_finds_no_serious_violation_loaded_with_a_result_or_shared(browser, server, chelsea_b64):
    ctx = browser.new_context(viewport={"width": 1440, "height": 900}, base_url=server)
    try:
        page = ctx.new_page()
        page.goto("/")
        page.wait_for_selector("body[data-ready=true]")
        settle(page)
        found = axe_check(page, "loaded")
        drop_and_predict(page, chelsea_b64)
        settle(page, 300)
        found += axe_check(page, "image and predictions")
        rid = explain_and_wait(page)
        page.locator("#q-more summary").click()  # the Quality panel with its other metrics open
        settle(page)
        assert page.locator("#q-more").get_attribute("open") is not None
        found += axe_check(page, "result, Quality open")
        page.goto(f"/r/{rid}")
        page.wait_for_selector("body[data-ready=true]")
        settle(page)
        found += axe_check(page, "share page")
    finally:
        ctx.close()
    assert found == [], "\n" + "\n".join(found)


def window_cls(shifts: list[dict]) -> float:
    """The metric's own definition: the largest session window (gaps under 1 s, at most 5 s long)."""
    best = current = 0.0
    start = last = None
    for s in shifts:
        if start is None or s["time"] - last > 1000 or s["time"] - start > 5000:
            start, current = s["time"], 0.0
        current += s["value"]
        last = s["time"]
        best = max(best, current)
    return best


@pytest.mark.parametrize("device", list(VIEWPORTS))
def test_the_page_does_not_jump_through_load_upload_and_result(browser, server, chelsea_b64, device):
    ctx = browser.new_context(base_url=server, **VIEWPORTS[device])
    try:
        page = ctx.new_page()
        page.add_init_script(OBSERVE_SHIFTS)
        page.goto("/")
        page.wait_for_selector("body[data-ready=true]")
        settle(page)
        load = page.evaluate("window.__shifts")
        shot(page, f"stability-{device}-loaded")
        drop_and_predict(page, chelsea_b64)
        settle(page)
        upload = page.evaluate("window.__shifts")[len(load):]
        shot(page, f"stability-{device}-predictions")
        explain_and_wait(page)
        settle(page, 1000)
        result = page.evaluate("window.__shifts")[len(load) + len(upload):]
        shot(page, f"stability-{device}-result")
    finally:
        ctx.close()
    total = lambda shifts: sum(s["value"] for s in shifts)  # noqa: E731
    everything = load + upload + result
    print(f"\n{device}: layout shift on load {total(load):.4f}, upload and predictions {total(upload):.4f}, "
          f"explain and result {total(result):.4f}; all together {total(everything):.4f} "
          f"(largest session window {window_cls(everything):.4f})")
    for s in everything:
        print(f"  {s['value']:.4f} at {s['time']:.0f} ms: {', '.join(s['sources'])}")
    # The sum of every shift from load to result is at least the CLS of any part of it.
    assert total(everything) < CLS_LIMIT, f"{device}: the page shifted by {total(everything):.4f} (limit {CLS_LIMIT})"
