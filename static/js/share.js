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
