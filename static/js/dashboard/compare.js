// Compare: several methods on the current model, or the current method on several models, one
// card each, run one at a time. The cards follow the result view's settings. Once the maps are
// in, each card is scored (deletion and insertion areas, and the box check when a box is drawn)
// and the grid can be ranked by any score.
import { explainToResult } from "../api.js";
import { measure } from "../quality-api.js";
import { areaOf, num, pct, pointingOf, verdict } from "../quality-view.js";
import { $, $$, duration, h, plainError, showError } from "../ui.js";
import { bindCanvas } from "../viewer.js";
import { loadResult } from "../render.js";

// The scores a card shows, and how the grid ranks by each (`better`: which end comes first).
const SCORES = {
  deletion: { label: "Deletion", better: "lower", value: areaOf, text: (q) => num(areaOf(q)),
    why: "Deletion area: the class score as the map's top pixels are removed first; lower means it falls sooner, so the map found what the model needs." },
  insertion: { label: "Insertion", better: "higher", value: areaOf, text: (q) => num(areaOf(q)),
    why: "Insertion area: the class score as the map's top pixels are revealed first; higher means it rises sooner." },
  pointing: { label: "Box", better: "higher", value: (q) => pointingOf(q).energy,
    text: (q) => `${pct(pointingOf(q).energy)} ${pointingOf(q).hit ? "hit" : "miss"}`,
    why: "Box energy: the share of positive attribution inside your box; higher means the map points at the object." },
};

function card(title, subtitle) {
  const canvas = h("canvas.card-canvas", { width: 224, height: 224, role: "img", "aria-label": `${title} map` });
  const fill = h("span.progress-fill");
  const progress = h("div.progress.small", { role: "progressbar", "aria-label": `${title} progress`, "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": "0" }, fill);
  const status = h("p.card-status.muted.small", { text: "Waiting…" });
  const cancel = h("button.btn.btn-ghost.btn-small", { type: "button", hidden: true, text: "Cancel" });
  const link = h("a.card-link", { hidden: true, text: "Open" });
  const rank = h("span.card-rank", { hidden: true });
  const frame = h("div.card-frame", {}, canvas, h("div.card-placeholder", {}, h("span.spinner")), rank);
  const scores = h("dl.card-scores", { hidden: true });
  const root = h("article.ccard.pending", {}, h("header", {}, h("h3", { text: title }), h("p.muted.small", { text: subtitle })), frame, progress, scores, h("div.card-foot", {}, status, cancel, link));
  return { root, canvas, fill, progress, status, cancel, link, scores, rank, quality: {}, meta: null };
}

/** The compare panel; `store` is the view every card follows, `refresh()` re-enables buttons. */
export function comparePanel(state, { store, refresh, box }) {
  const grid = $("#compare-grid");
  const unbinders = [];
  let by = "methods";
  let shown = []; // the cards of the comparison on screen, in the order they were run
  let scoring = Promise.resolve();

  function renderChoices() {
    $("#compare-method-list").replaceChildren(
      ...state.methods.map((m, i) => {
        const id = `cmp-method-${m.id}`;
        return h("span.chip-check", {}, h("input", { type: "checkbox", id, value: m.id, checked: i < 2 }), h("label", { for: id, text: m.label }));
      }),
    );
    $("#compare-model-list").replaceChildren(
      ...state.models.map((m) => {
        const id = `cmp-model-${m.name}`;
        return h("span.chip-check", { title: m.available ? "" : m.reason || "" },
          h("input", { type: "checkbox", id, value: m.name, disabled: !m.available, checked: m.available }),
          h("label", { for: id, text: m.label || m.name }));
      }),
    );
  }

  function setupTabs() {
    const tabs = [$("#tab-methods"), $("#tab-models")];
    const select = (tab, focus) => {
      for (const t of tabs) {
        const on = t === tab;
        t.setAttribute("aria-selected", String(on));
        t.tabIndex = on ? 0 : -1;
        $(`#${t.getAttribute("aria-controls")}`).hidden = !on;
      }
      by = tab.id === "tab-methods" ? "methods" : "models";
      if (focus) tab.focus();
    };
    tabs.forEach((t, i) => {
      t.addEventListener("click", () => select(t));
      t.addEventListener("keydown", (ev) => {
        if (ev.key === "ArrowRight" || ev.key === "ArrowLeft") {
          ev.preventDefault();
          select(tabs[(i + 1) % 2], true);
        }
      });
    });
  }

  /** Empties the comparison (its canvases stop following the view settings). */
  function clear() {
    while (unbinders.length) unbinders.pop()();
    grid.replaceChildren();
    shown = [];
    $("#compare-rank").hidden = true;
  }

  /** Writes a card's scores (the ones measured so far) under its map. */
  function paintScores(ui) {
    const rows = Object.entries(SCORES).filter(([id]) => ui.quality[id] !== undefined).map(([id, sc]) => {
      const q = ui.quality[id];
      if (q === "busy") return [h("dt", { text: sc.label }), h("dd.muted", { text: "…" })];
      if (q === "failed") return [h("dt", { text: sc.label }), h("dd.muted", { text: "–" })];
      const v = id === "pointing" ? null : verdict(q);
      const tone = id === "pointing" ? (pointingOf(q).hit ? "ok" : "bad") : v.tone;
      return [h("dt", { text: sc.label }),
        h(`dd.tone-${tone}`, { "data-score": id, "data-value": String(sc.value(q)), title: v ? v.text : "", text: sc.text(q) })];
    });
    ui.scores.replaceChildren(...rows.flat());
    ui.scores.hidden = !rows.length;
    if (rows.length) $("#compare-rank").hidden = false;
  }

  /** Measures `ids` for each finished card, one at a time; the grid is ranked again as they land. */
  function score(cards, ids) {
    const todo = cards.filter((ui) => ui.meta);
    for (const ui of todo) for (const id of ids) ui.quality[id] = "busy";
    todo.forEach(paintScores);
    scoring = scoring.then(async () => {
      for (const ui of todo) {
        for (const id of ids) {
          if (!ui.root.isConnected) return;
          const params = id === "pointing" ? { box: box.pixels(ui.meta.size) } : {};
          if (id === "pointing" && !params.box) {
            delete ui.quality.pointing;
            paintScores(ui);
            continue;
          }
          try {
            ui.quality[id] = await measure(ui.meta.id, id, params);
          } catch (e) {
            ui.quality[id] = "failed";
          }
          paintScores(ui);
          rank();
        }
      }
    });
    return scoring;
  }

  /** Orders the cards by the chosen score (missing scores last) and numbers them. */
  function rank() {
    const key = $("#compare-sort").value;
    const sc = SCORES[key];
    $("#compare-why").textContent = sc ? sc.why : "";
    const value = (ui) => {
      const q = ui.quality[key];
      return q && typeof q === "object" ? sc.value(q) : null;
    };
    const order = sc
      ? [...shown].sort((a, b) => {
        const va = value(a);
        const vb = value(b);
        if (va === null || vb === null) return (va === null) - (vb === null);
        return sc.better === "lower" ? va - vb : vb - va;
      })
      : shown;
    let n = 0;
    for (const ui of order) {
      const ranked = sc && value(ui) !== null;
      ui.rank.hidden = !ranked;
      if (ranked) ui.rank.textContent = `#${++n}`;
      grid.append(ui.root);
    }
  }

  /** The explanations to compare, or an error message. */
  function plan() {
    const base = { image: state.image.id, target: state.target.index };
    if (by === "methods") {
      const ids = $$("#compare-method-list input:checked").map((i) => i.value);
      if (ids.length < 2) return "Choose at least two methods to compare.";
      return ids.map((id) => {
        const m = state.methods.find((x) => x.id === id);
        return { title: m.label, subtitle: state.model, body: { model: state.model, ...base, method: id, params: {} } };
      });
    }
    const names = $$("#compare-model-list input:checked").map((i) => i.value);
    if (names.length < 1) return "Choose at least one model.";
    const { ok, params } = state.form.read();
    if (!ok) return "Fix the method's parameters first.";
    return names.map((name) => ({ title: name, subtitle: state.method.label, body: { model: name, ...base, method: state.method.id, params } }));
  }

  async function runOne(job, ui) {
    ui.status.textContent = "Running…";
    let cancelJob = null;
    ui.cancel.onclick = () => cancelJob && cancelJob().catch(() => {});
    try {
      const meta = await explainToResult(job.body, {
        onJob: (j, cancel) => {
          cancelJob = cancel;
          ui.cancel.hidden = false;
        },
        onProgress: (j) => {
          const pct = j.total ? Math.round((100 * j.done) / j.total) : 0;
          ui.fill.style.width = `${pct}%`;
          ui.progress.setAttribute("aria-valuenow", String(pct));
          ui.status.textContent = j.status === "running" ? `${pct}%${j.eta_s ? ` · ${duration(j.eta_s)} left` : ""}` : j.status;
        },
      });
      const asset = await loadResult(meta);
      if (!ui.root.isConnected) return; // the comparison was cleared meanwhile
      unbinders.push(bindCanvas(ui.canvas, asset, store));
      ui.root.classList.remove("pending");
      ui.root.classList.add("done");
      ui.status.textContent = meta.cached ? "cached" : `${Number(meta.elapsed_s).toFixed(2)} s`;
      ui.link.href = meta.links.share;
      ui.link.hidden = false;
      ui.meta = meta;
    } catch (e) {
      ui.root.classList.remove("pending");
      ui.root.classList.add("failed");
      ui.status.textContent = e.cancelled ? "Cancelled" : plainError(e);
    } finally {
      ui.cancel.hidden = true;
    }
  }

  async function run() {
    showError($("#compare-error"), "");
    clear();
    const jobs = plan();
    if (typeof jobs === "string") return showError($("#compare-error"), jobs);
    const cards = jobs.map((j) => ({ job: j, ui: card(j.title, j.subtitle) }));
    shown = cards.map((c) => c.ui);
    grid.append(...cards.map((c) => c.ui.root));
    $("#compare-run").disabled = true;
    // One at a time: the server shares a few cores between everyone.
    for (const { job, ui } of cards) {
      if (!ui.root.isConnected) break; // a new image cleared the comparison
      await runOne(job, ui);
    }
    refresh();
    const ids = ["deletion", "insertion", ...(box && box.get() ? ["pointing"] : [])];
    await score(cards.map((c) => c.ui), ids);
  }

  renderChoices();
  setupTabs();
  $("#compare-run").addEventListener("click", run);
  $("#compare-sort").addEventListener("change", rank);
  if (box) box.subscribe(() => score(shown, ["pointing"]));
  /** Greys out (and unticks) the methods the chosen model cannot run, with the reason. */
  function fit() {
    const why = (state.models.find((m) => m.name === state.model) || {}).unsupported || {};
    for (const input of $("#compare-method-list").querySelectorAll("input")) {
      input.disabled = Boolean(why[input.value]);
      if (input.disabled) input.checked = false;
      input.parentElement.title = why[input.value] || "";
    }
  }

  return { clear, fit };
}
