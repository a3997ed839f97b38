// The items grid: one page of items as cards of a fixed size, laid out on a spacer as tall as the
// whole page; only the rows in view (and a margin) exist in the DOM, so a page of 200 scrolls as
// lightly as a page of 20, and nothing moves when a thumbnail arrives.
import { h } from "../ui.js";

const GAP = 12;
const MIN_CARD = 176; // px; below this the grid takes one column fewer
const TRUE_H = 30; // the true-label line
const MODEL_H = 44; // one model's prediction line
const INFO_PAD = 10;
const MARGIN_ROWS = 2;

const pct = (p) => (p >= 0.995 ? "100%" : p >= 0.1 ? `${(p * 100).toFixed(0)}%` : `${(p * 100).toFixed(1)}%`);

/** hooks: thumb(item, size), overlay(item) → url or null, showOverlay() → bool, selected(index) → bool,
 * toggle(index, on), open(item), label(model) → display name. */
export function itemsGrid(root, hooks) {
  let items = [];
  let models = [];
  let cols = 2;
  let cardW = 0;
  let cardH = 0;
  let frame = 0;
  const shown = new Map(); // position in the page → card

  root.style.setProperty("--ds-true-h", `${TRUE_H}px`);
  root.style.setProperty("--ds-model-h", `${MODEL_H}px`);
  root.style.setProperty("--ds-info-pad", `${INFO_PAD}px`);

  function measure() {
    const w = root.clientWidth;
    if (!w) return false;
    cols = Math.max(2, Math.floor((w + GAP) / (MIN_CARD + GAP)));
    cardW = (w - GAP * (cols - 1)) / cols;
    cardH = Math.round(cardW + TRUE_H + MODEL_H * Math.max(1, models.length) + 2 * INFO_PAD);
    const rows = Math.ceil(items.length / cols);
    root.style.height = `${rows ? rows * (cardH + GAP) - GAP : 0}px`;
    return true;
  }

  function badge(entry) {
    if (entry.correct === true) return h("span.ds-badge.ok", { title: "Correct" }, h("span", { "aria-hidden": "true", text: "✓" }), h("span.visually-hidden", { text: "correct" }));
    if (entry.correct === false) return h("span.ds-badge.bad", { title: "Incorrect" }, h("span", { "aria-hidden": "true", text: "✗" }), h("span.visually-hidden", { text: "incorrect" }));
    return h("span.ds-badge.unknown", { title: "No true class for this model", text: "?" });
  }

  function modelLine(item, name) {
    const e = item.models[name];
    const tag = models.length > 1 ? h("span.ds-model-name", { text: hooks.label(name) }) : null;
    if (!e) return h("div.ds-model.pending", {}, tag, h("span.ds-pred.muted", { text: "Scoring…" }), h("span.ds-bar.skeleton", { "aria-hidden": "true" }));
    if (e.error) return h("div.ds-model.error", {}, tag, h("span.ds-pred", { text: "Could not be read" }));
    const p = e.prob || 0;
    return h("div.ds-model", { "data-model": name, "data-correct": String(e.correct) }, tag,
      h("span.ds-pred", { title: e.predicted.label, text: e.predicted.label }),
      h("span.ds-prob", { text: pct(p) }),
      badge(e),
      h("span.ds-bar", { "aria-hidden": "true" }, h("span.ds-bar-fill", { style: { width: `${Math.max(2, p * 100)}%` } })));
  }

  function stateOf(item) {
    if (unreadable(item)) return "error";
    const first = item.models[models[0]];
    if (!first) return "pending";
    if (first.error) return "error";
    return first.correct === true ? "ok" : first.correct === false ? "wrong" : "unknown";
  }

  function fillInfo(card, item) {
    const info = card.querySelector(".ds-info");
    info.replaceChildren(
      h("p.ds-true", {}, h("span.muted", { text: "True " }), h("strong", { text: item.true ? item.true.label : "unlabelled" })),
      ...models.map((m) => modelLine(item, m)));
    card.dataset.state = stateOf(item);
    if (unreadable(item)) fillThumb(card, item);
  }

  /** The item's read error: its own, or the one a model met scoring it. */
  const unreadable = (item) => item.error || models.map((m) => item.models[m] && item.models[m].error).find(Boolean) || null;

  function broken(box, why) {
    const img = box.querySelector("img");
    if (img) img.remove();
    if (!box.querySelector(".ds-broken")) box.append(h("div.ds-broken", { title: why }, h("span.ds-broken-icon", { "aria-hidden": "true", text: "!" }), h("span", { text: "Unreadable image" })));
  }

  function fillThumb(card, item) {
    const box = card.querySelector(".ds-thumb");
    const ov = hooks.overlay(item);
    const why = unreadable(item);
    // 160 px thumbnails, 256 where a card is wider than that on a sharp screen
    const size = cardW * (window.devicePixelRatio || 1) > 220 ? 256 : 160;
    const want = why ? null : ov && hooks.showOverlay() ? ov : hooks.thumb(item, size);
    const img = box.querySelector("img");
    card.classList.toggle("has-overlay", !!ov);
    card.classList.toggle("showing-overlay", !!(ov && want === ov));
    if (why) {
      broken(box, why);
      return;
    }
    if (img && img.getAttribute("src") === want) return;
    const next = h("img", { src: want, alt: "", loading: "lazy", decoding: "async", width: 160, height: 160, draggable: "false" });
    next.addEventListener("error", () => broken(box, "The image could not be read"));
    if (img) img.replaceWith(next);
    else box.prepend(next);
  }

  function build(item) {
    const check = h("input", { type: "checkbox", checked: hooks.selected(item.index), "aria-label": `Select ${item.key}` });
    check.addEventListener("click", (ev) => ev.stopPropagation());
    check.addEventListener("change", () => {
      card.classList.toggle("selected", check.checked);
      hooks.toggle(item.index, check.checked);
    });
    const open = h("button.ds-open", { type: "button", "aria-label": `Open ${item.key} in the single-image view` },
      h("div.ds-thumb", {}, h("span.ds-ovtag", { "aria-hidden": "true", text: "Overlay" })));
    const card = h("article.ds-card", { role: "listitem", "data-index": item.index, "data-key": item.key },
      h("label.ds-check", { title: "Select" }, check, h("span.ds-checkbox", { "aria-hidden": "true" })),
      open, h("div.ds-info"));
    card.classList.toggle("selected", check.checked);
    card.addEventListener("click", (ev) => {
      if (ev.target.closest(".ds-check")) return;
      hooks.open(item);
    });
    fillThumb(card, item);
    fillInfo(card, item);
    card.item = item;
    return card;
  }

  function place(card, k) {
    const r = Math.floor(k / cols);
    const c = k % cols;
    card.style.transform = `translate(${Math.round(c * (cardW + GAP))}px, ${r * (cardH + GAP)}px)`;
    card.style.width = `${cardW}px`;
    card.style.height = `${cardH}px`;
  }

  /** Puts the cards of the rows in view (and a margin) in the DOM, and removes the others. */
  function draw() {
    frame = 0;
    if (!cardH && !measure()) return;
    const rect = root.getBoundingClientRect();
    const rowH = cardH + GAP;
    const top = Math.max(0, -rect.top);
    const bottom = Math.max(0, Math.min(rect.height, window.innerHeight - rect.top));
    const first = Math.max(0, Math.floor(top / rowH) - MARGIN_ROWS) * cols;
    const last = Math.min(items.length, (Math.ceil(bottom / rowH) + MARGIN_ROWS) * cols);
    for (const [k, card] of shown) {
      if (k < first || k >= last || card.item !== items[k]) {
        card.remove();
        shown.delete(k);
      }
    }
    for (let k = first; k < last; k++) {
      let card = shown.get(k);
      if (!card) {
        card = build(items[k]);
        shown.set(k, card);
        root.append(card);
      }
      place(card, k);
    }
  }

  const schedule = () => {
    if (!frame) frame = requestAnimationFrame(draw);
  };
  const relayout = () => {
    if (measure()) schedule();
  };
  window.addEventListener("scroll", schedule, { passive: true });
  window.addEventListener("resize", relayout);
  if (typeof ResizeObserver === "function") new ResizeObserver(relayout).observe(root);

  return {
    /** Shows a new page (cards are rebuilt) or the same page with new scores (updated in place). */
    set(nextItems, nextModels) {
      const sameModels = nextModels.join() === models.join();
      const sameItems = sameModels && nextItems.length === items.length && nextItems.every((it, k) => it.index === items[k].index);
      models = nextModels;
      if (sameItems) {
        for (const [k, card] of shown) {
          card.item = nextItems[k];
          fillInfo(card, nextItems[k]);
        }
        items = nextItems;
        return;
      }
      items = nextItems;
      for (const card of shown.values()) card.remove();
      shown.clear();
      measure();
      draw();
    },
    /** Redraws thumbnails (image ↔ overlay, new overlays) and checkboxes of the cards in the DOM. */
    refresh() {
      for (const card of shown.values()) {
        fillThumb(card, card.item);
        const on = hooks.selected(card.item.index);
        card.querySelector(".ds-check input").checked = on;
        card.classList.toggle("selected", on);
      }
    },
    relayout,
    count: () => shown.size,
  };
}
