// Completeness of a result (docs/api.md, "Results"): how far the map is from summing to the change
// of the class score between the baseline and the image. Used by the dashboard and the share page.
import { h } from "./ui.js";

// Why an "exact" map can miss by more than the threshold, per method.
const REASONS = {
  deeplift: "DeepLIFT's rules cover ReLU-like activation modules and max pooling, not LayerNorm, " +
    "attention, multiplicative gates (squeeze-and-excitation) or activations called as functions " +
    "inside forward(), so on this model its map does not add up to the change of the score. " +
    "Use Integrated Gradients for this model.",
  integrated_gradients: "Either too few steps on the path from the baseline to the image (raise " +
    "n_steps), or the score jumps along the path, as with a normalisation layer that sees an all-zero " +
    "baseline (ConvNeXt): try another baseline value.",
};

function percent(delta) {
  const pct = 100 * delta;
  if (!Number.isFinite(pct)) return "∞%";
  if (pct < 0.01) return "< 0.01%";
  return `${pct >= 10 ? pct.toFixed(0) : Number(pct.toPrecision(2))}%`;
}

/** "0.02% off" (and "on average" for gradient SHAP's), or null without the property. */
export function completenessText(c) {
  if (!c || typeof c.delta !== "number") return null;
  return `${percent(c.delta)} off${c.kind === "expected" ? " (on average)" : ""}`;
}

/** Whether the result's map should carry the warning: an exact kind above its threshold. */
export function unreliable(meta) {
  const c = meta && meta.completeness;
  return !!c && c.kind === "exact" && typeof c.delta === "number" && !(c.delta <= (c.threshold ?? 0.05));
}

/** The warning element for an unreliable map, or null. */
export function completenessWarning(meta) {
  if (!unreliable(meta)) return null;
  const c = meta.completeness;
  let why = REASONS[meta.method] || "The method's assumptions do not hold for this model.";
  if (meta.method === "deeplift" && c.uncovered && c.uncovered.length) {
    why = `DeepLIFT's rules cover ReLU-like activations and max pooling, not this model's ${c.uncovered.join(", ")} ` +
      "(nor attention or multiplicative gates written as plain operations), so its map does not add up " +
      "to the change of the score. Use Integrated Gradients for this model.";
  }
  return h("div.completeness-warning", { id: "completeness-warning", role: "alert" },
    h("strong", { text: "This map is not reliable for this model." }),
    h("p", { text: `It should add up to the change of the class score from the baseline to the image, ` +
      `but misses it by ${percent(c.delta)}. ${why}` }));
}
