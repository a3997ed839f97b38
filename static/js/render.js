// Draws an attribution map over its input in a canvas, the way Captum's visualize_image_attr
// does, entirely in the browser: changing the view never asks the server for anything.
import { autoColormap, lut } from "./colormaps.js";

export const MODES = [
  { value: "original_image", label: "Image", title: "Original image" },
  { value: "heat_map", label: "Heat", title: "Heat map" },
  { value: "blended_heat_map", label: "Blend", title: "Heat map blended over the grayscale image" },
  { value: "masked_image", label: "Mask", title: "Image masked by the map's magnitude" },
  { value: "alpha_scaling", label: "Alpha", title: "Image with opacity scaled by the map's magnitude" },
];

export const SIGNS = [
  { value: "all", label: "All" },
  { value: "positive", label: "Positive" },
  { value: "negative", label: "Negative" },
  { value: "absolute_value", label: "Absolute" },
];

export const DEFAULT_VIEW = { mode: "blended_heat_map", sign: "auto", cmap: "auto", alpha: 0.5, outlier: 2 };

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.decoding = "async";
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`could not load ${url}`));
    img.src = url;
  });
}

function pixels(img, w, h) {
  const c = document.createElement("canvas");
  c.width = w;
  c.height = h;
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(img, 0, 0, w, h);
  return ctx.getImageData(0, 0, w, h).data;
}

/**
 * Fetches the input view and the grayscale map of a result and decodes the map into
 * attribution values with the result's encoding (zero point and scale).
 */
export async function loadResult(meta) {
  const [input, map] = await Promise.all([loadImage(meta.links.input), loadImage(meta.links.map)]);
  const w = map.naturalWidth;
  const h = map.naturalHeight;
  const rgb = pixels(input, w, h);
  const gray = pixels(map, w, h);
  const zero = Number(meta.encoding.zero);
  const scale = Number(meta.encoding.scale);
  const span = 255 - zero || 1;
  const values = new Float32Array(w * h);
  for (let i = 0; i < values.length; i++) values[i] = ((gray[i * 4] - zero) / span) * scale;
  return { meta, w, h, rgb, values, signed: !!meta.signed, thresholds: new Map() };
}

// Captum's threshold: the value at which the cumulative sum of the sorted magnitudes reaches
// (100 - outlier)% of the total, so the brightest few percent of the mass saturate.
function cumulativeThreshold(sorted, percentile) {
  let total = 0;
  for (let i = 0; i < sorted.length; i++) total += sorted[i];
  const goal = total * 0.01 * percentile;
  let run = 0;
  for (let i = 0; i < sorted.length; i++) {
    run += sorted[i];
    if (run >= goal) return sorted[i];
  }
  return sorted[sorted.length - 1] || 0;
}

function sortedMagnitudes(asset, sign) {
  const key = `sorted:${sign}`;
  if (!asset.thresholds.has(key)) {
    const v = asset.values;
    const m = new Float32Array(v.length);
    for (let i = 0; i < v.length; i++) {
      const x = v[i];
      m[i] = sign === "positive" ? Math.max(x, 0) : sign === "negative" ? Math.max(-x, 0) : Math.abs(x);
    }
    m.sort();
    asset.thresholds.set(key, m);
  }
  return asset.thresholds.get(key);
}

/** The sign a view actually uses: "auto" is "all" for signed maps and "positive" otherwise. */
export function effectiveSign(asset, view) {
  if (view.sign && view.sign !== "auto") return view.sign;
  return asset.signed ? "all" : "positive";
}

/**
 * Normalises the map to [-1, 1] (sign "all") or [0, 1] (other signs) as Captum does and
 * returns {norm, threshold, sign}.
 */
export function normalise(asset, view) {
  const sign = effectiveSign(asset, view);
  const outlier = Math.min(50, Math.max(0, Number(view.outlier)));
  const key = `${sign}:${outlier}`;
  if (!asset.thresholds.has(key)) {
    const threshold = cumulativeThreshold(sortedMagnitudes(asset, sign), 100 - outlier);
    const v = asset.values;
    const norm = new Float32Array(v.length);
    const t = threshold > 0 ? threshold : 1;
    for (let i = 0; i < v.length; i++) {
      let x = v[i];
      if (sign === "positive") x = Math.max(x, 0);
      else if (sign === "negative") x = Math.max(-x, 0);
      else if (sign === "absolute_value") x = Math.abs(x);
      norm[i] = Math.max(-1, Math.min(1, x / t));
    }
    asset.thresholds.set(key, { norm, threshold, sign });
  }
  return asset.thresholds.get(key);
}

export function colormapFor(asset, view) {
  return view.cmap && view.cmap !== "auto" ? view.cmap : autoColormap(effectiveSign(asset, view));
}

/** Paints the view of the result into the canvas (sized to the map). */
export function draw(canvas, asset, view) {
  const { w, h, rgb } = asset;
  if (canvas.width !== w || canvas.height !== h) {
    canvas.width = w;
    canvas.height = h;
  }
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const out = ctx.createImageData(w, h);
  const px = out.data;
  const mode = view.mode || "blended_heat_map";
  const { norm, sign } = normalise(asset, view);
  const table = lut(colormapFor(asset, view));
  const alpha = Math.min(1, Math.max(0, Number(view.alpha)));
  const centred = sign === "all"; // the colour map spans [-1, 1] instead of [0, 1]
  for (let i = 0, p = 0; i < norm.length; i++, p += 4) {
    const r = rgb[p], g = rgb[p + 1], b = rgb[p + 2];
    const n = norm[i];
    const k = Math.round((centred ? (n + 1) / 2 : Math.max(0, n)) * 255) * 3;
    px[p + 3] = 255;
    if (mode === "original_image") {
      px[p] = r; px[p + 1] = g; px[p + 2] = b;
    } else if (mode === "heat_map") {
      px[p] = table[k]; px[p + 1] = table[k + 1]; px[p + 2] = table[k + 2];
    } else if (mode === "blended_heat_map") {
      // Captum shows the grayscale image under the heat map drawn at the chosen opacity.
      const grey = (r + g + b) / 3;
      px[p] = grey * (1 - alpha) + table[k] * alpha;
      px[p + 1] = grey * (1 - alpha) + table[k + 1] * alpha;
      px[p + 2] = grey * (1 - alpha) + table[k + 2] * alpha;
    } else {
      // Masking and alpha scaling need a magnitude in [0, 1]; "all" uses |value|.
      const m = Math.abs(n);
      if (mode === "masked_image") {
        px[p] = r * m; px[p + 1] = g * m; px[p + 2] = b * m;
      } else {
        px[p] = r; px[p + 1] = g; px[p + 2] = b; px[p + 3] = 255 * m;
      }
    }
  }
  ctx.putImageData(out, 0, 0);
}

/** The value range a colour bar shows for the view: {lo, hi, cmap, sign, active}. */
export function scaleFor(asset, view) {
  const { threshold, sign } = normalise(asset, view);
  const cmap = colormapFor(asset, view);
  const mode = view.mode || "blended_heat_map";
  const active = mode === "heat_map" || mode === "blended_heat_map";
  if (sign === "all") return { lo: -threshold, hi: threshold, cmap, sign, active };
  if (sign === "negative") return { lo: 0, hi: -threshold, cmap, sign, active };
  return { lo: 0, hi: threshold, cmap, sign, active };
}

/** Short human number for scale labels. */
export function fmt(x) {
  if (!Number.isFinite(x)) return "–";
  const a = Math.abs(x);
  if (a === 0) return "0";
  if (a >= 1000 || a < 0.001) return x.toExponential(1);
  return Number(x.toPrecision(2)).toString();
}
