"""Runs model work on one compute worker per device, with progress and cancellation.

All model work of an app goes through :meth:`JobRunner.submit`: one thread takes jobs from a
queue in order, so two computations never compete for the device (or the CPU's cores). Cheap
requests submit and wait; costly ones return the job at once and the client follows it by
polling or server-sent events. A job's function receives the job and reports with
``job.progress(done, total)``; it should pass ``job.cancel`` (a threading.Event) to the engine.

Jobs submitted with ``urgent=True`` (requests that wait for their answer) go ahead of queued
costly jobs; a running job is never interrupted except by cancellation.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable

from .methods import Cancelled

log = logging.getLogger("insights.jobs")

clock = time.time  # the wall clock of job times (tests replace it)

STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL = ("done", "failed", "cancelled")


class Job:
    """One unit of work: its state, progress, outcome and cancel signal."""

    def __init__(self, fn: Callable[["Job"], Any], key: str | None = None, total: int = 0, urgent: bool = False):
        self.id = uuid.uuid4().hex
        self.fn = fn
        self.key = key
        self.urgent = urgent
        self.status = "queued"
        self.done = 0
        self.total = int(total)
        self.result: Any = None
        self.error: dict | None = None
        self.exception: BaseException | None = None
        self.cancel = threading.Event()
        self.created = clock()
        self.started: float | None = None
        self.finished: float | None = None
        self.version = 0  # bumps on every change; event streams wait on it
        self._first: tuple[float, int] | None = None  # (time, done) of the first progress report
        self._cond = threading.Condition()

    # -- called by the worker and the job's function ------------------------------------------

    def _set(self, **changes) -> None:
        with self._cond:
            for name, value in changes.items():
                setattr(self, name, value)
            self.version += 1
            self._cond.notify_all()

    def progress(self, done: int, total: int) -> None:
        """Reports ``done`` of ``total`` units of work."""
        if done != self.done or total != self.total:
            if self._first is None:
                self._first = (clock(), int(done))
            self._set(done=int(done), total=int(total))

    # -- read by request threads ----------------------------------------------------------------

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the job is finished (True) or ``timeout`` passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self.final, timeout)

    def wait_change(self, version: int, timeout: float) -> int:
        """Blocks until the job's version differs from ``version`` or ``timeout`` passes."""
        with self._cond:
            self._cond.wait_for(lambda: self.version != version, timeout)
            return self.version

    def to_dict(self) -> dict:
        with self._cond:
            now = self.finished or clock()
            elapsed = (now - self.started) if self.started else 0.0
            eta = None
            if self.status == "running" and self.done > 0 and self.total > self.done:
                # The rate since the first report leaves out the start-up (loading the model);
                # with a single report so far, the whole elapsed time is all we have.
                rate_time, rate_done = elapsed, self.done
                if self._first is not None and self.done > self._first[1]:
                    rate_time, rate_done = now - self._first[0], self.done - self._first[1]
                eta = round(rate_time / rate_done * (self.total - self.done), 2)
            elif self.status == "done":
                eta = 0.0
            return {"id": self.id, "status": self.status, "done": self.done, "total": self.total,
                    "eta_s": eta, "elapsed_s": round(elapsed, 3),
                    "result_id": self.result if isinstance(self.result, str) else None,
                    "error": self.error, "version": self.version}


def error_of(exc: BaseException) -> dict:
    """The ``{"code", "message", "field"}`` of an exception raised inside a job."""
    from .methods import InsightsError, UnknownMethod
    from .models import ModelUnavailable, UnknownModel

    if isinstance(exc, UnknownMethod):
        return {"code": "unknown_method", "message": str(exc), "field": "method"}
    if isinstance(exc, InsightsError):
        field = getattr(exc, "field", None)
        return {"code": "bad_target" if field == "target" else "bad_param", "message": str(exc), "field": field}
    if isinstance(exc, UnknownModel):
        return {"code": "unknown_model", "message": str(exc), "field": "model"}
    if isinstance(exc, ModelUnavailable):
        return {"code": "model_unavailable", "message": str(exc), "field": "model"}
    return {"code": "internal", "message": f"{type(exc).__name__}: {exc}", "field": None}


class JobRunner:
    """One worker thread and queue; keeps the last ``keep`` finished jobs for clients to read."""

    def __init__(self, keep: int = 200):
        self.keep = keep
        self._jobs: "OrderedDict[str, Job]" = OrderedDict()
        self._by_key: dict[str, Job] = {}
        # (priority, order, job): urgent jobs (0) before costly ones (1), each in submission order.
        self._queue: "queue.PriorityQueue[tuple[int, int, Job | None]]" = queue.PriorityQueue()
        self._order = itertools.count()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    def init_app(self, app) -> None:
        self.keep = int(app.config["JOBS_KEPT"])

    def submit(self, fn: Callable[[Job], Any], key: str | None = None, total: int = 0, urgent: bool = False) -> Job:
        """Queues ``fn(job)``; its return value becomes ``job.result``. A job with the same
        ``key`` that is still queued or running is returned instead of a new one. ``urgent`` jobs
        (a request is waiting) run before queued non-urgent ones."""
        with self._guard:
            if key is not None:
                running = self._by_key.get(key)
                if running is not None and not running.final:
                    return running
            job = Job(fn, key=key, total=total, urgent=urgent)
            self._jobs[job.id] = job
            if key is not None:
                self._by_key[key] = job
            self._forget_old()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="insights-worker", daemon=True)
                self._thread.start()
        self._queue.put((0 if urgent else 1, next(self._order), job))
        return job

    def get(self, job_id: str) -> Job | None:
        with self._guard:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Asks a job to stop: a queued job is cancelled at once, a running one at its next check."""
        job = self.get(job_id)
        if job is None:
            return None
        job.cancel.set()
        with job._cond:
            if job.status == "queued":
                job._set(status="cancelled", finished=clock())
        return job

    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancels everything and stops the worker (used by tests and at exit)."""
        with self._guard:
            jobs = list(self._jobs.values())
        for job in jobs:
            if not job.final:
                self.cancel(job.id)
        if self._thread is not None:
            self._queue.put((-1, next(self._order), None))
            self._thread.join(timeout)
            self._thread = None

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.final]
        for job in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[job.id]
            if job.key is not None and self._by_key.get(job.key) is job:
                del self._by_key[job.key]

    def _work(self) -> None:
        while True:
            _priority, _order, job = self._queue.get()
            if job is None:
                return
            with job._cond:
                if job.status != "queued":  # cancelled while waiting
                    continue
                job._set(status="running", started=clock())
            try:
                if job.cancel.is_set():
                    raise Cancelled("cancelled before it started")
                result = job.fn(job)
            except Cancelled:
                job._set(status="cancelled", finished=clock())
            except Exception as exc:  # reported to the client; the worker keeps going
                error = error_of(exc)
                if error["code"] == "internal":
                    log.exception("job %s failed", job.id)
                # Only a waiting request re-raises the exception; kept jobs hold no tracebacks.
                job._set(status="failed", error=error, exception=exc if job.urgent else None, finished=clock())
            else:
                job._set(status="done", result=result, done=max(job.done, job.total), finished=clock())
            job.fn = None  # let the closure (model inputs, images) be freed
