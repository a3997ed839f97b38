// Errors next to the control they are about: the form field, the step, or under the button.
import { $, plainError, showError } from "../ui.js";

const SLOTS = { image: "#image-error", model: "#model-error", target: "#target-error", method: "#method-error", run: "#run-error" };
const BY_FIELD = { image: "image", file: "image", model: "model", target: "target", method: "method", top_k: "target" };
const BY_CODE = { bad_image: "image", too_large: "image", unknown_model: "model", model_unavailable: "model", bad_target: "target", unknown_method: "method" };

/** Shows (or clears, with "") the message of one step: image, model, target, method or run. */
export function stepError(step, message) {
  showError($(SLOTS[step]), message);
}

export function clearErrors(state) {
  for (const step of Object.keys(SLOTS)) stepError(step, "");
  if (state.form) state.form.clearErrors();
}

/** Puts an API error next to the control it is about (error.field), or under `fallback`'s step. */
export function placeError(state, e, fallback = "run") {
  if (e && e.cancelled) return;
  const msg = plainError(e);
  const field = e && e.field;
  if (field && state.form && state.form.has(field)) {
    state.form.setError(field, msg);
    $("#params-box").open = true;
    return;
  }
  const slot = $(SLOTS[BY_FIELD[field] || BY_CODE[e && e.code] || fallback]);
  showError(slot, msg);
  (slot.closest(".step") || slot).scrollIntoView({ block: "nearest" });
}
