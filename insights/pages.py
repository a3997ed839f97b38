"""Human pages: the dashboard and the share page of a result (everything else is /api)."""
from __future__ import annotations

from flask import Blueprint, current_app, render_template, request, url_for

from . import overlay
from .store import Store

bp = Blueprint("pages", __name__)


def _store() -> Store:
    return current_app.extensions["insights"].store


def _describe(meta: dict) -> dict:
    """The words the share page and its preview cards use for a result."""
    label = meta.get("target_label") or f"class {meta.get('target')}"
    method = meta.get("method", "")
    try:
        from .engine import method_info

        method_label = method_info(method)["label"]
    except Exception:  # an old result whose method is no longer registered still gets a page
        method_label = method
    title = f"{label} — {method_label} on {meta.get('model', '')}"
    top = (meta.get("predictions") or [{}])[0]
    description = f"Why {meta.get('model', 'the model')} sees “{label}”: the {method_label} attribution map."
    if top.get("label"):
        description += f" Top prediction: {top['label']} ({100 * float(top.get('prob', 0)):.1f}%)."
    return {"label": label, "method_label": method_label, "title": title, "description": description}


NOISE_ONLY = ("nt_samples", "stdevs", "seed")  # meaningless while nt_type is "none"


def shown_params(params: dict) -> list[tuple[str, object]]:
    """The parameters worth showing on the share page, sorted by name."""
    off = params.get("nt_type") == "none"
    return sorted((k, v) for k, v in params.items() if not (off and k in NOISE_ONLY))


@bp.app_template_filter("param_value")
def param_value(value) -> str:
    """A parameter value as the API spells it: true/false, auto for null, 3×8×8 for lists."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "×".join(str(v) for v in value)
    return str(value)


def public_url(path: str) -> str | None:
    """The address others reach ``path`` (a path in the app, e.g. /r/<id>) at: ``PUBLIC_URL``
    joined with it, or None when ``PUBLIC_URL`` is not set. The request's Host header never
    goes into a link: anyone can send any Host."""
    base = current_app.config.get("PUBLIC_URL")
    return base + path if base else None


@bp.app_context_processor
def _public_base() -> dict:
    """``public_base`` for base.html: the page script builds share links from it when set."""
    return {"public_base": current_app.config.get("PUBLIC_URL")}


def stored_quality(store: Store, result_id: str) -> list[dict]:
    """The newest stored measurement of each metric of a result (Store.quality keeps them all,
    oldest first); the page shows one per metric."""
    newest: dict[str, dict] = {}
    for q in store.quality(result_id):
        newest[q["metric"]] = q
    return list(newest.values())


def _first(value):
    """The first image's entry of a per-image list, or the value itself."""
    return value[0] if isinstance(value, (list, tuple)) else value


def quality_words(q: dict) -> str:
    """One line for a measurement, shown where the page script does not run: its main figure."""
    a = q.get("answer") or {}
    label = q.get("label") or q.get("metric")
    if "areas" in a:
        ref = a.get("reference")
        tail = f" vs random {ref['mean'][0]:.3g} ± {ref['std'][0]:.3g}" if ref else ""
        return f"{label}: area {_first(a['areas']):.3g}{tail} ({q.get('better')} is better)"
    if "energies" in a:
        hit = _first(a.get("hits"))
        return (f"{label}: {100 * _first(a['energies']):.1f}% of the positive attribution in the box "
                f"(a uniform map: {100 * _first(a['chance']):.1f}%), the peak {'inside' if hit else 'outside'}")
    if "stages" in a:
        if _first(a.get("flagged")):
            return f"{label}: flagged, the map barely changes when the model is randomised"
        return f"{label}: passed, the map changes when the model is randomised"
    value = _first(a.get("values", a.get("value")))
    return f"{label}: {value:.3g}" if isinstance(value, (int, float)) else str(label)


@bp.get("/")
def index():
    """The dashboard."""
    return render_template("index.html", overlay=overlay.describe())


@bp.get("/r/<result_id>")
def share(result_id: str):
    """The share page of one stored result, with OpenGraph tags for link previews."""
    meta = _store().result(result_id)
    if meta is None:
        return render_template("404.html", path=request.path), 404
    words = _describe(meta)
    path = f"/r/{meta['id']}"
    quality = stored_quality(_store(), meta["id"])
    return render_template(
        "share.html",
        meta=meta,
        words=words,
        params=shown_params(meta.get("params") or {}),
        # Link previews need absolute addresses, so without PUBLIC_URL the card has no image and
        # no og:url (title and description only); the canonical link is then relative.
        og_image=public_url(f"/api/results/{meta['id']}/card.png"),  # 1200×630, insights/card.py
        og_url=public_url(path),
        canonical=public_url(path) or url_for("pages.share", result_id=meta["id"]),
        overlay=overlay.describe(),
        quality=quality,
        quality_words=[quality_words(q) for q in quality],
    )
