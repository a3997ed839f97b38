"""Fixtures and helpers shared by the web app's tests (imported by tests/test_api.py and friends).

The app under test serves the tiny random-weight models of tests/tiny_models.py (loaded through the
same --config mechanism operators use) from a temporary instance folder, with small limits.
With INSIGHTS_TEST_BACKEND=celery (tests/test_api_distributed.py sets it) the app is the
distributed mode instead: BROKER_URL on a real Redis, jobs run by a Celery worker in a thread.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from insights import create_app
from insights.engine import registry
from insights.engine.method import Method
from insights.engine.params import Cost, Param

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_CONFIG = os.path.join(HERE, "tiny_models.py")
ENGINE = sys.modules["insights.engine"]


def png(size=(48, 40), color=(200, 30, 30), mode="RGB", fmt="PNG") -> bytes:
    """An image file made in memory: the left half ``color``, the right half its inverse."""
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:, : size[0] // 2] = color
    arr[:, size[0] // 2:] = 255 - np.array(color, np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def upload(client, data: bytes, name: str = "photo.png"):
    return client.post("/api/images", data={"image": (io.BytesIO(data), name)},
                       content_type="multipart/form-data")


def snapshot(root: str) -> dict:
    """Every file under ``root`` with its size and modification time: to prove nothing changed."""
    out = {}
    for folder, _dirs, names in os.walk(root):
        for n in names:
            p = os.path.join(folder, n)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


class FixedMap(Method):
    """Test method: a map of 1 on the left half of the image and 0 on the right, one pass."""

    id = "fixed_map_test"
    label = "Fixed map (test)"
    family = "test"
    params = (Param("value", "float", 1.0, "Height of the left half.", min=0.0, max=10.0),)

    def signed(self, p):
        return False

    def cost(self, p, facts):
        return Cost(1, 0)

    def run(self, ctx, p):
        out = torch.zeros_like(ctx.inputs)
        out[..., : out.shape[-1] // 2] = p["value"]
        ctx.advance(1)
        return out


class SlowSteps(Method):
    """Test method: ``steps`` forward passes of ``delay`` seconds each, reporting progress."""

    id = "slow_test"
    label = "Slow (test)"
    family = "test"
    params = (Param("steps", "int", 20, "Passes.", min=1, max=100000),
              Param("delay", "float", 0.02, "Seconds per pass.", min=0.0, max=1.0))

    def cost(self, p, facts):
        return Cost(p["steps"], 0)

    def run(self, ctx, p):
        for _ in range(p["steps"]):
            time.sleep(p["delay"])
            ctx.advance(1)
        return ctx.inputs * 0 + 1


@pytest.fixture
def extra_methods(monkeypatch):
    """Registers FixedMap and SlowSteps in the engine's registry for one test."""
    monkeypatch.setitem(registry._methods, FixedMap.id, FixedMap())
    monkeypatch.setitem(registry._methods, SlowSteps.id, SlowSteps())


BACKEND_ENV = "INSIGHTS_TEST_BACKEND"


def distributed() -> bool:
    """True when the `app` fixture builds the distributed mode (INSIGHTS_TEST_BACKEND=celery):
    a real Redis per test, BROKER_URL set, and a Celery worker thread in this process."""
    return os.environ.get(BACKEND_ENV, "").strip().lower() == "celery"


@pytest.fixture
def app(tmp_path, extra_methods, monkeypatch, request):
    config = {"INSTANCE_PATH": str(tmp_path / "instance"), "BUILTIN_MODELS": False,
              "MODELS_CONFIG": TINY_CONFIG, "DEVICE": "cpu", "INLINE_MAX_PASSES": 5,
              "MAX_PASSES": 5000, "MAX_CONTENT_LENGTH": 200_000, "MAX_IMAGE_PIXELS": 250_000,
              "SSE_HEARTBEAT_S": 0.2}
    if not distributed():
        app = create_app(config)
        yield app
        app.extensions["insights"].jobs.shutdown()
        return
    # The store's index and the jobs table on a fresh PostgreSQL database, the files in the
    # instance folder (BLOB_DIR), where the tests look for them.
    url = request.getfixturevalue("postgres_service").create_database()
    config = {**config, "DATABASE_URL": url, "BLOB_DIR": config["INSTANCE_PATH"]}
    with distributed_app(tmp_path, config, monkeypatch) as app:
        yield app


@contextlib.contextmanager
def distributed_app(tmp_path, config: dict, monkeypatch):
    """The app on CeleryBackend (a fresh redis-server in ``tmp_path``; the job table where
    ``config`` puts the store's index), and a worker (Celery's test worker, solo pool, in a thread of this
    process) running insights.worker's Runtime on the SAME app: the test methods registered in
    the engine's registry and the tiny models are there."""
    from services import ServiceError, redis_server, require_services, unavailable

    require_services("redis")
    try:
        redis = redis_server(tmp_path / "redis")
    except (ServiceError, OSError) as err:
        unavailable(f"redis-server could not start: {err}")
    monkeypatch.setenv("INSIGHTS_BROKER_URL", redis.url)  # insights.worker needs it to import
    from celery.contrib.testing.worker import start_worker

    import insights.worker as worker

    runtime = backend = None
    try:
        app = create_app({**config, "BROKER_URL": redis.url})
        backend = app.extensions["insights"].jobs
        runtime = worker.Runtime(app)
        monkeypatch.setattr(worker, "_runtime", runtime)  # insights.worker.run runs on this app
        celery = backend.celery  # the task insights.run is a shared task of insights.worker
        # The test worker polls its queues every 0.1 s (kombu's default 1 s), so it stops quickly.
        celery.conf.broker_transport_options = {**celery.conf.broker_transport_options, "polling_interval": 0.1}
        with start_worker(celery, pool="solo", concurrency=1, perform_ping_check=False,
                          loglevel="WARNING", shutdown_timeout=10):
            yield app
    finally:
        if runtime is not None:
            runtime.stop()
        if backend is not None:
            backend.shutdown()
        redis.close()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def image_id(client) -> str:
    r = upload(client, png())
    assert r.status_code == 201, r.json
    return r.json["id"]


def wait_job(client, job_id: str, timeout: float = 20.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = client.get(f"/api/jobs/{job_id}").json
        if state["status"] in ("done", "failed", "cancelled"):
            return state
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")
