"""The JSON API (docs/api.md): thin views that parse requests, call the services and serialise."""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import time
from typing import Any

import numpy as np
import torch
from flask import Blueprint, Response, current_app, jsonify, request, url_for
from PIL import Image
from werkzeug.exceptions import HTTPException

from . import __version__, imaging
from .jobs import error_of
from .models import ModelUnavailable, UnknownModel
from .store import canonical_json, result_id, utc_now

# The engine module itself (``insights.methods`` the attribute is the methods() function); views
# look its functions up at call time, so tests can wrap ``attribute`` to count calls.
engine = importlib.import_module("insights.engine")

bp = Blueprint("api", __name__, url_prefix="/api")

IMMUTABLE_AGE = 31536000
SAMPLES = {"chelsea": "Chelsea the cat", "coffee": "A cup of coffee", "astronaut": "Astronaut Eileen Collins",
           "rocket": "A rocket on the launch pad"}
# The settings shown under "limits" in GET /api.
LIMIT_SETTINGS = ("MAX_CONTENT_LENGTH", "MAX_IMAGE_PIXELS", "INLINE_MAX_PASSES", "MAX_PASSES", "MAX_TOP_K",
                  "MAX_LOADED_MODELS", "JOBS_KEPT", "MEMORY_BUDGET", "SSE_HEARTBEAT_S")


class ApiError(Exception):
    """A client error with the JSON body of docs/api.md."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field


def error_response(status: int, code: str, message: str, field: str | None = None):
    resp = jsonify({"error": {"code": code, "message": message, "field": field}})
    resp.status_code = status
    return resp


@bp.errorhandler(ApiError)
def _api_error(err: ApiError):
    return error_response(err.status, err.code, err.message, err.field)


@bp.errorhandler(imaging.ImageError)
def _image_error(err: imaging.ImageError):
    return error_response(413 if err.code == "too_large" else 400, err.code, err.message, err.field)


@bp.errorhandler(engine.InsightsError)
def _engine_error(err: engine.InsightsError):
    e = error_of(err)
    return error_response(400, e["code"], e["message"], e["field"])


@bp.errorhandler(UnknownModel)
def _unknown_model(err: UnknownModel):
    return error_response(400, "unknown_model", str(err), "model")


@bp.errorhandler(ModelUnavailable)
def _unavailable(err: ModelUnavailable):
    return error_response(503, "model_unavailable", str(err), "model")


def http_error(err: HTTPException):
    """HTTP errors under /api answer JSON too (404 for unknown paths, 405, 413 for big bodies)."""
    if err.code == 413:
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        field = "image" if request.mimetype == "multipart/form-data" else None
        return error_response(413, "too_large", f"the request body is larger than the limit of {limit} bytes "
                                                "(MAX_CONTENT_LENGTH)", field)
    code = {404: "not_found"}.get(err.code, "bad_request")
    return error_response(err.code or 500, code, err.description or err.name, None)


bp.register_error_handler(HTTPException, http_error)


@bp.errorhandler(Exception)
def _internal(err: Exception):
    current_app.logger.exception("internal error in %s", request.path)
    return error_response(500, "internal", f"{type(err).__name__}: {err}", None)


def init_app(app) -> None:
    """Registers the blueprint, and JSON errors for /api paths that match no view."""
    app.register_blueprint(bp)

    @app.errorhandler(HTTPException)
    def _app_http_error(err: HTTPException):
        if request.path == "/api" or request.path.startswith("/api/"):
            return http_error(err)
        return err.get_response()


# --------------------------------------------------------------------------- helpers


def services():
    return current_app.extensions["insights"]


def body() -> dict:
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "the request body must be a JSON object (Content-Type: application/json)")
    return data


def model_name(data: dict) -> str:
    models = services().models
    name = data.get("model") or models.default
    if not isinstance(name, str):
        raise ApiError(400, "unknown_model", f"model must be a model name, got {name!r}", "model")
    spec = models.spec(name)
    reason = spec.unavailable_reason()
    if reason:
        raise ModelUnavailable(name, reason)
    return name


def image_record(data: dict) -> dict:
    iid = data.get("image")
    if not isinstance(iid, str) or not iid:
        raise ApiError(400, "bad_request", "image must be the id of an uploaded image", "image")
    record = services().store.image(iid)
    if record is None:
        raise ApiError(404, "not_found", f"no image with id {iid!r}; upload it first (POST /api/images)", "image")
    return record


def integer(value, field: str, lo: int, hi: int, code: str = "bad_param") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ApiError(400, code, f"{field}: must be an integer, got {value!r}", field)
    try:
        number = float(value)
    except ValueError:
        raise ApiError(400, code, f"{field}: must be an integer, got {value!r}", field) from None
    if not number.is_integer():
        raise ApiError(400, code, f"{field}: must be an integer, got {value!r}", field)
    if not lo <= number <= hi:
        raise ApiError(400, code, f"{field}: must be between {lo} and {hi}, got {int(number)}", field)
    return int(number)


def number(value, field: str, lo: float, hi: float) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ApiError(400, "bad_param", f"{field}: must be a number, got {value!r}", field) from None
    if not lo <= x <= hi:
        raise ApiError(400, "bad_param", f"{field}: must be between {lo} and {hi}, got {value!r}", field)
    return x


def immutable(data: bytes, mimetype: str, etag: str, download: str | None = None):
    """A content-addressed response: strong ETag, cached for a year, 304 on If-None-Match."""
    resp = Response(data, mimetype=mimetype)
    resp.set_etag(etag)
    resp.cache_control.public = True
    resp.cache_control.max_age = IMMUTABLE_AGE
    resp.cache_control.immutable = True
    if download:
        resp.headers["Content-Disposition"] = f'attachment; filename="{download}"'
    return resp.make_conditional(request)


def image_json(record: dict) -> dict:
    return {"id": record["id"], "width": record["width"], "height": record["height"],
            "url": url_for("api.image", image_id=record["id"])}


def run_inline(work: "Work", key: str | None = None):
    """Runs the model work on the compute worker and waits for it (re-raising its error here),
    then finishes the answer in this request thread, so the worker only ever does model work."""
    job = services().jobs.submit(work.compute_one, key=key, urgent=True, batch=work.batch())
    job.wait()
    if job.status == "failed":
        raise job.exception
    if job.status == "cancelled":
        raise ApiError(409, "cancelled", "the computation was cancelled", None)
    return work.finish(job.result)


def top_predictions(logits: torch.Tensor, labels: list[str], k: int) -> list[dict]:
    probs = torch.softmax(logits.detach().float().flatten(), dim=0)
    values, indices = probs.topk(min(k, probs.numel()))
    return [{"index": int(i), "label": labels[int(i)] if int(i) < len(labels) else str(int(i)), "prob": float(v)}
            for v, i in zip(values.tolist(), indices.tolist())]


def work_of(job) -> "Work":
    """The Work a job was submitted with (its ``fn`` is a bound method of that Work)."""
    return job.fn.__self__


class Work:
    """Model work for one request, in two steps: ``compute_many`` (model work, on the compute
    worker, for one or several requests with the same ``batch_key`` at once: the job runner's
    dynamic batcher) and ``finish`` (turning the computed value into the answer; in the request
    thread for requests that wait, on the worker for queued jobs)."""

    batch_key: tuple | None = None

    def compute_many(self, works: list["Work"], jobs: list) -> list:
        raise NotImplementedError

    def finish(self, computed: Any) -> Any:
        return computed

    def compute_one(self, job) -> Any:
        return self.compute_many([self], [job])[0]

    def run_one(self, job) -> Any:
        return self.finish(self.compute_one(job))

    def batch(self):
        if self.batch_key is None:
            return None
        cls = type(self)
        return (self.batch_key, lambda jobs: cls.compute_many(work_of(jobs[0]), [work_of(j) for j in jobs], jobs))


def load_inputs(s, spec, image_id: str) -> tuple[torch.Tensor, Image.Image]:
    """The preprocessed 1×C×H×W tensor (on the CPU) and the cropped view of a stored image."""
    return imaging.preprocess(s.store.load_image(image_id), spec.preprocessing)


def check_logits(name: str, spec, logits: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.shape[-1] != spec.num_classes:
        raise RuntimeError(f"model {name} returned shape {tuple(logits.shape)}; "
                           f"expected N×{spec.num_classes} (one score per label)")


def scores(s, name: str, model, works: list, x: torch.Tensor) -> list[torch.Tensor]:
    """Each work's logits row: from the cache, or from one forward pass of the rows missing."""
    rows = [s.logits.get((name, w.image_id)) for w in works]
    missing = [i for i, row in enumerate(rows) if row is None]
    if missing:
        spec = s.models.spec(name)
        with torch.inference_mode():
            logits = model(x[missing])
        check_logits(name, spec, logits)
        for i, row in zip(missing, logits):
            rows[i] = row.float().cpu()
            s.logits.put((name, works[i].image_id), rows[i])
    return rows


class Predict(Work):
    """The top-k classes of one image; requests for one model batch together."""

    def __init__(self, name: str, image_id: str, k: int):
        self.s = services()
        self.name, self.image_id, self.k = name, image_id, k
        self.spec = self.s.models.spec(name)
        self.batch_key = ("predict", name)
        self.known = self.s.logits.get((name, image_id))  # kept here: the cache may drop it
        self.x = None if self.known is not None else load_inputs(self.s, self.spec, image_id)[0]

    def compute_many(self, works: list["Predict"], jobs: list) -> list:
        todo = [w for w in works if w.known is None]
        if todo:
            model = self.s.models.get(self.name)
            x = torch.cat([w.x for w in todo]).to(self.s.models.device)
            for w, row in zip(todo, scores(self.s, self.name, model, todo, x)):
                w.known = row
        return [w.known for w in works]

    def finish(self, logits: torch.Tensor) -> list[dict]:
        return top_predictions(logits, self.spec.labels, self.k)


# --------------------------------------------------------------------------- discovery


@bp.get("")
def index():
    """Version, limits and links."""
    cfg = current_app.config
    return jsonify({"version": __version__, "limits": {k: cfg.get(k) for k in LIMIT_SETTINGS},
                    "endpoints": {"models": url_for("api.models"), "methods": url_for("api.methods"),
                                  "samples": url_for("api.samples"), "images": url_for("api.upload"),
                                  "predict": url_for("api.predict"), "explain": url_for("api.explain")}})


@bp.get("/models")
def models():
    """The model list with availability (nothing is loaded to answer)."""
    reg = services().models
    return jsonify({"models": [reg.info(n) for n in reg.names()], "device": str(reg.device)})


@bp.get("/methods")
def methods():
    """Every method's self-description, in the registry's order."""
    return jsonify({"methods": [engine.method_info(m) for m in engine.methods()]})


@bp.get("/models/<name>/labels")
def labels(name: str):
    """Class names matching ``q`` (case-insensitive substring)."""
    spec = services().models.spec(name)
    q = request.args.get("q", "").strip().lower()
    limit = integer(request.args.get("limit", 20), "limit", 1, 1000)
    hits = [{"index": i, "label": lab} for i, lab in enumerate(spec.labels) if q in lab.lower()]
    return jsonify({"results": hits[:limit], "total": len(hits)})


@bp.get("/samples")
def samples():
    """The sample photos this server can offer."""
    return jsonify({"samples": [{"name": n, "label": label} for n, label in SAMPLES.items() if _sample_ok(n)]})


def _sample_ok(name: str) -> bool:
    try:
        import skimage.data
    except ImportError:
        return False
    return hasattr(skimage.data, name)


# --------------------------------------------------------------------------- images


@bp.post("/samples/<name>")
def sample(name: str):
    """Stores a sample photo as an image and answers its record."""
    if name not in SAMPLES or not _sample_ok(name):
        raise ApiError(404, "not_found", f"no sample named {name!r}; known: {', '.join(SAMPLES)}", "name")
    import skimage.data

    img = imaging.to_rgb(Image.fromarray(np.asarray(getattr(skimage.data, name)())))
    record = services().store.put_image(img)
    return jsonify(image_json(record)), 201


@bp.post("/images")
def upload():
    """Validates and stores an uploaded image (multipart field ``image``)."""
    f = request.files.get("image")
    if f is None:
        raise ApiError(400, "bad_request", "send the picture as multipart/form-data in the field 'image'", "image")
    img = imaging.decode(f.read(), f.filename, current_app.config["MAX_IMAGE_PIXELS"])
    record = services().store.put_image(img)
    return jsonify(image_json(record)), 201


@bp.get("/images/<image_id>")
def image(image_id: str):
    """The stored image as PNG."""
    if services().store.image(image_id) is None:
        raise ApiError(404, "not_found", f"no image with id {image_id!r}", "image")
    return immutable(services().store.image_png(image_id), "image/png", image_id)


# --------------------------------------------------------------------------- predict and explain


@bp.post("/predict")
def predict():
    """The model's top-k classes for an image."""
    data = body()
    name = model_name(data)
    record = image_record(data)
    spec = services().models.spec(name)
    k = integer(data.get("top_k", 5), "top_k", 1, min(spec.num_classes, current_app.config["MAX_TOP_K"]))
    preds = run_inline(Predict(name, record["id"], k))
    return jsonify({"model": name, "image": record["id"], "predictions": preds})


@bp.post("/explain")
def explain():
    """Answers a stored result, computes a cheap one now, or queues a costly one as a job."""
    data = body()
    s = services()
    cfg = current_app.config
    name = model_name(data)
    record = image_record(data)
    spec = s.models.spec(name)
    method_id = data.get("method")
    if not isinstance(method_id, str) or method_id not in engine.methods():
        raise engine.UnknownMethod(str(method_id), engine.methods())
    given = data.get("params") or {}
    if not isinstance(given, dict):
        raise ApiError(400, "bad_param", "params must be a JSON object of parameter values", "params")
    method = engine.registry.get(method_id)
    names = {p.name: p for p in method.params}
    for key, value in given.items():
        if key in names and names[key].type == "tensor" and value is not None:
            raise ApiError(400, "bad_param", f"{key}: is a tensor parameter, only settable from Python", key)
    if "layer" in names and not given.get("layer") and spec.cam_layer:
        given = {**given, "layer": spec.cam_layer}  # the model's own CAM layer by default
    params = method.validate(given)
    shape = (len(spec.preprocessing.mean), spec.preprocessing.crop, spec.preprocessing.crop)
    info = engine.method_info(method_id, params, shape)
    passes = int(info["cost"]["forward"])
    if passes > cfg["MAX_PASSES"]:
        raise ApiError(400, "over_budget", f"these parameters need {passes} forward passes, more than the limit "
                                           f"of {cfg['MAX_PASSES']} (MAX_PASSES); use a coarser setting", "params")
    target = data.get("target")
    if target is None:
        target = run_inline(Predict(name, record["id"], 1))[0]["index"]
    target = integer(target, "target", 0, spec.num_classes - 1, code="bad_target")

    rid = result_id(record["id"], name, method_id, params, target)
    stored = s.store.result(rid)
    if stored is not None:
        return jsonify({"status": "done", "cached": True, "result": stored})
    work = Explain(name, record, method_id, params, target, rid, info)
    if passes <= cfg["INLINE_MAX_PASSES"]:
        run_inline(work, key=rid)
        return jsonify({"status": "done", "cached": False, "result": s.store.result(rid)})
    job = s.jobs.submit(work.run_one, key=rid, total=passes)
    resp = jsonify({"status": "queued", "job": job.to_dict()})
    resp.status_code = 202
    resp.headers["Location"] = url_for("api.job", job_id=job.id)
    return resp


class Explain(Work):
    """One explanation. The image is decoded and preprocessed in the request thread, the model
    work runs on the compute worker, and encoding and storing happen in ``finish``. Requests with
    the same model, method and parameters batch together unless the method draws random noise
    (a batch would change which noise each image gets)."""

    def __init__(self, name: str, record: dict, method_id: str, params: dict, target: int, rid: str, info: dict):
        self.s = services()
        self.budget = current_app.config["MEMORY_BUDGET"]
        self.name, self.record, self.method_id, self.params = name, record, method_id, params
        self.image_id = record["id"]
        self.target, self.rid, self.info = target, rid, info
        self.spec = self.s.models.spec(name)
        self.x, self.view = load_inputs(self.s, self.spec, self.image_id)
        randomised = "seed" in params and params.get("nt_type", "random") != "none"
        if not randomised:
            self.batch_key = ("explain", name, method_id, canonical_json(_jsonable(params)))

    def compute_many(self, works: list["Explain"], jobs: list) -> list:
        s = self.s
        todo = [i for i, w in enumerate(works) if s.store.result(w.rid) is None]
        out: list = [None] * len(works)  # None: already stored (an identical job finished first)
        if not todo:
            return out
        run = [jobs[i] for i in todo]
        model = s.models.get(self.name)
        x = torch.cat([works[i].x for i in todo]).to(s.models.device)
        logits = scores(s, self.name, model, [works[i] for i in todo], x)
        if len(run) == 1:
            progress, cancel = run[0].progress, run[0].cancel
        else:  # a batch stops only when every client cancelled
            def progress(done, total):
                for j in run:
                    j.progress(done, total)

            def cancel():
                return all(j.cancel.is_set() for j in run)
        details: dict = {}
        start = time.perf_counter()
        attr = engine.attribute(model, x, self.method_id, [works[i].target for i in todo], progress=progress,
                                cancel=cancel, memory_budget=self.budget, info=details, **self.params)
        elapsed = time.perf_counter() - start
        arr = attr.detach().cpu().float().numpy()
        for row, i in enumerate(todo):
            out[i] = (arr[row:row + 1], logits[row], elapsed, details.get("layer"), len(todo))
        return out

    def finish(self, computed) -> str:
        """Encodes and stores the computed map; returns the result id."""
        if computed is None:
            return self.rid
        arr, logits, elapsed, layer, batch_size = computed
        rid, record, target, spec = self.rid, self.record, self.target, self.spec
        png, enc = imaging.encode_map(arr[0], bool(self.info["signed"]))
        meta = {
            "id": rid, "model": self.name, "method": self.method_id, "params": _jsonable(self.params),
            "target": target, "target_label": spec.labels[target],
            "image": {"id": record["id"], "width": record["width"], "height": record["height"],
                      "url": f"/api/images/{record['id']}"},
            "elapsed_s": round(elapsed, 4), "batch_size": batch_size, "created": utc_now(),
            "output": self.info["output"], "signed": bool(self.info["signed"]), "layer": layer,
            "cost": self.info["cost"], "predictions": top_predictions(logits, spec.labels, 5),
            "range": {"min": enc["min"], "max": enc["max"]}, "encoding": {"zero": enc["zero"], "scale": enc["scale"]},
            "size": [int(arr.shape[-2]), int(arr.shape[-1])], "shape": list(arr.shape),
            "links": {"input": f"/api/results/{rid}/input.png", "map": f"/api/results/{rid}/map.png",
                      "overlay": f"/api/results/{rid}/overlay.png", "npy": f"/api/results/{rid}/attribution.npy",
                      "share": f"/r/{rid}"},
        }
        self.s.store.put_result(meta, self.view, arr, png)
        return rid


def _jsonable(params: dict) -> dict:
    return json.loads(json.dumps(params, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


# --------------------------------------------------------------------------- jobs


def find_job(job_id: str):
    job = services().jobs.get(job_id)
    if job is None:
        raise ApiError(404, "not_found", f"no job with id {job_id!r} (jobs are kept in memory until restart)", "job")
    return job


@bp.get("/jobs/<job_id>")
def job(job_id: str):
    """The job's state and progress."""
    return jsonify(find_job(job_id).to_dict())


@bp.delete("/jobs/<job_id>")
def cancel_job(job_id: str):
    """Cancels a queued or running job."""
    find_job(job_id)
    return jsonify(services().jobs.cancel(job_id).to_dict())


@bp.get("/jobs/<job_id>/events")
def job_events(job_id: str):
    """Server-sent events: the job as JSON at every change, ending with its final state."""
    found = find_job(job_id)
    heartbeat = float(current_app.config["SSE_HEARTBEAT_S"])

    def stream():
        version = -1
        while True:
            state = found.to_dict()
            if state["version"] != version:
                version = state["version"]
                yield f"data: {json.dumps(state)}\n\n"
                if found.final and state["status"] in ("done", "failed", "cancelled"):
                    return
            elif found.wait_change(version, heartbeat) == version:
                yield ": keep-alive\n\n"

    resp = Response(stream(), mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp


# --------------------------------------------------------------------------- results


def stored_result(rid: str) -> dict:
    meta = services().store.result(rid)
    if meta is None:
        raise ApiError(404, "not_found", f"no result with id {rid!r}", "result")
    return meta


@bp.get("/results/<rid>")
def result(rid: str):
    """A result's metadata."""
    meta = stored_result(rid)
    resp = jsonify(meta)
    resp.set_etag(rid)
    resp.cache_control.public = True
    resp.cache_control.max_age = IMMUTABLE_AGE
    resp.cache_control.immutable = True
    return resp.make_conditional(request)


@bp.get("/results/<rid>/input.png")
def result_input(rid: str):
    """The cropped image the model saw."""
    stored_result(rid)
    return immutable(services().store.result_file(rid, "input.png"), "image/png", f"{rid}-input")


@bp.get("/results/<rid>/map.png")
def result_map(rid: str):
    """The channel-summed map as an 8-bit grayscale PNG (see ``encoding``)."""
    stored_result(rid)
    return immutable(services().store.result_file(rid, "map.png"), "image/png", f"{rid}-map")


@bp.get("/results/<rid>/attribution.npy")
def result_npy(rid: str):
    """The raw float32 attribution, N×C×H×W."""
    stored_result(rid)
    return immutable(services().store.result_file(rid, "attribution.npy"), "application/octet-stream",
                     f"{rid}-npy", download=f"{rid[:12]}-attribution.npy")


@bp.get("/results/<rid>/overlay.png")
def result_overlay(rid: str):
    """The map rendered over the input from map.png, as the page draws it (insights/overlay.py)."""
    from . import overlay  # the overlay specification, shared with static/js/render.js

    meta = stored_result(rid)
    try:
        opts = overlay.options(request.args, bool(meta["signed"]))
    except overlay.OptionError as err:
        raise ApiError(err.status, err.code, err.message, err.field) from None
    etag = hashlib.sha256(f"{rid}:{overlay.VERSION}:{json.dumps(opts.as_dict(), sort_keys=True)}".encode()).hexdigest()
    if request.if_none_match and etag in request.if_none_match:
        return immutable(b"", "image/png", etag)  # answered 304 without rendering
    store = services().store
    out = overlay.render_result(store.result_file(rid, "input.png"), store.result_file(rid, "map.png"),
                                meta["encoding"], opts)
    return immutable(imaging.png_bytes(out), "image/png", etag)


@bp.get("/colormaps/<name>.png")
def colormap_table(name: str):
    """A colour map as the 256×1 RGB lookup table both overlay renderers use."""
    from . import overlay

    try:
        png = overlay.lut_png(name)
    except KeyError:
        raise ApiError(404, "not_found", f"no matplotlib colormap named {name!r}", "cmap") from None
    return immutable(png, "image/png", hashlib.sha256(png).hexdigest())
