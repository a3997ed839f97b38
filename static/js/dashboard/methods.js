// Step 4: the method, grouped by family, and its parameter form (built from the method's schema).
import { api } from "../api.js";
import { paramForm } from "../form.js";
import { $, h } from "../ui.js";
import { stepError } from "./errors.js";

const FAMILIES = { gradient: "Gradients", rules: "Propagation rules", cam: "Class activation maps", perturbation: "Perturbation" };
const familyLabel = (f) => FAMILIES[f] || f.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());

/** Renders state.methods and selects the first; `changed()` runs on each choice. `fit()`, called
 * when the model changes, greys out the methods that model cannot run, with the server's reason. */
export function methodPanel(state, { changed }) {
  const options = new Map(); // method id → { input, option, reason }
  function select(id) {
    state.method = state.methods.find((m) => m.id === id);
    stepError("method", "");
    state.form = paramForm($("#param-form"), state.method);
    $("#params-box").hidden = !(state.method.params || []).some((p) => p.type !== "tensor");
    changed();
  }

  state.method = state.methods[0];
  const list = $("#method-list");
  list.replaceChildren();
  const families = [];
  for (const m of state.methods) if (!families.includes(m.family)) families.push(m.family);
  for (const fam of families) {
    const group = h("div.method-group", { role: "group", "aria-label": familyLabel(fam) }, h("p.group-label", { text: familyLabel(fam) }));
    for (const m of state.methods.filter((x) => x.family === fam)) {
      const id = `method-${m.id}`;
      const input = h("input.visually-hidden", { type: "radio", name: "method", id, value: m.id, checked: m.id === state.method.id });
      input.addEventListener("change", () => select(m.id));
      const cost = m.cost ? m.cost.forward + m.cost.backward : 0;
      const reason = h("span.option-desc.option-reason");
      const option = h("div.option.method", {}, input,
        h("label", { for: id },
          h("span.option-title", {}, m.label,
            cost > 20 ? h("span.badge.slow", { text: "slow", title: `${cost} passes per image` }) : null),
          h("span.option-desc", { text: m.description }), reason));
      options.set(m.id, { input, option, reason });
      group.append(option);
    }
    list.append(group);
  }

  function fit() {
    const model = state.models.find((m) => m.name === state.model) || {};
    const why = model.unsupported || {};
    for (const [id, { input, option, reason }] of options) {
      input.disabled = Boolean(why[id]);
      option.classList.toggle("disabled", Boolean(why[id]));
      reason.textContent = why[id] || "";
      option.title = why[id] || "";
    }
    if (why[state.method.id]) {
      const usable = state.methods.find((m) => !why[m.id]);
      if (usable) {
        options.get(usable.id).input.checked = true;
        select(usable.id);
      }
    }
  }

  /** The methods as described for `model` (defaults that follow its input size); the form is
   * rebuilt only when the chosen method's parameters differ, so edits survive a like model. */
  async function use(model) {
    const before = JSON.stringify(state.method.params);
    state.methods = await api.methods(model);
    fit();
    const now = state.methods.find((m) => m.id === state.method.id);
    if (now && JSON.stringify(now.params) !== before) select(now.id);
    else if (now) state.method = now;
  }

  select(state.method.id);
  fit();
  return { fit, use };
}
