// The overlay specification as the server describes it (insights/overlay.py, embedded in the page
// as #overlay-spec), the colour tables it serves, and the overlay.png URL of a view. The server
// renders the PNG download from the same rules, so the file is the picture on the canvas.

let loaded = null;

export function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error(`could not load ${url}`));
    img.src = url;
  });
}

/** The RGBA pixels of an image at its natural size (PNGs without a colour profile come back exact). */
export function pixelsOf(img) {
  const c = document.createElement("canvas");
  c.width = img.naturalWidth;
  c.height = img.naturalHeight;
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(img, 0, 0);
  return ctx.getImageData(0, 0, c.width, c.height).data;
}

async function table(url) {
  const px = pixelsOf(await loadImage(url));
  const out = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) for (let k = 0; k < 3; k++) out[i * 3 + k] = px[i * 4 + k];
  return out;
}

/**
 * Reads the specification and fetches every colour table it lists (all before the first paint,
 * so changing the view never waits for the network). Resolves with the specification.
 */
export async function loadOverlay() {
  if (loaded) return loaded.spec;
  const spec = JSON.parse(document.getElementById("overlay-spec").textContent);
  const names = Object.keys(spec.luts);
  const tables = await Promise.all(names.map((n) => table(spec.luts[n])));
  loaded = { spec, luts: new Map(names.map((n, i) => [n, tables[i]])) };
  return spec;
}

export function spec() {
  if (!loaded) throw new Error("the overlay specification is not loaded yet");
  return loaded.spec;
}

/** A Uint8ClampedArray of 256×3 (r, g, b): the server's table for the named map. */
export function lut(name) {
  const t = loaded && loaded.luts.get(name);
  if (!t) throw new Error(`unknown colour map ${name}`);
  return t;
}

/** The colour map a sign gets when the view says "auto" (Captum's defaults). */
export function autoColormap(sign) {
  return spec().auto_colormap[sign];
}

/** CSS linear-gradient for a colour bar or swatch of the named map. */
export function cssGradient(name, direction = "to right") {
  const t = lut(name);
  const parts = [];
  for (let i = 0; i <= 16; i++) {
    const k = Math.round((i / 16) * 255) * 3;
    parts.push(`rgb(${t[k]},${t[k + 1]},${t[k + 2]}) ${(i / 16) * 100}%`);
  }
  return `linear-gradient(${direction}, ${parts.join(", ")})`;
}

/** overlay.png of a result as the view shows it; "auto" choices are left to the server's same rule. */
export function overlayUrl(meta, view) {
  const q = new URLSearchParams({ mode: view.mode, alpha: view.alpha, outlier: view.outlier });
  if (view.sign !== "auto") q.set("sign", view.sign);
  if (view.cmap !== "auto") q.set("cmap", view.cmap);
  return `${meta.links.overlay}?${q}`;
}
