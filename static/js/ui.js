// Small DOM helpers shared by the dashboard and the share page.

/** h("div.card", {attrs}, ...children): builds an element. */
export function h(tag, attrs = {}, ...children) {
  const [name, ...classes] = tag.split(".");
  const node = document.createElement(name || "div");
  if (classes.length) node.className = classes.join(" ");
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "html") node.innerHTML = v;
    else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "style" && typeof v === "object") {
      for (const [prop, val] of Object.entries(v)) {
        if (prop.startsWith("--")) node.style.setProperty(prop, val);
        else node.style[prop] = val;
      }
    }
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export const $ = (sel, root = document) => root.querySelector(sel);
export const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

/** A segmented control (radio group) with arrow-key navigation. */
export function segmented(name, label, options, value, onChange) {
  const group = h("div.segmented", { role: "radiogroup", "aria-label": label, "data-name": name });
  const buttons = options.map((o) =>
    h("button", {
      type: "button",
      role: "radio",
      "data-value": o.value,
      "aria-checked": String(o.value === value),
      tabindex: o.value === value ? "0" : "-1",
      text: o.label,
      title: o.title,
    }),
  );
  const select = (btn, focus) => {
    for (const b of buttons) {
      const on = b === btn;
      b.setAttribute("aria-checked", String(on));
      b.tabIndex = on ? 0 : -1;
    }
    if (focus) btn.focus();
    onChange(btn.dataset.value);
  };
  buttons.forEach((b, i) => {
    b.addEventListener("click", () => select(b, false));
    b.addEventListener("keydown", (ev) => {
      const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[ev.key];
      if (!step) return;
      ev.preventDefault();
      select(buttons[(i + step + buttons.length) % buttons.length], true);
    });
  });
  group.append(...buttons);
  group.setValue = (v) => {
    for (const b of buttons) {
      const on = b.dataset.value === v;
      b.setAttribute("aria-checked", String(on));
      b.tabIndex = on ? 0 : -1;
    }
  };
  return group;
}

/** Shows a message in the error slot for `field` (or clears it with an empty message). */
export function showError(slot, message) {
  if (!slot) return;
  slot.textContent = message || "";
  slot.hidden = !message;
}

let toastTimer = null;
/** A short confirmation at the bottom of the screen, read out by screen readers. */
export function toast(message) {
  const node = $("#toast");
  if (!node) return;
  node.textContent = message;
  node.classList.add("show");
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => node.classList.remove("show"), 2600);
}

/** Copies text, with a textarea fallback where the async clipboard is unavailable. */
export async function copyText(text) {
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      return true;
    }
  } catch (e) {
    /* fall through to the fallback */
  }
  const area = h("textarea", { readonly: true, "aria-hidden": "true", style: { position: "fixed", top: "-1000px", opacity: "0" } });
  area.value = text;
  document.body.append(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch (e) {
    ok = false;
  }
  area.remove();
  return ok;
}

/** "12 s", "1 min 5 s". */
export function duration(s) {
  if (s === null || s === undefined || !Number.isFinite(Number(s))) return "";
  s = Math.max(0, Math.round(Number(s)));
  if (s < 60) return `${s} s`;
  return `${Math.floor(s / 60)} min ${s % 60} s`;
}

export function plainError(e) {
  if (!e) return "Something went wrong.";
  const msg = e.message || String(e);
  return msg.charAt(0).toUpperCase() + msg.slice(1);
}

/** Shows a job's state in its progress box, whose parts are #<prefix>-progress, -status, -eta and
 * -cancel; `runningWords(percent)` says the running state (the single view and a dataset batch). */
export function showJobIn(box, prefix, j, runningWords) {
  box.hidden = false;
  box.dataset.status = j.status;
  const pct = j.total ? Math.round((100 * j.done) / j.total) : 0;
  $(`#${prefix}-progress`).setAttribute("aria-valuenow", String(pct));
  $(`#${prefix}-progress .progress-fill`).style.width = `${pct}%`;
  const words = { queued: "Queued", running: runningWords(pct), done: "Done", failed: "Failed", cancelled: "Cancelled" };
  $(`#${prefix}-status`).textContent = words[j.status] || j.status;
  $(`#${prefix}-eta`).textContent = j.status === "running" && j.eta_s !== null && j.eta_s !== undefined ? `about ${duration(j.eta_s)} left` : "";
  $(`#${prefix}-cancel`).hidden = !(j.status === "queued" || j.status === "running");
}
