// Step 2: the model, one radio per registered model; unavailable ones folded away with their reason.
import { $, h } from "../ui.js";
import { stepError } from "./errors.js";

/** The model the page starts with: the server's default when available, else the first available. */
export function defaultModel(models) {
  const available = models.filter((m) => m.available);
  return (available.find((m) => m.default) || available[0] || {}).name || null;
}

/** Renders the models of state.models, selects the default; `changed()` runs on each choice. */
export function modelPanel(state, { changed }) {
  const list = $("#model-list");
  list.replaceChildren();
  const available = state.models.filter((m) => m.available);
  state.model = defaultModel(state.models);
  const unavailable = state.models.filter((m) => !m.available);
  const more = h("details.more-models", {}, h("summary", { text: `${unavailable.length} more ${unavailable.length === 1 ? "model" : "models"} not available here` }));
  for (const m of state.models) {
    const id = `model-${m.name}`;
    const input = h("input.visually-hidden", { type: "radio", name: "model", id, value: m.name, disabled: !m.available, checked: m.name === state.model });
    input.addEventListener("change", () => {
      state.model = m.name;
      stepError("model", "");
      changed();
    });
    const size = m.input_size ? `${m.input_size[1]}×${m.input_size[2]}` : "";
    const detail = m.available ? [size, m.num_classes ? `${m.num_classes} classes` : ""].filter(Boolean).join(" · ") : m.reason || "Unavailable";
    (m.available ? list : more).append(
      h("div.option", { class: `option${m.available ? "" : " disabled"}` }, input,
        h("label", { for: id, title: m.available ? m.description || "" : m.reason || "" },
          h("span.option-title", {}, m.label || m.name, m.loaded ? h("span.badge.ok", { text: "ready", title: "Loaded in memory" }) : null,
            !m.available ? h("span.badge.warn", { text: "unavailable" }) : null),
          h("span.option-desc", { text: detail }))),
    );
  }
  if (unavailable.length) list.append(more);
  if (!available.length) stepError("model", "No model is available on this server.");
}
