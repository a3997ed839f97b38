// The summary: accuracy per model (big numbers), items per true class (bars, the correct share
// of the first model in green) and, for up to 50 classes, the first model's confusion matrix as
// a heat map whose cells set the true/predicted filters.
import { h } from "../ui.js";

const pct = (x) => (x === null || x === undefined ? "—" : `${(x * 100).toFixed(1)}%`);

function accuracyCard(name, label, m, size) {
  return h("div.ds-acc", { "data-model": name },
    h("span.ds-acc-model", { text: label }),
    h("strong.ds-acc-value", { "data-accuracy": m.accuracy ?? "", class: `ds-acc-value${m.accuracy === null ? " none" : ""}`, text: pct(m.accuracy) }),
    h("span.ds-acc-detail.muted", { text: `${m.correct} of ${m.evaluated} correct · ${m.scored}/${size} scored${m.failed ? ` · ${m.failed} unreadable` : ""}` }));
}

function classBars(classes, confusion) {
  const max = Math.max(1, ...classes.map((c) => c.count));
  const diag = new Map();
  if (confusion) confusion.classes.forEach((c, k) => diag.set(c.index, confusion.matrix[k][k]));
  return h("ol.ds-bars", { "aria-label": "Items per true class" },
    ...classes.map((c) => {
      const right = diag.get(c.index);
      return h("li.ds-bar-row", { title: `${c.label}: ${c.count} items${right !== undefined ? `, ${right} predicted right` : ""}` },
        h("span.ds-bar-label", { text: c.label }),
        h("span.ds-bar-track", { "aria-hidden": "true" },
          h("span.ds-bar-total", { style: { width: `${(100 * c.count) / max}%` } },
            right !== undefined ? h("span.ds-bar-right", { style: { width: `${(100 * right) / Math.max(1, c.count)}%` } }) : null)),
        h("span.ds-bar-count", { text: c.count }));
    }));
}

function matrix(confusion, onCell) {
  const { classes, matrix: m } = confusion;
  const n = classes.length;
  const cols = [...classes.map((c) => c.label), "other"];
  const readout = h("p.ds-cm-readout.small", { "aria-live": "polite", text: "Hover or focus a cell; click it to filter." });
  const grid = h("div.ds-cm", { role: "grid", "aria-label": "Confusion matrix: rows are true classes, columns predicted classes", style: { "--n": n + 1 } });
  grid.append(h("span.ds-cm-corner", { "aria-hidden": "true", text: "true ↓ · predicted →" }));
  cols.forEach((label) => grid.append(h("span.ds-cm-col", { title: label, "aria-hidden": "true" }, h("span", { text: label }))));
  const big = n <= 12;
  m.forEach((row, r) => {
    const total = row.reduce((a, b) => a + b, 0);
    grid.append(h("span.ds-cm-row", { title: classes[r].label, text: classes[r].label, "aria-hidden": "true" }));
    row.forEach((count, c) => {
      const share = total ? count / total : 0;
      const words = `True ${classes[r].label}, predicted ${cols[c]}: ${count}${total ? ` (${(share * 100).toFixed(0)}% of the row)` : ""}`;
      const cell = h("button.ds-cm-cell", {
        type: "button", role: "gridcell", "aria-label": words, "data-row": r, "data-col": c, "data-count": count,
        class: `ds-cm-cell${r === c ? " diag" : ""}${count ? "" : " zero"}`,
        style: { "--v": share.toFixed(3) },
        onclick: () => onCell(classes[r], c < n ? classes[c] : null),
      }, big && count ? String(count) : "");
      const say = () => { readout.textContent = words; };
      cell.addEventListener("mouseenter", say);
      cell.addEventListener("focus", say);
      grid.append(cell);
    });
  });
  return h("div.ds-cm-wrap", {}, h("div.ds-cm-scroll", {}, grid), readout);
}

/** Renders into `root`; onCell(trueClass, predictedClass or null for "other"). */
export function summaryPanel(root, { onCell, label }) {
  return {
    skeleton() {
      if (root.childElementCount) return;
      root.replaceChildren(h("div.ds-summary-grid", {}, h("div.ds-sum-block.skeleton"), h("div.ds-sum-block.skeleton"), h("div.ds-sum-block.skeleton")));
    },
    render(summary, models) {
      const first = summary.models[models[0]] || {};
      const confusion = first.confusion;
      const accuracy = h(`section.ds-sum-block.ds-accs${models.length > 1 ? ".many" : ""}`, { "aria-label": "Accuracy per model" },
        h("h3.group-label", { text: "Accuracy" }),
        ...models.filter((m) => summary.models[m]).map((m) => accuracyCard(m, label(m), summary.models[m], summary.size)));
      const counts = h("section.ds-sum-block", { "aria-label": "Items per class" },
        h("h3.group-label", { text: `Per class · ${summary.classes.length} ${summary.classes.length === 1 ? "class" : "classes"}` }),
        summary.classes.length ? classBars(summary.classes, confusion) : h("p.muted.small", { text: "No labels." }),
        confusion ? h("p.ds-legend.small.muted", {}, h("span.ds-key.right", { "aria-hidden": "true" }), "predicted right ",
          h("span.ds-key.wrong", { "aria-hidden": "true" }), "wrong or not scored") : null);
      const cm = h("section.ds-sum-block.ds-cm-block", { "aria-label": "Confusion matrix" },
        h("h3.group-label", { text: models.length > 1 ? `Confusion · ${label(models[0])}` : "Confusion" }),
        confusion ? matrix(confusion, onCell)
          : h("p.muted.small", { text: summary.classes.length > 50 ? "More than 50 classes: filter by class instead." : "Appears once items are scored." }));
      root.replaceChildren(h("div.ds-summary-grid", {}, accuracy, counts, cm));
    },
  };
}
