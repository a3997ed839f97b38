"""Runs model work on one compute worker, with progress, cancellation and event streams.

The job backend's interface is :class:`JobBackend` (submit, get, cancel, events, shutdown);
:class:`JobRunner` implements it in-process: one thread takes jobs from a queue in order, so two
computations never compete for the device (or the CPU's cores). Cheap requests submit and wait;
costly ones return the job at once and the client follows it by polling or server-sent events.

Work is a plain function ``fn(job)`` or a :class:`~insights.tasks.Task`. A function reports with
``job.progress(done, total)`` and should pass ``job.cancel`` (a threading.Event) to the engine.
A task's ``compute`` runs on the worker; its ``finish`` too for queued jobs, while a request that
waits (``urgent=True``) calls it itself. Urgent jobs go ahead of queued costly ones; a running
job is never interrupted except by cancellation.

Dynamic batching: a task submitted with ``batch=True`` may run together with other queued tasks
of the same ``batch_key``. When the worker takes such a job it waits up to ``batch_window``
seconds for more of them (at most ``batch_max``), then calls ``compute`` once for all of them.
Concurrent clients asking for the same kind of work on different images then share one batched
pass through the model instead of queueing one by one.
"""
from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable, Iterator, Protocol

from .engine import Cancelled
from .errors import describe

log = logging.getLogger("insights.jobs")

clock = time.time  # the wall clock of job times (tests replace it)

FINAL = ("done", "failed", "cancelled")


class Job:
    """One unit of work: its state, progress, outcome and cancel signal."""

    def __init__(self, work: Any, key: str | None = None, total: int = 0, urgent: bool = False,
                 batch_key: Any = None):
        self.id = uuid.uuid4().hex
        self.work = work  # a function of the job, or a Task
        self.batch_key = batch_key
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

    # -- called by the worker and the job's work ------------------------------------------------

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


class JobBackend(Protocol):
    """What the service needs of a job runner; another backend (a queue on other machines)
    implements the same calls."""

    def init_app(self, app) -> None: ...

    def submit(self, work: Any, key: str | None = None, total: int = 0, urgent: bool = False,
               batch: bool = False) -> Job: ...

    def get(self, job_id: str) -> Job | None: ...

    def cancel(self, job_id: str) -> Job | None: ...

    def events(self, job: Job, heartbeat: float) -> Iterator[dict | None]: ...

    def shutdown(self, timeout: float = 5.0) -> None: ...


class JobRunner:
    """One worker thread and queue; keeps the last ``keep`` finished jobs for clients to read."""

    def __init__(self, keep: int = 200, batch_window: float = 0.005, batch_max: int = 16):
        self.keep = keep
        self.batch_window = batch_window
        self.batch_max = batch_max
        self._jobs: "OrderedDict[str, Job]" = OrderedDict()
        self._by_key: dict[str, Job] = {}
        # (priority, order, job): urgent jobs (0) before costly ones (1), each in submission order.
        self._queue: "queue.PriorityQueue[tuple[int, int, Job | None]]" = queue.PriorityQueue()
        self._order = itertools.count()
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    def init_app(self, app) -> None:
        self.keep = int(app.config["JOBS_KEPT"])
        self.batch_window = float(app.config["BATCH_WINDOW_MS"]) / 1000.0
        self.batch_max = int(app.config["BATCH_MAX"])

    def submit(self, work: Callable[[Job], Any] | Any, key: str | None = None, total: int = 0,
               urgent: bool = False, batch: bool = False) -> Job:
        """Queues ``work`` (a function of the job, or a Task); its return value (a task's
        finished answer, or for urgent tasks its computed value) becomes ``job.result``. A job
        with the same ``key`` that is still queued or running is returned instead of a new one.
        ``urgent`` jobs (a request is waiting) run before queued non-urgent ones. With ``batch``
        a task may be computed together with other queued tasks of its ``batch_key``."""
        batch_key = getattr(work, "batch_key", None) if batch else None
        with self._guard:
            if key is not None:
                running = self._by_key.get(key)
                if running is not None and not running.final:
                    return running
            job = Job(work, key=key, total=total, urgent=urgent, batch_key=batch_key)
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

    def snapshot(self) -> list[Job]:
        """The jobs kept in memory (queued, running and the recently finished), oldest first."""
        with self._guard:
            return list(self._jobs.values())

    def cancel(self, job_id: str) -> Job | None:
        """Asks a job to stop: a queued job is cancelled at once, a running one at its next check."""
        job = self.get(job_id)
        if job is None:
            return None
        job.cancel.set()
        with job._cond:
            if job.status == "queued":
                job._set(status="cancelled", finished=clock(), work=None)  # its inputs can go now
        return job

    @staticmethod
    def events(job: Job, heartbeat: float) -> Iterator[dict | None]:
        """The job's state at every change, ending with its final state; None when nothing
        changed for ``heartbeat`` seconds (a stream sends a keep-alive then)."""
        version = -1
        while True:
            state = job.to_dict()
            if state["version"] != version:
                version = state["version"]
                yield state
                if state["status"] in FINAL:
                    return
            elif job.wait_change(version, heartbeat) == version:
                yield None

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

    def _gather(self, first: Job) -> list[Job]:
        """``first`` and the queued jobs of its batch key that arrive within the batch window;
        other jobs taken from the queue meanwhile are put back in their places."""
        batch, held = [first], []
        deadline = time.monotonic() + self.batch_window
        while len(batch) < self.batch_max:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            job = item[2]
            if job is not None and job.batch_key == first.batch_key and job.status == "queued":
                batch.append(job)
            else:
                held.append(item)
                if job is None:  # shutting down: stop gathering
                    break
        for item in held:
            self._queue.put(item)
        return batch

    @staticmethod
    def _run(first: Job, started: list[Job]) -> list:
        """The results of the started jobs (one job, or one batch of tasks)."""
        work = first.work
        if not hasattr(work, "compute"):
            return [work(first)]
        computed = type(work).compute([j.work for j in started], started)
        # A waiting request finishes its answer itself; a queued job is finished here.
        return [value if j.urgent else j.work.finish(value) for j, value in zip(started, computed)]

    def _work(self) -> None:
        while True:
            _priority, _order, job = self._queue.get()
            if job is None:
                return
            jobs = self._gather(job) if job.batch_key is not None else [job]
            started = []
            for j in jobs:
                with j._cond:
                    if j.status != "queued":  # cancelled while waiting
                        continue
                    j._set(status="running", started=clock())
                started.append(j)
            if not started:
                continue
            try:
                if len(started) == 1 and started[0].cancel.is_set():
                    raise Cancelled("cancelled before it started")
                results = self._run(started[0], started)
            except Cancelled:
                for j in started:
                    j._set(status="cancelled", finished=clock())
            except Exception as exc:  # reported to the client; the worker keeps going
                error = describe(exc)  # an internal error is logged there, with an id
                if error.code == "internal":
                    log.error("job %s failed: %s", job.id, error.message)
                for j in started:
                    # Only a waiting request re-raises the exception; kept jobs hold no tracebacks.
                    j._set(status="failed", error=error.as_dict(), exception=exc if j.urgent else None,
                           finished=clock())
            else:
                for j, result in zip(started, results):
                    j._set(status="done", result=result, done=max(j.done, j.total), finished=clock())
            for j in started:
                j.work = None  # let the task's tensors and images be freed
