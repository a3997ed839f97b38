// Batch explanation: the selected items (or every item matching the filter) explained with the
// single-image view's current method and parameters, as one job with progress and cancel. The
// job is followed by the same code as the single view's (api.js followSubmitted).
import { api, followSubmitted } from "../api.js";
import { $, duration, plainError, segmented, showError, showJobIn, toast } from "../ui.js";

/** context() → {dataset, model, items: [..] or null, filter, count}; done(answer) gets the job's result. */
export function batchPanel(state, { context, done }) {
  const button = $("#ds-explain");
  const box = $("#ds-job");
  let target = "predicted";
  let cancelJob = null;
  let running = false;

  $("#ds-target-slot").append(segmented("ds-target", "Class to explain", [
    { value: "predicted", label: "Predicted", title: "Each item's top predicted class" },
    { value: "true", label: "True label", title: "Each item's true class" },
  ], target, (v) => { target = v; }));

  function refresh() {
    const { count } = context();
    button.textContent = running ? "Explaining…" : `Explain ${count} selected`;
    button.disabled = running || !count || !state.method || !state.form;
    $("#ds-method-name").textContent = state.method ? state.method.label : "";
  }

  function showJob(j) {
    showJobIn(box, "ds-job", j, (pct) => `Explaining · ${pct}%`);
  }

  async function run() {
    if (button.disabled) return;
    showError($("#ds-explain-error"), "");
    const { ok, params } = state.form.read();
    if (!ok) {
      $("#ds-method").open = true;
      showError($("#ds-explain-error"), "A parameter of the method is not valid: see the form above.");
      return;
    }
    const ctx = context();
    const body = { model: ctx.model, method: state.method.id, params, target };
    if (ctx.items) body.items = ctx.items;
    else body.filter = ctx.filter;
    running = true;
    refresh();
    $("#ds-job-counts").hidden = true;
    try {
      const job = await api.explainDataset(ctx.dataset, body);
      const final = await followSubmitted(job, {
        onJob: (j, cancel) => {
          cancelJob = cancel;
          showJob(j);
        },
        onProgress: showJob,
      });
      const r = final.result;
      const counts = $("#ds-job-counts");
      counts.replaceChildren();
      counts.append(`${r.explained} explained · ${r.cached} cached · `, Object.assign(document.createElement("span"), { className: r.failed ? "bad" : "", textContent: `${r.failed} failed` }));
      counts.hidden = false;
      box.hidden = true;
      done(r);
      toast(`${r.rows.length} ${r.rows.length === 1 ? "item" : "items"} explained with ${state.method.label}`);
    } catch (e) {
      if (e.cancelled) {
        box.hidden = false;
        box.dataset.status = "cancelled";
        $("#ds-job-status").textContent = "Cancelled";
        $("#ds-job-eta").textContent = "";
        $("#ds-job-cancel").hidden = true;
        toast("Batch explanation cancelled");
      } else {
        box.hidden = true;
        showError($("#ds-explain-error"), describe(e));
      }
    } finally {
      cancelJob = null;
      running = false;
      refresh();
    }
  }

  function describe(e) {
    if (e.code === "over_budget") return `Too much for one batch: ${plainError(e)}`;
    if (e.code === "busy") return `The server is busy${e.retryAfter ? ` (try again in ${duration(e.retryAfter)})` : ""}: ${plainError(e)}`;
    return plainError(e);
  }

  button.addEventListener("click", run);
  $("#ds-job-cancel").addEventListener("click", async () => {
    if (!cancelJob) return;
    $("#ds-job-cancel").disabled = true;
    try {
      await cancelJob();
    } catch (e) {
      showError($("#ds-explain-error"), plainError(e));
    } finally {
      $("#ds-job-cancel").disabled = false;
    }
  });
  return { refresh, busy: () => running };
}
