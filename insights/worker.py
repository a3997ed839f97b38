"""The Celery worker of the distributed job backend (:mod:`insights.distributed`)::

    INSIGHTS_BROKER_URL=redis://127.0.0.1:6379/0 INSIGHTS_DEVICE=cuda:0 \\
        celery -A insights.worker worker --concurrency 1 -l info

One worker per device. It takes the same ``INSIGHTS_*`` settings as the web nodes (the models
config, ``DATABASE_URL``, the store), builds the app's service once per pool process, so models
stay loaded from one task to the next, and runs each task's compute and finish there: the answer
is stored through the store, the job ended in the database, and Redis told.

A message is a job id. The run claims the job in the database (``UPDATE ... WHERE status =
'queued'``), and with it, after ``BATCH_WINDOW_MS``, up to ``BATCH_MAX`` - 1 queued jobs of the same
batch key (compatible requests: one model, method and parameters), computed in one pass as the
in-process runner does; their own messages then find them taken and are dropped. Progress goes to
Redis (at most every ``PROGRESS_S``), and so does the engine's cancel check (a Redis key, looked at
most every ``CANCEL_CHECK_S``); a heartbeat thread bumps the run's jobs' heartbeat in the database
and brings their cancel flags from there too; a janitor thread sweeps for lost jobs
(:meth:`~insights.distributed.CeleryBackend.sweep`).

Celery needs its app at module level (``-A insights.worker``); it holds settings only, and the
service is made in each pool process (``worker_process_init``), never in the main process.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager

from celery import signals

from .app import DEFAULTS, create_app, env_settings
from .distributed import (CANCEL_CHECK_S, HEARTBEAT_S, LOST_AFTER_S, PROGRESS_S, SWEEP_S, TASK, CeleryBackend,
                          make_celery)
from .engine import Cancelled
from .errors import describe
from .tasks import Task

log = logging.getLogger("insights.worker")

_settings = {**DEFAULTS, **env_settings()}
if not _settings.get("BROKER_URL"):
    raise RuntimeError("set INSIGHTS_BROKER_URL (redis://host:port/db) to run a worker: the web nodes' BROKER_URL")
celery = make_celery(_settings["BROKER_URL"], _settings.get("BROKER_VISIBILITY_S"))


@celery.task(name=TASK, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run(self, job_id: str) -> None:
    """Runs one job (and its queued batch mates) by id."""
    info = self.request.delivery_info or {}
    runtime().run(str(job_id), bool(info.get("redelivered")), self.request.hostname or socket.gethostname())


_runtime: "Runtime | None" = None
_runtime_lock = threading.Lock()


def runtime() -> "Runtime":
    """This process's runtime, made on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime(create_app())
        return _runtime


@signals.worker_process_init.connect
def _start(**_kwargs) -> None:
    """Each pool process builds its service before its first task."""
    try:
        made = runtime()
    except Exception:  # noqa: BLE001 - a task tries again and reports it
        log.exception("the worker process could not build the app")
        return
    log.info("insights worker ready: pid %s, device %s", os.getpid(), made.service.models.device)


class RemoteCancel:
    """A job's cancel signal on a worker, as the engine asks it (``is_set``): set by the heartbeat
    thread (the database's flag), or found in Redis (looked at most every ``CANCEL_CHECK_S``)."""

    def __init__(self, backend: CeleryBackend, job_id: str):
        self.backend, self.job_id = backend, job_id
        self.flag = threading.Event()
        self._checked = float("-inf")

    def set(self) -> None:
        self.flag.set()

    def is_set(self) -> bool:
        if not self.flag.is_set():
            now = time.monotonic()
            if now - self._checked >= CANCEL_CHECK_S:
                self._checked = now
                if self.backend.cancel_flagged(self.job_id):
                    self.flag.set()
        return self.flag.is_set()


class WorkerJob:
    """A job as a task's ``compute`` sees it on a worker: ``progress`` to Redis, ``cancel``."""

    def __init__(self, backend: CeleryBackend, row: dict):
        self.backend, self.row, self.id = backend, row, row["id"]
        self.done, self.total = 0, int(row["total"])
        self.cancel = RemoteCancel(backend, self.id)
        self._written: float | None = None
        # Partial maps are numbered from the time this attempt began, so that a redelivered
        # job's maps never reuse the numbers of an earlier attempt's.
        self._partials = int(time.time() * 1000)

    def progress(self, done: int, total: int) -> None:
        if (done, total) == (self.done, self.total):
            return
        self.done, self.total = int(done), int(total)
        now = time.monotonic()
        fields = {"done": self.done, "total": self.total}
        if self._written is None:  # the first report: the ETA's rate is counted from here
            fields.update(first_t=time.time(), first_done=self.done)
        elif now - self._written < PROGRESS_S and self.done < self.total:
            return
        self._written = now
        self.backend.notify(self.id, **fields)


    def publish(self, partial: dict) -> None:
        """A partial map for the web nodes (Redis; the method publishes at most a few a second),
        numbered like :meth:`insights.jobs.Job.publish` numbers them."""
        self._partials += 1
        self.backend.notify(self.id, partial=json.dumps({**partial, "seq": self._partials}))


class Runtime:
    """What a worker process keeps between tasks: the app's service (its models stay loaded), the
    job backend, and two threads: the heartbeat of the runs going on, and the janitor."""

    def __init__(self, app):
        self.app = app
        self.service = app.extensions["insights"]
        self.backend = self.service.jobs
        if not isinstance(self.backend, CeleryBackend):
            raise RuntimeError("the worker's app has no BROKER_URL: set INSIGHTS_BROKER_URL")
        self._runs: dict[str, dict[str, WorkerJob]] = {}  # run → its jobs
        self._lock = threading.Lock()
        self._stopped = threading.Event()  # set by stop(): the two threads end
        for target, name in ((self._beat, "insights-heartbeat"), (self._sweep, "insights-janitor")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def stop(self) -> None:
        """Ends the heartbeat and janitor threads (a worker process ends them by exiting; a
        worker inside another process, as in the tests, calls this)."""
        self._stopped.set()

    # -- one task ---------------------------------------------------------------------------

    def run(self, job_id: str, redelivered: bool, node: str) -> None:
        run = f"{node}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        rows = self.claim(job_id, run, redelivered)
        if rows:
            self.compute(rows, run)

    def claim(self, job_id: str, run: str, redelivered: bool) -> list[dict]:
        """The jobs this run computes: the message's (queued), with its queued batch mates; or,
        for a redelivered message whose run is gone, that run's jobs; else none."""
        table, backend = self.backend.table, self.backend
        row = table.claim(job_id, run)
        if row is not None:
            rows = [row]
            if row["batch_key"] is not None and backend.batch_max > 1:
                time.sleep(backend.batch_window)  # compatible requests arriving meanwhile join
                rows += table.claim_batch(row["batch_key"], run, backend.batch_max - 1)
            return rows
        row = table.row(job_id)
        if row is None:
            log.warning("job %s is not in the job database; its message is dropped", job_id)
            return []
        if row["status"] != "running" or not redelivered:
            return []  # ended, or taken by another run (a batch mate's, or this message's copy)
        # Given back by Celery (its worker died) or by Redis (after BROKER_VISIBILITY_S): the run
        # is gone if its heartbeat stands still for LOST_AFTER_S, else it is alive and keeps it.
        mark = (row["worker"], row["beats"])
        deadline = time.monotonic() + LOST_AFTER_S
        while time.monotonic() < deadline:
            time.sleep(HEARTBEAT_S / 2)
            row = table.row(job_id)
            if row is None or row["status"] != "running" or (row["worker"], row["beats"]) != mark:
                return []
        for dead in table.fail_lost(mark[0]):
            log.warning("job %s failed: its worker stopped %s times", dead["id"], dead["tries"])
            backend.ended(dead)
        rows = table.take_over(mark[0], mark[1], run)
        if rows:
            log.warning("run %s took over %s job(s) of %s, whose worker stopped", run, len(rows), mark[0])
        return rows

    def compute(self, rows: list[dict], run: str) -> None:
        """Computes the jobs together (one batch key), finishes each and ends it."""
        jobs, tasks = [], []
        for row in rows:
            self.backend.notify(row["id"], restart=True, done=0, total=row["total"])
            try:
                tasks.append(Task.from_payload(self.service, json.loads(row["request"])))
            except Exception as exc:  # noqa: BLE001 - the image is gone, a model unknown here...
                self.fail([row], run, exc)
                continue
            jobs.append(WorkerJob(self.backend, row))
        if not jobs:
            return
        with self.beating(run, jobs):
            try:
                if len(jobs) == 1 and jobs[0].cancel.is_set():
                    raise Cancelled("cancelled before it started")
                values = type(tasks[0]).compute(tasks, jobs)
            except Cancelled:
                for job in jobs:
                    self.end(job.row, run, "cancelled")
                return
            except Exception as exc:  # noqa: BLE001 - reported to the clients; the worker goes on
                self.fail([j.row for j in jobs], run, exc)
                return
            for job, task, value in zip(jobs, tasks, values):
                try:
                    answer = task.finish(value)
                except Exception as exc:  # noqa: BLE001 - a failure to store fails this job only
                    self.fail([job.row], run, exc)
                else:
                    self.end(job.row, run, "done", result=json.dumps(answer), done=max(job.done, job.total))

    def end(self, row: dict, run: str, status: str, **values) -> None:
        ended = self.backend.table.end(row["id"], run, status, **values)
        if ended is not None:
            self.backend.ended(ended)

    def fail(self, rows: list[dict], run: str, exc: Exception) -> None:
        error = describe(exc)  # an internal error is logged there, with an id
        if error.code == "internal":
            log.error("job %s failed: %s", rows[0]["id"], error.message)
        for row in rows:
            self.end(row, run, "failed", error=json.dumps(error.as_dict()), error_status=error.status)

    # -- the threads --------------------------------------------------------------------------

    @contextmanager
    def beating(self, run: str, jobs: list[WorkerJob]):
        with self._lock:
            self._runs[run] = {j.id: j for j in jobs}
        try:
            yield
        finally:
            with self._lock:
                self._runs.pop(run, None)

    def _beat(self) -> None:
        """Every HEARTBEAT_S: each run's jobs beat, and cancels flagged in the database reach them."""
        while not self._stopped.wait(HEARTBEAT_S):
            with self._lock:
                runs = dict(self._runs)
            for run, jobs in runs.items():
                try:
                    for job_id in self.backend.table.beat(run):
                        if job_id in jobs:
                            jobs[job_id].cancel.set()
                except Exception as exc:  # noqa: BLE001 - the database is away: no beat this time
                    log.warning("heartbeat of %s missed: %s", run, exc)

    def _sweep(self) -> None:
        seen: dict = {}
        while not self._stopped.wait(SWEEP_S):
            try:
                counts = self.backend.sweep(seen)
            except Exception as exc:  # noqa: BLE001 - Redis or the database away: next time
                log.warning("janitor: %s", exc)
                continue
            if any(counts.values()):
                log.warning("janitor: %s", ", ".join(f"{k} {v}" for k, v in counts.items() if v))
