// Step 3: the class to explain: the model's top guesses, or any class found by name.
import { api } from "../api.js";
import { $, $$, h, toast } from "../ui.js";
import { placeError, stepError } from "./errors.js";

/** The predictions list and the class search; `changed()` runs when the target changes. */
export function targetPanel(state, { changed }) {
  const box = $("#predictions");
  let predictions = [];

  /** The box is a list only while it holds guesses: a note or a skeleton inside a list breaks the
   * list's contract for screen readers (axe: aria-required-children). */
  function asList(on) {
    if (on) {
      box.setAttribute("role", "list");
      box.setAttribute("aria-label", "Top predictions");
    } else {
      box.removeAttribute("role");
      box.removeAttribute("aria-label");
    }
  }
  asList(false); // the page starts with a note in the box

  function renderTargetLine() {
    const line = $("#target-line");
    line.replaceChildren();
    if (!state.target) return;
    line.append(h("span.muted", { text: "Target " }), h("strong", { id: "target-label", text: state.target.label }), h("span.muted", { text: ` · class ${state.target.index}` }));
  }

  function setTarget(t) {
    state.target = t;
    stepError("target", "");
    for (const b of $$("#predictions .pred")) b.setAttribute("aria-pressed", String(Number(b.dataset.index) === t.index));
    renderTargetLine();
    changed();
  }

  function renderPredictions() {
    asList(true);
    box.replaceChildren(
      ...predictions.map((p, i) => {
        const pct = Math.max(0, Math.min(100, p.prob * 100));
        const selected = state.target && state.target.index === p.index;
        return h("div", { role: "listitem" },
          h("button.pred", {
            type: "button",
            "data-index": p.index,
            "aria-pressed": String(!!selected), // its name is what it shows (rank, class, probability)
            style: { "--p": `${pct}%` },
            onclick: () => setTarget({ index: p.index, label: p.label }),
          },
          h("span.pred-rank", { text: i + 1 }),
          h("span.pred-label", { text: p.label }),
          h("span.pred-prob", { text: pct >= 10 ? `${pct.toFixed(0)}%` : `${pct.toFixed(1)}%` }),
          h("span.pred-bar", { "aria-hidden": "true" }, h("span.pred-fill"))));
      }),
    );
    renderTargetLine();
  }

  /** Asks the model for its top five (fewer when it has fewer classes) on the current image; the first
   * becomes the target if none is set. */
  async function predict() {
    const classes = (state.models.find((m) => m.name === state.model) || {}).num_classes || 5;
    const k = Math.max(1, Math.min(5, classes));
    box.setAttribute("aria-busy", "true");
    asList(false);
    box.replaceChildren(...Array.from({ length: k }, () => h("div.pred.skeleton", { "aria-hidden": "true" })));
    try {
      const answer = await api.predict(state.model, state.image.id, k);
      predictions = answer.predictions;
      performance.mark("insights:predicted");
    } catch (e) {
      box.replaceChildren(h("p.muted.small.empty-note", { text: "No predictions." }));
      placeError(state, e, "target");
      return;
    } finally {
      box.removeAttribute("aria-busy");
    }
    if (!state.target && predictions.length) state.target = { index: predictions[0].index, label: predictions[0].label };
    renderPredictions();
    changed();
  }

  function setupSearch() {
    const input = $("#class-search");
    const list = $("#class-results");
    let results = [];
    let active = -1;
    let seq = 0;
    const close = () => {
      list.hidden = true;
      input.setAttribute("aria-expanded", "false");
      input.removeAttribute("aria-activedescendant");
      active = -1;
    };
    const choose = (r) => {
      setTarget({ index: r.index, label: r.label });
      input.value = "";
      close();
      toast(`Target set to “${r.label}”`);
    };
    const highlight = (i) => {
      active = i;
      $$("li", list).forEach((li, k) => li.setAttribute("aria-selected", String(k === i)));
      if (i >= 0) input.setAttribute("aria-activedescendant", `class-opt-${i}`);
    };
    const search = async () => {
      const q = input.value.trim();
      if (!q || !state.model) return close();
      const mine = ++seq;
      try {
        results = await api.labels(state.model, q, 8);
      } catch (e) {
        placeError(state, e, "target");
        return;
      }
      if (mine !== seq) return;
      list.replaceChildren(
        ...(results.length
          ? results.map((r, i) => h("li", { id: `class-opt-${i}`, role: "option", "aria-selected": "false", onmousedown: (ev) => { ev.preventDefault(); choose(r); } },
              h("span", { text: r.label }), h("span.muted", { text: `#${r.index}` })))
          : [h("li.none", { role: "option", "aria-disabled": "true", text: `No class matches “${q}”` })]),
      );
      list.hidden = false;
      input.setAttribute("aria-expanded", "true");
      active = -1;
    };
    let timer = null;
    input.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(search, 120);
    });
    input.addEventListener("keydown", (ev) => {
      if (ev.key === "ArrowDown" && results.length) {
        ev.preventDefault();
        highlight(Math.min(results.length - 1, active + 1));
      } else if (ev.key === "ArrowUp" && results.length) {
        ev.preventDefault();
        highlight(Math.max(0, active - 1));
      } else if (ev.key === "Enter") {
        ev.preventDefault();
        const r = results[active >= 0 ? active : 0];
        if (r && !list.hidden) choose(r);
      } else if (ev.key === "Escape") close();
    });
    input.addEventListener("blur", () => setTimeout(close, 100));
  }

  setupSearch();
  return { predict, top: () => predictions[0] || null };
}
