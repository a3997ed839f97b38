// Step 1: an image from a file, a drop, the clipboard or a sample.
import { api } from "../api.js";
import { $, h, toast } from "../ui.js";
import { clearErrors, placeError, stepError } from "./errors.js";

/** Wires the drop zone; `loaded()` runs after each new image is in state.image. */
export function uploadPanel(state, { loaded }) {
  const zone = $("#dropzone");
  const input = $("#file-input");

  const setBusy = (on) => {
    zone.classList.toggle("busy", on);
    zone.setAttribute("aria-busy", String(on));
  };

  async function use(promise) {
    clearErrors(state);
    setBusy(true);
    performance.mark("insights:image-start");
    try {
      state.image = await promise;
      performance.mark("insights:uploaded");
    } catch (e) {
      setBusy(false);
      placeError(state, e, "image");
      return;
    }
    setBusy(false);
    const thumb = $("#thumb");
    thumb.src = state.image.url;
    thumb.hidden = false;
    zone.classList.add("has-image");
    await loaded();
  }

  function uploadFile(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      clearErrors(state);
      stepError("image", `“${file.name}” is not an image. Choose a PNG, JPEG or WebP photo.`);
      return;
    }
    use(api.upload(file));
  }

  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") {
      ev.preventDefault();
      input.click();
    }
  });
  input.addEventListener("change", () => {
    uploadFile(input.files[0]);
    input.value = "";
  });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (ev) => {
      ev.preventDefault();
      zone.classList.add("dragging");
    });
  }
  for (const name of ["dragleave", "drop"]) zone.addEventListener(name, () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    const file = ev.dataTransfer && ev.dataTransfer.files && ev.dataTransfer.files[0];
    if (file) uploadFile(file);
  });
  // Dropping outside the zone should not navigate away from the page.
  window.addEventListener("dragover", (ev) => ev.preventDefault());
  window.addEventListener("drop", (ev) => ev.preventDefault());
  document.addEventListener("paste", (ev) => {
    const items = Array.from((ev.clipboardData && ev.clipboardData.items) || []);
    const item = items.find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (!item) return;
    ev.preventDefault();
    const file = item.getAsFile();
    uploadFile(new File([file], file.name || "pasted.png", { type: file.type }));
    toast("Pasted image uploaded");
  });

  return {
    /** Offers the server's sample images as chips (nothing when there are none). The steps below
     * stay hidden in their place until the answer is in (app.css), so the chips arriving do not
     * push them down under the reader's eyes. */
    async loadSamples() {
      let samples = [];
      try {
        samples = await api.samples();
      } catch (e) {
        samples = [];
      }
      if (samples.length) {
        $("#sample-list").replaceChildren(
          ...samples.map((s) => h("button.chip", { type: "button", "data-sample": s.name, onclick: () => use(api.sample(s.name)) }, s.label || s.name)),
        );
        $("#samples").hidden = false;
      }
      $("#step-image").dataset.settled = "true";
    },
  };
}
