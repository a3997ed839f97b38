// Colour maps as 256-entry lookup tables, built from a few stops of the matplotlib maps
// of the same name (linear interpolation in sRGB is close enough at this resolution).

const STOPS = {
  viridis: ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"],
  inferno: ["#000004", "#1b0c41", "#4a0c6b", "#781c6d", "#a52c60", "#cf4446", "#ed6925", "#fb9b06", "#f7d13d", "#fcffa4"],
  magma: ["#000004", "#180f3d", "#440f76", "#721f81", "#9e2f7f", "#cd4071", "#f1605d", "#fd9668", "#feca8d", "#fcfdbf"],
  turbo: ["#30123b", "#4145ab", "#4675ed", "#39a2fc", "#1bcfd4", "#24eca6", "#61fc6c", "#a4fc3b", "#d1e834", "#f3c63a", "#fe9b2d", "#f36315", "#d93806", "#b11901", "#7a0403"],
  jet: [[0, "#00007f"], [0.11, "#0000ff"], [0.125, "#0000ff"], [0.34, "#00ffff"], [0.375, "#00ffff"], [0.5, "#7dff7a"], [0.64, "#ffff00"], [0.66, "#ffff00"], [0.89, "#ff0000"], [0.91, "#ff0000"], [1, "#7f0000"]],
  RdBu_r: ["#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f"],
  RdWhGn: ["#ff0000", "#ffffff", "#008000"],
  Greens: ["#f7fcf5", "#e5f5e0", "#c7e9c0", "#a1d99b", "#74c476", "#41ab5d", "#238b45", "#006d2c", "#00441b"],
  Reds: ["#fff5f0", "#fee0d2", "#fcbba1", "#fc9272", "#fb6a4a", "#ef3b2c", "#cb181d", "#a50f15", "#67000d"],
  Blues: ["#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b"],
  gray: ["#000000", "#ffffff"],
};

/** The colour maps offered in the viewer: value is the matplotlib name, label is for people. */
export const COLORMAPS = [
  { value: "auto", label: "Auto (Captum default)" },
  { value: "viridis", label: "Viridis" },
  { value: "inferno", label: "Inferno" },
  { value: "magma", label: "Magma" },
  { value: "turbo", label: "Turbo" },
  { value: "jet", label: "Jet" },
  { value: "RdBu_r", label: "Red–Blue (diverging)" },
  { value: "Greens", label: "Greens" },
  { value: "Reds", label: "Reds" },
  { value: "Blues", label: "Blues" },
  { value: "gray", label: "Gray" },
];

/** Captum's visualize_image_attr picks its colour map from the sign when none is given. */
export function autoColormap(sign) {
  return { all: "RdWhGn", positive: "Greens", negative: "Reds", absolute_value: "Blues" }[sign] || "viridis";
}

function hex(c) {
  const n = parseInt(c.slice(1), 16);
  return [(n >> 16) & 255, (n >> 8) & 255, n & 255];
}

const cache = new Map();

/** A Uint8ClampedArray of 256×3 (r, g, b) for the named map. */
export function lut(name) {
  if (cache.has(name)) return cache.get(name);
  const raw = STOPS[name];
  if (!raw) throw new Error(`unknown colour map ${name}`);
  const stops = raw.map((s, i) => (Array.isArray(s) ? [s[0], hex(s[1])] : [i / (raw.length - 1), hex(s)]));
  const out = new Uint8ClampedArray(256 * 3);
  let j = 0;
  for (let i = 0; i < 256; i++) {
    const t = i / 255;
    while (j < stops.length - 2 && t > stops[j + 1][0]) j++;
    const [t0, c0] = stops[j];
    const [t1, c1] = stops[j + 1];
    const f = t1 > t0 ? Math.min(1, Math.max(0, (t - t0) / (t1 - t0))) : 0;
    for (let k = 0; k < 3; k++) out[i * 3 + k] = c0[k] + (c1[k] - c0[k]) * f;
  }
  cache.set(name, out);
  return out;
}

/** CSS linear-gradient for a colour bar or swatch of the named map. */
export function cssGradient(name, direction = "to right") {
  const table = lut(name);
  const parts = [];
  for (let i = 0; i <= 16; i++) {
    const k = Math.round((i / 16) * 255) * 3;
    parts.push(`rgb(${table[k]},${table[k + 1]},${table[k + 2]}) ${(i / 16) * 100}%`);
  }
  return `linear-gradient(${direction}, ${parts.join(", ")})`;
}
