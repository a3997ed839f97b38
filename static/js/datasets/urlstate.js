// The dataset view's state in the URL hash (#datasets?ds=…&model=…&true=…), so a reload or a
// shared link opens the same page of the same filtered, sorted items.

export const DEFAULTS = Object.freeze({
  ds: "", models: [], true: "", predicted: "", correct: "all", min: "", max: "", sort: "index",
  page: 1, per: 96, show: "image",
});
const SORTS = ["index", "confidence", "-confidence", "loss", "-loss"];
const PER_PAGE = [48, 96, 200];

/** The view the hash names ("datasets" or "image") and the dataset view's query. */
export function readHash(hash = location.hash) {
  const [head, rest = ""] = hash.replace(/^#/, "").split("?");
  const p = new URLSearchParams(rest);
  const int = (v, d) => (/^\d+$/.test(v || "") ? Number(v) : d);
  const q = {
    ...DEFAULTS,
    ds: p.get("ds") || "",
    models: p.getAll("model").filter(Boolean).slice(0, 4),
    true: /^\d+$/.test(p.get("true") || "") ? p.get("true") : "",
    predicted: /^(\d+|other)$/.test(p.get("predicted") || "") ? p.get("predicted") : "",
    correct: ["true", "false"].includes(p.get("correct")) ? p.get("correct") : "all",
    min: /^\d+(\.\d+)?$/.test(p.get("min") || "") ? p.get("min") : "",
    max: /^\d+(\.\d+)?$/.test(p.get("max") || "") ? p.get("max") : "",
    sort: SORTS.includes(p.get("sort")) ? p.get("sort") : "index",
    page: Math.max(1, int(p.get("page"), 1)),
    per: PER_PAGE.includes(int(p.get("per"), 0)) ? int(p.get("per"), 0) : DEFAULTS.per,
    show: p.get("show") === "overlay" ? "overlay" : "image",
  };
  return { view: head === "datasets" ? "datasets" : "image", q };
}

/** The hash for the dataset view's query (defaults left out, so links stay short). */
export function writeHash(q) {
  const p = new URLSearchParams();
  if (q.ds) p.set("ds", q.ds);
  for (const m of q.models) p.append("model", m);
  for (const k of ["true", "predicted", "min", "max"]) if (q[k] !== "") p.set(k, q[k]);
  if (q.correct !== "all") p.set("correct", q.correct);
  if (q.sort !== "index") p.set("sort", q.sort);
  if (q.page > 1) p.set("page", String(q.page));
  if (q.per !== DEFAULTS.per) p.set("per", String(q.per));
  if (q.show !== "image") p.set("show", q.show);
  const s = p.toString();
  return s ? `#datasets?${s}` : "#datasets";
}

/** The items query the API takes for this state (min/max are percent here, 0–1 there). */
export function itemsQuery(q) {
  const p = new URLSearchParams();
  for (const m of q.models) p.append("model", m);
  if (q.true !== "") p.set("true", q.true);
  if (q.predicted !== "") p.set("predicted", q.predicted);
  if (q.correct !== "all") p.set("correct", q.correct);
  if (q.min !== "") p.set("min_prob", String(Number(q.min) / 100));
  if (q.max !== "") p.set("max_prob", String(Number(q.max) / 100));
  p.set("sort", q.sort);
  p.set("page", String(q.page));
  p.set("per_page", String(q.per));
  return p;
}

/** The batch explanation's filter for this state ("all matching the filter"). */
export function filterOf(q) {
  const f = { model: q.models[0] };
  if (q.true !== "") f.true = q.true;
  if (q.predicted !== "") f.predicted = q.predicted;
  if (q.correct !== "all") f.correct = q.correct;
  if (q.min !== "") f.min_prob = Number(q.min) / 100;
  if (q.max !== "") f.max_prob = Number(q.max) / 100;
  return f;
}
