// The dashboard: image → model → class → method → map, plus comparisons and sharing. This entry
// loads the settings and wires the panels (static/js/dashboard/) to each other.
import { api } from "./api.js";
import { datasetView } from "./datasets/view.js";
import { comparePanel } from "./dashboard/compare.js";
import { clearErrors, stepError } from "./dashboard/errors.js";
import { boxTool } from "./dashboard/boxcheck.js";
import { methodPanel } from "./dashboard/methods.js";
import { defaultModel, modelPanel } from "./dashboard/models.js";
import { resultView } from "./dashboard/result.js";
import { qualityPanel } from "./dashboard/quality.js";
import { partialView } from "./dashboard/partial.js";
import { runPanel } from "./dashboard/run.js";
import { createState } from "./dashboard/state.js";
import { targetPanel } from "./dashboard/target.js";
import { uploadPanel } from "./dashboard/upload.js";
import { loadOverlay } from "./overlay.js";
import { $, plainError, toast } from "./ui.js";

async function start() {
  // A link to the dataset view shows it from the first paint (its panels reserve their space),
  // rather than the single view first and then a jump.
  if (location.hash.startsWith("#datasets")) {
    $("#view-image").hidden = true;
    $("#view-datasets").hidden = false;
  }
  const state = createState();
  try {
    [state.models] = await Promise.all([api.models(), loadOverlay()]);
    // The methods as described for the model the page starts with (its input size's defaults).
    state.methods = await api.methods(defaultModel(state.models));
  } catch (e) {
    stepError("run", `The dashboard could not load its settings: ${plainError(e)}`);
    return;
  }
  let quality = null;
  const result = resultView(state, { shown: (meta) => quality.open(meta), cleared: () => quality.close() });
  const box = boxTool($("#box-slot"));
  quality = qualityPanel(state, { store: result.store, box });
  const run = runPanel(state, { explained: (meta, imageId) => result.show(meta, imageId), partial: partialView(result.store) });
  const target = targetPanel(state, { changed: run.refresh });
  const compare = comparePanel(state, { store: result.store, refresh: run.refresh, box });
  /** A new image is in state.image: predict, with `preset` (or the top guess) as the target. */
  const loaded = async (preset = null) => {
    state.target = preset;
    compare.clear();
    result.showImage();
    run.refresh();
    await target.predict();
    result.invite(target.top());
  };
  const upload = uploadPanel(state, { loaded: () => loaded() });
  const methods = methodPanel(state, { changed: run.refresh });
  modelPanel(state, {
    changed: () => {
      methods.use(state.model).catch((e) => stepError("method", plainError(e)));
      compare.fit();
      if (state.image) target.predict();
      run.refresh();
    },
  });
  compare.fit(); // the default model is chosen now
  methods.fit();
  upload.loadSamples();
  await views(state, loaded, result.store);
  document.body.dataset.ready = "true";
}

/** The single-image view and, when the server has datasets, the dataset view: a switch in the
 * top bar, the view in the URL's hash (#datasets?…), opening a dataset item in the single view. */
async function views(state, loaded, viewStore) {
  let datasets = [];
  try {
    datasets = await api.datasets();
  } catch (e) {
    datasets = []; // not allowed, or none: the single view alone
  }
  if (!datasets.length) {
    $("#view-image").hidden = false;
    $("#view-datasets").hidden = true;
    return;
  }
  const tabs = { image: $("#tab-view-image"), datasets: $("#tab-view-datasets") };
  const useModel = (name) => {
    const radio = document.getElementById(`model-${name}`);
    if (radio && !radio.checked && !radio.disabled) {
      radio.checked = true;
      radio.dispatchEvent(new Event("change"));
    }
  };
  const view = datasetView(state, datasets, { open: openItem, useModel, view: viewStore });
  let shown = "image";

  function show(which, { fromHash = true } = {}) {
    if (which === shown) return;
    if (shown === "datasets") view.leave();
    shown = which;
    for (const [name, tab] of Object.entries(tabs)) {
      const on = name === which;
      tab.setAttribute("aria-selected", String(on));
      tab.tabIndex = on ? 0 : -1;
    }
    $("#view-image").hidden = which !== "image";
    $("#view-datasets").hidden = which !== "datasets";
    document.body.dataset.view = which;
    if (which === "datasets") view.enter(fromHash);
  }

  /** Switches view as a person does (a history entry, so Back returns). */
  function go(which) {
    if (which === shown) return;
    if (which === "image") {
      history.pushState(null, "", `${location.pathname}${location.search}`);
      show("image");
      window.scrollTo(0, 0);
    } else {
      history.pushState(null, "", `${location.pathname}${location.search}#datasets`);
      show("datasets", { fromHash: !visited });
      visited = true;
    }
  }
  let visited = false;

  async function openItem(name, item) {
    let answer;
    try {
      answer = await api.datasetImage(name, item.index);
    } catch (e) {
      toast(`Could not open ${item.key}: ${plainError(e)}`);
      return;
    }
    go("image");
    clearErrors(state);
    state.image = answer.image;
    const thumb = $("#thumb");
    thumb.src = answer.image.url;
    thumb.hidden = false;
    $("#dropzone").classList.add("has-image");
    const preset = await trueTarget(state, answer.true);
    await loaded(preset);
    toast(preset ? `${answer.key} · target: its true label “${preset.label}”` : `${answer.key} opened`);
    if (preset && !state.busy) {
      $("#hero-title").textContent = answer.key;
      $("#hero-sub").textContent = `From the dataset “${name}”, labelled “${preset.label}”: the class to explain is its true label. Pick another class or a method, then press Explain.`;
    }
  }

  for (const [name, tab] of Object.entries(tabs)) {
    tab.addEventListener("click", () => go(name));
    tab.addEventListener("keydown", (ev) => {
      if (ev.key === "ArrowRight" || ev.key === "ArrowLeft") {
        ev.preventDefault();
        const other = name === "image" ? "datasets" : "image";
        go(other);
        tabs[other].focus();
      }
    });
  }
  window.addEventListener("popstate", () => {
    const which = location.hash.startsWith("#datasets") ? "datasets" : "image";
    if (which === "datasets" && shown === "datasets") view.enter(true); // a link or a typed address
    else show(which, { fromHash: which === "datasets" && !visited });
    visited = visited || which === "datasets";
  });
  $("#viewswitch").hidden = false;
  if (location.hash.startsWith("#datasets")) {
    visited = true;
    $("#view-datasets").hidden = true; // shown for real (state, tabs) just below
    show("datasets");
  }
}

/** The item's true class as a target of the current model (the datasets' labels are the default
 * model's; another model's index is found by the label's name), or null for its top guess. */
async function trueTarget(state, truth) {
  if (!truth) return null;
  const model = state.models.find((m) => m.name === state.model) || {};
  if (model.default) return { index: truth.index, label: truth.label };
  try {
    const found = await api.labels(state.model, truth.label, 8);
    const same = found.find((r) => r.label.toLowerCase() === truth.label.toLowerCase());
    return same ? { index: same.index, label: same.label } : null;
  } catch (e) {
    return null;
  }
}

start();
