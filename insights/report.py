"""What ``insights explain`` writes: ``results.csv`` (one row per item) and ``index.html``, a report
that opens from disk with no server and no script: each item's input (the crop the model saw) and
its overlay, copied from the store to ``images/``, with the true label, the prediction, and the
share id (a link when ``PUBLIC_URL`` is set). Files are written under a temporary name and renamed,
so a report is whole or absent."""
from __future__ import annotations

import csv
import io
import os
import re
import time

from jinja2 import Environment

from . import overlay
from .store import write_atomic

CSV_COLUMNS = ("item", "true_index", "true_label", "predicted_index", "prediction", "probability", "target",
               "target_label", "correct", "method", "share_id", "share_url", "cached", "error")
IMAGE_NAME = re.compile(r"^[0-9a-f]{64}-(input|overlay)\.png$")


def verdict(row: dict) -> str:
    """correct, incorrect, unlabelled or error."""
    if row.get("error") or not row.get("prediction"):
        return "error"
    if not row.get("true"):
        return "unlabelled"
    return "correct" if row["true"]["index"] == row["prediction"]["index"] else "incorrect"


def share_url(public_url: str | None, rid: str | None) -> str | None:
    return f"{str(public_url).rstrip('/')}/r/{rid}" if public_url and rid else None


def csv_rows(rows: list[dict], labels: list[str], public_url: str | None) -> list[dict]:
    out = []
    for row in rows:
        true, pred, target = row.get("true"), row.get("prediction"), row.get("target")
        v = verdict(row)
        out.append({
            "item": row["key"],
            "true_index": "" if true is None else true["index"],
            "true_label": "" if true is None else true["label"],
            "predicted_index": "" if pred is None else pred["index"],
            "prediction": "" if pred is None else pred["label"],
            "probability": "" if pred is None else f"{pred['prob']:.4f}",
            "target": "" if target is None else target,
            "target_label": labels[target] if isinstance(target, int) and 0 <= target < len(labels) else "",
            "correct": {"correct": "true", "incorrect": "false"}.get(v, ""),
            "method": row.get("method") or "",
            "share_id": row.get("result") or "",
            "share_url": share_url(public_url, row.get("result")) or "",
            "cached": "true" if row.get("cached") else "false",
            "error": row.get("error") or "",
        })
    return out


def copy_images(out: str, rows: list[dict], store) -> dict[str, tuple[str, str] | str]:
    """Each result's input and overlay as ``images/<result id>-input.png`` and ``-overlay.png``
    (kept when already there: a result id names its content); a result id → the two relative
    paths, or the reason they could not be made. Images of results no longer listed are removed."""
    folder = os.path.join(out, "images")
    os.makedirs(folder, exist_ok=True)
    made: dict[str, tuple[str, str] | str] = {}
    for row in rows:
        rid = row.get("result")
        if not rid or rid in made:
            continue
        names = (f"{rid}-input.png", f"{rid}-overlay.png")
        paths = [os.path.join(folder, n) for n in names]
        try:
            if not all(os.path.isfile(p) for p in paths):
                meta = store.result(rid)
                if meta is None:
                    raise LookupError("the stored result is gone (evicted or deleted); run again to recompute it")
                view = store.result_file(rid, "input.png")
                heat = store.result_file(rid, "map.png")
                opts = overlay.options({}, bool(meta.get("signed")))
                picture = io.BytesIO()
                overlay.render_result(view, heat, meta["encoding"], opts).save(picture, "PNG", optimize=True)
                write_atomic(paths[0], view)
                write_atomic(paths[1], picture.getvalue())
            made[rid] = (f"images/{names[0]}", f"images/{names[1]}")
        except (LookupError, OSError) as e:
            made[rid] = str(e)
    keep = {os.path.basename(p) for v in made.values() if isinstance(v, tuple) for p in v}
    for name in os.listdir(folder):
        if IMAGE_NAME.match(name) and name not in keep:
            os.unlink(os.path.join(folder, name))
    return made


def write(out: str, rows: list[dict], store, *, dataset, model: str, method: str, params: dict, target,
          public_url: str | None = None, complete: bool = True) -> dict[str, str]:
    """Writes ``out/results.csv``, ``out/index.html`` and ``out/images/``; returns their paths."""
    rows = sorted(rows, key=lambda r: r["index"])
    labels = list(dataset.labels)
    images = copy_images(out, rows, store)

    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(rows, labels, public_url))
    csv_path = os.path.join(out, "results.csv")
    write_atomic(csv_path, table.getvalue().encode())

    cards = []
    for row in rows:
        pictures = images.get(row.get("result") or "")
        pred, true, t = row.get("prediction"), row.get("true"), row.get("target")
        error = row.get("error") or (pictures if isinstance(pictures, str) else None)
        cards.append({
            "key": row["key"], "verdict": verdict(row), "true": true, "prediction": pred,
            "percent": None if pred is None else round(100 * float(pred["prob"]), 1),
            "target": labels[t] if isinstance(t, int) and 0 <= t < len(labels) else None,
            "target_index": t, "explains_prediction": bool(pred) and t == pred["index"],
            "input": pictures[0] if isinstance(pictures, tuple) else None,
            "overlay": pictures[1] if isinstance(pictures, tuple) else None,
            "rid": row.get("result"), "url": share_url(public_url, row.get("result")),
            "cached": bool(row.get("cached")), "error": error})
    counts = {v: sum(1 for c in cards if c["verdict"] == v) for v in ("correct", "incorrect", "unlabelled", "error")}
    labelled = counts["correct"] + counts["incorrect"]
    page = _TEMPLATE.render(
        title=f"{dataset.name} · {model} · {method}", dataset=dataset, model=model, method=method,
        params=params, target=target, cards=cards, counts=counts, total=len(dataset), done=len(rows),
        accuracy=None if not labelled else round(100 * counts["correct"] / labelled, 1),
        cached=sum(1 for c in cards if c["cached"]), complete=complete, public_url=public_url,
        when=time.strftime("%Y-%m-%d %H:%M %Z"))
    html_path = os.path.join(out, "index.html")
    write_atomic(html_path, page.encode())
    return {"csv": csv_path, "html": html_path}


_TEMPLATE = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} — Insights report</title>
<style>
:root { --ink: #1d2330; --muted: #5d6675; --line: #e3e6ec; --bg: #f5f6f9; --card: #fff;
        --good: #1b7f4b; --good-bg: #e3f5eb; --bad: #b3261e; --bad-bg: #fbe7e5; --plain: #44506a;
        --plain-bg: #eceff5; --accent: #3454d1; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: var(--bg); }
header { background: var(--card); border-bottom: 1px solid var(--line); padding: 20px 28px 16px; }
h1 { margin: 0 0 4px; font-size: 20px; font-weight: 650; }
h1 small { color: var(--muted); font-weight: 500; font-size: 14px; margin-left: 6px; }
.facts { color: var(--muted); display: flex; flex-wrap: wrap; gap: 4px 18px; margin: 0; }
.facts b { color: var(--ink); font-weight: 600; }
code { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.stats { display: flex; flex-wrap: wrap; gap: 10px; margin-top: 14px; }
.stat { background: var(--bg); border: 1px solid var(--line); border-radius: 10px; padding: 8px 14px; min-width: 96px; }
@media (max-width: 560px) { header, main { padding-left: 16px; padding-right: 16px; } .stat { padding: 6px 10px; }
  .stat strong { font-size: 17px; } }
.stat strong { display: block; font-size: 20px; font-weight: 650; }
.stat span { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.warn { margin: 14px 0 0; padding: 10px 14px; border-radius: 8px; background: #fff4d6; color: #6b4b00; }
main { padding: 18px 28px 40px; }
.filters { display: flex; gap: 6px; margin-bottom: 16px; flex-wrap: wrap; }
main > input[type=radio] { position: absolute; opacity: 0; pointer-events: none; }
.filters label { padding: 6px 12px; border-radius: 999px; border: 1px solid var(--line); background: var(--card);
                 cursor: pointer; color: var(--plain); user-select: none; }
#all:checked ~ .filters label[for=all], #correct:checked ~ .filters label[for=correct],
#incorrect:checked ~ .filters label[for=incorrect], #error:checked ~ .filters label[for=error] {
  background: var(--ink); color: #fff; border-color: var(--ink); }
#correct:checked ~ .grid .card:not(.correct), #incorrect:checked ~ .grid .card:not(.incorrect),
#error:checked ~ .grid .card:not(.error) { display: none; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 16px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 12px; overflow: hidden;
        display: flex; flex-direction: column; box-shadow: 0 1px 2px rgba(20, 30, 50, .05); }
.pics { display: grid; grid-template-columns: 1fr 1fr; gap: 2px; background: var(--line); }
.pics figure { margin: 0; position: relative; background: #fff; }
.pics img { display: block; width: 100%; aspect-ratio: 1; object-fit: cover; }
.pics figcaption { position: absolute; left: 6px; bottom: 6px; font-size: 11px; color: #fff;
                   background: rgba(15, 20, 30, .6); padding: 1px 6px; border-radius: 4px; }
.missing { height: 72px; display: flex; align-items: center; justify-content: center; padding: 12px;
           color: var(--muted); text-align: center; border-bottom: 1px solid var(--line);
           background: repeating-linear-gradient(135deg, #f7f8fa 0 10px, #eef0f4 10px 20px); }
.body { padding: 12px 14px 14px; display: flex; flex-direction: column; gap: 6px; }
.top { display: flex; justify-content: space-between; align-items: center; gap: 8px; }
.key { font-weight: 600; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.badge { flex: none; font-size: 11px; font-weight: 650; text-transform: uppercase; letter-spacing: .04em;
         padding: 2px 8px; border-radius: 999px; }
.correct .badge { color: var(--good); background: var(--good-bg); }
.incorrect .badge { color: var(--bad); background: var(--bad-bg); }
.unlabelled .badge { color: var(--plain); background: var(--plain-bg); }
.error .badge { color: #fff; background: var(--bad); }
.incorrect { border-color: #f1c4bf; }
dl { margin: 0; display: grid; grid-template-columns: auto 1fr; gap: 2px 10px; }
dt { color: var(--muted); }
dd { margin: 0; min-width: 0; overflow-wrap: anywhere; }
.bar { height: 6px; border-radius: 3px; background: var(--plain-bg); overflow: hidden; margin-top: 3px; }
.bar i { display: block; height: 100%; background: var(--accent); }
.incorrect .bar i { background: var(--bad); }
.correct .bar i { background: var(--good); }
.share { color: var(--muted); font-size: 12px; }
.share a { color: var(--accent); }
.err { color: var(--bad); overflow-wrap: anywhere; }
footer { color: var(--muted); font-size: 12px; padding: 0 28px 28px; }
</style>
</head>
<body>
<header>
  <h1>{{ dataset.name }}<small>{{ model }} · {{ method }}</small></h1>
  <p class="facts">
    <span>target <b>{{ target }}</b></span>
    <span>parameters <code>{{ params | tojson if params else "defaults" }}</code></span>
    <span>source <b>{{ dataset.kind }}</b>, {{ total }} item{{ "s" if total != 1 }}</span>
    <span>made {{ when }}</span>
  </p>
  <div class="stats">
    <div class="stat"><strong>{{ done }}</strong><span>explained</span></div>
    {% if accuracy is not none %}
    <div class="stat"><strong>{{ accuracy }}%</strong><span>top-1 correct</span></div>
    <div class="stat"><strong>{{ counts.correct }}</strong><span>correct</span></div>
    <div class="stat"><strong>{{ counts.incorrect }}</strong><span>incorrect</span></div>
    {% endif %}
    {% if counts.error %}<div class="stat"><strong>{{ counts.error }}</strong><span>errors</span></div>{% endif %}
    <div class="stat"><strong>{{ cached }}</strong><span>from the store</span></div>
  </div>
  {% if not complete %}
  <p class="warn">Stopped before the end: {{ done }} of {{ total }} items are here. Run the same command again to
    go on; what is stored is not computed again.</p>
  {% endif %}
</header>
<main>
  <input type="radio" name="show" id="all" checked>
  <input type="radio" name="show" id="correct">
  <input type="radio" name="show" id="incorrect">
  <input type="radio" name="show" id="error">
  <div class="filters">
    <label for="all">All {{ cards | length }}</label>
    {% if accuracy is not none %}
    <label for="correct">Correct {{ counts.correct }}</label>
    <label for="incorrect">Incorrect {{ counts.incorrect }}</label>
    {% endif %}
    {% if counts.error %}<label for="error">Errors {{ counts.error }}</label>{% endif %}
  </div>
  <div class="grid">
  {% for c in cards %}
    <article class="card {{ c.verdict }}">
      {% if c.input %}
      <div class="pics">
        <figure><img src="{{ c.input }}" alt="{{ c.key }}, as the model saw it" loading="lazy">
          <figcaption>input</figcaption></figure>
        <figure><img src="{{ c.overlay }}" alt="{{ method }} map of {{ c.key }}" loading="lazy">
          <figcaption>{{ method }}</figcaption></figure>
      </div>
      {% else %}
      <div class="missing">No map: the item could not be explained</div>
      {% endif %}
      <div class="body">
        <div class="top">
          <span class="key" title="{{ c.key }}">{{ c.key }}</span><span class="badge">{{ c.verdict }}</span>
        </div>
        <dl>
          {% if c.true %}
          <dt>true</dt><dd>{{ c.true.label }} <span class="share">#{{ c.true.index }}</span></dd>
          {% endif %}
          {% if c.prediction %}
          <dt>predicted</dt>
          <dd>{{ c.prediction.label }} · {{ c.percent }}%
            <div class="bar"><i style="width: {{ c.percent }}%"></i></div></dd>
          {% endif %}
          {% if c.target and not c.explains_prediction %}
          <dt>explains</dt><dd>{{ c.target }} <span class="share">#{{ c.target_index }}</span></dd>
          {% endif %}
        </dl>
        {% if c.error %}<div class="err">{{ c.error }}</div>{% endif %}
        {% if c.rid %}
        <div class="share">share id
          {% if c.url %}<a href="{{ c.url }}" title="{{ c.rid }}"><code>{{ c.rid[:16] }}…</code></a>
          {% else %}<code title="{{ c.rid }}">{{ c.rid[:16] }}…</code>{% endif %}
        </div>
        {% endif %}
      </div>
    </article>
  {% endfor %}
  </div>
</main>
<footer>
  Made by <code>insights explain</code>. Every map is stored in the instance folder;
  {% if public_url %}share links open on {{ public_url }}
  {% else %}a server on the same instance folder serves each at <code>/r/&lt;share id&gt;</code>{% endif %}.
  Full ids and values: <a href="results.csv">results.csv</a>.
</footer>
</body>
</html>
""")
