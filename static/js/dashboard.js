// The dashboard: image → model → class → method → map, plus comparisons and sharing.
import { api, explainToResult } from "./api.js";
import { paramForm } from "./form.js";
import { autoColormap, loadOverlay, overlayUrl } from "./overlay.js";
import { colormapFor, effectiveSign, loadResult } from "./render.js";
import { $, $$, copyText, duration, h, plainError, showError, toast } from "./ui.js";
import { ViewStore, bindCanvas, colorBar, viewControls } from "./viewer.js";

const FAMILIES = { gradient: "Gradients", rules: "Propagation rules", cam: "Class activation maps", perturbation: "Perturbation" };
const familyLabel = (f) => FAMILIES[f] || f.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());

const state = {
  models: [],
  methods: [],
  model: null,
  image: null,
  predictions: [],
  target: null, // {index, label}
  method: null,
  form: null,
  result: null,
  asset: null,
  job: null,
  busy: false,
  compareBy: "methods",
};
let store = null; // the view settings, once the overlay specification is loaded
let bar = null;
let unbindHero = null;

// ---------------------------------------------------------------------------- errors

const slots = () => ({
  image: $("#image-error"),
  model: $("#model-error"),
  target: $("#target-error"),
  method: $("#method-error"),
  run: $("#run-error"),
});

function clearErrors() {
  for (const slot of Object.values(slots())) showError(slot, "");
  if (state.form) state.form.clearErrors();
}

/** Puts an API error next to the control it is about (error.field), or under the button. */
function placeError(e, fallback = "run") {
  if (e && e.cancelled) return;
  const msg = plainError(e);
  const field = e && e.field;
  const s = slots();
  if (field && state.form && state.form.has(field)) {
    state.form.setError(field, msg);
    $("#params-box").open = true;
    return;
  }
  const map = { image: "image", file: "image", model: "model", target: "target", method: "method", top_k: "target" };
  const byCode = { bad_image: "image", too_large: "image", unknown_model: "model", model_unavailable: "model", bad_target: "target", unknown_method: "method" };
  const slot = s[map[field] || byCode[e && e.code] || fallback];
  showError(slot, msg);
  (slot.closest(".step") || slot).scrollIntoView({ block: "nearest" });
}

// ---------------------------------------------------------------------------- image

function setDropBusy(on) {
  $("#dropzone").classList.toggle("busy", on);
  $("#dropzone").setAttribute("aria-busy", String(on));
}

async function useImage(promise) {
  clearErrors();
  setDropBusy(true);
  performance.mark("insights:image-start");
  try {
    state.image = await promise;
    performance.mark("insights:uploaded");
  } catch (e) {
    setDropBusy(false);
    placeError(e, "image");
    return;
  }
  setDropBusy(false);
  state.target = null;
  clearCompare();
  showPreview();
  await predict();
  if (!state.asset && state.predictions.length) {
    const top = state.predictions[0];
    $("#hero-title").textContent = "Ready to explain";
    $("#hero-sub").textContent = `The model's top guess is “${top.label}” (${(top.prob * 100).toFixed(1)}%). Pick a class and a method, then press Explain.`;
  }
}

function uploadFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    clearErrors();
    showError($("#image-error"), `“${file.name}” is not an image. Choose a PNG, JPEG or WebP photo.`);
    return;
  }
  useImage(api.upload(file));
}

function showPreview() {
  const url = state.image.url;
  const thumb = $("#thumb");
  thumb.src = url;
  thumb.hidden = false;
  $("#dropzone").classList.add("has-image");
  if (state.asset && state.asset.meta.image && state.asset.meta.image.id !== state.image.id) {
    if (unbindHero) unbindHero();
    unbindHero = null;
    state.asset = null;
    state.result = null;
    $("#overlay").hidden = true;
    $("#hero-side").hidden = true;
    $("#hero-actions").hidden = true;
  }
  if (!state.asset) {
    $("#preview").src = url;
    $("#preview").hidden = false;
    $("#stage-empty").hidden = true;
  }
  updateRunState();
}

function setupUpload() {
  const zone = $("#dropzone");
  const input = $("#file-input");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") {
      ev.preventDefault();
      input.click();
    }
  });
  input.addEventListener("change", () => {
    uploadFile(input.files[0]);
    input.value = "";
  });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (ev) => {
      ev.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const name of ["dragleave", "drop"]) zone.addEventListener(name, () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    const file = ev.dataTransfer && ev.dataTransfer.files && ev.dataTransfer.files[0];
    if (file) uploadFile(file);
  });
  // Dropping outside the zone should not navigate away from the page.
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());
  document.addEventListener("paste", (ev) => {
    const items = Array.from((ev.clipboardData && ev.clipboardData.items) || []);
    const item = items.find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (!item) return;
    ev.preventDefault();
    const file = item.getAsFile();
    uploadFile(new File([file], file.name || "pasted.png", { type: file.type }));
    toast("Pasted image uploaded");
  });
}

async function loadSamples() {
  let samples = [];
  try {
    samples = await api.samples();
  } catch (e) {
    return;
  }
  if (!samples.length) return;
  $("#sample-list").replaceChildren(
    ...samples.map((s) => h("button.chip", { type: "button", "data-sample": s.name, onclick: () => useImage(api.sample(s.name)) }, s.label || s.name)),
  );
  $("#samples").hidden = false;
}

// ---------------------------------------------------------------------------- models

function renderModels() {
  const list = $("#model-list");
  list.replaceChildren();
  const available = state.models.filter((m) => m.available);
  state.model = (available.find((m) => m.default) || available[0] || {}).name || null;
  const unavailable = state.models.filter((m) => !m.available);
  const more = h("details.more-models", {}, h("summary", { text: `${unavailable.length} more ${unavailable.length === 1 ? "model" : "models"} not available here` }));
  for (const m of state.models) {
    const id = `model-${m.name}`;
    const input = h("input.visually-hidden", { type: "radio", name: "model", id, value: m.name, disabled: !m.available, checked: m.name === state.model });
    input.addEventListener("change", () => {
      state.model = m.name;
      showError($("#model-error"), "");
      if (state.image) predict();
      updateRunState();
    });
    const size = m.input_size ? `${m.input_size[1]}×${m.input_size[2]}` : "";
    const detail = m.available ? [size, m.num_classes ? `${m.num_classes} classes` : ""].filter(Boolean).join(" · ") : m.reason || "Unavailable";
    (m.available ? list : more).append(
      h("div.option", { class: `option${m.available ? "" : " disabled"}` }, input,
        h("label", { for: id, title: m.available ? m.description || "" : m.reason || "" },
          h("span.option-title", {}, m.label || m.name, m.loaded ? h("span.badge.ok", { text: "ready", title: "Loaded in memory" }) : null,
            !m.available ? h("span.badge.warn", { text: "unavailable" }) : null),
          h("span.option-desc", { text: detail }))),
    );
  }
  if (unavailable.length) list.append(more);
  if (!available.length) showError($("#model-error"), "No model is available on this server.");
}

// ---------------------------------------------------------------------------- predictions and target

async function predict() {
  const box = $("#predictions");
  box.setAttribute("aria-busy", "true");
  box.replaceChildren(...Array.from({ length: 5 }, () => h("div.pred.skeleton", { "aria-hidden": "true" })));
  try {
    const answer = await api.predict(state.model, state.image.id, 5);
    state.predictions = answer.predictions;
    performance.mark("insights:predicted");
  } catch (e) {
    box.replaceChildren(h("p.muted.small.empty-note", { text: "No predictions." }));
    placeError(e, "target");
    return;
  } finally {
    box.removeAttribute("aria-busy");
  }
  if (!state.target && state.predictions.length) state.target = { index: state.predictions[0].index, label: state.predictions[0].label };
  renderPredictions();
  updateRunState();
}

function renderPredictions() {
  const box = $("#predictions");
  box.replaceChildren(
    ...state.predictions.map((p, i) => {
      const pct = Math.max(0, Math.min(100, p.prob * 100));
      const selected = state.target && state.target.index === p.index;
      return h("div", { role: "listitem" },
        h("button.pred", {
          type: "button",
          "data-index": p.index,
          "aria-pressed": String(!!selected),
          "aria-label": `${p.label}, ${pct.toFixed(1)} percent${selected ? ", target" : ""}`,
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

function renderTargetLine() {
  const line = $("#target-line");
  line.replaceChildren();
  if (!state.target) return;
  line.append(h("span.muted", { text: "Target " }), h("strong", { id: "target-label", text: state.target.label }), h("span.muted", { text: ` · class ${state.target.index}` }));
}

function setTarget(t) {
  state.target = t;
  showError($("#target-error"), "");
  for (const b of $$("#predictions .pred")) b.setAttribute("aria-pressed", String(Number(b.dataset.index) === t.index));
  renderTargetLine();
  updateRunState();
}

function setupClassSearch() {
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
      placeError(e, "target");
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

// ---------------------------------------------------------------------------- methods

function renderMethods() {
  const list = $("#method-list");
  list.replaceChildren();
  const families = [];
  for (const m of state.methods) if (!families.includes(m.family)) families.push(m.family);
  for (const fam of families) {
    const group = h("div.method-group", { role: "group", "aria-label": familyLabel(fam) }, h("p.group-label", { text: familyLabel(fam) }));
    for (const m of state.methods.filter((x) => x.family === fam)) {
      const id = `method-${m.id}`;
      const input = h("input.visually-hidden", { type: "radio", name: "method", id, value: m.id, checked: m.id === state.method.id });
      input.addEventListener("change", () => selectMethod(m.id));
      const cost = m.cost ? m.cost.forward + m.cost.backward : 0;
      group.append(h("div.option.method", {}, input,
        h("label", { for: id },
          h("span.option-title", {}, m.label,
            cost > 20 ? h("span.badge.slow", { text: "slow", title: `${cost} passes per image` }) : null),
          h("span.option-desc", { text: m.description }))));
    }
    list.append(group);
  }
}

function selectMethod(id) {
  state.method = state.methods.find((m) => m.id === id);
  showError($("#method-error"), "");
  state.form = paramForm($("#param-form"), state.method);
  $("#params-box").hidden = !(state.method.params || []).some((p) => p.type !== "tensor");
  updateRunState();
}

// ---------------------------------------------------------------------------- run

function updateRunState() {
  const ready = !!(state.image && state.model && state.target && state.method);
  $("#run").disabled = !ready || state.busy;
  $("#compare-run").disabled = !ready;
}

function setBusy(on, text = "Working…") {
  state.busy = on;
  $("#stage-busy").hidden = !on;
  $("#stage-busy-text").textContent = text;
  $("#run").classList.toggle("loading", on);
  updateRunState();
}

function showJob(job) {
  const box = $("#job");
  box.hidden = false;
  box.dataset.status = job.status;
  const pct = job.total ? Math.round((100 * job.done) / job.total) : 0;
  $("#job-progress").setAttribute("aria-valuenow", String(pct));
  $("#job-progress .progress-fill").style.width = `${pct}%`;
  const words = { queued: "Queued", running: `Running · ${pct}%`, done: "Done", failed: "Failed", cancelled: "Cancelled" };
  $("#job-status").textContent = words[job.status] || job.status;
  $("#job-eta").textContent = job.status === "running" && job.eta_s !== null && job.eta_s !== undefined ? `about ${duration(job.eta_s)} left` : "";
  $("#job-cancel").hidden = !(job.status === "queued" || job.status === "running");
}

async function run() {
  if ($("#run").disabled) return;
  clearErrors();
  const { ok, params } = state.form.read();
  if (!ok) {
    $("#params-box").open = true;
    return;
  }
  const body = { model: state.model, image: state.image.id, method: state.method.id, target: state.target.index, params };
  setBusy(true, `Running ${state.method.label}…`);
  $("#job").hidden = true;
  try {
    performance.mark("insights:explain-start");
    const meta = await explainToResult(body, {
      onJob: (job) => {
        state.job = job;
        showJob(job);
        $("#job-cancel").focus();
      },
      onProgress: (job) => {
        state.job = job;
        showJob(job);
      },
    });
    performance.mark("insights:explained");
    state.job = null;
    $("#job").hidden = true;
    await showResult(meta);
  } catch (e) {
    if (e.cancelled) {
      $("#job").hidden = false;
      $("#job-status").textContent = "Cancelled";
      $("#job-eta").textContent = "";
      $("#job-cancel").hidden = true;
      toast("Explanation cancelled");
    } else {
      $("#job").hidden = true;
      placeError(e);
    }
  } finally {
    setBusy(false);
  }
}

async function cancelJob() {
  if (!state.job) return;
  $("#job-cancel").disabled = true;
  try {
    showJob(await api.cancel(state.job.id));
  } catch (e) {
    placeError(e);
  } finally {
    $("#job-cancel").disabled = false;
  }
}

// ---------------------------------------------------------------------------- result

// Noise-tunnel settings mean nothing while the tunnel is off: leave them out of the summary.
const NOISE_ONLY = ["nt_samples", "stdevs", "seed"];

function describeParams(params) {
  const off = params && params.nt_type === "none";
  const entries = Object.entries(params || {}).filter(([k]) => !(off && NOISE_ONLY.includes(k)));
  if (!entries.length) return "defaults";
  return entries.map(([k, v]) => `${k}=${Array.isArray(v) ? v.join("×") : v === null ? "auto" : v}`).join(", ");
}

async function showResult(meta) {
  const asset = await loadResult(meta);
  state.result = meta;
  state.asset = asset;
  const canvas = $("#overlay");
  if (unbindHero) unbindHero();
  canvas.hidden = false;
  $("#preview").hidden = true;
  $("#stage-empty").hidden = true;
  $("#hero-side").hidden = false;
  $("#hero-actions").hidden = false;
  unbindHero = bindCanvas(canvas, asset, store, (a, view) => bar.update(a, view));
  performance.mark("insights:painted");
  if (state.onResult) state.onResult();
  const model = state.models.find((m) => m.name === meta.model);
  const method = state.methods.find((m) => m.id === meta.method);
  $("#hero-title").textContent = meta.target_label.charAt(0).toUpperCase() + meta.target_label.slice(1);
  if (matchMedia("(max-width: 820px)").matches) $("#hero").scrollIntoView({ behavior: "smooth", block: "start" });
  $("#hero-sub").replaceChildren(
    h("span", { id: "result-method", text: method ? method.label : meta.method }), " on ",
    h("span", { id: "result-model", text: model ? model.label || model.name : meta.model }),
  );
  canvas.setAttribute("aria-label", `${method ? method.label : meta.method} map for ${meta.target_label}`);
  const dl = $("#result-meta");
  const row = (k, v) => [h("dt", { text: k }), h("dd", { text: v })];
  dl.replaceChildren(
    ...row("Class", `${meta.target_label} (#${meta.target})`),
    ...row("Model", meta.model),
    ...row("Method", meta.method),
    ...row("Parameters", describeParams(meta.params)),
    ...(meta.layer ? row("Layer", meta.layer) : []),
    ...row("Range", `${Number(meta.range.min).toPrecision(3)} … ${Number(meta.range.max).toPrecision(3)}`),
    ...row("Time", meta.cached ? "cached" : `${Number(meta.elapsed_s).toFixed(2)} s`),
  );
  $("#download-npy").href = meta.links.npy;
  $("#download-npy").setAttribute("download", `${meta.method}-${meta.id.slice(0, 8)}.npy`);
  updateDownloadLink();
}

// The PNG download asks the server for the same view the canvas shows.
function updateDownloadLink() {
  if (!state.result) return;
  const a = $("#download-png");
  a.href = overlayUrl(state.result, store.view);
  a.setAttribute("download", `${state.result.method}-${state.result.id.slice(0, 8)}.png`);
}

async function share() {
  if (!state.result) return;
  const url = new URL(state.result.links.share, location.origin).href;
  const ok = await copyText(url);
  const btn = $("#share");
  const label = $("span", btn);
  label.textContent = ok ? "Link copied" : "Copy failed";
  btn.classList.add("confirmed");
  btn.dataset.url = url;
  toast(ok ? `Share link copied: ${url}` : `Copy this link: ${url}`);
  setTimeout(() => {
    label.textContent = "Copy share link";
    btn.classList.remove("confirmed");
  }, 2200);
}

// ---------------------------------------------------------------------------- compare

function renderCompareChoices() {
  const ml = $("#compare-method-list");
  ml.replaceChildren(
    ...state.methods.map((m, i) => {
      const id = `cmp-method-${m.id}`;
      return h("span.chip-check", {}, h("input", { type: "checkbox", id, value: m.id, checked: i < 2 }), h("label", { for: id, text: m.label }));
    }),
  );
  const mo = $("#compare-model-list");
  mo.replaceChildren(
    ...state.models.map((m) => {
      const id = `cmp-model-${m.name}`;
      return h("span.chip-check", { title: m.available ? "" : m.reason || "" },
        h("input", { type: "checkbox", id, value: m.name, disabled: !m.available, checked: m.available }),
        h("label", { for: id, text: m.label || m.name }));
    }),
  );
  const tabs = [$("#tab-methods"), $("#tab-models")];
  const select = (tab, focus) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(`#${t.getAttribute("aria-controls")}`).hidden = !on;
    }
    state.compareBy = tab.id === "tab-methods" ? "methods" : "models";
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

function compareCard(title, subtitle) {
  const canvas = h("canvas.card-canvas", { width: 224, height: 224, role: "img", "aria-label": `${title} map` });
  const fill = h("span.progress-fill");
  const progress = h("div.progress.small", { role: "progressbar", "aria-label": `${title} progress`, "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": "0" }, fill);
  const status = h("p.card-status.muted.small", { text: "Waiting…" });
  const cancel = h("button.btn.btn-ghost.btn-small", { type: "button", hidden: true, text: "Cancel" });
  const link = h("a.card-link", { hidden: true, text: "Open" });
  const frame = h("div.card-frame", {}, canvas, h("div.card-placeholder", {}, h("span.spinner")));
  const card = h("article.ccard.pending", {}, h("header", {}, h("h3", { text: title }), h("p.muted.small", { text: subtitle })), frame, progress, h("div.card-foot", {}, status, cancel, link));
  return { card, canvas, fill, progress, status, cancel, link };
}

const compareUnbinders = [];

/** Empties the comparison (its canvases stop following the view settings). */
function clearCompare() {
  while (compareUnbinders.length) compareUnbinders.pop()();
  $("#compare-grid").replaceChildren();
}

async function runCompare() {
  showError($("#compare-error"), "");
  const grid = $("#compare-grid");
  clearCompare();
  let jobs = [];
  if (state.compareBy === "methods") {
    const ids = $$("#compare-method-list input:checked").map((i) => i.value);
    if (ids.length < 2) return showError($("#compare-error"), "Choose at least two methods to compare.");
    jobs = ids.map((id) => {
      const m = state.methods.find((x) => x.id === id);
      return { title: m.label, subtitle: state.model, body: { model: state.model, image: state.image.id, method: id, target: state.target.index, params: {} } };
    });
  } else {
    const names = $$("#compare-model-list input:checked").map((i) => i.value);
    if (names.length < 1) return showError($("#compare-error"), "Choose at least one model.");
    const { ok, params } = state.form.read();
    if (!ok) return showError($("#compare-error"), "Fix the method's parameters first.");
    jobs = names.map((name) => ({ title: name, subtitle: state.method.label, body: { model: name, image: state.image.id, method: state.method.id, target: state.target.index, params } }));
  }
  const cards = jobs.map((j) => ({ ...j, ui: compareCard(j.title, j.subtitle) }));
  grid.append(...cards.map((c) => c.ui.card));
  $("#compare-run").disabled = true;
  // One at a time: the server shares a few cores between everyone.
  for (const c of cards) {
    const ui = c.ui;
    if (!ui.card.isConnected) break; // a new image cleared the comparison
    ui.status.textContent = "Running…";
    let jobId = null;
    ui.cancel.onclick = () => jobId && api.cancel(jobId).catch(() => {});
    try {
      const meta = await explainToResult(c.body, {
        onJob: (job) => {
          jobId = job.id;
          ui.cancel.hidden = false;
        },
        onProgress: (job) => {
          const pct = job.total ? Math.round((100 * job.done) / job.total) : 0;
          ui.fill.style.width = `${pct}%`;
          ui.progress.setAttribute("aria-valuenow", String(pct));
          ui.status.textContent = job.status === "running" ? `${pct}%${job.eta_s ? ` · ${duration(job.eta_s)} left` : ""}` : job.status;
        },
      });
      const asset = await loadResult(meta);
      if (!ui.card.isConnected) continue; // the comparison was cleared meanwhile
      compareUnbinders.push(bindCanvas(ui.canvas, asset, store));
      ui.card.classList.remove("pending");
      ui.card.classList.add("done");
      ui.status.textContent = meta.cached ? "cached" : `${Number(meta.elapsed_s).toFixed(2)} s`;
      ui.link.href = meta.links.share;
      ui.link.hidden = false;
    } catch (e) {
      ui.card.classList.remove("pending");
      ui.card.classList.add("failed");
      ui.status.textContent = e.cancelled ? "Cancelled" : plainError(e);
    } finally {
      ui.cancel.hidden = true;
    }
  }
  updateRunState();
}

// ---------------------------------------------------------------------------- start

async function start() {
  setupUpload();
  setupClassSearch();
  $("#run").addEventListener("click", run);
  $("#job-cancel").addEventListener("click", cancelJob);
  $("#share").addEventListener("click", share);
  $("#compare-run").addEventListener("click", runCompare);
  document.addEventListener("keydown", (ev) => {
    if ((ev.ctrlKey || ev.metaKey) && ev.key === "Enter") {
      ev.preventDefault();
      run();
    }
  });
  try {
    await loadOverlay();
  } catch (e) {
    showError($("#run-error"), `The dashboard could not load its settings: ${plainError(e)}`);
    return;
  }
  store = new ViewStore();
  bar = colorBar();
  $("#colorbar-slot").append(bar);
  const controls = viewControls(store);
  $("#view-slot").append(controls);
  const syncSwatch = () => {
    controls.setSwatch(state.asset ? colormapFor(state.asset, store.view) : store.view.cmap === "auto" ? autoColormap("all") : store.view.cmap);
    if (state.asset) controls.showSign(effectiveSign(state.asset, store.view));
  };
  store.subscribe(() => {
    syncSwatch();
    updateDownloadLink();
  });
  state.onResult = syncSwatch;
  try {
    const [models, methods] = await Promise.all([api.models(), api.methods()]);
    state.models = models;
    state.methods = methods;
  } catch (e) {
    showError($("#run-error"), `The dashboard could not load its settings: ${plainError(e)}`);
    return;
  }
  renderModels();
  state.method = state.methods[0];
  renderMethods();
  selectMethod(state.method.id);
  renderCompareChoices();
  loadSamples();
  document.body.dataset.ready = "true";
}

start();
