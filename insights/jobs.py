"""Runs model work on compute workers, with admission, progress, cancellation and event streams.

The job backend's interface is :class:`JobBackend` (admit, submit, get, cancel, events, shutdown);
:class:`JobRunner` implements it in-process. Model work runs on two lanes, each one thread and a
queue: the main lane takes jobs in order, so two computations never compete for the device (or
the CPU's cores); the light lane serves one-pass predictions, so a prediction never waits for a
running job to end (it shares the model under the engine's model lock: a plain forward waits
while a method has hooks on the model). Cheap requests submit and
wait; costly ones return the job at once and the client follows it by polling or server-sent
events.

Admission (:class:`~insights.admission.Admission`, ``runner.admission``): :meth:`JobRunner.admit`
refuses work past ``MAX_QUEUED_JOBS`` active jobs (503) or ``MAX_JOBS_PER_CLIENT`` of one client
(429), and gives each submitter a cancel token; a job shared by several submitters (an identical
request joins the active job) is cancelled only when the last of them cancels.

Work is a plain function ``fn(job)`` or a :class:`~insights.tasks.Task`. A function reports with
``job.progress(done, total)`` and should pass ``job.cancel`` (a threading.Event) to the engine;
its return value is the job's result. A task's ``compute`` runs on its lane; its ``finish``
(encoding and storing the answer) runs on a small pool of finishing threads, so the worker goes on
to the next computation meanwhile, and the job is done once its answer is finished. Urgent jobs
(a request is waiting) go ahead of queued costly ones; a running job is never interrupted except
by cancellation. Queued tasks hold ids, not tensors: they load their inputs in ``compute``.

Dynamic batching: a task submitted with ``batch=True`` may run together with other queued tasks
of the same ``batch_key``. When a lane takes such a job it waits up to ``batch_window`` seconds
for more of them (at most ``batch_max``), then calls ``compute`` once for all of them.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

from .admission import Admission, wait_for_first
from .engine import Cancelled
from .errors import describe

log = logging.getLogger("insights.jobs")

clock = time.time  # the wall clock of job times (tests replace it)

FINAL = ("done", "failed", "cancelled")
LANES = ("main", "light")
FINISHERS = 2  # threads that encode and store finished answers


class Job:
    """One unit of work: its state, progress, outcome and cancel signal."""

    def __init__(self, work: Any, key: str | None = None, total: int = 0, urgent: bool = False,
                 batch_key: Any = None, lane: str = "main"):
        self.id = uuid.uuid4().hex
        self.work = work  # a function of the job, or a Task; None once the job has ended
        self.batch_key = batch_key
        self.key = key
        self.urgent = urgent
        self.lane = lane
        self.status = "queued"
        self.done = 0
        self.total = int(total)
        self.result: Any = None  # the finished answer: a result id, or a JSON object (predictions)
        self.partial: dict | None = None  # the latest partial map a progressive method published
        self.error: dict | None = None
        self.error_status: int | None = None  # the HTTP status of the error
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

    def publish(self, partial: dict) -> None:
        """Shows a partial answer (a whole-image approximation of the map, see
        :func:`insights.tasks.partial_payload`) until the final one; each gets the next ``seq``."""
        with self._cond:
            seq = (self.partial or {}).get("seq", 0) + 1
        self._set(partial={**partial, "seq": seq})

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
                    "result": self.result if isinstance(self.result, dict) else None,
                    "error": self.error, "partial": self.partial, "version": self.version}


@dataclass(frozen=True)
class Ticket:
    """An admitted submission: the job (new, or the identical one it joined) and the
    submitter's own cancel token."""

    job: Job
    cancel_token: str


class JobBackend(Protocol):
    """What the service needs of a job runner; another backend (a queue on other machines)
    implements the same calls, and its own :class:`~insights.admission.Admission` bookkeeping
    on storage its machines share."""

    admission: Admission

    def init_app(self, app) -> None: ...

    def admit(self, work: Any, client: str, key: str | None = None, total: int = 0, urgent: bool = False,
              batch: bool = False, lane: str = "main") -> Ticket: ...

    def submit(self, work: Any, key: str | None = None, total: int = 0, urgent: bool = False,
               batch: bool = False, lane: str = "main") -> Job: ...

    def get(self, job_id: str) -> Job | None: ...

    def cancel(self, job_id: str, token: str | None = None) -> Job | None: ...

    def events(self, job: Job, heartbeat: float, until: float | None = None) -> Iterator[dict | None]: ...

    def shutdown(self, timeout: float = 5.0) -> None: ...


class _Lane:
    """One worker thread and its queue of (priority, order, job): urgent jobs (0) before costly
    ones (1), each in submission order; None asks the thread to stop."""

    def __init__(self, name: str):
        self.name = name
        self.queue: "queue.PriorityQueue[tuple[int, int, Job | None]]" = queue.PriorityQueue()
        self.thread: threading.Thread | None = None


class JobRunner:
    """Two lanes (main, light) and a finishing pool; keeps the last ``keep`` finished jobs for
    clients to read."""

    def __init__(self, keep: int = 200, batch_window: float = 0.005, batch_max: int = 16,
                 admission: Admission | None = None):
        self.keep = keep
        self.batch_window = batch_window
        self.batch_max = batch_max
        self.admission = admission or Admission()
        self._jobs: "OrderedDict[str, Job]" = OrderedDict()
        self._by_key: dict[str, Job] = {}
        self._lanes = {name: _Lane(name) for name in LANES}
        self._order = itertools.count()
        self._guard = threading.Lock()
        self._finishers: ThreadPoolExecutor | None = None

    def init_app(self, app) -> None:
        self.keep = int(app.config["JOBS_KEPT"])
        self.batch_window = float(app.config["BATCH_WINDOW_MS"]) / 1000.0
        self.batch_max = int(app.config["BATCH_MAX"])
        self.admission.configure(app.config)

    def admit(self, work: Any, client: str, key: str | None = None, total: int = 0, urgent: bool = False,
              batch: bool = False, lane: str = "main") -> Ticket:
        """Like :meth:`submit`, for ``client`` and within the admission limits (else
        :class:`~insights.errors.Busy`): answers the job with this submitter's cancel token."""
        with self._guard:
            joined = self._active_with(key)
            self.admission.check(client, joined.id if joined else None, self._seconds_to_end)
            job = joined or self._new(work, key, total, urgent, batch, lane)
            token = self.admission.hold(job.id, client, new=joined is None)
        if joined is None:
            self._enqueue(job)
        return Ticket(job, token)

    def submit(self, work: Callable[[Job], Any] | Any, key: str | None = None, total: int = 0,
               urgent: bool = False, batch: bool = False, lane: str = "main") -> Job:
        """Queues ``work`` (a function of the job, or a Task) on ``lane`` with no admission
        check (the app's requests go through :meth:`admit`). Its return value (a task's finished
        answer) becomes ``job.result``. A job with the same ``key`` that is still queued or
        running is returned instead of a new one. ``urgent`` jobs (a request is waiting) run
        before queued non-urgent ones. With ``batch`` a task may be computed together with other
        queued tasks of its ``batch_key``."""
        with self._guard:
            joined = self._active_with(key)
            if joined is not None:
                return joined
            job = self._new(work, key, total, urgent, batch, lane)
        self._enqueue(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._guard:
            return self._jobs.get(job_id)

    def snapshot(self) -> list[Job]:
        """The jobs kept in memory (queued, running and the recently finished), oldest first."""
        with self._guard:
            return list(self._jobs.values())

    def cancel(self, job_id: str, token: str | None = None) -> Job | None:
        """Asks a job to stop: a queued job is cancelled at once, a running one at its next check.
        With a submitter's ``token`` (else :class:`~insights.errors.Forbidden`), only that
        submitter's hold is dropped, and the job stops once no submitter holds it."""
        job = self.get(job_id)
        if job is None:
            return None
        if token is not None and self.admission.release(job_id, token) > 0:
            return job  # another submitter still wants it
        if job.final:
            return job
        job.cancel.set()
        with job._cond:
            queued = job.status == "queued"
            if queued:  # its inputs can go now
                job._set(status="cancelled", finished=clock(), work=None)
        if queued:
            self.admission.ended(job.id)
        return job

    @staticmethod
    def events(job: Job, heartbeat: float, until: float | None = None) -> Iterator[dict | None]:
        """The job's state at every change, ending with its final state, or at ``until`` (a
        ``time.monotonic()`` deadline) whatever the state; None when nothing changed for
        ``heartbeat`` seconds (a stream sends a keep-alive then)."""
        version = -1
        while True:
            state = job.to_dict()
            if state["version"] != version:
                version = state["version"]
                yield state
                if state["status"] in FINAL:
                    return
            now = time.monotonic()
            if until is not None and now >= until:
                return
            wait = heartbeat if until is None else min(heartbeat, until - now)
            if job.wait_change(version, wait) == version and (until is None or time.monotonic() < until):
                yield None

    def shutdown(self, timeout: float = 5.0) -> None:
        """Cancels everything and stops the workers (used by tests and at exit); answers being
        finished are stored first."""
        with self._guard:
            jobs = list(self._jobs.values())
        for job in jobs:
            if not job.final:
                self.cancel(job.id)
        for lane in self._lanes.values():
            if lane.thread is not None:
                lane.queue.put((-1, next(self._order), None))
                lane.thread.join(timeout)
                lane.thread = None
        with self._guard:
            pool, self._finishers = self._finishers, None
        if pool is not None:
            pool.shutdown(wait=True)

    # -- bookkeeping (under self._guard) --------------------------------------------------------

    def _active_with(self, key: str | None) -> Job | None:
        job = self._by_key.get(key) if key is not None else None
        return job if job is not None and not job.final else None

    def _new(self, work: Any, key: str | None, total: int, urgent: bool, batch: bool, lane: str) -> Job:
        if lane not in self._lanes:
            raise ValueError(f"no lane {lane!r}; lanes: {', '.join(LANES)}")
        batch_key = getattr(work, "batch_key", None) if batch else None
        job = Job(work, key=key, total=total, urgent=urgent, batch_key=batch_key, lane=lane)
        self._jobs[job.id] = job
        if key is not None:
            self._by_key[key] = job
        self._forget_old()
        return job

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.final]
        for job in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[job.id]
            self.admission.forget(job.id)
            if job.key is not None and self._by_key.get(job.key) is job:
                del self._by_key[job.key]

    def _seconds_to_end(self, job_ids: Iterable[str]) -> float:
        """About how long until the first of these jobs ends: the smallest ETA among them, or
        :data:`DEFAULT_RETRY_S` when none has one yet."""
        return wait_for_first(j.to_dict()["eta_s"] for j in (self._jobs.get(i) for i in job_ids) if j is not None)

    def _enqueue(self, job: Job) -> None:
        lane = self._lanes[job.lane]
        with self._guard:
            if lane.thread is None or not lane.thread.is_alive():
                lane.thread = threading.Thread(target=self._work, args=(lane,), name=f"insights-{lane.name}",
                                               daemon=True)
                lane.thread.start()
        lane.queue.put((0 if job.urgent else 1, next(self._order), job))

    # -- the workers ----------------------------------------------------------------------------

    def _end(self, job: Job, **changes) -> None:
        """Sets a final state; the job's work (the task's inputs) can go, and it counts no more."""
        job._set(finished=clock(), work=None, partial=None, **changes)  # the result (or nothing) replaces it
        self.admission.ended(job.id)

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        error = describe(exc)  # an internal error is logged there, with an id
        if error.code == "internal":
            log.error("job %s failed: %s", jobs[0].id, error.message)
        for j in jobs:
            # Only a waiting request re-raises the exception; kept jobs hold no tracebacks.
            self._end(j, status="failed", error=error.as_dict(), error_status=error.status,
                      exception=exc if j.urgent else None)

    def _gather(self, lane: _Lane, first: Job) -> list[Job]:
        """``first`` and the queued jobs of its batch key that arrive within the batch window;
        other jobs taken from the queue meanwhile are put back in their places."""
        batch, held = [first], []
        deadline = time.monotonic() + self.batch_window
        while len(batch) < self.batch_max:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = lane.queue.get(timeout=remaining)
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
            lane.queue.put(item)
        return batch

    def _finish(self, lane: _Lane, job: Job, value: Any) -> None:
        """Turns a computed value into the job's answer: a task's ``finish`` on the finishing
        pool (on the light lane itself: its answers are a few numbers), a function's value as is."""
        work = job.work
        if not hasattr(work, "finish"):
            self._end(job, status="done", result=value, done=max(job.done, job.total))
        elif lane.name == "light":
            self._settle(job, value)
        else:
            with self._guard:
                if self._finishers is None:
                    self._finishers = ThreadPoolExecutor(FINISHERS, thread_name_prefix="insights-finish")
                pool = self._finishers
            try:
                pool.submit(self._settle, job, value)
            except RuntimeError:  # the pool is shutting down: finish here
                self._settle(job, value)

    def _settle(self, job: Job, value: Any) -> None:
        try:
            answer = job.work.finish(value)
        except Exception as exc:  # a failure to store fails this job only
            self._fail([job], exc)
        else:
            self._end(job, status="done", result=answer, done=max(job.done, job.total))

    def _work(self, lane: _Lane) -> None:
        while True:
            _priority, _order, job = lane.queue.get()
            if job is None:
                return
            self._run(lane, self._gather(lane, job) if job.batch_key is not None else [job])

    def _run(self, lane: _Lane, jobs: list[Job]) -> None:
        """Computes one job, or one batch of tasks, and hands each value on to be finished."""
        started = []
        for j in jobs:
            with j._cond:
                if j.status != "queued":  # cancelled while waiting
                    continue
                j._set(status="running", started=clock())
            started.append(j)
        if not started:
            return
        try:
            if len(started) == 1 and started[0].cancel.is_set():
                raise Cancelled("cancelled before it started")
            work = started[0].work
            if hasattr(work, "compute"):
                values = type(work).compute([j.work for j in started], started)
            else:
                values = [work(started[0])]
        except Cancelled:
            for j in started:
                self._end(j, status="cancelled")
        except Exception as exc:  # reported to the client; the worker keeps going
            self._fail(started, exc)
        else:
            for j, value in zip(started, values):
                self._finish(lane, j, value)
