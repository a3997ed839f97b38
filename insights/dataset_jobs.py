"""Model work on datasets: every item's prediction by a model (computed in the background, kept in
the store's index per model and item, so a restart finds them), pages of items filtered and sorted
by those predictions, a summary (accuracy, counts, confusion), and batch explanations.

The work goes through the app's job backend as tasks (``dataset_predict``, ``dataset_explain``),
so it runs on the in-process worker or on Celery workers alike; a worker opens the same
``DATASETS`` settings. Predictions run in chunks of :data:`CHUNK` items, one job each, submitted one
after the other by a driver thread of the web process: a user's own explanation waits for one
chunk at most, never for the whole dataset.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from . import engine
from .datasets import Dataset, DatasetError, ItemError, LabelIndex, iter_indices
from .engine import Cancelled
from .engine.errors import shown
from .errors import BadParam, ServiceError, as_int, as_number
from .tasks import ExplainTask, Task, jsonable, load_inputs, scores

log = logging.getLogger("insights.datasets")

CHUNK = 32  # items per prediction job
MAX_PER_PAGE = 200
SORTS = ("index", "confidence", "-confidence", "loss", "-loss")
THUMB_SIZES = (96, 160, 256)
THUMB_CACHE_BYTES = 64 * 1024 * 1024  # thumbnails kept in memory, least recently used dropped
CONFUSION_MAX_CLASSES = 50
FILTERS = {"true", "predicted", "correct", "min_prob", "max_prob", "model"}  # a batch's filter keys


def item_key(item) -> str:
    """What the predictions cache calls an item: a digest of its file's path, size and
    modification time (a changed file is scored again)."""
    return hashlib.sha256(item.stamp.encode()).hexdigest()[:32]


def model_key(spec) -> str:
    """What the predictions cache calls a model: its name and a digest of its labels and
    description (a model served again under the same name with other classes, or from another
    file, starts afresh; retrained weights at the same path do not: see docs/api.md)."""
    digest = hashlib.sha256(json.dumps([spec.labels, spec.description]).encode()).hexdigest()[:12]
    return f"{spec.name}@{digest}"


def truth(dataset: Dataset, labels: list[str]) -> np.ndarray:
    """Each item's true class as an index into a model's ``labels`` (-1: unlabelled, or the
    class has no counterpart among that model's labels). For another model's labels, the class is
    looked up by its name, then by the name the source wrote, then by its ImageNet WordNet id."""
    if labels == dataset.labels:
        return np.array([-1 if i.label is None else i.label for i in dataset.items], dtype=np.int64)
    from .datasets import imagenet_wnids, is_imagenet

    index, mapping = LabelIndex(labels), {}
    wnids = imagenet_wnids() if is_imagenet(dataset.labels) else None
    out = np.full(len(dataset), -1, dtype=np.int64)
    for k, item in enumerate(dataset.items):
        if item.label is None:
            continue
        key = (item.label, item.label_name)
        if key not in mapping:
            mapping[key] = -1
            for name in (dataset.labels[item.label], item.label_name, wnids[item.label] if wnids else None):
                if name is None:
                    continue
                try:
                    mapping[key] = index.find(name)
                    break
                except DatasetError:
                    continue
        out[k] = mapping[key]
    return out


class Board:
    """One model's predictions over one dataset, in memory: top class, its probability, the
    true class's probability, and which items are scored (1) or failed (2)."""

    def __init__(self, dataset: Dataset, model: str, labels: list[str], key: str):
        n = len(dataset)
        self.dataset, self.model, self.labels, self.key = dataset, model, labels, key
        self.keys = [item_key(i) for i in dataset.items]
        self.true = truth(dataset, labels)
        self.pred = np.full(n, -1, dtype=np.int64)
        self.prob = np.full(n, np.nan, dtype=np.float32)
        self.true_prob = np.full(n, np.nan, dtype=np.float32)
        self.state = np.zeros(n, dtype=np.int8)
        self.errors: dict[int, str] = {}
        self.lock = threading.Lock()

    def load(self, store) -> None:
        """Reads the stored predictions of the items not yet known (a file dataset's only:
        Python objects are not the same after a restart)."""
        if self.dataset.kind == "python":
            return
        with self.lock:
            todo = [int(i) for i in np.flatnonzero(self.state == 0)]
        found = store.predictions(self.key, [self.keys[i] for i in todo]) if todo else {}
        with self.lock:
            for i in todo:
                row = found.get(self.keys[i])
                if row is not None:
                    self.fill(i, *row)

    def fill(self, i: int, top: int | None, prob: float | None, true_prob: float | None,
             error: str | None) -> None:
        """Records item ``i``'s prediction, or its error (the caller holds the lock)."""
        if top is None or prob is None or not 0 <= int(top) < len(self.labels):
            self.state[i], self.errors[i] = 2, error or "could not be scored"
            return
        self.pred[i], self.prob[i] = int(top), float(prob)
        if true_prob is not None and self.true[i] >= 0:
            self.true_prob[i] = float(true_prob)
        self.state[i] = 1

    def record(self, rows: list) -> None:
        """A chunk job's answer: [index, top, prob, true_prob, error] per item."""
        with self.lock:
            for i, top, prob, true_prob, error in rows:
                if 0 <= int(i) < len(self.keys):
                    self.fill(int(i), top, prob, true_prob, error)

    @property
    def done(self) -> int:
        return int((self.state != 0).sum())

    def pending(self) -> list[int]:
        with self.lock:
            return [int(i) for i in np.flatnonzero(self.state == 0)]

    def correct(self) -> np.ndarray:
        """1 correct, 0 wrong, -1 unknown (not scored, failed, or no true class for this model)."""
        out = np.full(len(self.keys), -1, dtype=np.int8)
        known = (self.state == 1) & (self.true >= 0)
        out[known] = (self.pred[known] == self.true[known]).astype(np.int8)
        return out

    def loss(self) -> np.ndarray:
        """Cross-entropy of the true class (NaN where unknown)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.log(np.maximum(self.true_prob, 1e-12))


class Progress:
    """A driver thread that scores a dataset's unscored items with one model, a chunk job at a
    time, recording each chunk's answer in the board."""

    def __init__(self, work: "DatasetWork", board: Board):
        self.work, self.board = work, board
        self.cancel = threading.Event()
        self.total = len(board.keys)
        self.started = time.time()
        self.start_done = board.done
        self.finished: float | None = None
        self.status = "queued"  # until no other model's run is going (one at a time: see DatasetWork)
        self.error: str | None = None
        self.job_id: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"predict-{board.dataset.name}-{board.model}",
                                       daemon=True)

    def _run(self) -> None:
        try:
            while not self.work.one_at_a_time.acquire(timeout=0.2):
                if self.cancel.is_set():
                    self.status = "cancelled"
                    return
            try:
                self.status = "running"
                self.started, self.start_done = time.time(), self.board.done
                self.status = self._chunks()
            finally:
                self.work.one_at_a_time.release()
        except Exception as err:  # noqa: BLE001 - reported in the status, and logged
            log.exception("predictions of dataset %s by %s failed", self.board.dataset.name, self.board.model)
            self.status, self.error = "failed", str(err)
        finally:
            self.finished = time.time()

    def _chunks(self) -> str:
        service, board = self.work.service, self.board
        pending = board.pending()
        for start in range(0, len(pending), CHUNK):
            if self.cancel.is_set():
                return "cancelled"
            chunk = pending[start:start + CHUNK]
            task = DatasetPredictTask(service, board.dataset, board.model, chunk)
            job = service.jobs.submit(task, key=f"dataset:{board.dataset.fingerprint}:{board.key}:{chunk[0]}",
                                      total=len(chunk))
            self.job_id = job.id
            while not job.wait(0.2):
                if self.cancel.is_set():
                    service.jobs.cancel(job.id)
            if job.status == "failed":
                raise RuntimeError((job.error or {}).get("message") or "the prediction job failed")
            if job.status == "cancelled":
                return "cancelled"
            board.record((job.result or {}).get("items") or [])
        return "done"

    def describe(self) -> dict:
        done = self.board.done
        eta = None
        if self.status == "running":
            rate = (done - self.start_done) / max(time.time() - self.started, 1e-6)
            eta = round((self.total - done) / rate, 1) if rate > 0 else None
        return {"status": self.status, "done": done, "total": self.total, "eta_s": eta, "error": self.error}


class DatasetWork:
    """The datasets' model work for one service (``service.dataset_work``)."""

    def __init__(self, service):
        self.service = service
        self._boards: dict[tuple[str, str], Board] = {}
        self._runs: dict[tuple[str, str], Progress] = {}
        self._stopped: set[tuple[str, str]] = set()  # cancelled by a user: not restarted by reads
        self._guard = threading.Lock()
        self._loading = threading.Lock()  # a board is made and read from the index once, readers wait
        self._closed = False
        self._thumbs: "OrderedDict[tuple, bytes]" = OrderedDict()
        self._thumbs_lock = threading.Lock()
        self._thumb_bytes = 0  # the bytes of the thumbnails kept
        # One model's run at a time: runs of several models would take turns chunk by chunk, and
        # with more models than MAX_LOADED_MODELS each turn would load its model again.
        self.one_at_a_time = threading.Semaphore(1)

    # -- predictions -----------------------------------------------------------------------

    def board(self, dataset: Dataset, model: str) -> Board:
        """The model's board over the dataset, read back from the index when first made (other
        requests wait for that, so none sees it half-read)."""
        key = (dataset.name, model)
        board = self._boards.get(key)
        if board is not None:
            return board
        with self._loading:
            board = self._boards.get(key)
            if board is None:
                spec = self.service.models.spec(model)
                board = Board(dataset, model, spec.labels, model_key(spec))
                board.load(self.service.store)
                with self._guard:
                    self._boards[key] = board
        return board

    def start(self, dataset: Dataset, model: str, asked: bool = False) -> dict:
        """Starts scoring the dataset's unscored items with ``model``. A read (``asked`` False)
        starts the model's first run over the dataset only; a user asking (``asked``) starts one
        again after a stop, a failure, or items that could not be read then."""
        board = self.board(dataset, model)
        key = (dataset.name, model)
        with self._guard:
            if asked:
                self._stopped.discard(key)
            run = self._runs.get(key)
            again = run is None or (asked and run.finished is not None)
            if again and not self._closed and key not in self._stopped and board.done < len(board.keys) \
                    and not self.service.store.read_only:
                if asked:  # the items that failed for now (a file gone) are tried again
                    with board.lock:
                        for i in [i for i, _e in board.errors.items() if board.state[i] == 2]:
                            board.state[i] = 0
                            board.errors.pop(i, None)
                run = self._runs[key] = Progress(self, board)
                run.thread.start()
        return self.status(dataset, model)

    def stop(self, dataset: Dataset, model: str) -> dict:
        key = (dataset.name, model)
        with self._guard:
            self._stopped.add(key)
            run = self._runs.get(key)
        if run is not None:
            run.cancel.set()
        return self.status(dataset, model)

    def status(self, dataset: Dataset, model: str) -> dict:
        board = self.board(dataset, model)
        run = self._runs.get((dataset.name, model))
        if run is not None and run.finished is None:
            return run.describe()
        done = board.done
        if done >= len(board.keys):
            status = "done"
        elif run is not None:
            status = run.status
        else:
            status = "stopped" if (dataset.name, model) in self._stopped else "idle"
        return {"status": status, "done": done, "total": len(board.keys), "eta_s": None,
                "error": run.error if run is not None else None}

    def wait(self, dataset: Dataset, model: str, timeout: float | None = None) -> dict:
        """Blocks until the model's run over the dataset ends (tests, the CLI)."""
        run = self._runs.get((dataset.name, model))
        if run is not None:
            run.thread.join(timeout)
        return self.status(dataset, model)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stops every run (no new one starts) and waits up to ``timeout`` for their threads."""
        with self._guard:
            self._closed = True
            runs = list(self._runs.values())
        for run in runs:
            run.cancel.set()
        deadline = time.monotonic() + timeout
        for run in runs:
            run.thread.join(max(0.0, deadline - time.monotonic()))

    # -- listing ---------------------------------------------------------------------------

    def models_of(self, values: list[str]) -> list[str]:
        names = [self.service.model_name(v or None) for v in (values or [None])]
        seen = []
        for n in names:
            if n not in seen:
                seen.append(n)
        if len(seen) > 4:
            raise BadParam("model: at most 4 models side by side", "model")
        return seen

    def matching(self, dataset: Dataset, args: dict) -> tuple[list[str], list[Board], np.ndarray, str]:
        """The models asked for, their boards, the indices of the items matching the query's
        filters in its sort order, and the sort (starting the models' first runs)."""
        models = self.models_of(args.get("model") or [])
        boards = [self.board(dataset, m) for m in models]
        for m in models:
            self.start(dataset, m)
        first = boards[0]
        n = len(dataset)
        keep = np.ones(n, dtype=bool)
        true_values = np.array([-1 if i.label is None else i.label for i in dataset.items], dtype=np.int64)
        if args.get("true") not in (None, ""):
            keep &= true_values == self._class(args["true"], dataset.labels, "true")
        if args.get("predicted") == "other":  # a class none of the dataset's items has (the matrix's last column)
            inside = np.unique(first.true[first.true >= 0])
            keep &= (first.state == 1) & ~np.isin(first.pred, inside)
        elif args.get("predicted") not in (None, ""):
            keep &= first.pred == self._class(args["predicted"], first.labels, "predicted")
        correct = args.get("correct")
        if correct not in (None, "", "all"):
            if correct not in ("true", "false"):
                raise BadParam(f"correct: must be true, false or all, got {shown(correct)}", "correct")
            keep &= first.correct() == (1 if correct == "true" else 0)
        lo = as_number(args["min_prob"], "min_prob", 0, 1) if args.get("min_prob") not in (None, "") else None
        hi = as_number(args["max_prob"], "max_prob", 0, 1) if args.get("max_prob") not in (None, "") else None
        if lo is not None:
            keep &= first.prob >= lo
        if hi is not None:
            keep &= first.prob <= hi
        order = np.flatnonzero(keep)
        sort = args.get("sort") or "index"
        if sort not in SORTS:
            raise BadParam(f"sort: must be one of {', '.join(SORTS)}, got {shown(sort)}", "sort")
        if sort != "index":
            values = first.prob if sort.endswith("confidence") else first.loss()
            picked = values[order].astype(np.float64)
            picked = -picked if sort.startswith("-") else picked
            picked = np.where(np.isnan(picked), np.inf, picked)  # unscored items last
            order = order[np.argsort(picked, kind="stable")]
        return models, boards, order, sort

    def items(self, dataset: Dataset, args: dict) -> dict:
        """A page of items with each model's prediction; ``args`` are the query's values (lists
        for ``model``). Filters and sort apply to the first model."""
        models, boards, order, sort = self.matching(dataset, args)
        n = len(dataset)
        per_page = as_int(args.get("per_page") or 48, "per_page", 1, MAX_PER_PAGE)
        pages = max(1, math.ceil(len(order) / per_page))
        page = as_int(args.get("page") or 1, "page", 1, 10 ** 9)
        rows = order[(page - 1) * per_page: page * per_page]
        correct_of = [b.correct() for b in boards]
        out = []
        for i in rows.tolist():
            entry = dataset.describe_item(i)
            entry["thumb"] = f"/api/datasets/{dataset.name}/items/{i}/thumb"
            entry["models"] = {b.model: self._prediction(b, i, c) for b, c in zip(boards, correct_of)}
            out.append(entry)
        return {"dataset": dataset.name, "models": models, "total": int(len(order)), "size": n, "page": page,
                "per_page": per_page, "pages": pages, "sort": sort, "items": out,
                "predictions": {b.model: self.status(dataset, b.model) for b in boards}}

    @staticmethod
    def _prediction(board: Board, i: int, correct: np.ndarray) -> dict | None:
        if board.state[i] == 0:
            return None
        if board.state[i] == 2:
            return {"error": board.errors.get(i)}
        t = int(board.true[i])
        label = int(board.pred[i])
        return {"predicted": {"index": label, "label": board.labels[label]}, "prob": float(board.prob[i]),
                "true_prob": None if t < 0 else float(board.true_prob[i]),
                "loss": None if t < 0 else float(-math.log(max(float(board.true_prob[i]), 1e-12))),
                "correct": None if correct[i] < 0 else bool(correct[i])}

    @staticmethod
    def _class(value: Any, labels: list[str], field: str) -> int:
        try:
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                return as_int(value, field, 0, len(labels) - 1)
            return LabelIndex(labels).find(value)
        except DatasetError as err:
            raise BadParam(f"{field}: {err}", field) from None

    def summary(self, dataset: Dataset, models: list[str]) -> dict:
        """Accuracy per model, the true classes' counts, and a confusion matrix over the
        dataset's classes when there are at most :data:`CONFUSION_MAX_CLASSES`."""
        models = self.models_of(models)
        classes = dataset.classes()
        out = {"dataset": dataset.name, "size": len(dataset), "classes": classes, "models": {}}
        for m in models:
            self.start(dataset, m)
            b = self.board(dataset, m)
            correct = b.correct()
            known = correct >= 0
            entry = {"status": self.status(dataset, m), "scored": int((b.state == 1).sum()),
                     "failed": int((b.state == 2).sum()), "evaluated": int(known.sum()),
                     "correct": int((correct == 1).sum()),
                     "accuracy": float((correct == 1).sum() / known.sum()) if known.any() else None,
                     "confusion": None}
            if 0 < len(classes) <= CONFUSION_MAX_CLASSES:
                entry["confusion"] = self._confusion(dataset, b, classes)
            out["models"][m] = entry
        return out

    @staticmethod
    def _confusion(dataset: Dataset, b: Board, classes: list[dict]) -> dict:
        """Rows: the dataset's true classes; columns: the same classes as predicted, then
        "other" (a class outside the dataset's, or one this model has no counterpart for)."""
        order = sorted(c["index"] for c in classes)
        n = len(order)
        own = np.array([-1 if i.label is None else i.label for i in dataset.items], dtype=np.int64)
        row_of = np.full(len(dataset.labels), -1, dtype=np.int64)
        row_of[order] = np.arange(n)
        col_of = np.full(len(b.labels), n, dtype=np.int64)  # the model's class → column ("other")
        for c, k in zip(order, range(n)):
            ts = b.true[own == c]
            if ts.size and ts[0] >= 0:
                col_of[ts[0]] = k
        use = (own >= 0) & (b.state == 1)
        matrix = np.zeros((n, n + 1), dtype=np.int64)
        np.add.at(matrix, (row_of[own[use]], col_of[b.pred[use]]), 1)
        return {"classes": [{"index": c, "label": dataset.labels[c]} for c in order], "matrix": matrix.tolist()}

    # -- images ----------------------------------------------------------------------------

    def thumbnail(self, dataset: Dataset, index: Any, size: Any = 160) -> bytes:
        from .datasets import image_bytes

        i = dataset.item(index).index
        size = as_int(size, "size", 16, 512)
        size = min(THUMB_SIZES, key=lambda s: (s < size, abs(s - size)))  # a few sizes, cached
        key = (dataset.name, dataset.fingerprint, i, size)
        with self._thumbs_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        data = image_bytes(dataset.image(i, max_side=2 * size), size)  # a JPEG decodes reduced
        with self._thumbs_lock:
            if key not in self._thumbs:  # (another request may have made it meanwhile)
                self._thumbs[key] = data
                self._thumb_bytes += len(data)
            while self._thumb_bytes > THUMB_CACHE_BYTES:
                self._thumb_bytes -= len(self._thumbs.popitem(last=False)[1])
        return data

    def store_item(self, dataset: Dataset, index: Any) -> dict:
        """Stores an item's image as an upload (to open it in the single-image view)."""
        item = dataset.item(index)
        record = self.service.store.put_image(dataset.image(item.index))
        return {"image": record, **dataset.describe_item(item.index)}

    # -- batch explanations ----------------------------------------------------------------

    def select(self, dataset: Dataset, body: dict) -> list[int]:
        """The items a batch explanation covers: ``items`` (indices) or ``filter`` (the items
        query's parameters: every item matching it)."""
        if "items" in body and body["items"] is not None:
            values = body["items"]
            if not isinstance(values, list) or not values:
                raise BadParam("items must be a non-empty list of item indices", "items")
            limit = int(self.service.settings.get("BATCH_MAX_ITEMS") or 1000)
            if len(values) > limit:
                raise ServiceError(f"{len(values)} items are more than one batch may cover ({limit}, BATCH_MAX_ITEMS)",
                                   "items", code="over_budget")
            try:
                return sorted(set(iter_indices(values, len(dataset))))
            except DatasetError as err:
                raise BadParam(str(err), "items") from None
        query = body.get("filter")
        if not isinstance(query, dict):
            raise BadParam("name the items (items: [indices]) or a filter (filter: {true, predicted, correct, "
                           "min_prob, max_prob, model})", "items")
        unknown = sorted(set(query) - FILTERS)
        if unknown:
            raise BadParam(f"filter: unknown key {shown(unknown[0])}; a filter has {', '.join(sorted(FILTERS))}",
                           "filter")
        args = {k: (v if k == "model" else None if v is None else str(v).lower() if isinstance(v, bool) else str(v))
                for k, v in query.items()}
        if isinstance(args.get("model"), str):
            args["model"] = [args["model"]]
        _models, _boards, order, _sort = self.matching(dataset, {**args, "sort": "index"})
        if not len(order):
            raise BadParam("no item matches the filter", "filter")
        limit = int(self.service.settings.get("BATCH_MAX_ITEMS") or 1000)
        if len(order) > limit:
            raise ServiceError(f"{len(order)} items match the filter, more than one batch may cover ({limit}, "
                               "BATCH_MAX_ITEMS); narrow it", "filter", code="over_budget")
        return order.tolist()

    def explain(self, dataset: Dataset, body: dict, client: str):
        """Admits a batch explanation of the selected items as one job (its ticket)."""
        from .admission import digest

        name = self.service.model_name(body.get("model"))
        p, info = self.service.plan(name, body.get("method"), body.get("params"))
        target = parse_target(body.get("target", "predicted"), self.service.models.spec(name).num_classes)
        indices = self.select(dataset, body)
        passes = int(info["cost"]["forward"]) * len(indices)
        limit = self.service.settings.get("BATCH_MAX_PASSES") or 25 * int(self.service.settings["MAX_PASSES"])
        if passes > int(limit):
            raise ServiceError(f"explaining {len(indices)} items needs {passes} forward passes, more than the limit "
                               f"of {limit} (BATCH_MAX_PASSES); select fewer items or use a cheaper setting",
                               "items", code="over_budget")
        task = DatasetExplainTask(self.service, dataset, name, body.get("method"), p, info, target, indices)
        key = digest(f"{dataset.name}\0{dataset.fingerprint}\0{task.to_payload()}".encode())
        return self.service.jobs.admit(task, client, key=f"batch:{key}", total=passes)


def parse_target(value: Any, num_classes: int) -> str | int:
    """``predicted``, ``true`` or a class index."""
    if value in (None, "", "predicted"):
        return "predicted"
    if value == "true":
        return "true"
    return as_int(value, "target", 0, num_classes - 1, code="bad_target")


# --------------------------------------------------------------------------- tasks


class DatasetPredictTask(Task):
    """Scores a chunk of a dataset's items with one model; keeps each prediction in the index (a
    file dataset's; an item that cannot be read for now is not kept) and answers them."""

    kind = "dataset_predict"

    def __init__(self, service, dataset: Dataset, model: str, indices: list[int]):
        self.service, self.dataset, self.name, self.indices = service, dataset, model, list(indices)
        self.spec = service.models.spec(model)

    def to_payload(self) -> dict:
        return {"kind": self.kind, "model": self.name, "dataset": self.dataset.name,
                "fingerprint": self.dataset.fingerprint, "items": self.indices}

    @classmethod
    def from_payload(cls, service, payload: dict) -> "DatasetPredictTask":
        return cls(service, worker_dataset(service, payload), payload["model"], payload["items"])

    @classmethod
    def compute(cls, tasks: list["DatasetPredictTask"], jobs: list) -> list:
        return [t._score(j) for t, j in zip(tasks, jobs)]

    def _score(self, job) -> list[tuple]:
        """(index, top, prob, true_prob, error, lasting) per item."""
        service, out, rows, good = self.service, [], [], []
        true_of = truth(self.dataset, self.spec.labels)
        for i in self.indices:
            if job.cancel.is_set():
                raise Cancelled("cancelled")
            try:
                x, _view = self.spec.prepare(self.dataset.image(i))
                rows.append(x)
                good.append(i)
            except ItemError as err:
                out.append((i, None, None, None, str(err), err.lasting))
            except Exception as err:  # noqa: BLE001 - a model's own transform failing on this item
                out.append((i, None, None, None, f"{self.dataset.items[i].key}: {type(err).__name__}: {err}", False))
        if good:
            model = service.models.get(self.name)
            options = service.engine_settings()["options"]
            if len({tuple(x.shape) for x in rows}) == 1:
                logits = engine.logits(model, torch.cat(rows).to(service.models.device), options=options)
            else:  # a transform whose output size follows the image: one at a time
                logits = torch.cat([engine.logits(model, x.to(service.models.device), options=options) for x in rows])
            if logits.dim() != 2 or logits.shape[-1] != self.spec.num_classes:
                raise RuntimeError(f"model {self.name} returned shape {tuple(logits.shape)}; "
                                   f"expected N×{self.spec.num_classes} (one score per label)")
            probs = torch.softmax(logits.float().cpu(), dim=1)
            for i, row in zip(good, probs):
                if not bool(torch.isfinite(row).all()):
                    out.append((i, None, None, None, f"{self.dataset.items[i].key}: the model's scores are not finite",
                                True))
                    continue
                top = int(row.argmax())
                t = int(true_of[i])
                out.append((i, top, float(row[top]), float(row[t]) if t >= 0 else None, None, True))
        job.progress(len(self.indices), len(self.indices))
        return sorted(out, key=lambda r: r[0])

    def finish(self, computed: list) -> dict:
        if self.dataset.kind != "python":
            items, key = self.dataset.items, model_key(self.spec)
            self.service.store.put_predictions(key, [(item_key(items[i]), top, prob, true_prob, error)
                                                     for i, top, prob, true_prob, error, lasting in computed
                                                     if lasting])
        return {"items": [[i, top, prob, true_prob, error] for i, top, prob, true_prob, error, _l in computed]}


def worker_dataset(service, payload: dict) -> Dataset:
    """The dataset a task payload names, as this process opened it; refused when its files differ
    from the submitter's (item indices would name other pictures)."""
    dataset = service.datasets.get(payload["dataset"])
    if payload.get("fingerprint") != dataset.fingerprint:
        raise DatasetError(f"this worker's copy of dataset {dataset.name!r} differs from the web node's (its files "
                           "or their paths changed): every node needs the same DATASETS at the same paths, "
                           "started after the files last changed")
    return dataset


class DatasetExplainTask(Task):
    """Explains a list of a dataset's items with one method: one job, results stored one by one
    (a re-run finds them), answering one row per item."""

    kind = "dataset_explain"

    def __init__(self, service, dataset: Dataset, model: str, method_id: str, params: dict, info: dict,
                 target: str | int, indices: list[int]):
        self.service, self.dataset, self.name, self.method_id = service, dataset, model, method_id
        self.params, self.info, self.target, self.indices = params, info, target, list(indices)

    def to_payload(self) -> dict:
        return {"kind": self.kind, "model": self.name, "dataset": self.dataset.name,
                "fingerprint": self.dataset.fingerprint, "method": self.method_id,
                "params": jsonable(self.params), "info": jsonable(self.info), "target": self.target,
                "items": self.indices}

    @classmethod
    def from_payload(cls, service, payload: dict) -> "DatasetExplainTask":
        name, method_id = payload["model"], payload["method"]
        params = engine.registry.get(method_id).validate(payload["params"], service.input_shape(name))
        return cls(service, worker_dataset(service, payload), name, method_id, params, payload["info"],
                   payload["target"], payload["items"])

    @classmethod
    def compute(cls, tasks: list["DatasetExplainTask"], jobs: list) -> list:
        return [run_batch(t.service, t.dataset, t.indices, t.name, t.method_id, t.params, t.info, t.target,
                          progress=j.progress, cancel=j.cancel) for t, j in zip(tasks, jobs)]

    def finish(self, rows: list[dict]) -> dict:
        return {"dataset": self.dataset.name, "model": self.name, "method": self.method_id, "rows": rows,
                "explained": len({r["result"] for r in rows if r["result"] and not r["cached"]}),
                "cached": sum(1 for r in rows if r["cached"]), "failed": sum(1 for r in rows if r["error"])}


@dataclass
class _Share:
    """One engine call's share of a batch's progress, for :meth:`ExplainTask.compute`."""

    report: Callable[[int, int], None] | None
    cancel: Any
    offset: int
    passes: int
    whole: int

    def progress(self, done: int, total: int) -> None:
        if self.report is not None and total:
            self.report(self.offset + int(self.passes * min(done, total) / total), self.whole)


class _Flag:
    """A cancel signal as an Event-like object (the engine and tasks call ``is_set``)."""

    def __init__(self, cancel: Any):
        self._cancel = cancel

    def is_set(self) -> bool:
        c = self._cancel
        return bool(c is not None and (c.is_set() if hasattr(c, "is_set") else c()))


def run_batch(service, dataset: Dataset, indices: list[int], name: str, method_id: str, params: dict,
              info: dict, target: str | int, progress: Callable[[int, int], None] | None = None,
              cancel: Any = None) -> list[dict]:
    """Explains each item (stored as an upload, then explained like one; a result stored already
    is reused): one row per item, in order. Raises :class:`~insights.engine.Cancelled` when
    cancelled; what finished before is stored."""
    spec = service.models.spec(name)
    model = service.models.get(name)
    flag = _Flag(cancel)
    per = max(1, int(info["cost"]["forward"]))
    whole = per * len(indices)
    batchable = engine.registry.get(method_id).batchable(params)
    step = max(1, int(service.settings.get("BATCH_MAX") or 16)) if batchable else 1
    true_of = truth(dataset, spec.labels)
    rows: list[dict] = []
    for start in range(0, len(indices), step):
        if flag.is_set():
            raise Cancelled("cancelled")
        chunk = indices[start:start + step]
        todo: list[tuple[dict, ExplainTask]] = []
        stored: list[tuple[dict, dict, int]] = []  # (row, the image's record, true index)
        for i in chunk:
            item = dataset.items[i]
            t = int(true_of[i])
            row = {"index": i, "key": item.key,
                   "true": None if t < 0 else {"index": t, "label": spec.labels[t]},
                   "prediction": None, "target": None, "method": method_id, "image": None, "result": None,
                   "cached": False, "error": None}
            rows.append(row)
            try:
                record = service.store.put_image(dataset.image(i))
            except ItemError as err:
                row["error"] = str(err)
                continue
            row["image"] = record["id"]
            stored.append((row, record, t))
        # The stored copies' inputs, read once: for the chunk's scores in one pass (from the cache
        # where the images were seen) and for the explanations.
        inputs = [load_inputs(service, spec, record["id"]) for _row, record, _t in stored]
        if stored:
            x = torch.cat([x for x, _view in inputs])
            chunk_logits = scores(service, name, model, [_Scored(record["id"]) for _row, record, _t in stored],
                                  x.to(service.models.device))
            del x
        pending: set[str] = set()  # result ids this chunk computes (a picture listed twice: once)
        for (row, record, t), logits, loaded in zip(stored, chunk_logits if stored else [], inputs):
            probs = torch.softmax(logits, dim=0)
            top = int(probs.argmax())
            row["prediction"] = {"index": top, "label": spec.labels[top], "prob": float(probs[top])}
            if target == "true":
                if t < 0:
                    row["error"] = f"{row['key']}: no true label among the model's classes to explain"
                    continue
                row["target"] = t
            else:
                row["target"] = top if target == "predicted" else int(target)
            rid = service.store.result_id(record["id"], name, method_id, params, row["target"])
            row["result"] = rid
            if rid in pending:
                continue
            if service.store.result(rid) is not None:
                row["cached"] = True
                continue
            pending.add(rid)
            task = ExplainTask(service, name, record, method_id, params, row["target"], rid, info)
            task.loaded = loaded
            todo.append((row, task))
        done_before = per * start
        for k in range(0, len(todo), step):
            group = todo[k:k + step]
            share = _Share(progress, flag, done_before + per * k, per * len(group), whole)
            computed = ExplainTask.compute([t for _r, t in group], [share] * len(group))
            for (row, task), value in zip(group, computed):
                task.finish(value)
        if progress is not None:
            progress(per * min(start + step, len(indices)), whole)
    return rows


@dataclass
class _Scored:
    """What :func:`insights.tasks.scores` reads of a task: its image id."""

    image_id: str
