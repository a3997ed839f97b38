// The Quality panel of the shown result: deletion and insertion against random maps, any other
// metric through a form built from its schema, the sanity strip and the box check. Measurements
// run one at a time in the panel's job box (progress, time left, cancel) and are stored with the
// result, so opening it again shows them without recomputing.
import { paramForm } from "../form.js";
import { measure, metrics, storedQuality } from "../quality-api.js";
import { latestByMetric, qualityCard, sanityStrip } from "../quality-view.js";
import { $, h, plainError, showError, showJobIn, toast } from "../ui.js";

const OWN_BUTTONS = new Set(["sanity_check", "pointing"]); // they have their own controls

/** The panel; `store` is the page's view (the sanity maps follow it), `box` the box tool. */
export function qualityPanel(state, { store, box }) {
  const panel = $("#quality");
  const cards = $("#q-cards");
  const jobBox = $("#q-job");
  const error = $("#q-error");
  let meta = null;
  let strip = null;
  let queue = Promise.resolve();
  let cancelJob = null;
  let generation = 0; // bumped when the result changes or the work is cancelled: queued work is dropped
  let form = null;
  let list = [];

  function setBusy(on) {
    panel.classList.toggle("busy", on);
    for (const b of [$("#q-measure"), $("#q-sanity-run"), $("#q-other-run")]) b.disabled = on;
  }

  /** Puts a measurement in its place: sanity in the strip, the rest as cards (one per metric). */
  function place(q) {
    if (!meta || q.result !== meta.id) return;
    if (q.metric === "sanity_check") {
      if (strip) strip.stop();
      strip = sanityStrip(q, meta, store);
      $("#q-sanity").replaceChildren(strip.root);
      $("#q-sanity").hidden = false;
      return;
    }
    const card = qualityCard(q);
    const old = cards.querySelector(`.qcard[data-metric="${q.metric}"]`);
    if (old) old.replaceWith(card);
    else cards.append(card);
    cards.hidden = false;
    $("#q-empty").hidden = true;
  }

  /** Queues one measurement for the shown result; resolves with Q, or null when dropped or failed. */
  function run(metric, params, words) {
    const gen = generation;
    const rid = meta.id;
    const task = queue.then(async () => {
      if (gen !== generation) return null;
      setBusy(true);
      showError(error, "");
      const show = (j) => showJobIn(jobBox, "q-job", j, (p) => `${words} · ${p}%`);
      show({ status: "running", done: 0, total: 0, eta_s: null });
      try {
        const q = await measure(rid, metric, params, {
          onJob: (j, cancel) => {
            cancelJob = cancel;
          },
          onProgress: show,
        });
        jobBox.hidden = true;
        place(q);
        return q;
      } catch (e) {
        if (e.cancelled) {
          show({ status: "cancelled", done: 0, total: 0 });
          toast(`${words} cancelled`);
          // The word stays a moment, then the box goes (unless another measurement took it).
          setTimeout(() => {
            if (jobBox.dataset.status === "cancelled") jobBox.hidden = true;
          }, 4000);
        } else {
          jobBox.hidden = true;
          showError(error, `${words}: ${plainError(e)}`);
        }
        return null;
      } finally {
        cancelJob = null;
        setBusy(false);
      }
    });
    queue = task.catch(() => null);
    return task;
  }

  async function measureFaithfulness() {
    const del = await run("deletion", {}, "Deletion");
    if (del) await run("insertion", {}, "Insertion");
  }

  async function pointing(b) {
    if (!meta || !b) return;
    await run("pointing", { box: box.pixels(meta.size) }, "Box check");
  }

  async function otherRun() {
    const id = $("#q-metric").value;
    if (!form) return;
    const { ok, params } = form.read();
    if (!ok) return;
    const m = list.find((x) => x.id === id);
    await run(id, params, m ? m.label : id);
  }

  function pickMetric() {
    const m = list.find((x) => x.id === $("#q-metric").value);
    if (!m) return;
    $("#q-metric-desc").textContent = `${m.description}${m.better ? ` (${m.better} is better)` : ""}`;
    form = paramForm($("#q-form"), { id: `q-${m.id}`, params: m.params });
  }

  async function loadMetrics() {
    try {
      list = await metrics();
    } catch (e) {
      $("#q-more").hidden = true;
      return;
    }
    const choices = list.filter((m) => !OWN_BUTTONS.has(m.id));
    $("#q-metric").replaceChildren(...choices.map((m) => h("option", { value: m.id, text: m.label })));
    $("#q-more").hidden = !choices.length;
    $("#q-sanity-run").hidden = !list.some((m) => m.id === "sanity_check");
    $("#q-box-section").hidden = !list.some((m) => m.id === "pointing");
    if (choices.length) pickMetric();
  }

  /** Shows the panel for a freshly shown result, with what is stored for it. */
  async function open(m) {
    close();
    meta = m;
    panel.hidden = false;
    box.setSize(m.size);
    box.enable(true);
    const rid = m.id;
    let stored = [];
    try {
      stored = await storedQuality(rid);
    } catch (e) {
      stored = [];
    }
    if (!meta || meta.id !== rid) return;
    for (const q of latestByMetric(stored)) place(q);
    // A stored box check brings its box back, unless one is drawn already (then it is measured).
    const point = latestByMetric(stored).find((q) => q.metric === "pointing");
    if (box.get()) pointing(box.get());
    else if (point && Array.isArray(point.params.box) && m.size) {
      const [x0, y0, x1, y1] = point.params.box;
      const [H, W] = m.size;
      box.set({ x0: x0 / W, y0: y0 / H, x1: x1 / W, y1: y1 / H }, { quiet: true });
    }
  }

  /** Puts the panel away (a new image, or nothing shown). */
  function close() {
    generation++;
    if (cancelJob) cancelJob().catch(() => {});
    meta = null;
    if (strip) strip.stop();
    strip = null;
    cards.replaceChildren();
    $("#q-sanity").replaceChildren();
    $("#q-sanity").hidden = true;
    $("#q-empty").hidden = false;
    jobBox.hidden = true;
    showError(error, "");
    panel.hidden = true;
    box.enable(false);
  }

  $("#q-measure").addEventListener("click", measureFaithfulness);
  $("#q-sanity-run").addEventListener("click", () => run("sanity_check", {}, "Sanity check"));
  $("#q-other-run").addEventListener("click", otherRun);
  $("#q-metric").addEventListener("change", pickMetric);
  $("#q-job-cancel").addEventListener("click", async () => {
    generation++; // what is queued behind it is dropped too
    if (cancelJob) {
      $("#q-job-cancel").disabled = true;
      try {
        await cancelJob();
      } catch (e) {
        showError(error, plainError(e));
      } finally {
        $("#q-job-cancel").disabled = false;
      }
    }
  });
  box.subscribe((b) => {
    if (b) pointing(b);
    else cards.querySelector('.qcard[data-metric="pointing"]')?.remove();
  });
  loadMetrics();
  return { open, close };
}
