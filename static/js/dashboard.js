// The dashboard: image → model → class → method → map, plus comparisons and sharing. This entry
// loads the settings and wires the panels (static/js/dashboard/) to each other.
import { api } from "./api.js";
import { comparePanel } from "./dashboard/compare.js";
import { stepError } from "./dashboard/errors.js";
import { methodPanel } from "./dashboard/methods.js";
import { defaultModel, modelPanel } from "./dashboard/models.js";
import { resultView } from "./dashboard/result.js";
import { runPanel } from "./dashboard/run.js";
import { createState } from "./dashboard/state.js";
import { targetPanel } from "./dashboard/target.js";
import { uploadPanel } from "./dashboard/upload.js";
import { loadOverlay } from "./overlay.js";
import { plainError } from "./ui.js";

async function start() {
  const state = createState();
  try {
    [state.models] = await Promise.all([api.models(), loadOverlay()]);
    // The methods as described for the model the page starts with (its input size's defaults).
    state.methods = await api.methods(defaultModel(state.models));
  } catch (e) {
    stepError("run", `The dashboard could not load its settings: ${plainError(e)}`);
    return;
  }
  const result = resultView(state);
  const run = runPanel(state, { explained: (meta, imageId) => result.show(meta, imageId) });
  const target = targetPanel(state, { changed: run.refresh });
  const compare = comparePanel(state, { store: result.store, refresh: run.refresh });
  const upload = uploadPanel(state, {
    loaded: async () => {
      state.target = null;
      compare.clear();
      result.showImage();
      run.refresh();
      await target.predict();
      result.invite(target.top());
    },
  });
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
  document.body.dataset.ready = "true";
}

start();
