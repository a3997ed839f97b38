// The result viewer: view settings shared by every canvas on the page, the controls that
// change them, and the colour bar. Every change redraws locally; nothing is fetched.
import { autoColormap, cssGradient, spec } from "./overlay.js";
import { draw, fmt, scaleFor } from "./render.js";
import { h, segmented } from "./ui.js";

/** The view settings shared by every canvas of a page; starts from the specification's defaults. */
export class ViewStore {
  constructor(view = {}) {
    this.view = { ...spec().defaults, ...view };
    this.listeners = new Set();
  }
  set(patch) {
    this.view = { ...this.view, ...patch };
    for (const fn of this.listeners) fn(this.view);
  }
  subscribe(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }
}

/** Keeps `canvas` painted with `asset` under the store's view; returns a function that stops it. */
export function bindCanvas(canvas, asset, store, after) {
  let frame = 0;
  const paint = () => {
    frame = 0;
    draw(canvas, asset, store.view);
    canvas.dataset.painted = asset.meta.id;
    if (after) after(asset, store.view);
  };
  paint();
  return store.subscribe(() => {
    if (!frame) frame = requestAnimationFrame(paint);
  });
}

function slider(id, label, min, max, step, value, format, onInput) {
  const out = h("output.slider-value", { for: id, text: format(value) });
  const input = h("input.range", { type: "range", id, min, max, step, value, "aria-valuetext": format(value) });
  const paintFill = () => input.style.setProperty("--fill", `${((input.value - min) / (max - min)) * 100}%`);
  paintFill();
  input.addEventListener("input", () => {
    const v = Number(input.value);
    out.textContent = format(v);
    input.setAttribute("aria-valuetext", format(v));
    paintFill();
    onInput(v);
  });
  return h("div.control", {}, h("div.control-head", {}, h("label.control-label", { for: id, text: label }), out), input);
}

/** The view controls (mode, sign, colour map, opacity, outlier clipping) bound to the store. */
export function viewControls(store, prefix = "view") {
  const v = store.view;
  const { modes, signs, colormaps, ranges } = spec();
  const mode = segmented("mode", "Display mode", modes, v.mode, (x) => store.set({ mode: x }));
  const sign = segmented("sign", "Sign", signs, v.sign, (x) => store.set({ sign: x }));
  const swatch = h("span.swatch", { "aria-hidden": "true" });
  const cmap = h("select.select", { id: `${prefix}-cmap` }, colormaps.map((c) => h("option", { value: c.value, text: c.label, selected: c.value === v.cmap })));
  cmap.addEventListener("change", () => store.set({ cmap: cmap.value }));
  const range = (name, label, format) => {
    const r = ranges[name];
    return slider(`${prefix}-${name}`, label, r.min, r.max, r.step, v[name], format, (x) => store.set({ [name]: x }));
  };
  const opacity = range("alpha", "Opacity", (x) => `${Math.round(x * 100)}%`);
  const outlier = range("outlier", "Clip outliers", (x) => `${x}%`);
  const root = h("div.view-controls", {},
    h("div.control.wide", {}, h("span.control-label", { id: `${prefix}-mode-label`, text: "Display" }), mode),
    h("div.control.wide", {}, h("span.control-label", { id: `${prefix}-sign-label`, text: "Sign" }), sign),
    h("div.control", {}, h("label.control-label", { for: `${prefix}-cmap`, text: "Colour map" }), h("div.select-wrap.with-swatch", {}, swatch, cmap)),
    opacity,
    outlier,
  );
  mode.setAttribute("aria-labelledby", `${prefix}-mode-label`);
  sign.setAttribute("aria-labelledby", `${prefix}-sign-label`);
  root.setSwatch = (name) => (swatch.style.background = cssGradient(name));
  // Until someone picks a sign, the control shows the one the map gets by default.
  root.showSign = (value) => sign.setValue(value);
  root.setSwatch(v.cmap === "auto" ? autoColormap("all") : v.cmap);
  return root;
}

/** A colour bar that shows the value scale of the current view of `asset`. */
export function colorBar() {
  const bar = h("div.colorbar-gradient", { role: "img", "aria-label": "Colour scale" });
  const lo = h("span", {});
  const mid = h("span", {});
  const hi = h("span", {});
  const caption = h("span.colorbar-caption", {});
  const root = h("div.colorbar", {}, bar, h("div.colorbar-ticks", {}, lo, mid, hi), caption);
  root.update = (asset, view) => {
    const s = scaleFor(asset, view);
    bar.style.background = cssGradient(s.cmap);
    lo.textContent = fmt(s.lo);
    hi.textContent = fmt(s.hi);
    mid.textContent = s.sign === "all" ? "0" : fmt((s.lo + s.hi) / 2);
    const what = { all: "attribution", positive: "positive attribution", negative: "negative attribution", absolute_value: "|attribution|" }[s.sign];
    caption.textContent = `${what}, clipped at the top ${view.outlier}%` + (s.active ? "" : " · colours not shown in this mode");
    bar.setAttribute("aria-label", `Colour scale from ${lo.textContent} to ${hi.textContent}`);
    root.classList.toggle("inactive", !s.active);
  };
  return root;
}
