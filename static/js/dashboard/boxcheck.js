// The box check's box: drawn by dragging on the hero image (mouse, pen or touch), moved by
// dragging it or resized by its corners, by the arrow keys, or typed as four numbers. Kept as fractions of the image, so
// the same box serves results whose model inputs differ in size; `pixels(size)` gives the
// [x0, y0, x1, y1] (end exclusive) that `pointing` takes.
import { $, h } from "../ui.js";

const MIN = 0.02; // the smallest side, as a fraction: a click is not a box
const clamp = (x, lo, hi) => Math.min(hi, Math.max(lo, x));

/** The box tool on #canvas-stage and its numeric form in `formSlot`; subscribe(fn) hears each settled change. */
export function boxTool(formSlot) {
  const stage = $("#canvas-stage");
  let box = null; // {x0, y0, x1, y1} in [0, 1]
  let size = [224, 224]; // [H, W] of the shown result's input
  let drawing = false;
  const listeners = new Set();

  const toggle = h("button.btn.btn-small.stage-tool", { type: "button", id: "box-toggle", hidden: true, "aria-pressed": "false", title: "Drag on the image to draw a box around the object" },
    h("span", { "aria-hidden": "true", class: "tool-icon" }), h("span.tool-label", { text: "Draw a box" }));
  const rect = h("div.box-rect", { tabindex: "0", role: "group", hidden: true, "aria-label": "Box: arrow keys move it, Shift+arrow keys resize it" },
    ...["nw", "ne", "sw", "se"].map((c) => h(`span.box-handle.${c}`, { "data-corner": c, "aria-hidden": "true" })));
  const layer = h("div.box-layer", { id: "box-layer", hidden: true }, rect);
  stage.append(layer, toggle);

  // The numeric form: the box in the model input's pixels.
  const names = [["x0", "Left"], ["y0", "Top"], ["x1", "Right"], ["y1", "Bottom"]];
  const inputs = {};
  const fields = names.map(([k, label]) => {
    const id = `box-${k}`;
    inputs[k] = h("input.input", { id, type: "number", inputmode: "numeric", step: "1", min: "0", autocomplete: "off" });
    return h("div.box-field", {}, h("label.field-label", { for: id, text: label }), inputs[k]);
  });
  const clear = h("button.btn.btn-ghost.btn-small", { type: "button", id: "box-clear", text: "Clear box", disabled: true });
  formSlot.append(h("div.box-form", { role: "group", "aria-label": "Box corners, in the model input's pixels" }, fields), clear);

  /** The shown image's rectangle inside the stage (the canvas covers the stage: object-fit cover). */
  function geometry() {
    const r = stage.getBoundingClientRect();
    const scale = Math.max(r.width / size[1], r.height / size[0]);
    const dw = size[1] * scale;
    const dh = size[0] * scale;
    return { r, ox: (r.width - dw) / 2, oy: (r.height - dh) / 2, dw, dh };
  }

  function toFraction(ev) {
    const g = geometry();
    return { x: clamp((ev.clientX - g.r.left - g.ox) / g.dw, 0, 1), y: clamp((ev.clientY - g.r.top - g.oy) / g.dh, 0, 1) };
  }

  function pixels(sz = size, b = box) {
    if (!b) return null;
    const [H, W] = sz;
    const x0 = clamp(Math.round(b.x0 * W), 0, W - 1);
    const y0 = clamp(Math.round(b.y0 * H), 0, H - 1);
    return [x0, y0, clamp(Math.max(x0 + 1, Math.round(b.x1 * W)), 1, W), clamp(Math.max(y0 + 1, Math.round(b.y1 * H)), 1, H)];
  }

  function paint() {
    rect.hidden = !box;
    clear.disabled = !box;
    stage.classList.toggle("has-box", !!box);
    const px = pixels();
    for (const [i, [k]] of names.entries()) {
      inputs[k].max = String(k.startsWith("x") ? size[1] : size[0]);
      if (document.activeElement !== inputs[k]) inputs[k].value = px ? String(px[i]) : "";
    }
    if (!box) return;
    const g = geometry();
    rect.style.left = `${g.ox + box.x0 * g.dw}px`;
    rect.style.top = `${g.oy + box.y0 * g.dh}px`;
    rect.style.width = `${(box.x1 - box.x0) * g.dw}px`;
    rect.style.height = `${(box.y1 - box.y0) * g.dh}px`;
    rect.setAttribute("aria-label", `Box ${px.join(", ")} (left, top, right, bottom): arrow keys move it, Shift+arrow keys resize it`);
  }

  let timer = 0;
  function settle(delay = 0) {
    clearTimeout(timer);
    timer = setTimeout(() => {
      for (const fn of listeners) fn(box);
    }, delay);
  }

  function set(b, { quiet = false } = {}) {
    box = b ? normalise(b) : null;
    paint();
    if (!quiet) settle();
  }

  function normalise(b) {
    const x0 = clamp(Math.min(b.x0, b.x1), 0, 1 - MIN);
    const y0 = clamp(Math.min(b.y0, b.y1), 0, 1 - MIN);
    return { x0, y0, x1: clamp(Math.max(b.x0, b.x1, x0 + MIN), 0, 1), y1: clamp(Math.max(b.y0, b.y1, y0 + MIN), 0, 1) };
  }

  function setDrawing(on) {
    drawing = on;
    toggle.setAttribute("aria-pressed", String(on));
    $(".tool-label", toggle).textContent = on ? "Done" : box ? "Redraw box" : "Draw a box";
    stage.classList.toggle("drawing", on);
  }

  // Dragging: on the empty image a new box; on the box it moves; on a corner it resizes.
  let drag = null;
  layer.addEventListener("pointerdown", (ev) => {
    const corner = ev.target.dataset && ev.target.dataset.corner;
    const onBox = ev.target === rect || corner;
    if (!drawing && !onBox) return;
    ev.preventDefault();
    layer.setPointerCapture(ev.pointerId);
    const p = toFraction(ev);
    // While drawing, a press anywhere but on a corner starts a new box (the toggle says "Redraw").
    if (corner) drag = { kind: "corner", corner, start: { ...box } };
    else if (onBox && !drawing) drag = { kind: "move", p, start: { ...box } };
    else drag = { kind: "new", p };
  });
  layer.addEventListener("pointermove", (ev) => {
    if (!drag) return;
    const p = toFraction(ev);
    if (drag.kind === "new") {
      box = normalise({ x0: drag.p.x, y0: drag.p.y, x1: p.x, y1: p.y });
    } else if (drag.kind === "move") {
      const w = drag.start.x1 - drag.start.x0;
      const hh = drag.start.y1 - drag.start.y0;
      const x0 = clamp(drag.start.x0 + p.x - drag.p.x, 0, 1 - w);
      const y0 = clamp(drag.start.y0 + p.y - drag.p.y, 0, 1 - hh);
      box = { x0, y0, x1: x0 + w, y1: y0 + hh };
    } else {
      const b = { ...drag.start };
      if (drag.corner.includes("w")) b.x0 = p.x; else b.x1 = p.x;
      if (drag.corner.includes("n")) b.y0 = p.y; else b.y1 = p.y;
      box = normalise(b);
    }
    paint();
  });
  const end = (ev) => {
    if (!drag) return;
    const made = drag.kind === "new";
    drag = null;
    if (layer.hasPointerCapture(ev.pointerId)) layer.releasePointerCapture(ev.pointerId);
    if (!box) return;
    if (made) setDrawing(false);
    settle();
  };
  layer.addEventListener("pointerup", end);
  layer.addEventListener("pointercancel", end);

  rect.addEventListener("keydown", (ev) => {
    const d = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] }[ev.key];
    if (!d || !box) return;
    ev.preventDefault();
    const sx = d[0] / size[1];
    const sy = d[1] / size[0];
    const k = ev.altKey ? 1 : 4; // four pixels a press, one with Alt
    if (ev.shiftKey) box = normalise({ ...box, x1: box.x1 + k * sx, y1: box.y1 + k * sy });
    else {
      const w = box.x1 - box.x0;
      const hh = box.y1 - box.y0;
      const x0 = clamp(box.x0 + k * sx, 0, 1 - w);
      const y0 = clamp(box.y0 + k * sy, 0, 1 - hh);
      box = { x0, y0, x1: x0 + w, y1: y0 + hh };
    }
    paint();
    settle(500);
  });

  for (const [k] of names) {
    inputs[k].addEventListener("change", () => {
      const vals = names.map(([n]) => Number(inputs[n].value));
      if (vals.some((v) => !Number.isFinite(v) || inputs[k].value === "")) return;
      const [H, W] = size;
      set({ x0: vals[0] / W, y0: vals[1] / H, x1: vals[2] / W, y1: vals[3] / H });
    });
  }

  toggle.addEventListener("click", () => setDrawing(!drawing));
  clear.addEventListener("click", () => {
    set(null);
    setDrawing(false);
  });
  new ResizeObserver(() => paint()).observe(stage);

  return {
    get: () => box,
    pixels,
    set,
    /** The shown result's input size [H, W] (the box's pixels are counted in it). */
    setSize(sz) {
      size = sz && sz.length === 2 ? sz.map(Number) : [224, 224];
      paint();
    },
    /** Shows the tool (only over a result). */
    enable(on) {
      toggle.hidden = !on;
      layer.hidden = !on;
      if (!on) setDrawing(false);
    },
    subscribe(fn) {
      listeners.add(fn);
      return () => listeners.delete(fn);
    },
  };
}
