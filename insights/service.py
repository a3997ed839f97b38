"""The service layer: what the app does, on its models, store and job runner, without HTTP.

Views parse a request, call one method here and serialise what it returns; every refusal is a
:class:`~insights.errors.ServiceError` carrying its status and code. Model work always runs on
the job runner: cheap requests wait for it (their tasks may batch with others), costly ones are
answered with the queued job.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from PIL import Image

from . import engine, imaging
from .errors import BadParam, Conflict, NotFound, ServiceError, as_int
from .jobs import Job, JobBackend, JobRunner
from .models import LogitsCache, ModelRegistry, ModelUnavailable
from .store import Store
from .tasks import ExplainTask, PredictTask, Task

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


@dataclass
class Explained:
    """The answer to an explain request: a stored result (``result``) or a queued ``job``."""

    status: str  # done | queued
    cached: bool = False
    result: dict | None = None
    job: Job | None = None


class Service:
    """Predict and explain for one app. ``app.extensions["insights"]`` holds it; ``models``,
    ``store`` and ``jobs`` (any :class:`~insights.jobs.JobBackend`; the in-process runner by
    default) are its collaborators, each with its own ``init_app``."""

    def __init__(self, models: ModelRegistry | None = None, store: Store | None = None,
                 jobs: JobBackend | None = None, settings: dict | None = None):
        self.models = models or ModelRegistry()
        self.store = store or Store()
        self.jobs = jobs or JobRunner()
        self.logits = LogitsCache()  # recent scores per (model, image)
        self.settings: dict = dict(settings or {})

    def init_app(self, app) -> None:
        for key in OPTION_SETTINGS.values():
            app.config[key] = switch(app.config[key], key)
        self.settings = app.config
        self.models.init_app(app)
        if app.config.get("MAX_PASSES") is None:  # sane for the device: ~30 s of CPU work
            app.config["MAX_PASSES"] = 4_000 if self.models.device.type == "cpu" else 20_000
        self.store.init_app(app)
        self.jobs.init_app(app)

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
            raise ServiceError(f"model must be a model name, got {name!r}", "model", code="unknown_model")
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
            raise NotFound(f"no image with id {image_id!r}; upload it first (POST /api/images)", "image")
        return record

    def result(self, rid: str) -> dict:
        """A stored result's metadata."""
        meta = self.store.result(rid)
        if meta is None:
            raise NotFound(f"no result with id {rid!r}", "result")
        return meta

    def delete_result(self, rid: str) -> str:
        """Deletes a stored result (files and index row); its links answer 404 from then on."""
        if not self.store.delete_result(rid):
            raise NotFound(f"no result with id {rid!r}", "result")
        return rid

    def job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job with id {job_id!r} (jobs are kept in memory until restart)", "job")
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancels a queued or running job."""
        self.job(job_id)
        return self.jobs.cancel(job_id)

    def events(self, job_id: str) -> Iterator[dict | None]:
        """The job's state at every change (None: nothing changed for a heartbeat's time)."""
        return self.jobs.events(self.job(job_id), float(self.settings.get("SSE_HEARTBEAT_S", 15)))

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
        img = imaging.decode(data, filename, self.settings.get("MAX_IMAGE_PIXELS", 40_000_000))
        return self.store.put_image(img)

    @staticmethod
    def samples() -> list[dict]:
        """The sample photos this server can offer."""
        return [{"name": n, "label": label} for n, label in SAMPLES.items() if _sample_ok(n)]

    def put_sample(self, name: str) -> dict:
        """Stores a sample photo as an image; answers its record."""
        if name not in SAMPLES or not _sample_ok(name):
            raise NotFound(f"no sample named {name!r}; known: {', '.join(SAMPLES)}", "name")
        import skimage.data

        img = imaging.to_rgb(Image.fromarray(np.asarray(getattr(skimage.data, name)())))
        return self.store.put_image(img)

    # -- predict and explain ------------------------------------------------------------------

    def run_inline(self, task: Task, key: str | None = None) -> Any:
        """Runs the task's model work on the compute worker and waits for it (re-raising its
        error here), then finishes the answer in this thread: the worker only does model work."""
        job = self.jobs.submit(task, key=key, urgent=True, batch=True)
        job.wait()
        if job.status == "failed":
            raise job.exception
        if job.status == "cancelled":
            raise Conflict("the computation was cancelled")
        answer = task.finish(job.result)
        job.result = None  # the computed tensors; the kept job need not hold them
        return answer

    def predict(self, name: Any, image_id: Any, top_k: Any = 5) -> dict:
        """The model's ``top_k`` classes for a stored image."""
        name = self.model_name(name)
        record = self.image(image_id)
        spec = self.models.spec(name)
        k = as_int(top_k, "top_k", 1, min(spec.num_classes, self.settings.get("MAX_TOP_K", 100)))
        preds = self.run_inline(PredictTask(self, name, record["id"], k))
        return {"model": name, "image": record["id"], "predictions": preds}

    def explain(self, name: Any, image_id: Any, method_id: Any, params: Any, target: Any) -> Explained:
        """A stored result, one computed now, or a queued job for a costly one."""
        name = self.model_name(name)
        record = self.image(image_id)
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
        limit = self.settings["MAX_PASSES"]
        if passes > limit:
            raise ServiceError(f"these parameters need {passes} forward passes, more than the limit of "
                               f"{limit} (MAX_PASSES); use a coarser setting", "params", code="over_budget")
        if target is None:
            target = self.run_inline(PredictTask(self, name, record["id"], 1))[0]["index"]
        target = as_int(target, "target", 0, spec.num_classes - 1, code="bad_target")

        rid = self.store.result_id(record["id"], name, method_id, p, target)
        stored = self.store.result(rid)
        if stored is not None:
            return Explained("done", cached=True, result=stored)
        task = ExplainTask(self, name, record, method_id, p, target, rid, info)
        if passes <= self.settings.get("INLINE_MAX_PASSES", 64):
            self.run_inline(task, key=rid)
            return Explained("done", result=self.store.result(rid))
        return Explained("queued", job=self.jobs.submit(task, key=rid, total=passes))


def _sample_ok(name: str) -> bool:
    try:
        import skimage.data
    except ImportError:
        return False
    return hasattr(skimage.data, name)
