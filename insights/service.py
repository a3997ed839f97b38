"""The service layer: what the app does, on its models, store and job runner, without HTTP.

Views parse a request, call one method here and serialise what it returns; every refusal is a
:class:`~insights.errors.ServiceError` carrying its status and code. Model work always runs on
the job runner, admitted for a client (``client``: :func:`insights.admission.client_id` in a
request, ``"local"`` for Python callers): cheap requests wait for it (their tasks may batch with
others) for at most ``INLINE_TIMEOUT_S``, and at most ``MAX_INLINE_WAITS`` requests wait at once;
costly ones, and cheap ones that did not finish in time, are answered with the queued job.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from PIL import Image

from . import card, engine, imaging
from .admission import Slot, Slots
from .dataset_jobs import DatasetWork
from .datasets import DatasetRegistry
from .engine.errors import shown
from .errors import BadParam, Busy, Conflict, Forbidden, NotFound, ServiceError, as_int
from .jobs import Job, JobBackend, JobRunner, Ticket
from .models import LogitsCache, ModelRegistry, ModelUnavailable
from .store import Store, canonical_json
from .tasks import ExplainTask, PredictTask, QualityTask, Task, jsonable

SAMPLES = {"chelsea": "Chelsea the cat", "coffee": "A cup of coffee", "astronaut": "Astronaut Eileen Collins",
           "rocket": "A rocket on the launch pad"}

# The app settings that switch the engine's fast paths (EngineOptions fields).
OPTION_SETTINGS = {"twin": "TWIN", "cuda_graphs": "CUDA_GRAPHS", "cuda_fused": "CUDA_FUSED",
                   "cpu_slices": "CPU_SLICES"}


def switch(value: Any, name: str) -> bool:
    """An on/off setting as a bool: true/false, 1/0, on/off or yes/no (any case); anything else
    is refused at start-up rather than read as "on"."""
    words = {"true": True, "1": True, "on": True, "yes": True, "false": False, "0": False, "off": False, "no": False}
    if isinstance(value, bool):
        return value
    key = str(value).strip().lower()
    if isinstance(value, (int, str)) and key in words:
        return words[key]
    raise ValueError(f"setting {name} must be true or false, got {value!r}")


LOCAL = "local"  # the client of calls from Python (no request)


@dataclass
class Explained:
    """The answer to an explain request: a stored result (``result``) or a queued ``job`` with
    the submitter's ``cancel_token``."""

    status: str  # done | queued
    cached: bool = False
    result: dict | None = None
    job: Job | None = None
    cancel_token: str | None = None


class EventStream:
    """A job's states for one event stream (None: a heartbeat), holding one of the server's
    stream places until it is closed; ``expired`` when it ended at ``EVENT_STREAM_MAX_S``
    before the job did."""

    def __init__(self, events: Iterator[dict | None], slot: Slot):
        self._events, self._slot = events, slot
        self.last: dict | None = None
        self._partial: int | None = None  # the seq of the partial map this stream has sent

    def __iter__(self) -> "EventStream":
        return self

    def __next__(self) -> dict | None:
        try:
            state = next(self._events)
        except StopIteration:
            self.close()
            raise
        if state is not None:
            self.last = state
            partial = state.get("partial")
            if partial is not None:
                # A partial map's images go out once per stream: later states of the same one
                # (progress) carry what it is and its seq only.
                if partial.get("seq") == self._partial:
                    state = {**state, "partial": {k: partial.get(k) for k in ("seq", "kind", "fraction")}}
                self._partial = partial.get("seq")
        return state

    @property
    def expired(self) -> bool:
        return self.last is None or self.last["status"] not in ("done", "failed", "cancelled")

    def close(self) -> None:
        try:
            self._events.close()
        except ValueError:  # closed from another thread while it runs: it ends at its next step
            pass
        self._slot.release()


class Service:
    """Predict and explain for one app. ``app.extensions["insights"]`` holds it; ``models``,
    ``store`` and ``jobs`` (any :class:`~insights.jobs.JobBackend`; the in-process runner by
    default) are its collaborators, each with its own ``init_app``."""

    def __init__(self, models: ModelRegistry | None = None, store: Store | None = None,
                 jobs: JobBackend | None = None, settings: dict | None = None):
        self.models = models or ModelRegistry()
        self.store = store or Store()
        self.jobs = jobs or JobRunner()
        self._own_jobs = jobs is None  # init_app picks the backend the settings ask for
        self.logits = LogitsCache()  # recent scores per (model, image)
        self.datasets = DatasetRegistry()  # labelled datasets to browse (DATASETS, or a notebook's)
        self.dataset_work = DatasetWork(self)  # their predictions, pages and batch explanations
        self.settings: dict = dict(settings or {})
        # What this process lets requests hold of its threads (MAX_INLINE_WAITS, MAX_EVENT_STREAMS).
        self.waits, self.streams = Slots(None), Slots(None)
        self._cards: OrderedDict[str, bytes] = OrderedDict()  # result id → its link-preview card
        self._card_locks = [threading.Lock() for _ in range(16)]  # by the result id's first digits
        self._card_guard = threading.Lock()
        self._card_renders = threading.BoundedSemaphore(self.CARD_RENDERS)

    def init_app(self, app) -> None:
        for key in OPTION_SETTINGS.values():
            app.config[key] = switch(app.config[key], key)
        self.settings = app.config
        self.models.init_app(app)
        if app.config.get("MAX_PASSES") is None:  # sane for the device: ~30 s of CPU work
            app.config["MAX_PASSES"] = 4_000 if self.models.device.type == "cpu" else 20_000
        self.store.init_app(app)
        self.datasets.init_app(app, self.models.spec(self.models.default).labels)
        if self._own_jobs and app.config.get("BROKER_URL"):  # jobs on Celery workers (insights/worker.py)
            from .distributed import CeleryBackend

            self.jobs = CeleryBackend()
        self.jobs.init_app(app)
        self.waits = Slots(app.config.get("MAX_INLINE_WAITS"))
        self.streams = Slots(app.config.get("MAX_EVENT_STREAMS"))

    def engine_settings(self) -> dict:
        """The keyword arguments every engine call of this app gets (memory budget, fast paths)."""
        switches = {field: bool(self.settings[key]) for field, key in OPTION_SETTINGS.items()
                    if key in self.settings}  # parsed once, by init_app
        return {"memory_budget": self.settings.get("MEMORY_BUDGET"), "options": engine.EngineOptions(**switches)}

    # -- lookups -----------------------------------------------------------------------------

    def model_name(self, name: Any) -> str:
        """A registered, available model's name (the default one for None)."""
        name = name or self.models.default
        if not isinstance(name, str):
            raise ServiceError(f"model must be a model name, got {shown(name)}", "model", code="unknown_model")
        reason = self.models.spec(name).unavailable_reason()
        if reason:
            raise ModelUnavailable(name, reason)
        return name

    def image(self, image_id: Any) -> dict:
        """A stored image's record."""
        if not isinstance(image_id, str) or not image_id:
            raise ServiceError("image must be the id of an uploaded image", "image")
        record = self.store.image(image_id)
        if record is None:
            raise NotFound(f"no image with id {shown(image_id)}; upload it first (POST /api/images)", "image")
        return record

    def result(self, rid: str) -> dict:
        """A stored result's metadata."""
        meta = self.store.result(rid)
        if meta is None:
            raise NotFound(f"no result with id {shown(rid)}", "result")
        return meta

    CARDS_IN_MEMORY = 16  # recent cards kept here too (a read-only mirror cannot store them)
    CARD_RENDERS = 2  # cards rendered at once, at most

    def result_card(self, rid: str, meta: dict) -> bytes:
        """The result's link-preview card (see insights/card.py), made once and kept with it:
        one request renders it while others for the same result wait for it, at most
        :attr:`CARD_RENDERS` render at once, and the last :attr:`CARDS_IN_MEMORY` are also kept
        in memory (a read-only mirror's only copy)."""
        with self._card_guard:
            cached = self._cards.get(rid)
            if cached is not None:
                self._cards.move_to_end(rid)
                return cached
        with self._card_locks[int(rid[:8], 16) % len(self._card_locks)]:  # one render per result
            with self._card_guard:
                cached = self._cards.get(rid)
            if cached is None:
                with self._card_renders:
                    cached = self._card_file(rid, meta)
            with self._card_guard:
                self._cards[rid] = cached
                while len(self._cards) > self.CARDS_IN_MEMORY:
                    self._cards.popitem(last=False)
        return cached

    def _card_file(self, rid: str, meta: dict) -> bytes:
        def make() -> bytes:
            method = engine.registry.get(meta["method"]).label if meta["method"] in engine.methods() else meta["method"]
            names = self.models.names()
            model = self.models.info(meta["model"]).get("label") if meta["model"] in names else None
            return card.render(meta, self.store.result_file(rid, "input.png"), self.store.result_file(rid, "map.png"),
                               method, model or meta["model"])

        return self.store.derived_file(rid, "card.png", make)

    def delete_result(self, rid: str) -> str:
        """Deletes a stored result (files and index row); its links answer 404 from then on."""
        if not self.store.delete_result(rid):
            raise NotFound(f"no result with id {shown(rid)}", "result")
        return rid

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job with id {shown(job_id)} (finished jobs are forgotten after a while)", "job")
        return job

    def allow_write(self, client: str) -> None:
        """Counts a write of ``client`` against its rate limit (429 ``busy`` past it)."""
        self.jobs.admission.allow_write(client)

    def cancel(self, job_id: str, token: Any) -> Job:
        """Cancels a queued or running job for the submitter whose cancel token this is (403
        ``forbidden`` without it); a job other submitters still hold goes on for them."""
        self.job(job_id)
        if not isinstance(token, str) or not token:
            raise Forbidden("cancelling a job needs the cancel_token its submission answered "
                            "(header X-Cancel-Token)", "cancel_token")
        return self.jobs.cancel(job_id, token) or self.job(job_id)

    def events(self, job_id: str) -> EventStream:
        """The job's state at every change (None: nothing changed for a heartbeat's time), for at
        most ``EVENT_STREAM_MAX_S``; refused (503 ``busy``) when ``MAX_EVENT_STREAMS`` are open."""
        job = self.job(job_id)
        lifetime = self.settings.get("EVENT_STREAM_MAX_S")
        slot = self.streams.take()
        if slot is None:
            raise Busy(f"{self.streams.size} event streams are open, the most this server keeps "
                       f"(MAX_EVENT_STREAMS); follow the job with GET /api/jobs/{job.id} instead",
                       self.streams.seconds_to_free(float(lifetime or 60)), status=503, reason="event_streams")
        until = time.monotonic() + float(lifetime) if lifetime else None
        return EventStream(self.jobs.events(job, float(self.settings.get("SSE_HEARTBEAT_S", 15)), until), slot)

    def unsupported(self, name: str) -> dict[str, str]:
        """The methods that cannot run on a model, each with the reason (nothing is loaded)."""
        hooks = self.models.spec(name).takes_hooks
        found = {m: engine.registry.get(m).unsupported(hooks) for m in engine.methods()}
        return {m: why for m, why in found.items() if why}

    def model_list(self) -> list[dict]:
        """Every registered model's entry, with the methods it cannot run and why."""
        return [{**self.models.info(n), "unsupported": self.unsupported(n)} for n in self.models.names()]

    def input_shape(self, name: str) -> tuple[int, int, int]:
        """(C, H, W) of the model's input after preprocessing."""
        p = self.models.spec(name).preprocessing
        return (len(p.mean), p.crop, p.crop)

    def method_list(self, model: str | None = None) -> list[dict]:
        """Every method's self-description; for a ``model``, with the defaults for its input size,
        whether it runs on it and why not."""
        if model is None:
            return [engine.method_info(m) for m in engine.methods()]
        why = self.unsupported(model)
        return [{**info, "supported": info["id"] not in why, "reason": why.get(info["id"])}
                for info in (engine.method_info(m, shape=self.input_shape(model)) for m in engine.methods())]

    def labels(self, name: str, query: str, limit: int) -> dict:
        """Class names of a model containing ``query`` (case-insensitive)."""
        spec = self.models.spec(name)
        q = query.strip().lower()
        hits = [{"index": i, "label": lab} for i, lab in enumerate(spec.labels) if q in lab.lower()]
        return {"results": hits[:limit], "total": len(hits)}

    # -- images --------------------------------------------------------------------------------

    def upload(self, data: bytes, filename: str | None) -> dict:
        """Validates and stores an uploaded file; answers the image's record."""
        img = imaging.decode(data, filename, self.settings.get("MAX_IMAGE_PIXELS", 40_000_000),
                             self.settings.get("MAX_ASPECT_RATIO", 16), self.settings.get("UPLOAD_MAX_SIDE", 2048))
        return self.store.put_image(img)

    @staticmethod
    def samples() -> list[dict]:
        """The sample photos this server can offer."""
        return [{"name": n, "label": label} for n, label in SAMPLES.items() if _sample_ok(n)]

    def put_sample(self, name: str) -> dict:
        """Stores a sample photo as an image; answers its record."""
        if name not in SAMPLES or not _sample_ok(name):
            raise NotFound(f"no sample named {shown(name)}; known: {', '.join(SAMPLES)}", "name")
        import skimage.data

        img = imaging.to_rgb(Image.fromarray(np.asarray(getattr(skimage.data, name)())))
        return self.store.put_image(img)

    # -- predict and explain ------------------------------------------------------------------

    def run_inline(self, task: Task, client: str = LOCAL, key: str | None = None, total: int = 0,
                   lane: str = "main") -> Any:
        """Runs the task on the job runner ahead of queued costly work and waits for its answer
        (re-raising its error here) for at most ``INLINE_TIMEOUT_S``; answers the
        :class:`~insights.jobs.Ticket` instead when it is not done by then, or at once when
        ``MAX_INLINE_WAITS`` requests are waiting already (the job goes on; the client follows it)."""
        ticket = self.jobs.admit(task, client, key=key, total=total, urgent=True, batch=True, lane=lane)
        job = ticket.job
        slot = self.waits.take()
        if slot is not None:
            timeout = self.settings.get("INLINE_TIMEOUT_S")
            try:
                job.wait(None if timeout is None else float(timeout))
            finally:
                slot.release()
        if not job.final:
            return ticket
        if job.status == "failed":
            raise failure(job)
        if job.status == "cancelled":
            raise Conflict("the computation was cancelled")
        return job.result

    def predict(self, name: Any, image_id: Any, top_k: Any = 5, client: str = LOCAL) -> dict | Ticket:
        """The model's ``top_k`` classes for a stored image (a ticket when not done in time).
        Scores seen recently answer at once; others are one pass on the light lane, beside a
        running job (the lane loads the model if it is not in memory)."""
        name = self.model_name(name)
        record = self.image(image_id)
        spec = self.models.spec(name)
        k = as_int(top_k, "top_k", 1, min(spec.num_classes, self.settings.get("MAX_TOP_K", 100)))
        task = PredictTask(self, name, record["id"], k)
        known = self.logits.get((name, record["id"]))
        if known is not None:
            return task.finish(known)
        return self.run_inline(task, client, lane="light")

    def plan(self, name: str, method_id: Any, params: Any) -> tuple[dict, dict]:
        """A method's checked parameters for a model and the method's info (cost, output), or the
        400 that says what is wrong: an unknown or unsupported method, a bad parameter, more
        forward passes than ``MAX_PASSES``."""
        spec = self.models.spec(name)
        if not isinstance(method_id, str) or method_id not in engine.methods():
            raise engine.UnknownMethod(str(method_id), engine.methods())
        given = params or {}
        if not isinstance(given, dict):
            raise BadParam("params must be a JSON object of parameter values", "params")
        method = engine.registry.get(method_id)
        reason = method.unsupported(spec.takes_hooks)
        if reason:
            raise engine.UnsupportedModel(method_id, reason)
        names = {p.name: p for p in method.params}
        for key, value in given.items():
            if key in names and names[key].type == "tensor" and value is not None:
                raise BadParam(f"{key}: is a tensor parameter, only settable from Python", key)
        if "layer" in names and not given.get("layer") and spec.cam_layer:
            given = {**given, "layer": spec.cam_layer}  # the model's own CAM layer by default
        shape = self.input_shape(name)
        p = method.validate(given, shape)
        # The model's layers count where a method's cost follows them (Score-CAM's channels);
        # a model not yet in memory is not loaded for that, and the engine reports the real
        # cost with the result.
        info = engine.method_info(method_id, p, shape, self.models.peek(name))
        passes = int(info["cost"]["forward"])
        cheap = method.preview(p) if hasattr(method, "preview") else None
        if cheap is not None:  # a path method's preview runs first, and counts
            info = {**info, "preview_passes": int(engine.method_info(method_id, cheap, shape)["cost"]["forward"])}
            passes += info["preview_passes"]
        limit = self.settings["MAX_PASSES"]
        if passes > limit:
            raise ServiceError(f"these parameters need {passes} forward passes, more than the limit of "
                               f"{limit} (MAX_PASSES); use a coarser setting", "params", code="over_budget")
        return p, info

    def explain(self, name: Any, image_id: Any, method_id: Any, params: Any, target: Any,
                client: str = LOCAL) -> Explained:
        """A stored result, one computed now, or a queued job for a costly one (or for a cheap
        one not done within ``INLINE_TIMEOUT_S``)."""
        name = self.model_name(name)
        record = self.image(image_id)
        spec = self.models.spec(name)
        p, info = self.plan(name, method_id, params)
        passes = int(info["cost"]["forward"])
        if target is None:
            top = self.predict(name, record["id"], 1, client)
            if isinstance(top, Ticket):
                raise Busy("the model's top class for this image is still being computed; try again in a "
                           "moment, or name a target", 2, status=503, reason="inline_timeout")
            target = top["predictions"][0]["index"]
        target = as_int(target, "target", 0, spec.num_classes - 1, code="bad_target")

        rid = self.store.result_id(record["id"], name, method_id, p, target)
        stored = self.store.result(rid)
        if stored is not None:
            return Explained("done", cached=True, result=stored)
        task = ExplainTask(self, name, record, method_id, p, target, rid, info)
        # A method that shows a preview first (a path method with many steps) runs as a job, so
        # the page can show the preview while the requested map is computed.
        answer = self.submit(task, client, rid, passes, inline="preview_passes" not in info)
        if not isinstance(answer, Ticket):
            return Explained("done", result=self.store.result(rid))
        return Explained("queued", job=answer.job, cancel_token=answer.cancel_token)

    def submit(self, task: Task, client: str, key: str, passes: int, inline: bool = True) -> Any:
        """The task's answer when ``inline`` and at most ``INLINE_MAX_PASSES`` passes (waited for
        by :meth:`run_inline`, whose ticket comes back when it is not done in time), else the
        :class:`~insights.jobs.Ticket` of the job admitted for it."""
        if inline and passes <= self.settings.get("INLINE_MAX_PASSES", 64):
            return self.run_inline(task, client, key=key, total=max(1, passes))
        return self.jobs.admit(task, client, key=key, total=passes)

    # -- quality: measurements of a stored result ------------------------------------------------

    def metric_list(self, model: str | None = None) -> list[dict]:
        """Every metric's self-description (defaults for the model's input size when given)."""
        shape = self.input_shape(self.model_name(model)) if model else (3, 224, 224)
        return [{"needs_method": False, **engine.metric_info(m, shape=shape)} for m in engine.list_metrics()]

    def quality_list(self, rid: str) -> list[dict]:
        """The stored measurements of a result, oldest first."""
        self.result(rid)
        return self.store.quality(rid)

    def plan_quality(self, meta: dict, metric_id: Any, params: Any) -> tuple[dict, str, int]:
        """A metric's checked parameters for a stored result, the measurement's key and its
        forward passes, or the 400 that says what is wrong (an unknown metric, a bad
        parameter, more forward passes than ``MAX_PASSES``)."""
        registry = engine.metrics.registry
        if not isinstance(metric_id, str) or metric_id not in registry.ids():
            raise BadParam(f"unknown metric {shown(metric_id)}; known metrics: {', '.join(registry.ids())}",
                           "metric")
        given = params or {}
        if not isinstance(given, dict):
            raise BadParam("params must be a JSON object of parameter values", "params")
        metric = registry.get(metric_id)
        for param in metric.params:
            if param.type == "tensor" and given.get(param.name) is not None:
                raise BadParam(f"{param.name}: is a tensor parameter, only settable from Python", param.name)
        name = self.model_name(meta["model"])
        shape = self.input_shape(name)
        p = metric.validate(given, shape)
        extra = {}
        if getattr(metric, "needs_method", False):
            method = engine.registry.get(meta["method"])
            extra = {"method": meta["method"], "method_params": method.validate(meta["params"], shape),
                     "model": self.models.peek(name)}
        passes = int(engine.metric_info(metric_id, p, shape, **extra)["cost"]["forward"]) * metric.pass_weight
        limit = self.settings["MAX_PASSES"]
        if passes > limit:
            raise ServiceError(f"these parameters need {passes} forward passes, more than the limit of "
                               f"{limit} (MAX_PASSES); use fewer steps or samples", "params", code="over_budget")
        key = hashlib.sha256(canonical_json({"metric": metric_id, "params": jsonable(p)}).encode()).hexdigest()
        return p, key, passes

    def quality(self, rid: str, metric_id: Any, params: Any, client: str = LOCAL) -> Explained:
        """A stored measurement of a result's map, one made now, or a queued job for a costly
        one; the job's answer is the measurement, kept with the result."""
        meta = self.result(rid)
        p, key, passes = self.plan_quality(meta, metric_id, params)
        stored = self.store.quality_entry(rid, key)
        if stored is not None:
            return Explained("done", cached=True, result=stored)
        answer = self.submit(QualityTask(self, rid, metric_id, p, key), client, f"quality:{rid}:{key}", passes)
        if not isinstance(answer, Ticket):
            return Explained("done", result=answer)
        return Explained("queued", job=answer.job, cancel_token=answer.cancel_token)


def failure(job: Job) -> Exception:
    """The error a request that waited for a failed job raises: the job's exception (taken, so
    the kept job holds no traceback), or one made from its reported error."""
    exc, job.exception = job.exception, None
    if exc is not None:
        return exc
    error = job.error or {}
    return ServiceError(error.get("message", "the computation failed"), error.get("field"),
                        code=error.get("code", "internal"), status=job.error_status or 500)


def _sample_ok(name: str) -> bool:
    try:
        import skimage.data
    except ImportError:
        return False
    return hasattr(skimage.data, name)
