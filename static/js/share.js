// The share page: the stored result drawn with the same viewer as the dashboard; nothing is recomputed.
import { api } from "./api.js";
import { completenessText, completenessWarning } from "./completeness.js";
import { loadOverlay, overlayUrl } from "./overlay.js";
import { colormapFor, effectiveSign, loadResult } from "./render.js";
import { $, copyText, h, plainError, toast } from "./ui.js";
import { ViewStore, bindCanvas, colorBar, viewControls } from "./viewer.js";
import { qualityCard, sanityStrip } from "./quality-view.js";

/** The stored quality measurements (embedded by the server) as cards, and the sanity strip. */
function showQuality(meta, store) {
  const data = document.getElementById("quality-data");
  if (!data) return;
  const list = JSON.parse(data.textContent);
  const cards = list.filter((q) => q.metric !== "sanity_check").map(qualityCard);
  $("#share-quality-cards").replaceChildren(...cards);
  const sanity = list.find((q) => q.metric === "sanity_check");
  if (sanity) {
    $("#share-sanity").replaceChildren(sanityStrip(sanity, meta, store).root);
    $("#share-sanity").hidden = false;
  }
  $("#share-quality-list").hidden = true; // the cards say it all, with the curves
  const point = list.find((q) => q.metric === "pointing");
  if (point && Array.isArray(point.params.box) && meta.size) showBox(point.params.box, meta.size);
}

/** The box of the stored box check, outlined on the image (the canvas covers its square stage). */
function showBox([x0, y0, x1, y1], [H, W]) {
  const stage = $(".canvas-stage");
  const rect = h("div.box-rect.static", { role: "img", "aria-label": `Box of the box check: ${x0}, ${y0}, ${x1}, ${y1}` });
  stage.append(h("div.box-layer", {}, rect));
  const place = () => {
    const r = stage.getBoundingClientRect();
    const scale = Math.max(r.width / W, r.height / H);
    const ox = (r.width - W * scale) / 2;
    const oy = (r.height - H * scale) / 2;
    rect.style.left = `${ox + x0 * scale}px`;
    rect.style.top = `${oy + y0 * scale}px`;
    rect.style.width = `${(x1 - x0) * scale}px`;
    rect.style.height = `${(y1 - y0) * scale}px`;
  };
  new ResizeObserver(place).observe(stage);
}

async function start() {
  const id = $("#share").dataset.result;
  const link = document.querySelector('link[rel="canonical"]')?.href || location.href;  // PUBLIC_URL's when set
  $("#share-copy").addEventListener("click", async () => {
    const ok = await copyText(link);
    $("#share-copy span").textContent = ok ? "Link copied" : "Copy failed";
    toast(ok ? "Link copied" : `Copy this link: ${link}`);
    setTimeout(() => ($("#share-copy span").textContent = "Copy link"), 2200);
  });
  try {
    const [meta] = await Promise.all([api.result(id), loadOverlay()]);
    const store = new ViewStore();
    const bar = colorBar();
    $("#colorbar-slot").append(bar);
    const controls = viewControls(store, "share");
    $("#view-slot").append(controls);
    const text = completenessText(meta.completeness);
    if (text) {
      $(".share-facts").append(h("span.fact", {}, h("b", { text: "Completeness" }), h("span", { id: "fact-completeness", text })));
    }
    const warning = completenessWarning(meta);
    if (warning) $("#view-slot").before(warning);
    const asset = await loadResult(meta);
    bindCanvas($("#overlay"), asset, store, (a, view) => {
      bar.update(a, view);
      controls.showSign(effectiveSign(a, view));
      controls.setSwatch(colormapFor(a, view));
    });
    store.subscribe((v) => ($("#download-png").href = overlayUrl(meta, v)));
    showQuality(meta, store);
    document.body.dataset.ready = "true";
  } catch (e) {
    $("#view-slot").replaceChildren(h("p.field-error", { role: "alert", text: `The map could not be loaded: ${plainError(e)}` }));
  }
}

start();
