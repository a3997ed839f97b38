"""The JSON API (docs/api.md): views that parse a request, call the service and serialise."""
from __future__ import annotations

import hashlib
import ipaddress
import json
from functools import wraps

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from werkzeug.exceptions import HTTPException

from . import __version__, card, imaging, metrics, overlay, security
from .admission import client_id
from .engine.errors import shown
from .errors import Forbidden, NotFound, ServiceError, as_int, describe
from .jobs import Ticket

bp = Blueprint("api", __name__, url_prefix="/api")

IMMUTABLE_AGE = 31536000
# The settings shown under "limits" in GET /api.
LIMIT_SETTINGS = ("MAX_CONTENT_LENGTH", "MAX_IMAGE_PIXELS", "INLINE_MAX_PASSES", "MAX_PASSES", "MAX_TOP_K",
                  "MAX_LOADED_MODELS", "JOBS_KEPT", "MEMORY_BUDGET", "SSE_HEARTBEAT_S", "MAX_QUEUED_JOBS",
                  "MAX_JOBS_PER_CLIENT", "RATE_LIMIT_PER_MIN", "INLINE_TIMEOUT_S", "MAX_INLINE_WAITS",
                  "MAX_EVENT_STREAMS", "EVENT_STREAM_MAX_S")


def error_response(status: int, code: str, message: str, field: str | None = None):
    resp = jsonify({"error": {"code": code, "message": message, "field": field}})
    resp.status_code = status
    return resp


@bp.errorhandler(Exception)
def _error(err: Exception):
    """Every error under /api, in one mapping (:func:`insights.errors.describe`)."""
    if isinstance(err, HTTPException):
        return http_error(err)
    e = describe(err, security.request_id())  # an internal error is logged there, under the id
    if e.code == "busy":  # every admission refusal comes through here: counted once, by reason
        metrics.count_rejection(current_app, getattr(err, "reason", None) or "busy")
    resp = error_response(e.status, e.code, e.message, e.field)
    if getattr(err, "retry_after", None):  # admission control's refusals (errors.Busy)
        resp.headers["Retry-After"] = str(err.retry_after)
    return resp


def http_error(err: HTTPException):
    """HTTP errors under /api answer JSON too (404 for unknown paths, 405, 413 for big bodies)."""
    if err.code == 413:
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        field = "image" if request.mimetype == "multipart/form-data" else None
        return error_response(413, "too_large", f"the request body is larger than the limit of {limit} bytes "
                                                "(MAX_CONTENT_LENGTH)", field)
    code = {404: "not_found"}.get(err.code, "bad_request")
    return error_response(err.code or 500, code, err.description or err.name, None)


def init_app(app) -> None:
    """Registers the blueprint, and JSON errors for /api paths that match no view."""
    app.register_blueprint(bp)

    @app.errorhandler(HTTPException)
    def _app_http_error(err: HTTPException):
        if request.path == "/api" or request.path.startswith("/api/"):
            return http_error(err)
        return err.get_response()


# --------------------------------------------------------------------------- helpers


def service():
    return current_app.extensions["insights"]


def write(view):
    """Marks a view that writes: each call counts against the client's rate limit
    (``RATE_LIMIT_PER_MIN``), checked before the request's body is read."""
    @wraps(view)
    def counted(*args, **kwargs):
        service().allow_write(client_id())
        return view(*args, **kwargs)
    return counted


def queued(ticket: Ticket):
    """202 with the job to follow and the submitter's cancel token (only this answer has it)."""
    resp = jsonify({"status": "queued", "job": {**ticket.job.to_dict(), "cancel_token": ticket.cancel_token}})
    resp.status_code = 202
    resp.headers["Location"] = url_for("api.job", job_id=ticket.job.id)
    return resp


MAX_JSON_DEPTH = 8  # our bodies nest three levels (body → params → a list); more is refused


def body() -> dict:
    """The request's JSON object, refused with a 400 when it is not one or nests too deep."""
    try:
        data = request.get_json(silent=True)
    except RecursionError:  # nesting deeper than the parser's own stack allows
        raise ServiceError(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(data, dict):
        raise ServiceError("the request body must be a JSON object (Content-Type: application/json)")
    if json_depth(data) > MAX_JSON_DEPTH:
        raise ServiceError(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")
    return data


def json_depth(value, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep ``value`` nests (a scalar is 0), counted without recursion and only up to
    ``limit`` + 1."""
    deepest, level = 0, [(value, 0)]
    while level:
        item, depth = level.pop()
        if isinstance(item, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            level.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def immutable(data: bytes, mimetype: str, etag: str):
    """A content-addressed response: strong ETag, cached for a year, 304 on If-None-Match."""
    return conditional(data, mimetype, etag, max_age=IMMUTABLE_AGE, immutable=True)


def revalidated(data: bytes, mimetype: str, etag: str, download: str | None = None):
    """A response of a share link: cached, but revalidated on every use (``no-cache``) so that
    a deleted result stops being served; the strong ETag keeps those checks to a 304."""
    return conditional(data, mimetype, etag, download, no_cache=True)


def conditional(data: bytes, mimetype: str, etag: str, download: str | None = None, **cache):
    """A public response with a strong ETag (304 on If-None-Match) and the ``cache`` directives."""
    resp = Response(data, mimetype=mimetype)
    resp.set_etag(etag)
    resp.cache_control.public = True
    for directive, value in cache.items():
        setattr(resp.cache_control, directive, value)
    if download:
        resp.headers["Content-Disposition"] = f'attachment; filename="{download}"'
    return resp.make_conditional(request)


def image_json(record: dict) -> dict:
    return {"id": record["id"], "width": record["width"], "height": record["height"],
            "url": url_for("api.image", image_id=record["id"])}


# --------------------------------------------------------------------------- discovery


@bp.get("")
def index():
    """Version, limits and links."""
    cfg = current_app.config
    return jsonify({"version": __version__, "limits": {k: cfg.get(k) for k in LIMIT_SETTINGS},
                    "endpoints": {"models": url_for("api.models"), "methods": url_for("api.methods"),
                                  "samples": url_for("api.samples"), "images": url_for("api.upload"),
                                  "predict": url_for("api.predict"), "explain": url_for("api.explain"),
                                  "metrics": url_for("api.metric_list")}})


@bp.get("/models")
def models():
    """The model list with availability (nothing is loaded to answer)."""
    return jsonify({"models": service().model_list(), "device": str(service().models.device)})


@bp.get("/methods")
def methods():
    """Every method's self-description, in the registry's order; with ``model``, whether each
    runs on that model (``supported``) and why not (``reason``)."""
    model = request.args.get("model")
    if model is not None:
        service().models.spec(model)  # an unknown model is a 400 naming it
    return jsonify({"methods": service().method_list(model)})


@bp.get("/metrics")
def metric_list():
    """Every faithfulness metric and check's self-description (parameters, cost, which way is
    better); with ``model``, the defaults for its input size."""
    return jsonify({"metrics": service().metric_list(request.args.get("model"))})


@bp.get("/models/<name>/labels")
def labels(name: str):
    """Class names matching ``q`` (case-insensitive substring)."""
    service().models.spec(name)  # an unknown model is named before a bad limit
    limit = as_int(request.args.get("limit", 20), "limit", 1, 1000)
    return jsonify(service().labels(name, request.args.get("q", ""), limit))


@bp.get("/samples")
def samples():
    """The sample photos this server can offer."""
    return jsonify({"samples": service().samples()})


# --------------------------------------------------------------------------- images


@bp.post("/samples/<name>")
@write
def sample(name: str):
    """Stores a sample photo as an image and answers its record."""
    return jsonify(image_json(service().put_sample(name))), 201


@bp.post("/images")
@write
def upload():
    """Validates and stores an uploaded image (multipart field ``image``)."""
    f = request.files.get("image")
    if f is None:
        raise ServiceError("send the picture as multipart/form-data in the field 'image'", "image")
    return jsonify(image_json(service().upload(f.read(), f.filename))), 201


@bp.get("/images/<image_id>")
def image(image_id: str):
    """The stored image: JPEG when it was uploaded as one, else PNG."""
    service().image(image_id)
    data, mimetype = service().store.image_file(image_id)
    return immutable(data, mimetype, image_id)


# --------------------------------------------------------------------------- predict and explain


@bp.post("/predict")
@write
def predict():
    """The model's top-k classes for an image (202 with the job when not done in time)."""
    data = body()
    answer = service().predict(data.get("model"), data.get("image"), data.get("top_k", 5), client_id())
    return queued(answer) if isinstance(answer, Ticket) else jsonify(answer)


@bp.post("/explain")
@write
def explain():
    """Answers a stored result, computes a cheap one now, or queues a costly one as a job."""
    data = body()
    answer = service().explain(data.get("model"), data.get("image"), data.get("method"), data.get("params"),
                               data.get("target"), client_id())
    if answer.job is None:
        return jsonify({"status": answer.status, "cached": answer.cached, "result": answer.result})
    return queued(Ticket(answer.job, answer.cancel_token))


# --------------------------------------------------------------------------- jobs


@bp.get("/jobs/<job_id>")
def job(job_id: str):
    """The job's state and progress."""
    return jsonify(service().job(job_id).to_dict())


@bp.delete("/jobs/<job_id>")
@write
def cancel_job(job_id: str):
    """Cancels a queued or running job for its submitter (the cancel token its submission got)."""
    token = request.headers.get("X-Cancel-Token") or request.args.get("cancel_token")
    if not token:
        data = request.get_json(silent=True)
        token = data.get("cancel_token") if isinstance(data, dict) else None
    return jsonify(service().cancel(job_id, token).to_dict())


@bp.get("/jobs/<job_id>/events")
def job_events(job_id: str):
    """Server-sent events: the job as JSON at every change, ending with its final state, or
    with an ``expired`` event after ``EVENT_STREAM_MAX_S`` (503 ``busy`` past ``MAX_EVENT_STREAMS``)."""
    events = service().events(job_id)

    def stream():
        try:
            for state in events:
                yield ": keep-alive\n\n" if state is None else f"data: {json.dumps(state)}\n\n"
            if events.expired:
                yield "event: expired\ndata: {}\n\n"
        finally:
            events.close()

    resp = Response(stream(), mimetype="text/event-stream")
    resp.call_on_close(events.close)  # also when the stream is never read
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp


# --------------------------------------------------------------------------- results


def digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


@bp.get("/results/<rid>")
def result(rid: str):
    """A result's metadata."""
    body = current_app.json.dumps(service().result(rid)).encode()
    return revalidated(body, "application/json", digest(body))


@bp.delete("/results/<rid>")
@write
def delete_result(rid: str):
    """Deletes a result: its files and index row; its links answer 404 from then on. It needs a
    token; a server with none (a laptop, a public demo) takes it from this machine only: a share
    link is permission to look, and on an open demo everyone who saw one could delete it."""
    if not current_app.extensions["insights.access"].required and not loopback(request.remote_addr):
        raise Forbidden("deleting a result needs an access token, and this server has none: only a request "
                        "from the server's own machine may delete one here", "result")
    return jsonify({"deleted": service().delete_result(rid)})


@bp.get("/results/<rid>/quality")
def result_quality(rid: str):
    """The stored measurements of a result's map, oldest first."""
    return jsonify({"quality": service().quality_list(rid)})


@bp.post("/results/<rid>/quality")
@write
def measure(rid: str):
    """Measures a result's map with a metric: answers a stored measurement, makes a cheap one
    now, or queues a costly one as a job whose result is the measurement."""
    data = body()
    answer = service().quality(rid, data.get("metric"), data.get("params"), client_id())
    if answer.job is None:
        return jsonify({"status": answer.status, "cached": answer.cached, "quality": answer.result})
    return queued(Ticket(answer.job, answer.cancel_token))


def loopback(addr: str | None) -> bool:
    """Whether the request came from this machine (127.0.0.0/8, ::1, or IPv4 mapped into IPv6)."""
    try:
        ip = ipaddress.ip_address((addr or "").split("%", 1)[0])
    except ValueError:
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


@bp.get("/results/<rid>/input.png")
def result_input(rid: str):
    """The cropped image the model saw."""
    service().result(rid)
    data = service().store.result_file(rid, "input.png")
    return revalidated(data, "image/png", digest(data))


@bp.get("/results/<rid>/map.png")
def result_map(rid: str):
    """The channel-summed map as an 8-bit grayscale PNG (see ``encoding``)."""
    service().result(rid)
    data = service().store.result_file(rid, "map.png")
    return revalidated(data, "image/png", digest(data))


@bp.get("/results/<rid>/attribution.npy")
def result_npy(rid: str):
    """The float32 attribution, N×C×H×W, made from the stored compact map (304 without it)."""
    service().result(rid)
    store = service().store
    stored = store.attribution_file(rid)
    etag = digest(b"npy", stored)
    if request.if_none_match and etag in request.if_none_match:
        return revalidated(b"", "application/octet-stream", etag)
    return revalidated(store.npy_bytes(stored), "application/octet-stream", etag,
                       download=f"{rid[:12]}-attribution.npy")


@bp.get("/results/<rid>/overlay.png")
def result_overlay(rid: str):
    """The map rendered over the input from map.png, as the page draws it (insights/overlay.py)."""
    meta = service().result(rid)
    opts = overlay.options(request.args, bool(meta["signed"]))
    store = service().store
    view, heat = store.result_file(rid, "input.png"), store.result_file(rid, "map.png")
    key = f"{overlay.fingerprint()}:{json.dumps(opts.as_dict(), sort_keys=True)}:{json.dumps(meta['encoding'])}"
    etag = digest(key.encode(), view, heat)
    if request.if_none_match and etag in request.if_none_match:
        return revalidated(b"", "image/png", etag)  # answered 304 without rendering
    out = overlay.render_result(view, heat, meta["encoding"], opts)
    return revalidated(imaging.png_bytes(out), "image/png", etag)


@bp.get("/results/<rid>/card.png")
def result_card(rid: str):
    """The result's link-preview card (1200×630): input and overlay side by side, with the class,
    its probability, the method and the model; made once and kept with the result."""
    meta = service().result(rid)
    # A card follows from its result and the renderer's version: the ETag is known before
    # anything is rendered, so a revalidation costs nothing.
    etag = digest(f"card:{card.VERSION}:{rid}".encode())
    if request.if_none_match and etag in request.if_none_match:
        return revalidated(b"", "image/png", etag)
    return revalidated(service().result_card(rid, meta), "image/png", etag)


@bp.get("/colormaps/<name>.png")
def colormap_table(name: str):
    """A colour map as the 256×1 RGB lookup table both overlay renderers use."""
    try:
        png = overlay.lut_png(name)
    except KeyError:
        raise NotFound(f"no matplotlib colormap named {shown(name)}", "cmap") from None
    return immutable(png, "image/png", hashlib.sha256(png).hexdigest())


from . import api_datasets  # noqa: E402,F401 - the datasets' views, on this blueprint
