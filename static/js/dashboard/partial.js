// A job's partial map on the stage while the requested map is computed: occlusion's windows scored
// so far ("refining") or a path method's cheap preview. It is drawn like a result, with the
// page's current display settings, and put away when a result or an image takes the stage; a
// cancelled run leaves it on the stage, labelled as partial (it is never stored).
import { loadResult } from "../render.js";
import { $, h } from "../ui.js";
import { bindCanvas } from "../viewer.js";

const WORDS = { refining: "Refining", preview: "Preview · computing the full map" };

/** The partial-map layer of the stage; `store` is the view every canvas follows. */
export function partialView(store) {
  const stage = $("#canvas-stage");
  const canvas = h("canvas.overlay-canvas.partial-canvas", { id: "partial", width: 224, height: 224, role: "img", hidden: true });
  const note = h("p.stage-busy.partial-note", { id: "partial-note", role: "status", hidden: true });
  stage.insertBefore(canvas, $("#stage-busy"));
  stage.append(note);
  let unbind = null;
  let shown = 0; // the version of the last partial drawn (events may repeat one)
  let loading = null;

  function clear() {
    if (unbind) unbind();
    unbind = null;
    shown = 0;
    canvas.hidden = true;
    note.hidden = true;
    delete canvas.dataset.kind;
  }

  /** Draws a job's partial map (if it has a new one); answers the words for the busy pill. */
  async function update(job) {
    const p = job && job.partial;
    if (!p || !p.map || p.seq === shown) return null; // an event stream sends each map once
    shown = p.seq;
    const meta = { id: `partial-${job.id}`, signed: !!p.encoding && p.encoding.zero === 128, encoding: p.encoding, links: { input: p.input, map: p.map } };
    const mine = (loading = loadResult(meta));
    const asset = await mine;
    if (mine !== loading || shown !== p.seq) return null; // a newer one is on its way
    if (unbind) unbind();
    for (const other of ["#overlay", "#preview"]) $(other).hidden = true;
    $("#stage-empty").hidden = true;
    canvas.hidden = false;
    canvas.dataset.kind = p.kind;
    canvas.dataset.fraction = String(p.fraction);
    canvas.setAttribute("aria-label", `Partial attribution map (${p.kind}), ${Math.round(p.fraction * 100)}% of the work done`);
    unbind = bindCanvas(canvas, asset, store);
    return words(job);
  }

  /** The busy pill's words for a job with a partial map: what it is and how far the work is. */
  function words(job) {
    const pct = job.total ? Math.round((100 * job.done) / job.total) : 0;
    return `${WORDS[job.partial.kind] || "Refining"}… ${pct}%`;
  }

  /** After a cancel: the partial map stays, labelled. */
  function cancelled(job) {
    if (canvas.hidden) return;
    const pct = job && job.total ? Math.round((100 * job.done) / job.total) : Math.round(Number(canvas.dataset.fraction) * 100);
    note.textContent = `Cancelled · partial map at ${pct}%, not saved`;
    note.hidden = false;
  }

  // A result or an image taking the stage puts the partial map away.
  const watch = new MutationObserver(() => {
    if (!canvas.hidden && (!$("#overlay").hidden || !$("#preview").hidden)) clear();
  });
  for (const el of [$("#overlay"), $("#preview")]) watch.observe(el, { attributes: true, attributeFilter: ["hidden"] });

  return { update, words, cancelled, clear };
}
