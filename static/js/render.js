// Draws an attribution map over its input in a canvas by the rules of insights/overlay.py (read
// them there), entirely in the browser: changing the view never asks the server for anything.
// The server renders overlay.png from the same map.png by the same rules, value for value.
import { autoColormap, loadImage, lut, pixelsOf, spec } from "./overlay.js";

// Bilinear, pixel centres aligned, edges clamped: overlay.resample.
function resample(m, w, h, width, height) {
  const out = new Float64Array(width * height);
  for (let y = 0; y < height; y++) {
    const ys = Math.min(h - 1, Math.max(0, (y + 0.5) * (h / height) - 0.5));
    const y0 = Math.floor(ys), y1 = Math.min(y0 + 1, h - 1), fy = ys - y0;
    for (let x = 0; x < width; x++) {
      const xs = Math.min(w - 1, Math.max(0, (x + 0.5) * (w / width) - 0.5));
      const x0 = Math.floor(xs), x1 = Math.min(x0 + 1, w - 1), fx = xs - x0;
      const top = m[y0 * w + x0] * (1 - fx) + m[y0 * w + x1] * fx;
      const bottom = m[y1 * w + x0] * (1 - fx) + m[y1 * w + x1] * fx;
      out[y * width + x] = top * (1 - fy) + bottom * fy;
    }
  }
  return out;
}

/**
 * Fetches the input view and the 8-bit map of a result. The map is kept as levels (pixel − zero):
 * the encoding's scale cancels in the normalisation and only labels the colour bar.
 */
export async function loadResult(meta) {
  const [input, map] = await Promise.all([loadImage(meta.links.input), loadImage(meta.links.map)]);
  const w = input.naturalWidth;
  const h = input.naturalHeight;
  const gray = pixelsOf(map);
  const zero = Number(meta.encoding.zero);
  let values = new Float64Array(map.naturalWidth * map.naturalHeight);
  for (let i = 0; i < values.length; i++) values[i] = gray[i * 4] - zero;
  if (map.naturalWidth !== w || map.naturalHeight !== h) values = resample(values, map.naturalWidth, map.naturalHeight, w, h);
  const unit = Number(meta.encoding.scale) / (255 - zero || 1); // attribution per level
  return { meta, w, h, rgb: pixelsOf(input), values, unit, signed: !!meta.signed, cache: new Map() };
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
  return sorted.length ? sorted[sorted.length - 1] : 0;
}

function kept(x, sign) {
  if (sign === "positive") return Math.max(x, 0);
  if (sign === "negative") return Math.max(-x, 0);
  if (sign === "absolute_value") return Math.abs(x);
  return x;
}

/** The sign a view actually uses: "auto" is "all" for signed maps and "positive" otherwise. */
export function effectiveSign(asset, view) {
  if (view.sign && view.sign !== "auto") return view.sign;
  return asset.signed ? "all" : "positive";
}

// Masking and alpha scaling show magnitudes: with sign "all" they normalise |value|.
function renderSign(asset, view) {
  const sign = effectiveSign(asset, view);
  return sign === "all" && spec().magnitude_modes.includes(view.mode) ? "absolute_value" : sign;
}

/** The map kept to the sign and scaled to [-1, 1] (all) or [0, 1]: {norm, threshold, sign}. */
export function normalise(asset, sign, outlier) {
  const key = `${sign}:${outlier}`;
  if (!asset.cache.has(key)) {
    const v = asset.values;
    const magnitudes = new Float64Array(v.length);
    for (let i = 0; i < v.length; i++) magnitudes[i] = Math.abs(kept(v[i], sign));
    magnitudes.sort();
    const threshold = cumulativeThreshold(magnitudes, 100 - outlier);
    const norm = new Float64Array(v.length);
    if (threshold > 0) for (let i = 0; i < v.length; i++) norm[i] = Math.max(-1, Math.min(1, kept(v[i], sign) / threshold));
    asset.cache.set(key, { norm, threshold, sign });
  }
  return asset.cache.get(key);
}

function clamp(x, lo, hi) {
  return Math.min(hi, Math.max(lo, Number(x)));
}

export function colormapFor(asset, view) {
  return view.cmap && view.cmap !== "auto" ? view.cmap : autoColormap(effectiveSign(asset, view));
}

/** Paints the view of the result into the canvas (sized to the input). */
export function draw(canvas, asset, view) {
  const { w, h, rgb } = asset;
  if (canvas.width !== w || canvas.height !== h) {
    canvas.width = w;
    canvas.height = h;
  }
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const out = ctx.createImageData(w, h);
  const px = out.data;
  const mode = view.mode;
  const { norm, sign } = normalise(asset, renderSign(asset, view), clamp(view.outlier, 0, 50));
  const table = lut(colormapFor(asset, view));
  const alpha = clamp(view.alpha, 0, 1);
  const heat = mode === "heat_map" || mode === "blended_heat_map";
  for (let i = 0, p = 0; i < norm.length; i++, p += 4) {
    const r = rgb[p], g = rgb[p + 1], b = rgb[p + 2];
    const n = norm[i];
    px[p + 3] = 255;
    if (mode === "original_image") {
      px[p] = r; px[p + 1] = g; px[p + 2] = b;
    } else if (heat) {
      const k = Math.min(255, Math.floor((sign === "all" ? (n + 1) / 2 : n) * 256)) * 3;
      if (mode === "heat_map") {
        px[p] = table[k]; px[p + 1] = table[k + 1]; px[p + 2] = table[k + 2];
      } else {
        const grey = (r + g + b) / 3;
        px[p] = alpha * table[k] + (1 - alpha) * grey;
        px[p + 1] = alpha * table[k + 1] + (1 - alpha) * grey;
        px[p + 2] = alpha * table[k + 2] + (1 - alpha) * grey;
      }
    } else {
      const m = Math.abs(n);
      if (mode === "masked_image") {
        px[p] = r * m; px[p + 1] = g * m; px[p + 2] = b * m;
      } else { // alpha_scaling: the map is the image's opacity, over white
        px[p] = r * m + 255 * (1 - m); px[p + 1] = g * m + 255 * (1 - m); px[p + 2] = b * m + 255 * (1 - m);
      }
    }
  }
  ctx.putImageData(out, 0, 0);
}

/** The value range a colour bar shows for the view: {lo, hi, cmap, sign, active}. */
export function scaleFor(asset, view) {
  const sign = effectiveSign(asset, view);
  const t = normalise(asset, sign, clamp(view.outlier, 0, 50)).threshold * asset.unit;
  const cmap = colormapFor(asset, view);
  const active = view.mode === "heat_map" || view.mode === "blended_heat_map";
  if (sign === "all") return { lo: -t, hi: t, cmap, sign, active };
  if (sign === "negative") return { lo: 0, hi: -t, cmap, sign, active };
  return { lo: 0, hi: t, cmap, sign, active };
}

/** Short human number for scale labels. */
export function fmt(x) {
  if (!Number.isFinite(x)) return "–";
  const a = Math.abs(x);
  if (a === 0) return "0";
  if (a >= 1000 || a < 0.001) return x.toExponential(1);
  return Number(x.toPrecision(2)).toString();
}
