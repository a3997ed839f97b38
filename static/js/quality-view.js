// Draws stored quality measurements (POST /api/results/<id>/quality answers, "Q"): the deletion and
// insertion curves against the smooth random reference, single values, the box check and the
// sanity strip. Shared by the dashboard's Quality panel and the share page; nothing is fetched here
// except the sanity maps, which are drawn like the main map.
import { loadResult } from "./render.js";
import { h } from "./ui.js";
import { bindCanvas } from "./viewer.js";

const SVG = "http://www.w3.org/2000/svg";
const CURVES = new Set(["deletion", "insertion", "road_morf", "road_lerf"]);
const X_WORDS = { deletion: "removed", insertion: "revealed", road_morf: "removed", road_lerf: "removed" };

export const isCurve = (metric) => CURVES.has(metric);

function s(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  for (const c of children.flat()) if (c) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

/** 1, 2 or 5 times a power of ten, at least `x`: a tick step people read at a glance. */
function niceStep(x) {
  if (!(x > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(x));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= x) return m * p;
  return 10 * p;
}

/** A number to three significant figures, as every score on the page is written. */
export function num(x) {
  if (x === null || x === undefined || !Number.isFinite(Number(x))) return "–";
  const v = Number(x);
  if (v !== 0 && (Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3)) return v.toExponential(2);
  return Number(v.toPrecision(3)).toString();
}

export const pct = (x) => `${(100 * Number(x)).toFixed(1)}%`;

/** The first image's entry of an answer's field: its per-image list (`plural`) or the value itself. */
export function first(a, plural, singular = plural) {
  const v = a[plural] ?? a[singular];
  return Array.isArray(v) ? v[0] : v;
}

/** The box check's figures for the first image: {energy, hit, chance}. */
export function pointingOf(q) {
  const a = q.answer || {};
  return { energy: Number(first(a, "energies", "energy")), hit: !!first(a, "hits", "hit"), chance: Number(first(a, "chance")) };
}

/** Words for the better direction: "lower is better". */
export function betterWords(better) {
  return better === "lower" ? "lower is better" : better === "higher" ? "higher is better" : "";
}

/**
 * A curve metric's area against the random reference: {tone, text}. Inside one standard deviation
 * of the random maps' areas the map is said to be no better than chance, whatever the sign.
 */
export function verdict(q) {
  const a = q.answer || {};
  const ref = a.reference;
  if (!ref) return { tone: "neutral", text: "No random reference measured" };
  const area = Number(a.area ?? (a.areas || [])[0]);
  const mean = Number(ref.mean[0]);
  const std = Number(ref.std[0]);
  const gain = q.better === "lower" ? mean - area : area - mean;
  if (Math.abs(gain) <= std) return { tone: "warn", text: "No better than a random map" };
  return gain > 0 ? { tone: "ok", text: "Better than a random map" } : { tone: "bad", text: "Worse than a random map" };
}

/** The area of a curve metric (image 0). */
export function areaOf(q) {
  const a = q.answer || {};
  return Number(a.area ?? (a.areas || [])[0]);
}

/**
 * The score curve of a map and the mean curve of the random maps (dashed), score against the
 * fraction removed or revealed. The map's curve is the one path with class q-curve-map.
 */
export function curveChart(q, { width = 320, height = 180 } = {}) {
  const a = q.answer;
  const xs = a.fractions.map(Number);
  const ys = a.scores[0].map(Number);
  const ref = a.reference && a.reference.scores ? a.reference.scores[0].map(Number) : null;
  const all = ys.concat(ref || []);
  // A round top (and bottom, for logits below zero) so the ticks read 0, 0.4, 0.8 rather than 0.668.
  const step = niceStep((Math.max(...all) - Math.min(0, ...all)) / 2);
  const lo = Math.floor(Math.min(0, ...all) / step) * step;
  let hi = Math.ceil(Math.max(...all) / step - 1e-9) * step;
  if (hi - lo < 1e-9) hi = lo + step;
  const pad = { l: 36, r: 10, t: 10, b: 28 };
  const w = width - pad.l - pad.r;
  const ht = height - pad.t - pad.b;
  const X = (x) => pad.l + x * w;
  const Y = (y) => pad.t + (1 - (y - lo) / (hi - lo)) * ht;
  const line = (vals) => vals.map((y, i) => `${i ? "L" : "M"}${X(xs[i]).toFixed(1)},${Y(y).toFixed(1)}`).join("");
  const area = `${line(ys)}L${X(xs[xs.length - 1]).toFixed(1)},${Y(lo).toFixed(1)}L${X(xs[0]).toFixed(1)},${Y(lo).toFixed(1)}Z`;
  const grid = [];
  for (const t of [0, 0.5, 1]) {
    const yv = lo + t * (hi - lo);
    grid.push(s("line", { x1: pad.l, x2: pad.l + w, y1: Y(yv), y2: Y(yv), class: "q-grid" }));
    grid.push(s("text", { x: pad.l - 6, y: Y(yv) + 3.5, "text-anchor": "end", class: "q-tick" }, num(yv)));
  }
  for (const t of [0, 0.5, 1]) {
    grid.push(s("text", { x: X(t), y: height - 12, "text-anchor": t === 0 ? "start" : t === 1 ? "end" : "middle", class: "q-tick" }, `${t * 100}%`));
  }
  const word = X_WORDS[q.metric] || "changed";
  const title = `${q.label || q.metric}: ${q.params && q.params.score === "logit" ? "logit" : "probability"} of the class as pixels are ${word}, area ${num(areaOf(q))}` +
    (a.reference ? `, random maps ${num(a.reference.mean[0])}` : "");
  return s("svg", { viewBox: `0 0 ${width} ${height}`, class: "q-chart", role: "img", "aria-label": title },
    s("title", {}, title),
    grid,
    s("path", { d: area, class: "q-area" }),
    ref ? s("path", { d: line(ref), class: "q-curve-ref" }) : null,
    s("path", { d: line(ys), class: "q-curve-map" }),
    ys.map((y, i) => s("circle", { cx: X(xs[i]), cy: Y(y), r: 1.8, class: "q-dot" })),
    s("text", { x: pad.l + w, y: height - 1, "text-anchor": "end", class: "q-axis" }, `pixels ${word} →`),
  );
}

/** The big number of a metric and what it is compared with: {value, unit, compare, tone, text}. */
export function headline(q) {
  const a = q.answer || {};
  if (isCurve(q.metric)) {
    const v = verdict(q);
    const ref = a.reference;
    return {
      value: num(areaOf(q)),
      unit: "area",
      compare: ref ? `vs random ${num(ref.mean[0])} ± ${num(ref.std[0])}` : "",
      tone: v.tone,
      text: v.text,
    };
  }
  if (q.metric === "pointing") {
    const { energy: e, hit, chance: c } = pointingOf(q);
    return {
      value: pct(e),
      unit: "of the positive attribution in the box",
      compare: `vs ${pct(c)} for a uniform map`,
      tone: hit && e > c ? "ok" : e > c ? "warn" : "bad",
      text: `${hit ? "Hit: the peak is inside the box" : "Miss: the peak is outside the box"}`,
    };
  }
  if (q.metric === "sanity_check") {
    const flagged = !!first(a, "flagged");
    const at = flagStage(a);
    return {
      value: at ? num(at.spearman[0]) : "–",
      unit: `ρ at stage ${a.flag_after}`,
      compare: `flagged above ρ ${num(a.threshold)}`,
      tone: flagged ? "bad" : "ok",
      text: flagged ? "Barely changes with a random model" : "Changes when the model is randomised",
    };
  }
  const value = a.value ?? (a.values || [])[0];
  return { value: num(value), unit: "", compare: "", tone: "neutral", text: "" }; // the header says which way is better
}

/** One measurement as a card: title, big number, comparison, verdict and (curves) the chart. */
export function qualityCard(q) {
  const hl = headline(q);
  const root = h("article.qcard", { "data-metric": q.metric, "data-tone": hl.tone, "data-key": q.key || "" },
    h("header.qcard-head", {},
      h("h3", { text: q.label || q.metric }),
      q.better ? h("span.q-better", { text: betterWords(q.better) }) : null),
    h("p.q-figure", {},
      h("span.q-value", { text: hl.value }),
      hl.unit ? h("span.q-unit", { text: ` ${hl.unit}` }) : null),
    hl.compare ? h("p.q-compare", { text: hl.compare }) : null,
    hl.text ? h(`p.q-verdict.tone-${hl.tone}`, { text: hl.text }) : null,
    isCurve(q.metric) && q.answer.fractions ? curveChart(q) : null,
    isCurve(q.metric) && q.answer.reference ? h("p.q-legend", {},
      h("span.key-map", { text: "this map" }), h("span.key-ref", { text: "random maps (mean)" })) : null,
  );
  return root;
}

/** The stage whose correlation decides the flag (`flag_after`, counted from 1). */
function flagStage(a) {
  const stages = a.stages || [];
  return stages[Math.min(stages.length, Math.max(1, Number(a.flag_after) || 1)) - 1];
}

/** The words for a sanity stage's randomised blocks: "+ fc", "+ layer4". */
function stageWords(stages, i) {
  const now = stages[i].blocks || [];
  const before = i ? stages[i - 1].blocks || [] : [];
  const added = now.filter((b) => !before.includes(b));
  return `+ ${(added.length ? added : now).join(", ")}`;
}

/**
 * The sanity strip: the original map, then each stage's map (drawn with `store`'s view, like the
 * main map) labelled with the blocks randomised and its Spearman ρ. Returns {root, stop()}.
 */
export function sanityStrip(q, meta, store) {
  const a = q.answer;
  const flagged = !!first(a, "flagged");
  const decisive = flagStage(a);
  const unbind = [];
  let stopped = false;
  const frame = (label, rho, cls) => {
    const canvas = h("canvas.sanity-canvas", { width: 224, height: 224, role: "img", "aria-label": `Map ${label}` });
    const fig = h(`figure.sanity-stage${cls}`, {}, canvas,
      h("figcaption", {}, h("span.sanity-blocks", { text: label }), rho === null ? h("span.sanity-rho.muted", { text: "original" }) : h("span.sanity-rho", { text: `ρ ${num(rho)}` })));
    return { fig, canvas };
  };
  const original = frame("Trained model", null, ".original");
  const frames = [original];
  loadResult(meta).then((asset) => {
    if (!stopped) unbind.push(bindCanvas(original.canvas, asset, store));
  }).catch(() => original.fig.classList.add("failed"));
  a.stages.forEach((st, i) => {
    // Stages still above the threshold are marked: the map has not changed much yet.
    const f = frame(stageWords(a.stages, i), Number(st.spearman[0]), Number(st.spearman[0]) > Number(a.threshold) ? ".similar" : "");
    frames.push(f);
    const pseudo = { id: `${meta.id}-sanity-${i}`, links: { input: meta.links.input, map: st.map }, encoding: st.encoding, signed: a.signed };
    loadResult(pseudo).then((asset) => {
      if (!stopped) unbind.push(bindCanvas(f.canvas, asset, store));
    }).catch(() => f.fig.classList.add("failed"));
  });
  const warning = flagged
    ? h("div.completeness-warning.sanity-warning", { role: "note" },
      h("strong", { text: "This map barely changes when the model is randomised" }),
      h("p", { text: `It may show the image, not the model: with ${decisive ? decisive.blocks.join(", ") : "the top blocks"} random, the map still ranks pixels like the original (Spearman ρ ${decisive ? num(decisive.spearman[0]) : "–"}, above ${num(a.threshold)}).` }))
    : h("p.q-verdict.tone-ok.sanity-ok", { text: `The map changes as the model is randomised from the output down, as a faithful map should (ρ ${decisive ? num(decisive.spearman[0]) : "–"} at stage ${a.flag_after}, threshold ${num(a.threshold)}).` });
  const root = h("div.sanity", { "data-flagged": String(flagged) },
    h("h3.control-label", { text: "Sanity check" }),
    warning,
    h("div.sanity-strip", { role: "list", "aria-label": "Maps as the model's blocks are randomised" }, frames.map((f) => {
      f.fig.setAttribute("role", "listitem");
      return f.fig;
    })));
  return {
    root,
    stop() {
      stopped = true;
      while (unbind.length) unbind.pop()();
    },
  };
}

/** The newest measurement of each metric, in a stable order (curves first). */
export function latestByMetric(list) {
  const order = ["deletion", "insertion", "road_morf", "road_lerf", "infidelity", "sensitivity_max", "pointing", "sanity_check"];
  const last = new Map();
  for (const q of list) last.set(q.metric, q);
  return [...last.values()].sort((x, y) => (order.indexOf(x.metric) + 99) % 99 - (order.indexOf(y.metric) + 99) % 99);
}
