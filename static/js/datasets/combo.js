// A searchable class picker (a combobox over a listbox): type to narrow, arrows to move, Enter
// to choose, the × to go back to "any class". `options(q)` answers [{index, label, note}].
import { $$, h } from "../ui.js";

let seq = 0;

export function classCombo({ labelledBy, placeholder, options, onChange }) {
  const id = `combo-${++seq}`;
  const input = h("input.input", {
    type: "search", placeholder, autocomplete: "off", role: "combobox", "aria-expanded": "false",
    "aria-controls": `${id}-list`, "aria-autocomplete": "list", "aria-labelledby": labelledBy, spellcheck: "false",
  });
  const list = h("ul.combo-list", { id: `${id}-list`, role: "listbox", hidden: true });
  const clear = h("button.combo-clear", { type: "button", "aria-label": "Any class", title: "Any class", hidden: true, text: "×" });
  const root = h("div.combo.ds-combo", {},
    h("span", { "aria-hidden": "true", html: '<svg class="combo-icon" viewBox="0 0 24 24"><circle cx="11" cy="11" r="6.5" fill="none" stroke="currentColor" stroke-width="1.8"/><path d="m16 16 4 4" stroke="currentColor" stroke-width="1.8" stroke-linecap="round"/></svg>' }),
    input, clear, list);
  let shown = [];
  let active = -1;
  let value = null; // {index, label}
  let ask = 0;

  const close = () => {
    list.hidden = true;
    input.setAttribute("aria-expanded", "false");
    input.removeAttribute("aria-activedescendant");
    active = -1;
  };
  const highlight = (i) => {
    active = i;
    $$("li", list).forEach((li, k) => li.setAttribute("aria-selected", String(k === i)));
    if (i >= 0) {
      input.setAttribute("aria-activedescendant", `${id}-opt-${i}`);
      list.children[i].scrollIntoView({ block: "nearest" });
    }
  };
  const show = (v) => {
    value = v;
    input.value = v ? v.label : "";
    clear.hidden = !v;
    root.classList.toggle("has-value", !!v);
  };
  const choose = (v) => {
    show(v);
    close();
    onChange(v);
  };
  async function search() {
    const mine = ++ask;
    const q = value && input.value === value.label ? "" : input.value.trim();
    let found = [];
    try {
      found = await options(q);
    } catch (e) {
      found = [];
    }
    if (mine !== ask) return;
    shown = found;
    list.replaceChildren(...(found.length
      ? found.map((o, i) => h("li", { id: `${id}-opt-${i}`, role: "option", "aria-selected": "false",
          onmousedown: (ev) => { ev.preventDefault(); choose({ index: o.index, label: o.label }); } },
          h("span", { text: o.label }), h("span.muted", { text: o.note ?? `#${o.index}` })))
      : [h("li.none", { role: "option", "aria-disabled": "true", text: q ? `No class matches “${q}”` : "No classes" })]));
    list.hidden = false;
    input.setAttribute("aria-expanded", "true");
    active = -1;
  }
  let timer = null;
  input.addEventListener("focus", () => search());
  input.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(search, 100);
  });
  input.addEventListener("keydown", (ev) => {
    if (ev.key === "ArrowDown") {
      ev.preventDefault();
      if (list.hidden) search();
      else if (shown.length) highlight(Math.min(shown.length - 1, active + 1));
    } else if (ev.key === "ArrowUp" && shown.length) {
      ev.preventDefault();
      highlight(Math.max(0, active - 1));
    } else if (ev.key === "Enter") {
      ev.preventDefault();
      const o = shown[active >= 0 ? active : 0];
      if (o && !list.hidden) choose({ index: o.index, label: o.label });
      else if (!input.value.trim()) choose(null);
    } else if (ev.key === "Escape") {
      show(value);
      close();
    }
  });
  input.addEventListener("blur", () => setTimeout(() => {
    close();
    if (!input.value.trim() && value) choose(null);
    else show(value);
  }, 120));
  clear.addEventListener("click", () => {
    choose(null);
    input.focus();
  });
  return { root, input, set: show, get: () => value };
}
