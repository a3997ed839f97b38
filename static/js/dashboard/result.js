// The hero: the image or its explanation, the view controls and colour bar, the facts, and the
// share link and downloads (the PNG is the server's rendering of the view on the canvas).
import { completenessText, completenessWarning } from "../completeness.js";
import { autoColormap, overlayUrl } from "../overlay.js";
import { colormapFor, effectiveSign, loadResult } from "../render.js";
import { $, copyText, h, toast } from "../ui.js";
import { ViewStore, bindCanvas, colorBar, viewControls } from "../viewer.js";

// Noise-tunnel settings mean nothing while the tunnel is off: leave them out of the summary.
const NOISE_ONLY = ["nt_samples", "stdevs", "seed"];

function describeParams(params) {
  const off = params && params.nt_type === "none";
  const entries = Object.entries(params || {}).filter(([k]) => !(off && NOISE_ONLY.includes(k)));
  if (!entries.length) return "defaults";
  return entries.map(([k, v]) => `${k}=${Array.isArray(v) ? v.join("×") : v === null ? "auto" : v}`).join(", ");
}

/** The result view; its `store` holds the view settings every canvas on the page follows.
 * `hooks.shown(meta)` runs when a result is shown, `hooks.cleared()` when it is put away. */
export function resultView(state, hooks = {}) {
  const store = new ViewStore();
  const bar = colorBar();
  const controls = viewControls(store);
  const canvas = $("#overlay");
  let result = null;
  let asset = null;
  let shownImage = null; // the upload the shown result was made from (its metadata does not say)
  let unbind = null;
  $("#colorbar-slot").append(bar);
  $("#view-slot").append(controls);

  const syncSwatch = () => {
    controls.setSwatch(asset ? colormapFor(asset, store.view) : store.view.cmap === "auto" ? autoColormap("all") : store.view.cmap);
    if (asset) controls.showSign(effectiveSign(asset, store.view));
  };

  function updateDownload() {
    if (!result) return;
    const a = $("#download-png");
    a.href = overlayUrl(result, store.view);
    a.setAttribute("download", `${result.method}-${result.id.slice(0, 8)}.png`);
  }

  function clear() {
    if (unbind) unbind();
    unbind = null;
    asset = null;
    result = null;
    canvas.hidden = true;
    $("#completeness-warning")?.remove();
    $("#hero-side").hidden = true;
    $("#hero-actions").hidden = true;
    if (hooks.cleared) hooks.cleared();
  }

  /** Shows the current image; a result of another image is put away. */
  function showImage() {
    if (asset && shownImage !== state.image.id) clear();
    if (!asset) {
      $("#preview").src = state.image.url;
      $("#preview").hidden = false;
      $("#stage-empty").hidden = true;
    }
  }

  /** Invites an explanation of the top guess while no result is shown. */
  function invite(top) {
    if (asset || !top) return;
    $("#hero-title").textContent = "Ready to explain";
    $("#hero-sub").textContent = `The model's top guess is “${top.label}” (${(top.prob * 100).toFixed(1)}%). Pick a class and a method, then press Explain.`;
  }

  async function show(meta, imageId = state.image && state.image.id) {
    const loaded = await loadResult(meta);
    result = meta;
    asset = loaded;
    shownImage = imageId;
    if (unbind) unbind();
    canvas.hidden = false;
    $("#preview").hidden = true;
    $("#stage-empty").hidden = true;
    $("#hero-side").hidden = false;
    $("#hero-actions").hidden = false;
    unbind = bindCanvas(canvas, asset, store, (a, view) => bar.update(a, view));
    performance.mark("insights:painted");
    syncSwatch();
    const model = state.models.find((m) => m.name === meta.model);
    const method = state.methods.find((m) => m.id === meta.method);
    $("#hero-title").textContent = meta.target_label.charAt(0).toUpperCase() + meta.target_label.slice(1);
    if (matchMedia("(max-width: 820px)").matches) $("#hero").scrollIntoView({ behavior: "smooth", block: "start" });
    $("#hero-sub").replaceChildren(
      h("span", { id: "result-method", text: method ? method.label : meta.method }), " on ",
      h("span", { id: "result-model", text: model ? model.label || model.name : meta.model }),
    );
    canvas.setAttribute("aria-label", `${method ? method.label : meta.method} map for ${meta.target_label}`);
    const row = (k, v) => [h("dt", { text: k }), h("dd", { text: v })];
    $("#result-meta").replaceChildren(
      ...row("Class", `${meta.target_label} (#${meta.target})`),
      ...row("Model", meta.model),
      ...row("Method", meta.method),
      ...row("Parameters", describeParams(meta.params)),
      ...(meta.layer ? row("Layer", meta.layer) : []),
      ...row("Range", `${Number(meta.range.min).toPrecision(3)} … ${Number(meta.range.max).toPrecision(3)}`),
      ...(completenessText(meta.completeness) ? row("Completeness", completenessText(meta.completeness)) : []),
      ...row("Time", meta.cached ? "cached" : `${Number(meta.elapsed_s).toFixed(2)} s`),
    );
    const warning = completenessWarning(meta);
    $("#completeness-warning")?.remove();
    if (warning) $("#hero-side").prepend(warning);
    $("#download-npy").href = meta.links.npy;
    $("#download-npy").setAttribute("download", `${meta.method}-${meta.id.slice(0, 8)}.npy`);
    updateDownload();
    if (hooks.shown) hooks.shown(meta);
  }

  async function share() {
    if (!result) return;
    // PUBLIC_URL (base.html's meta tag) when the operator set one, else this page's own origin.
    const base = document.querySelector('meta[name="insights-public-url"]')?.content || location.origin;
    const url = base.replace(/\/$/, "") + new URL(result.links.share, location.origin).pathname;
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

  $("#share").addEventListener("click", share);
  store.subscribe(() => {
    syncSwatch();
    updateDownload();
  });
  return { store, show, showImage, invite };
}
