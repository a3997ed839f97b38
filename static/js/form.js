// Builds a method's parameter form from its schema (GET /api/methods) and checks the values
// against the schema's bounds before anything is sent. No per-method code lives here.
import { h, segmented, showError } from "./ui.js";

const human = (name) => name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());

function numberText(v) {
  return v === null || v === undefined ? "" : String(v);
}

function boundsHint(p) {
  const parts = [];
  if (p.min !== undefined && p.max !== undefined) parts.push(`${p.min} – ${p.max}`);
  else if (p.min !== undefined) parts.push(`≥ ${p.min}`);
  else if (p.max !== undefined) parts.push(`≤ ${p.max}`);
  if (p.type === "int_list" && p.length) parts.unshift(`${p.length} integers`);
  return parts.join(", ");
}

/** Checks one raw value against its schema; returns [value, message]. */
export function checkValue(p, raw) {
  const optional = p.default === null || p.default === undefined;
  if (p.type === "bool") return [!!raw, null];
  if (p.type === "choice") {
    if (!p.choices.includes(raw)) return [null, `Choose one of ${p.choices.join(", ")}.`];
    return [raw, null];
  }
  const text = String(raw ?? "").trim();
  if (text === "") return optional ? [undefined, null] : [null, "This field is required."];
  if (p.type === "string") return [text, null];
  const number = (s) => {
    const n = Number(s);
    if (!Number.isFinite(n)) return [null, `“${s}” is not a number.`];
    if ((p.type === "int" || p.type === "int_list") && !Number.isInteger(n)) return [null, `“${s}” is not a whole number.`];
    if (p.min !== undefined && n < p.min) return [null, `Must be at least ${p.min}.`];
    if (p.max !== undefined && n > p.max) return [null, `Must be at most ${p.max}.`];
    return [n, null];
  };
  if (p.type === "int_list") {
    const items = text.split(/[\s,x×]+/).filter(Boolean);
    if (p.length && items.length !== p.length) return [null, `Needs exactly ${p.length} whole numbers, got ${items.length}.`];
    const out = [];
    for (const item of items) {
      const [n, msg] = number(item);
      if (msg) return [null, msg];
      out.push(n);
    }
    return [out, null];
  }
  return number(text);
}

/**
 * Renders the form for `method` into `container`. Returns {read(), setError(field, msg),
 * clearErrors(), has(field)}; read() answers {params, ok} and marks invalid fields.
 */
export function paramForm(container, method) {
  container.replaceChildren();
  const fields = new Map();
  const params = (method.params || []).filter((p) => p.type !== "tensor");
  if (!params.length) {
    container.append(h("p.muted.small", { text: "This method has no settings." }));
  }
  for (const p of params) {
    const id = `param-${method.id}-${p.name}`;
    const helpId = `${id}-help`;
    const errId = `${id}-error`;
    const error = h("p.field-error", { id: errId, role: "alert", hidden: true });
    const hint = boundsHint(p);
    const help = h("p.help", { id: helpId }, p.help || "", hint ? h("span.bounds", { text: ` (${hint})` }) : null);
    let control;
    let get;
    const label = h("label.field-label", { for: id }, human(p.name), h("code", { text: p.name }));
    if (p.type === "bool") {
      control = h("input.switch", { type: "checkbox", role: "switch", id, "aria-describedby": `${helpId} ${errId}` });
      control.checked = !!p.default;
      get = () => control.checked;
    } else if (p.type === "choice" && p.choices.length <= 4 && p.choices.join("").length <= 24) {
      let value = p.default;
      control = segmented(p.name, human(p.name), p.choices.map((c) => ({ value: c, label: c })), value, (v) => (value = v));
      control.id = id;
      control.setAttribute("aria-describedby", `${helpId} ${errId}`);
      get = () => value;
      label.removeAttribute("for");
      label.id = `${id}-label`;
      control.setAttribute("aria-labelledby", label.id);
    } else if (p.type === "choice") {
      control = h("select.select", { id, "aria-describedby": `${helpId} ${errId}` },
        p.choices.map((c) => h("option", { value: c, text: c, selected: c === p.default })));
      get = () => control.value;
    } else if (p.type === "string") {
      control = h("input.input", { id, type: "text", placeholder: p.default ?? "auto", "aria-describedby": `${helpId} ${errId}`, autocomplete: "off", spellcheck: "false" });
      control.value = p.default ?? "";
      get = () => control.value;
      control.addEventListener("input", () => setError(p.name, ""));
    } else {
      const isList = p.type === "int_list";
      control = h("input.input", {
        id,
        type: isList ? "text" : "number",
        inputmode: p.type === "float" ? "decimal" : "numeric",
        step: p.type === "float" ? "any" : isList ? undefined : "1",
        min: isList ? undefined : p.min,
        max: isList ? undefined : p.max,
        placeholder: isList ? Array(p.length || 2).fill("n").join(", ") : p.default === null ? "auto" : "",
        "aria-describedby": `${helpId} ${errId}`,
        autocomplete: "off",
      });
      control.value = isList ? (p.default || []).join(", ") : numberText(p.default);
      get = () => control.value;
      control.addEventListener("input", () => setError(p.name, ""));
    }
    const wrap = h(`div.field.field-${p.type}`, { "data-field": p.name }, p.type === "bool" ? h("div.switch-row", {}, label, control) : [label, control], help, error);
    container.append(wrap);
    fields.set(p.name, { p, control, get, error, wrap });
  }

  function setError(name, message) {
    const f = fields.get(name);
    if (!f) return false;
    showError(f.error, message);
    f.wrap.classList.toggle("invalid", !!message);
    if (f.control.setAttribute) f.control.setAttribute("aria-invalid", message ? "true" : "false");
    return true;
  }

  return {
    read() {
      const out = {};
      let ok = true;
      let first = null;
      for (const [name, f] of fields) {
        const [value, message] = checkValue(f.p, f.get());
        setError(name, message || "");
        if (message) {
          ok = false;
          first = first || f.control;
        } else if (value !== undefined) out[name] = value;
      }
      if (first && first.focus) first.focus();
      return { ok, params: out };
    },
    setError,
    clearErrors() {
      for (const name of fields.keys()) setError(name, "");
    },
    has: (name) => fields.has(name),
  };
}
