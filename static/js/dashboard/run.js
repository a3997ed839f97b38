// The Explain button: runs the chosen explanation, inline or as a job with progress and cancel.
import { explainToResult } from "../api.js";
import { $, showJobIn, toast } from "../ui.js";
import { clearErrors, placeError } from "./errors.js";

/** Wires Explain (and Ctrl+Enter) and the job box; `explained(meta, imageId)` shows each new result,
 * `partial` (partial.js), if given, a job's partial map while it runs. */
export function runPanel(state, { explained, partial = null }) {
  const button = $("#run");
  const box = $("#job");
  let cancelJob = null; // cancels the running job for this page (explainToResult's onJob gives it)
  let last = null; // the job's latest state

  /** Enables Explain and Compare when everything is chosen (Explain also waits for a run). */
  function refresh() {
    button.disabled = !state.ready() || state.busy;
    $("#compare-run").disabled = !state.ready();
  }

  function setBusy(on, text = "Working…") {
    state.busy = on;
    $("#stage-busy").hidden = !on;
    $("#stage-busy-text").textContent = text;
    button.classList.toggle("loading", on);
    refresh();
  }

  function showJob(j) {
    last = j;
    showJobIn(box, "job", j, (pct) => `Running · ${pct}%`);
    if (!partial || !j.partial || j.status !== "running") return;
    $("#stage-busy-text").textContent = partial.words(j);
    partial.update(j).catch(() => {}); // a partial map that does not load is skipped; the result follows
  }

  async function run() {
    if (button.disabled) return;
    clearErrors(state);
    const { ok, params } = state.form.read();
    if (!ok) {
      $("#params-box").open = true;
      return;
    }
    const body = { model: state.model, image: state.image.id, method: state.method.id, target: state.target.index, params };
    setBusy(true, `Running ${state.method.label}…`);
    box.hidden = true;
    last = null;
    if (partial) partial.clear();
    try {
      performance.mark("insights:explain-start");
      const meta = await explainToResult(body, {
        onJob: (j, cancel) => {
          cancelJob = cancel;
          showJob(j);
          $("#job-cancel").focus();
        },
        onProgress: showJob,
      });
      performance.mark("insights:explained");
      box.hidden = true;
      await explained(meta, body.image);
    } catch (e) {
      if (e.cancelled) {
        box.hidden = false;
        $("#job-status").textContent = "Cancelled";
        $("#job-eta").textContent = "";
        $("#job-cancel").hidden = true;
        if (partial) partial.cancelled(last);
        toast("Explanation cancelled");
      } else {
        box.hidden = true;
        if (partial) partial.clear();
        placeError(state, e);
      }
    } finally {
      cancelJob = null;
      setBusy(false);
    }
  }

  async function cancel() {
    if (!cancelJob) return;
    $("#job-cancel").disabled = true;
    try {
      await cancelJob(); // the run ends as cancelled (above)
    } catch (e) {
      placeError(state, e);
    } finally {
      $("#job-cancel").disabled = false;
    }
  }

  button.addEventListener("click", run);
  $("#job-cancel").addEventListener("click", cancel);
  document.addEventListener("keydown", (ev) => {
    if ((ev.ctrlKey || ev.metaKey) && ev.key === "Enter") {
      ev.preventDefault();
      run();
    }
  });
  return { refresh };
}
