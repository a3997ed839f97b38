"""The model work of one request, as a task the job runner can run alone or batched.

A task works in two steps: :meth:`Task.compute` does the model work, on the compute worker, for
one or several tasks with the same ``batch_key`` at once (the runner's dynamic batching), and
:meth:`Task.finish` turns the computed value into the answer — in the request thread for
requests that wait, on the worker for queued jobs. No Flask here: a task gets the service.
"""
from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from . import engine, imaging
from .engine.errors import shown
from .errors import NotFound
from .store import canonical_json, utc_now, utc_now_precise


class Task:
    """Model work that may be batched with other tasks of the same ``batch_key`` (None: alone)."""

    batch_key: tuple | None = None
    kind = ""  # what a payload calls the task's class ("predict", "explain", ...)
    kinds: dict[str, type["Task"]] = {}  # every task class with a kind, by kind

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Task.kinds[cls.kind] = cls

    @classmethod
    def compute(cls, tasks: list["Task"], jobs: list) -> list:
        """One computed value per task; ``jobs`` are the runner's jobs (progress, cancel)."""
        raise NotImplementedError

    def finish(self, computed: Any) -> Any:
        return computed

    def to_payload(self) -> dict:
        """The task as JSON values, for a backend whose workers run elsewhere: ids and
        parameters, never tensors or pickles."""
        raise NotImplementedError

    @classmethod
    def from_payload(cls, service, payload: dict) -> "Task":
        """The task a :meth:`to_payload` described, made again for ``service`` (a worker's own);
        on ``Task`` itself, by the payload's ``kind``."""
        kind = Task.kinds.get(payload.get("kind")) if isinstance(payload, dict) else None
        if kind is None or kind is cls:
            raise ValueError(f"not a task payload: {shown(payload)}")
        return kind.from_payload(service, payload)


def top_predictions(logits: torch.Tensor, labels: list[str], k: int) -> list[dict]:
    """The ``k`` most probable classes of one row of logits, most probable first."""
    probs = torch.softmax(logits.detach().float().flatten(), dim=0)
    values, indices = probs.topk(min(k, probs.numel()))
    return [{"index": int(i), "label": labels[int(i)] if int(i) < len(labels) else str(int(i)), "prob": float(v)}
            for v, i in zip(values.tolist(), indices.tolist())]


def load_inputs(service, spec, image_id: str) -> tuple[torch.Tensor, Image.Image]:
    """The preprocessed 1×C×H×W tensor (on the CPU) and the cropped view of a stored image."""
    return spec.prepare(service.store.load_image(image_id))


def scores(service, name: str, model, tasks: list, x: torch.Tensor) -> list[torch.Tensor]:
    """Each task's logits row: from the cache, or from one forward pass of the rows missing.
    The pass shares the model with other readers, and waits while a method holds it with hooks
    (the engine's model lock): it may run on the light lane beside a job."""
    rows = [service.logits.get((name, t.image_id)) for t in tasks]
    missing = [i for i, row in enumerate(rows) if row is None]
    if missing:
        spec = service.models.spec(name)
        with engine.model_lock(model, exclusive=False), torch.inference_mode():
            logits = model(x[missing])
        if logits.dim() != 2 or logits.shape[-1] != spec.num_classes:
            raise RuntimeError(f"model {name} returned shape {tuple(logits.shape)}; "
                               f"expected N×{spec.num_classes} (one score per label)")
        for i, row in zip(missing, logits):
            rows[i] = row.float().cpu()
            service.logits.put((name, tasks[i].image_id), rows[i])
    return rows


class PredictTask(Task):
    """The top-k classes of one image; predictions for one model batch together. Until it runs
    the task holds the image's id only: the image is loaded and preprocessed in ``compute``."""

    kind = "predict"

    def __init__(self, service, name: str, image_id: str, k: int):
        self.service, self.name, self.image_id, self.k = service, name, image_id, k
        self.spec = service.models.spec(name)
        self.batch_key = ("predict", name)

    def to_payload(self) -> dict:
        return {"kind": self.kind, "model": self.name, "image": self.image_id, "top_k": self.k}

    @classmethod
    def from_payload(cls, service, payload: dict) -> "PredictTask":
        return cls(service, payload["model"], payload["image"], int(payload["top_k"]))

    @classmethod
    def compute(cls, tasks: list["PredictTask"], jobs: list) -> list:
        first = tasks[0]
        service = first.service
        rows = [service.logits.get((t.name, t.image_id)) for t in tasks]
        todo = [i for i, row in enumerate(rows) if row is None]
        if todo:
            model = service.models.get(first.name)
            x = torch.cat([load_inputs(service, tasks[i].spec, tasks[i].image_id)[0] for i in todo])
            for i, row in zip(todo, scores(service, first.name, model, [tasks[i] for i in todo],
                                           x.to(service.models.device))):
                rows[i] = row
        return rows

    def finish(self, logits: torch.Tensor) -> dict:
        """The answer of POST /api/predict."""
        return {"model": self.name, "image": self.image_id,
                "predictions": top_predictions(logits, self.spec.labels, self.k)}


def jsonable(params: dict) -> dict:
    """Parameters as JSON values (tuples as lists, anything else as its string)."""
    return json.loads(json.dumps(params, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


@dataclass
class Computed:
    """One image's share of an explanation's model work, for :meth:`ExplainTask.finish`."""

    map: np.ndarray  # 1×C×H×W float32
    logits: torch.Tensor
    elapsed: float  # seconds of the engine call (for the whole batch)
    layer: str | None  # the layer a CAM method used
    batch_size: int
    cost: dict  # passes per image, as the engine counted them for this model
    completeness: dict | None = None  # {"delta", "kind", "threshold"}, or None (docs/api.md)
    preview: dict | None = None  # a path method's preview: {"params", "passes", "share"}, or None


COMPLETENESS_THRESHOLD = 0.05  # above this relative delta, an "exact" map is flagged unreliable


def completeness(details: dict, row: int) -> dict | None:
    """One row's completeness from the engine's ``info`` (``deltas``, ``delta_kind``), or None
    for a method without the property (or a noise tunnel, which has no single score difference)."""
    deltas = details.get("deltas")
    if not deltas:
        return None
    out = {"delta": float(deltas[row]), "kind": details["delta_kind"], "threshold": COMPLETENESS_THRESHOLD}
    if "uncovered" in details:  # DeepLift: the model's modules its rules do not cover
        out["uncovered"] = list(details["uncovered"])
    return out


def view_url(view: Image.Image) -> str:
    """The model's crop of an image as a JPEG data URL (quality 85: a partial map's backdrop)."""
    out = io.BytesIO()
    view.convert("RGB").save(out, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def partial_payload(approx: torch.Tensor, signed: bool, fraction: float, kind: str) -> dict:
    """A partial map (C×H×W) as a job shows it: a PNG data URL in a result map's encoding
    (``map``, ``encoding``), the share of the work done (``fraction``) and its ``kind``
    ("refining" or "preview", see :func:`insights.attribute`)."""
    png, enc = imaging.encode_map(approx.cpu().numpy(), signed)
    return {"kind": kind, "fraction": round(float(fraction), 4),
            "map": "data:image/png;base64," + base64.b64encode(png).decode(),
            "encoding": {"zero": enc["zero"], "scale": enc["scale"]}}


class ExplainTask(Task):
    """One explanation. Until it runs the task holds ids only: the image is loaded and
    preprocessed in ``compute``, on the compute worker, with the model work; encoding and storing
    happen in ``finish``. Requests with the same model, method and parameters batch together when the
    method says its rows are independent (methods that draw noise for a whole batch do not)."""

    kind = "explain"

    def __init__(self, service, name: str, record: dict, method_id: str, params: dict, target: int,
                 rid: str, info: dict):
        self.service, self.name, self.record = service, name, record
        self.method_id, self.params, self.target, self.rid, self.info = method_id, params, target, rid, info
        self.image_id = record["id"]
        self.spec = service.models.spec(name)
        self.view: Image.Image | None = None  # the model's crop of the image, loaded in compute
        self.loaded: tuple | None = None  # (input, view) a caller that has them already hands over (a batch)
        if engine.registry.get(method_id).batchable(params):
            self.batch_key = ("explain", name, method_id, canonical_json(params))

    def to_payload(self) -> dict:
        return {"kind": self.kind, "model": self.name, "image": self.image_id, "method": self.method_id,
                "params": jsonable(self.params), "target": self.target, "result_id": self.rid,
                "info": jsonable(self.info)}

    @classmethod
    def from_payload(cls, service, payload: dict) -> "ExplainTask":
        """The parameters are checked again by the method (JSON lists become its tuples), and the
        image's record is read from the store (404 ``not_found`` when it is gone meanwhile)."""
        name, method_id = payload["model"], payload["method"]
        params = engine.registry.get(method_id).validate(payload["params"], service.input_shape(name))
        return cls(service, name, service.image(payload["image"]), method_id, params, int(payload["target"]),
                   payload["result_id"], payload["info"])

    @classmethod
    def compute(cls, tasks: list["ExplainTask"], jobs: list) -> list:
        first = tasks[0]
        service = first.service
        todo = [i for i, t in enumerate(tasks) if service.store.result(t.rid) is None]
        out: list = [None] * len(tasks)  # None: already stored (an identical job finished first)
        if not todo:
            return out
        run = [jobs[i] for i in todo]
        model = service.models.get(first.name)
        rows = []
        for i in todo:
            row, tasks[i].view = tasks[i].loaded or load_inputs(service, tasks[i].spec, tasks[i].image_id)
            tasks[i].loaded = None
            rows.append(row)
        x = torch.cat(rows).to(service.models.device)
        del rows
        logits = scores(service, first.name, model, [tasks[i] for i in todo], x)
        if len(run) == 1:
            progress, cancel = run[0].progress, run[0].cancel
        else:  # a batch stops only when every client cancelled
            def progress(done, total):
                for j in run:
                    j.progress(done, total)

            def cancel():
                return all(j.cancel.is_set() for j in run)
        # One job alone may show partial maps (a batch's jobs would each need their own row).
        publish = getattr(run[0], "publish", None) if len(run) == 1 else None
        partial = None
        if publish is not None:
            signed = engine.registry.get(first.method_id).signed(first.params)
            view = view_url(tasks[todo[0]].view)  # the model's crop, once: the map is drawn over it

            def partial(approx, fraction, kind):
                publish({**partial_payload(approx[0], signed, fraction, kind), "input": view})
        details: dict = {}
        start = time.perf_counter()
        attr = engine.attribute(model, x, first.method_id, [tasks[i].target for i in todo], progress=progress,
                                cancel=cancel, info=details, partial=partial, **service.engine_settings(),
                                **first.params)
        elapsed = time.perf_counter() - start
        arr = attr.detach().cpu().float().numpy()
        for row, i in enumerate(todo):
            out[i] = Computed(arr[row:row + 1], logits[row], elapsed, details.get("layer"), len(todo),
                              details.get("cost") or first.info.get("cost"), completeness(details, row),
                              details.get("preview"))
        return out

    def finish(self, computed: "Computed | None") -> str:
        """Encodes and stores the computed map; returns the result id."""
        if computed is None:
            return self.rid
        png, enc = imaging.encode_map(computed.map[0], bool(self.info["signed"]))
        self.service.store.put_result(self.metadata(computed, enc), self.view, computed.map, png,
                                      image_id=self.image_id)  # may raise StoreFull (507)
        return self.rid

    def metadata(self, c: "Computed", enc: dict) -> dict:
        """The stored result's description (docs/api.md, "Results"). Shared with its link, so the
        upload is described by its size only: no id or URL of the original."""
        rid, record, spec, arr = self.rid, self.record, self.spec, c.map
        return {
            "id": rid, "model": self.name, "method": self.method_id, "params": jsonable(self.params),
            "target": self.target, "target_label": spec.labels[self.target],
            "image": {"width": record["width"], "height": record["height"]},
            "elapsed_s": round(c.elapsed, 4), "batch_size": c.batch_size, "created": utc_now(),
            "output": self.info["output"], "signed": bool(self.info["signed"]), "layer": c.layer,
            "cost": c.cost, "preview": c.preview, "completeness": c.completeness, "predictions": top_predictions(c.logits, spec.labels, 5),
            "range": {"min": enc["min"], "max": enc["max"]}, "encoding": {"zero": enc["zero"], "scale": enc["scale"]},
            "size": [int(arr.shape[-2]), int(arr.shape[-1])], "shape": list(arr.shape),
            "links": {"input": f"/api/results/{rid}/input.png", "map": f"/api/results/{rid}/map.png",
                      "overlay": f"/api/results/{rid}/overlay.png", "npy": f"/api/results/{rid}/attribution.npy",
                      "share": f"/r/{rid}"},
        }


def quality_answer(answer: dict, signed: bool) -> dict:
    """An engine metric's answer as JSON values: tensors become lists, except a sanity check's
    stage maps (``maps``, N×S×1×H×W), which become PNG data URLs in the encoding of a result's
    map (first image) under ``stages[i]["map"]`` and ``["encoding"]``."""
    out = {}
    for key, value in answer.items():
        if key == "maps" and isinstance(value, torch.Tensor):
            continue
        out[key] = value.tolist() if isinstance(value, torch.Tensor) else value
    maps = answer.get("maps")
    if isinstance(maps, torch.Tensor) and isinstance(out.get("stages"), list):
        stages = []
        for stage, plane in zip(out["stages"], maps[0].detach().cpu().float().numpy()):
            png, enc = imaging.encode_map(plane, signed)
            stages.append({**stage, "map": "data:image/png;base64," + base64.b64encode(png).decode(),
                           "encoding": {"zero": enc["zero"], "scale": enc["scale"]}})
        out["stages"], out["signed"] = stages, signed
    return jsonable(out)


class QualityTask(Task):
    """One measurement of a stored result's map (a faithfulness metric, the sanity or the box
    check): the result's image is loaded and preprocessed again, its stored map read back, and
    the metric run on the model; ``finish`` keeps the answer with the result and returns it."""

    kind = "quality"

    def __init__(self, service, rid: str, metric: str, params: dict, key: str):
        self.service, self.rid, self.metric, self.params, self.key = service, rid, metric, params, key
        self.meta = service.result(rid)
        self.name = self.meta["model"]
        self.spec = service.models.spec(self.name)

    def to_payload(self) -> dict:
        return {"kind": self.kind, "result": self.rid, "metric": self.metric, "params": jsonable(self.params),
                "key": self.key}

    @classmethod
    def from_payload(cls, service, payload: dict) -> "QualityTask":
        """The metric's parameters are checked again (JSON lists become its tuples)."""
        meta = service.result(payload["result"])
        params = engine.metrics.registry.get(payload["metric"]).validate(payload["params"],
                                                                          service.input_shape(meta["model"]))
        return cls(service, payload["result"], payload["metric"], params, payload["key"])

    def method_args(self) -> dict:
        """``method`` and ``method_params`` for a metric that re-runs the result's method."""
        if not getattr(engine.metrics.registry.get(self.metric), "needs_method", False):
            return {}
        method = engine.registry.get(self.meta["method"])
        params = method.validate(self.meta["params"], self.service.input_shape(self.name))
        if "layer" in params and not params["layer"] and self.meta.get("layer"):
            params["layer"] = self.meta["layer"]  # the layer the result's map was made at
        return {"method": self.meta["method"], "method_params": params}

    @classmethod
    def compute(cls, tasks: list["QualityTask"], jobs: list) -> list:
        out = []
        for task, job in zip(tasks, jobs):
            service = task.service
            if service.store.quality_entry(task.rid, task.key) is not None:
                out.append(None)  # an identical job finished first
                continue
            image_id = service.store.result_image(task.rid)
            if image_id is None or service.store.image(image_id) is None:
                raise NotFound(f"the image of result {shown(task.rid)} is no longer stored", "result")
            x = load_inputs(service, task.spec, image_id)[0].to(service.models.device)
            attr = torch.from_numpy(service.store.attribution(task.rid)).to(x.device)
            model = service.models.get(task.name)
            start = time.perf_counter()
            answer = engine.evaluate(model, x, attr, task.meta["target"], task.metric, progress=job.progress,
                                     cancel=job.cancel, **task.method_args(), **service.engine_settings(),
                                     **task.params)
            out.append((answer, time.perf_counter() - start))
        return out

    def finish(self, computed: tuple | None) -> dict:
        """Keeps the measurement with the result (may raise StoreFull, 507); answers it."""
        if computed is None:
            return self.service.store.quality_entry(self.rid, self.key)
        answer, elapsed = computed
        m = engine.metrics.registry.get(self.metric)
        entry = {"key": self.key, "result": self.rid, "metric": self.metric, "label": m.label,
                 "better": m.better, "params": jsonable(self.params), "created": utc_now_precise(),
                 "elapsed_s": round(elapsed, 4), "answer": quality_answer(answer, bool(self.meta["signed"]))}
        return self.service.store.put_quality(self.rid, entry)
