"""Liveness and Prometheus metrics (insights/metrics.py): /healthz, and /metrics parsed the way
Prometheus reads it, before and after jobs, rejections, uploads and errors."""
from __future__ import annotations

import os
import threading

import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from appkit import TINY_CONFIG, app, client, extra_methods, image_id, png, upload, wait_job  # noqa: F401
from insights import create_app, metrics
from insights.errors import ServiceError, StoreUnavailable

TOKEN = "metrics-test-token-0123456789"


def scrape(client) -> dict:
    """{(sample name, labels as a sorted tuple): value} from GET /metrics."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    out = {}
    for family in text_string_to_metric_families(r.get_data(as_text=True)):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# --------------------------------------------------------------------------- /healthz


def test_healthz_says_ok_without_touching_a_model(app, client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json == {"status": "ok"}
    assert r.headers["Cache-Control"] == "no-store"
    assert app.extensions["insights"].models.loaded() == []


def test_healthz_needs_no_token_and_metrics_does(tmp_path, extra_methods):
    app = create_app({"INSTANCE_PATH": str(tmp_path / "i"), "BUILTIN_MODELS": False, "MODELS_CONFIG": TINY_CONFIG,
                      "DEVICE": "cpu", "TOKENS": TOKEN})
    try:
        client = app.test_client()
        assert client.get("/healthz").json == {"status": "ok"}
        assert client.get("/metrics").status_code == 401
        r = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and b"insights_queue_depth" in r.data
    finally:
        app.extensions["insights"].jobs.shutdown()


# --------------------------------------------------------------------------- /metrics


def test_metrics_start_at_zero(client):
    m = scrape(client)
    assert value(m, "insights_queue_depth") == 0
    for state in ("queued", "running", "done", "failed", "cancelled"):
        assert value(m, "insights_jobs", state=state) == 0
    for state in ("done", "failed", "cancelled"):
        assert (("insights_jobs_finished_total", (("state", state),)) in m)
        assert value(m, "insights_job_duration_seconds_count", state=state) == 0
    assert ("insights_store_bytes", ()) in m


def test_a_finished_job_is_counted_once_with_its_duration(client, image_id):
    r = client.post("/api/explain", json={"image": image_id, "method": "slow_test", "target": 0,
                                          "params": {"steps": 10, "delay": 0.01}})
    assert r.status_code == 202
    assert wait_job(client, r.json["job"]["id"])["status"] == "done"
    first = scrape(client)
    assert value(first, "insights_jobs_finished_total", state="done") >= 1
    assert value(first, "insights_jobs", state="done") >= 1
    count = value(first, "insights_job_duration_seconds_count", state="done")
    assert count == value(first, "insights_jobs_finished_total", state="done")
    assert value(first, "insights_job_duration_seconds_sum", state="done") >= 0.1  # ten passes of 10 ms
    assert value(first, "insights_job_duration_seconds_bucket", state="done", le="0.05") < count
    again = scrape(client)  # nothing new finished: nothing counted twice
    assert value(again, "insights_jobs_finished_total", state="done") == value(
        first, "insights_jobs_finished_total", state="done")
    assert value(again, "insights_job_duration_seconds_count", state="done") == count


def test_queue_depth_and_running_jobs_are_read_when_scraped(app, client):
    runner = app.extensions["insights"].jobs
    gate, started = threading.Event(), threading.Event()
    busy = runner.submit(lambda job: (started.set(), gate.wait(10)))
    waiting = [runner.submit(lambda job: None) for _ in range(3)]
    assert started.wait(10)
    m = scrape(client)
    assert value(m, "insights_queue_depth") == 3
    assert value(m, "insights_jobs", state="running") == 1 and value(m, "insights_jobs", state="queued") == 3
    gate.set()
    assert busy.wait(10) and all(j.wait(10) for j in waiting)
    m = scrape(client)
    assert value(m, "insights_queue_depth") == 0 and value(m, "insights_jobs", state="running") == 0
    assert value(m, "insights_jobs_finished_total", state="done") == 4


def test_a_failed_job_is_counted_as_failed(app, client):
    job = app.extensions["insights"].jobs.submit(lambda job: 1 / 0)
    assert job.wait(10) and job.status == "failed"
    assert value(scrape(client), "insights_jobs_finished_total", state="failed") == 1


def test_rejections_are_counted_by_reason(app, client):
    service = app.extensions["insights"]
    metrics.count_rejection(app, "queue_full")
    metrics.count_rejection(service, "queue_full")
    with app.app_context():
        metrics.count_rejection(None, "Rate limit!")  # the current app; the reason made a label
    m = scrape(client)
    assert value(m, "insights_rejections_total", reason="queue_full") == 2
    assert value(m, "insights_rejections_total", reason="rate_limit") == 1


def test_a_busy_answer_of_the_api_counts_its_reason(app, client, monkeypatch):
    def full(_rid):
        err = ServiceError("the server is full; try again later", status=503, code="busy")
        err.reason = "queue_full"
        raise err

    monkeypatch.setattr(app.extensions["insights"], "result", full)
    assert client.get("/api/results/" + "0" * 64).status_code == 503
    assert value(scrape(client), "insights_rejections_total", reason="queue_full") == 1


def test_the_rate_limit_counts_as_a_rejection(tmp_path, extra_methods):
    app = create_app({"INSTANCE_PATH": str(tmp_path / "i"), "BUILTIN_MODELS": False, "MODELS_CONFIG": TINY_CONFIG,
                      "DEVICE": "cpu", "RATE_LIMIT_PER_MIN": 1})
    try:
        client = app.test_client()
        assert upload(client, png()).status_code == 201
        r = upload(client, png(color=(1, 2, 3)))
        assert r.status_code == 429 and r.json["error"]["code"] == "busy"
        assert value(scrape(client), "insights_rejections_total", reason="rate_limit") == 1
    finally:
        app.extensions["insights"].jobs.shutdown()


def test_count_rejection_never_fails(app):
    metrics.count_rejection(None, "queue_full")  # outside any app
    metrics.count_rejection(Flask("plain"), "queue_full")  # an app without metrics
    metrics.count_rejection(object(), "queue_full")  # something that is neither
    metrics.count_rejection(app, None)
    with app.test_client() as c:
        assert value(scrape(c), "insights_rejections_total", reason="none") == 1


def test_store_bytes_follow_the_files(app, client):
    def on_disk():
        store = app.extensions["insights"].store
        if callable(getattr(store, "total_bytes", None)):
            return store.total_bytes()
        return sum(os.path.getsize(os.path.join(d, n)) for d, _s, names in os.walk(store.root) for n in names)

    before = value(scrape(client), "insights_store_bytes")
    assert upload(client, png(size=(120, 90))).status_code == 201
    after = value(scrape(client), "insights_store_bytes")
    assert after > before and after == on_disk()


def test_a_store_whose_database_is_down_is_reported_and_the_scrape_still_answers(app, client, monkeypatch):
    assert value(scrape(client), "insights_store_up") == 1
    store = app.extensions["insights"].store

    def down():
        raise StoreUnavailable("the store's database does not answer", 5)

    monkeypatch.setattr(store, "total_bytes", down)
    samples = scrape(client)  # 200, not the 503 the store raised
    assert value(samples, "insights_store_up") == 0
    assert ("insights_store_bytes", ()) not in samples
    assert ("insights_queue_depth", ()) in samples  # the rest of the scrape is there


def test_responses_are_counted_by_status_class(client):
    before = scrape(client)
    client.get("/api/models")
    client.get("/no/such/page")
    client.get("/api/jobs/nope")
    after = scrape(client)
    assert value(after, "insights_http_responses_total", status="4xx") - value(
        before, "insights_http_responses_total", status="4xx") == 2
    # /api/models and the first scrape itself
    assert value(after, "insights_http_responses_total", status="2xx") - value(
        before, "insights_http_responses_total", status="2xx") == 2


def test_each_app_has_its_own_registry(tmp_path, extra_methods, app, client):
    other = create_app({"INSTANCE_PATH": str(tmp_path / "other"), "BUILTIN_MODELS": False,
                        "MODELS_CONFIG": TINY_CONFIG, "DEVICE": "cpu"})
    try:
        metrics.count_rejection(other, "queue_full")
        assert value(scrape(other.test_client()), "insights_rejections_total", reason="queue_full") == 1
        assert value(scrape(client), "insights_rejections_total", reason="queue_full") == 0
    finally:
        other.extensions["insights"].jobs.shutdown()


@pytest.mark.parametrize("path", ["/healthz", "/metrics"])
def test_they_answer_head_too(client, path):
    assert client.head(path).status_code == 200
