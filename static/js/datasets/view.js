// The dataset view: a labelled dataset's items as a paged, virtualised grid with each selected
// model's prediction, filters and sorting (kept in the URL), a summary, the background
// predictions' progress, and batch explanations whose overlays the grid then shows.
import { api } from "../api.js";
import { overlayUrl } from "../overlay.js";
import { $, duration, h, plainError, segmented, showError } from "../ui.js";
import { batchPanel } from "./batch.js";
import { classCombo } from "./combo.js";
import { itemsGrid } from "./grid.js";
import { summaryPanel } from "./summary.js";
import { DEFAULTS, filterOf, itemsQuery, readHash, writeHash } from "./urlstate.js";

const POLL_MS = 1000;
const SUMMARY_EVERY = 2; // polls
const KEPT = "insights:dataset-overlays"; // this tab's batch results, so a reload shows them again
const KEPT_MAX = 2000;

function remembered() {
  try {
    return new Map(JSON.parse(sessionStorage.getItem(KEPT) || "[]"));
  } catch (e) {
    return new Map();
  }
}

function keep(overlays) {
  try {
    sessionStorage.setItem(KEPT, JSON.stringify([...overlays].slice(-KEPT_MAX)));
  } catch (e) {
    /* storage full or disabled: the overlays last until the page is left */
  }
}

// The confusion matrix's last column as a predicted-class filter: a class none of the items has.
const OTHER = { index: "other", label: "Not one of the dataset's classes" };

export function datasetView(state, datasets, { open, useModel, view }) {
  let q = { ...DEFAULTS };
  let answer = null; // the last items answer
  let seq = 0;
  let poll = null;
  let polls = 0;
  let scrollY = 0;
  let active = false;
  let allMatching = false;
  const selected = new Set();
  const overlays = remembered(); // `${dataset}\0${model}\0${index}` → overlay url
  const labels = new Map(); // class index → label (for the filters' display)
  const modelLabel = (name) => (state.models.find((m) => m.name === name) || {}).label || name;
  const available = () => state.models.filter((m) => m.available).map((m) => m.name);
  const current = () => datasets.find((d) => d.name === q.ds) || datasets[0];
  const ovKey = (index) => `${q.ds}\0${q.models[0]}\0${index}`;

  // ---------------------------------------------------------------- pieces
  const grid = itemsGrid($("#ds-grid"), {
    thumb: (item, size) => `${item.thumb}?size=${size}`,
    overlay: (item) => {
      const link = overlays.get(ovKey(item.index));
      return link ? overlayUrl({ links: { overlay: link } }, view.view) : null;
    },
    showOverlay: () => q.show === "overlay",
    selected: (index) => allMatching || selected.has(index),
    toggle: (index, on) => {
      if (allMatching) {
        // leaving "all matching" for an explicit choice: the page's items stay chosen
        allMatching = false;
        for (const it of answer.items) selected.add(it.index);
      }
      if (on) selected.add(index);
      else selected.delete(index);
      selectionChanged();
    },
    open: (item) => open(q.ds, item),
    label: modelLabel,
  });
  const summary = summaryPanel($("#ds-summary-body"), {
    label: modelLabel,
    onCell: (t, p) => {
      remember(t);
      if (p) remember(p);
      set({ true: String(t.index), predicted: p ? String(p.index) : "other", correct: "all" });
      trueCombo.set(t);
      predCombo.set(p || OTHER);
      correct.setValue(q.correct);
      toGrid("smooth");
    },
  });
  const batch = batchPanel(state, {
    context: () => ({
      dataset: q.ds,
      model: q.models[0],
      items: allMatching ? null : [...selected],
      filter: filterOf(q),
      count: allMatching ? (answer ? answer.total : 0) : selected.size,
    }),
    done: (r) => {
      for (const row of r.rows) {
        if (row.result) overlays.set(`${r.dataset}\0${r.model}\0${row.index}`, `/api/results/${encodeURIComponent(row.result)}/overlay.png`);
      }
      keep(overlays);
      setShow("overlay");
    },
  });

  view.subscribe(() => active && grid.refresh());
  const remember = (c) => c && labels.set(Number(c.index), c.label);
  const trueCombo = classCombo({
    labelledBy: "ds-true-label", placeholder: "Any true class",
    options: async (text) => current().classes
      .filter((c) => c.label.toLowerCase().includes(text.toLowerCase()))
      .map((c) => ({ index: c.index, label: c.label, note: `${c.count}` })),
    onChange: (v) => {
      remember(v);
      set({ true: v ? String(v.index) : "" });
    },
  });
  const predCombo = classCombo({
    labelledBy: "ds-pred-label", placeholder: "Any predicted class",
    options: async (text) => {
      const local = current().classes.filter((c) => c.label.toLowerCase().includes(text.toLowerCase()))
        .map((c) => ({ index: c.index, label: c.label }));
      if (!text) return local;
      const found = await api.labels(q.models[0], text, 12);
      const seen = new Set(local.map((c) => c.index));
      return [...local, ...found.filter((c) => !seen.has(c.index)).map((c) => ({ index: c.index, label: c.label }))];
    },
    onChange: (v) => {
      remember(v);
      set({ predicted: v ? String(v.index) : "" });
    },
  });
  $("#ds-true-slot").append(trueCombo.root);
  $("#ds-pred-slot").append(predCombo.root);
  const correct = segmented("ds-correct", "Outcome", [
    { value: "all", label: "All", title: "All items" },
    { value: "true", label: "✓ Correct", title: "Correct predictions" },
    { value: "false", label: "✗ Incorrect", title: "Incorrect predictions" },
  ], q.correct, (v) => set({ correct: v }));
  $("#ds-correct-slot").append(correct);
  const show = segmented("ds-show", "Thumbnails show", [
    { value: "image", label: "Image", title: "Show the images" },
    { value: "overlay", label: "Overlay", title: "Show the explanations' overlays where there are some" },
  ], q.show, (v) => setShow(v));
  $("#ds-show-slot").append(show);

  /** Scrolls back to the first row when it is above the view (under the sticky toolbar). */
  function toGrid(behavior) {
    const below = $("#ds-toolbar").getBoundingClientRect().bottom + 12;
    const top = $("#ds-grid").getBoundingClientRect().top;
    if (top < below) window.scrollTo({ top: window.scrollY + top - below, behavior });
  }

  // ---------------------------------------------------------------- state changes
  function setShow(v) {
    q.show = v;
    show.setValue(v);
    writeUrl();
    grid.refresh();
  }

  /** Changes the query; any change but the page goes back to page 1 and re-reads. */
  function set(change) {
    const keys = Object.keys(change);
    const pageOnly = keys.length > 0 && keys.every((k) => k === "page");
    q = { ...q, ...change };
    if (!pageOnly) {
      if (!("page" in change)) q.page = 1;
      allMatching = false;
    }
    writeUrl();
    load({ top: true });
    if ("models" in change || "ds" in change) loadSummary();
    selectionChanged();
  }

  function writeUrl() {
    if (!active) return;
    const hash = writeHash(q);
    if (location.hash !== hash) history.replaceState(null, "", `${location.pathname}${location.search}${hash}`);
  }

  function selectionChanged() {
    const n = allMatching ? (answer ? answer.total : 0) : selected.size;
    $("#ds-select-clear").disabled = !n;
    $("#ds-select-all").setAttribute("aria-pressed", String(allMatching));
    $("#ds-grid").classList.toggle("all-selected", allMatching);
    $("#ds-explain-quick").hidden = !n;
    $("#ds-explain-quick").textContent = `Explain ${n}…`;
    grid.refresh();
    batch.refresh();
  }

  function filterCount() {
    const n = ["true", "predicted", "min", "max"].filter((k) => q[k] !== "").length + (q.correct !== "all" ? 1 : 0);
    const badge = $("#ds-filter-count");
    badge.textContent = String(n);
    badge.hidden = !n;
  }

  // ---------------------------------------------------------------- reading
  async function load({ top = false } = {}) {
    const mine = ++seq;
    clearTimeout(poll);
    filterCount();
    $("#ds-grid").setAttribute("aria-busy", "true");
    let a;
    try {
      a = await api.datasetItems(q.ds, itemsQuery(q));
    } catch (e) {
      if (mine !== seq) return;
      showError($("#ds-error"), plainError(e));
      $("#ds-grid").setAttribute("aria-busy", "false");
      return;
    }
    if (mine !== seq) return;
    showError($("#ds-error"), "");
    if (q.page > a.pages && a.pages >= 1) {
      q.page = a.pages;
      writeUrl();
      return load({ top });
    }
    answer = a;
    for (const it of a.items) {
      remember(it.true);
      for (const m of Object.values(it.models)) if (m && m.predicted) remember(m.predicted);
    }
    grid.set(a.items, a.models);
    $("#ds-grid").setAttribute("aria-busy", "false");
    $("#ds-empty").hidden = a.total > 0;
    renderCounts();
    renderProgress(a.predictions);
    selectionChanged();
    if (top) toGrid("auto");
    // A queued model's scoring starts when the running one ends: keep following both.
    const running = Object.values(a.predictions).some((p) => p.status === "running" || p.status === "queued");
    if (running && active) {
      poll = setTimeout(() => {
        polls += 1;
        if (polls % SUMMARY_EVERY === 0) loadSummary();
        load();
      }, POLL_MS);
    } else if (polls) {
      polls = 0;
      loadSummary(); // the last scores are in
    }
  }

  async function loadSummary() {
    summary.skeleton();
    try {
      summary.render(await api.datasetSummary(q.ds, q.models), q.models);
    } catch (e) {
      showError($("#ds-error"), plainError(e));
    }
  }

  function renderCounts() {
    const a = answer;
    const what = a.total === a.size ? `${a.total} items` : `${a.total} of ${a.size} items match`;
    $("#ds-total").replaceChildren(h("strong", { text: what }));
    $("#ds-page-info").textContent = a.total ? `Page ${a.page} of ${a.pages} · ${(a.page - 1) * a.per_page + 1}–${Math.min(a.total, a.page * a.per_page)} of ${a.total}` : "No items";
    $("#ds-prev").disabled = a.page <= 1;
    $("#ds-next").disabled = a.page >= a.pages;
    $("#ds-select-all").textContent = `Select all ${a.total}`;
    $("#ds-select-all").disabled = !a.total;
    $("#ds-per-page").value = String(q.per);
    $("#ds-pager").hidden = false; // shown once the grid has its height (nothing below it jumps)
  }

  function renderProgress(progress) {
    const entries = Object.entries(progress || {});
    const unfinished = entries.filter(([, p]) => p.status !== "done");
    const bar = $("#ds-pred");
    bar.hidden = !unfinished.length;
    if (!unfinished.length) return;
    const done = entries.reduce((s, [, p]) => s + p.done, 0);
    const total = entries.reduce((s, [, p]) => s + p.total, 0);
    const running = unfinished.filter(([, p]) => p.status === "running" || p.status === "queued");
    const eta = Math.max(0, ...running.map(([, p]) => p.eta_s || 0));
    const pctDone = total ? Math.round((100 * done) / total) : 0;
    const failed = unfinished.find(([, p]) => p.status === "failed");
    const waiting = running.length && running.every(([, p]) => p.status === "queued");
    const [long, short] = waiting
      ? [`Waiting for another model's scoring · ${done}/${total}`, `Waiting ${done}/${total}`]
      : running.length
      ? [`Scoring ${done}/${total}${eta ? ` · about ${duration(eta)} left` : ""}`, `${done}/${total}${eta ? ` · ${duration(eta)}` : ""}`]
      : failed ? [`Scoring failed: ${failed[1].error || "unknown error"}`, "Scoring failed"]
        : [`Scoring paused at ${done}/${total}`, `Paused ${done}/${total}`];
    $("#ds-pred-status").replaceChildren(h("span.long", { text: long }), h("span.short", { "aria-hidden": "true", text: short }));
    $("#ds-pred-status").title = long;
    $("#ds-pred-progress").setAttribute("aria-valuenow", String(pctDone));
    $("#ds-pred-progress .progress-fill").style.width = `${pctDone}%`;
    const toggle = $("#ds-pred-toggle");
    toggle.textContent = running.length ? "Stop" : "Resume";
    toggle.dataset.action = running.length ? "stop" : "start";
  }

  // ---------------------------------------------------------------- controls
  function renderPickers() {
    const select = $("#ds-name");
    select.replaceChildren(...datasets.map((d) => h("option", { value: d.name, text: `${d.name} · ${d.size} items` })));
    select.value = q.ds;
    const d = current();
    $("#ds-facts").textContent = `${d.kind === "folder" ? "Image folder" : d.kind === "csv" ? "CSV" : d.kind} · ${d.size} items · ${d.classes.length} ${d.classes.length === 1 ? "class" : "classes"}${d.labelled < d.size ? ` · ${d.size - d.labelled} unlabelled` : ""}`;
    const notes = [...(d.notes || []), ...(datasets.unavailable || []).map((u) => `Dataset ${u.name} is not served: ${u.error}`)];
    $("#ds-notes").replaceChildren(...notes.map((n) => h("li", { text: n })));
    $("#ds-notes").hidden = !notes.length;
    for (const c of d.classes) remember(c);
    const names = available();
    $("#ds-models").replaceChildren(...state.models.filter((m) => m.available).map((m) => {
      const id = `ds-model-${m.name}`;
      const on = q.models.includes(m.name);
      const input = h("input", { type: "checkbox", id, value: m.name, checked: on, disabled: !on && q.models.length >= 4 });
      input.addEventListener("change", () => {
        const next = input.checked ? [...q.models, m.name] : q.models.filter((x) => x !== m.name);
        if (!next.length) {
          input.checked = true; // one model at least
          return;
        }
        set({ models: next.filter((x) => names.includes(x)).slice(0, 4) });
        renderPickers();
        useModel(q.models[0]);
      });
      return h("span.chip-check", {}, input, h("label", { for: id, text: m.label || m.name }));
    }));
  }

  function syncControls() {
    trueCombo.set(q.true !== "" ? { index: Number(q.true), label: labels.get(Number(q.true)) || `class ${q.true}` } : null);
    predCombo.set(q.predicted === "other" ? OTHER
      : q.predicted !== "" ? { index: Number(q.predicted), label: labels.get(Number(q.predicted)) || `class ${q.predicted}` } : null);
    correct.setValue(q.correct);
    show.setValue(q.show);
    $("#ds-min").value = q.min;
    $("#ds-max").value = q.max;
    $("#ds-sort").value = q.sort;
    $("#ds-per-page").value = String(q.per);
    $("#ds-pager").hidden = false; // shown once the grid has its height (nothing below it jumps)
  }

  let confTimer = null;
  const readConfidence = () => {
    const min = $("#ds-min").value.trim();
    const max = $("#ds-max").value.trim();
    const bad = [min, max].some((v) => v !== "" && !(Number(v) >= 0 && Number(v) <= 100));
    const order = min !== "" && max !== "" && Number(min) > Number(max);
    showError($("#ds-conf-error"), bad ? "Confidence is a percentage from 0 to 100." : order ? "The lowest confidence is above the highest." : "");
    if (bad || order || (min === q.min && max === q.max)) return;
    set({ min, max });
  };
  for (const sel of ["#ds-min", "#ds-max"]) {
    $(sel).addEventListener("input", () => {
      clearTimeout(confTimer);
      confTimer = setTimeout(readConfidence, 350);
    });
    $(sel).addEventListener("change", readConfidence);
  }
  $("#ds-sort").addEventListener("change", (ev) => set({ sort: ev.target.value }));
  $("#ds-per-page").addEventListener("change", (ev) => set({ per: Number(ev.target.value) }));
  $("#ds-name").addEventListener("change", (ev) => {
    selected.clear();
    q = { ...DEFAULTS, ds: ev.target.value, models: q.models, per: q.per };
    renderPickers();
    syncControls();
    set({});
    loadSummary();
  });
  $("#ds-prev").addEventListener("click", () => set({ page: Math.max(1, q.page - 1) }));
  $("#ds-next").addEventListener("click", () => set({ page: q.page + 1 }));
  $("#ds-reset").addEventListener("click", () => {
    showError($("#ds-conf-error"), "");
    q = { ...q, true: "", predicted: "", correct: "all", min: "", max: "", sort: "index" };
    syncControls();
    set({});
  });
  $("#ds-select-page").addEventListener("click", () => {
    if (!answer) return;
    allMatching = false;
    for (const it of answer.items) if (!it.error) selected.add(it.index);
    selectionChanged();
  });
  $("#ds-select-all").addEventListener("click", () => {
    allMatching = true;
    selectionChanged();
  });
  $("#ds-select-clear").addEventListener("click", () => {
    allMatching = false;
    selected.clear();
    selectionChanged();
  });
  $("#ds-pred-toggle").addEventListener("click", async () => {
    const button = $("#ds-pred-toggle");
    const start = button.dataset.action === "start";
    button.disabled = true;
    try {
      await Promise.all(q.models.map((m) => (start ? api.startPredictions(q.ds, m) : api.stopPredictions(q.ds, m))));
    } catch (e) {
      showError($("#ds-error"), plainError(e));
    } finally {
      button.disabled = false;
    }
    load();
  });
  // Ctrl+Enter explains the selection here (the single view's own shortcut waits for its view).
  window.addEventListener("keydown", (ev) => {
    if (!active || !(ev.ctrlKey || ev.metaKey) || ev.key !== "Enter") return;
    ev.preventDefault();
    ev.stopPropagation();
    $("#ds-explain").click();
  }, true);
  // On a phone the summary shows the accuracy; the per-class bars and the matrix open on demand.
  $("#ds-summary-more").addEventListener("click", (ev) => {
    const open = !$("#ds-summary").classList.contains("expanded");
    $("#ds-summary").classList.toggle("expanded", open);
    ev.currentTarget.setAttribute("aria-expanded", String(open));
  });
  // The filters become a drawer on a phone.
  const drawer = (on) => {
    $("#view-datasets").classList.toggle("drawer-open", on);
    $("#ds-filters-open").setAttribute("aria-expanded", String(on));
    if (on) $("#ds-drawer-close").focus();
    else $("#ds-filters-open").focus();
  };
  $("#ds-filters-open").addEventListener("click", () => drawer(true));
  $("#ds-explain-quick").addEventListener("click", () => { // a phone: the batch panel is in the drawer
    drawer(true);
    $("#ds-batch").scrollIntoView({ block: "start" });
    $("#ds-explain").focus();
  });
  $("#ds-drawer-close").addEventListener("click", () => drawer(false));
  $("#ds-side").addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && $("#view-datasets").classList.contains("drawer-open")) drawer(false);
  });

  // The single view's method panel serves the batch too: it moves here while this view shows.
  const methodPanel = $("#step-method");
  const methodHome = methodPanel.nextElementSibling;
  methodPanel.addEventListener("change", () => batch.refresh()); // after the panel's own listener

  return {
    /** Shows the view with the query of the URL's hash (or the last one shown). */
    enter(fromHash = true) {
      if (fromHash) {
        const { q: wanted } = readHash();
        const names = available();
        q = { ...wanted };
        if (!datasets.some((d) => d.name === q.ds)) q.ds = datasets[0].name;
        q.models = q.models.filter((m) => names.includes(m));
        if (!q.models.length) q.models = [state.model || names[0]].filter(Boolean);
      }
      active = true;
      useModel(q.models[0]);
      $("#ds-method-slot").append(methodPanel);
      renderPickers();
      syncControls();
      $("#view-datasets").classList.add("ready"); // the side panels show once filled (no jump)
      writeUrl();
      batch.refresh();
      load();
      loadSummary();
      requestAnimationFrame(() => {
        grid.relayout();
        if (!fromHash) window.scrollTo(0, scrollY);
      });
    },
    /** Whether the view is shown. */
    get active() {
      return active;
    },
    leave() {
      active = false;
      clearTimeout(poll);
      scrollY = window.scrollY;
      methodHome.before(methodPanel);
      $("#view-datasets").classList.remove("drawer-open");
    },
    /** The model the batch explains with (the first shown), to keep the method panel fitted to it. */
    model: () => q.models[0],
    refresh: () => batch.refresh(),
  };
}
