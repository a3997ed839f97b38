"""Liveness (``/healthz``) and Prometheus metrics (``/metrics``), one registry per app.

Each app gets its own :class:`prometheus_client.CollectorRegistry` (never the process-wide one:
tests and benchmarks build several apps in one process). Counters are kept as things happen
(responses by status class, rejections by reason); the rest is read from the service when
Prometheus scrapes: the job runner's queue and jobs by state, the durations of jobs that finished
since the last scrape, and the bytes the store holds.

Other parts of the app report rejections with :func:`count_rejection`, which never fails a
request: with no metrics installed it does nothing.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import weakref
from typing import Any

from flask import Blueprint, Flask, Response, current_app, has_app_context, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .errors import StoreUnavailable

log = logging.getLogger("insights.metrics")

bp = Blueprint("metrics", __name__)

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES = ("done", "failed", "cancelled")
# Seconds from a job's start to its end: inline work takes well under a second, costly jobs
# minutes (MAX_PASSES on a CPU is about 30 s).
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

_by_service: "weakref.WeakKeyDictionary[Any, Metrics]" = weakref.WeakKeyDictionary()


class Metrics:
    """The registry of one app and the counters kept as requests are answered."""

    def __init__(self, service: Any):
        self.service = service
        self.registry = CollectorRegistry()
        self.responses = Counter("insights_http_responses", "HTTP responses by status class (2xx, 4xx, ...)",
                                 ["status"], registry=self.registry)
        self.rejections = Counter("insights_rejections", "Requests refused by admission control, by reason",
                                  ["reason"], registry=self.registry)
        self.jobs_finished = Counter("insights_jobs_finished", "Jobs that ended, by final state",
                                     ["state"], registry=self.registry)
        self.job_seconds = Histogram("insights_job_duration_seconds", "Seconds from a job's start to its end, "
                                     "by final state", ["state"], buckets=DURATION_BUCKETS, registry=self.registry)
        for state in FINAL_STATES:  # present at 0 from the start, so rates work from the first scrape
            self.jobs_finished.labels(state)
            self.job_seconds.labels(state)
        for status in ("2xx", "3xx", "4xx", "5xx"):
            self.responses.labels(status)
        self._seen: set[str] = set()  # finished jobs already counted
        self._lock = threading.Lock()  # two scrapes at once count each job once
        self.registry.register(_Collector(self))

    def jobs(self) -> list | None:
        """The job runner's jobs, or None for a backend that cannot list them."""
        snapshot = getattr(self.service.jobs, "snapshot", None)
        return list(snapshot()) if callable(snapshot) else None

    def observe_finished(self) -> None:
        """Counts the jobs that finished since the last scrape (once each). Jobs the runner has
        forgotten before a scrape (more than ``JOBS_KEPT`` finished in between) go uncounted."""
        with self._lock:
            kept = set()
            for job in self.jobs() or []:
                status = job.status
                if status not in FINAL_STATES:
                    continue
                kept.add(job.id)
                if job.id in self._seen:
                    continue
                self.jobs_finished.labels(status).inc()
                if job.started is not None and job.finished is not None:
                    self.job_seconds.labels(status).observe(max(0.0, job.finished - job.started))
            self._seen = kept  # forgotten jobs need not be remembered

    def store_bytes(self) -> int:
        """Bytes the store holds: its own count when it keeps one, else the files' sizes summed
        (a walk of the store folder, done at scrape time)."""
        store = self.service.store
        total = getattr(store, "total_bytes", None)
        if callable(total):
            return int(total())
        size = 0
        for folder, _dirs, names in os.walk(store.root):
            for name in names:
                try:
                    size += os.stat(os.path.join(folder, name)).st_size
                except OSError:  # removed while we walked
                    pass
        return size

    def exposition(self) -> bytes:
        self.observe_finished()
        return generate_latest(self.registry)


class _Collector:
    """The gauges read from the service at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        jobs = self.metrics.jobs()
        if jobs is not None:
            by_state = dict.fromkeys(JOB_STATES, 0)
            for job in jobs:
                by_state[job.status] = by_state.get(job.status, 0) + 1
            depth = GaugeMetricFamily("insights_queue_depth", "Jobs waiting for the compute worker")
            depth.add_metric([], by_state["queued"])
            yield depth
            states = GaugeMetricFamily("insights_jobs", "Jobs kept in memory, by state (finished ones up to "
                                       "JOBS_KEPT)", labels=["state"])
            for state, count in by_state.items():
                states.add_metric([state], count)
            yield states
        try:
            held = self.metrics.store_bytes()
        except StoreUnavailable:  # its database is down: say so, and the scrape still answers
            held = None
        up = GaugeMetricFamily("insights_store_up", "1 when the store's index answers, 0 when it does not")
        up.add_metric([], 0 if held is None else 1)
        yield up
        if held is not None:
            stored = GaugeMetricFamily("insights_store_bytes", "Bytes of images and results in the store")
            stored.add_metric([], held)
            yield stored


# --------------------------------------------------------------------------- the hook for others


REASON = re.compile(r"[^a-z0-9_]+")


def count_rejection(owner: Any, reason: str) -> None:
    """Counts one request refused for ``reason`` (a short word: ``queue_full``, ``rate_limit``,
    ...) in the metrics of ``owner`` (the app, or its service; None: the current app). Never
    raises: a missing metrics object or a bad reason costs the request nothing."""
    try:
        metrics = _find(owner)
        if metrics is not None:
            label = REASON.sub("_", str(reason).lower()).strip("_")[:40] or "other"
            metrics.rejections.labels(label).inc()
    except Exception:  # metrics must never turn a refusal into a 500
        log.warning("could not count a rejection (%r)", reason, exc_info=True)


def _find(owner: Any) -> Metrics | None:
    if owner is None:
        owner = current_app._get_current_object() if has_app_context() else None
    if isinstance(owner, Flask):
        return owner.extensions.get("insights.metrics")
    if owner is not None:
        return _by_service.get(owner)
    return None


# --------------------------------------------------------------------------- views


@bp.get("/healthz")
def healthz():
    """Liveness: the process answers requests. Touches no model, no store, no queue."""
    resp = jsonify({"status": "ok"})
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("/metrics")
def metrics():
    """The app's metrics in Prometheus' text format."""
    resp = Response(current_app.extensions["insights.metrics"].exposition(), content_type=CONTENT_TYPE_LATEST)
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _count_response(resp):
    current_app.extensions["insights.metrics"].responses.labels(f"{resp.status_code // 100}xx").inc()
    return resp


def init_app(app: Flask) -> None:
    """Gives the app its registry, counts its responses, and serves /healthz and /metrics."""
    service = app.extensions["insights"]
    metrics = Metrics(service)
    app.extensions["insights.metrics"] = metrics
    _by_service[service] = metrics
    app.after_request(_count_response)
    app.register_blueprint(bp)
