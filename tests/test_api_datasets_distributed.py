"""tests/test_api_datasets.py again in distributed mode: the dataset predictions (chunk jobs) and
batch explanations run on a Celery worker through Redis, and the predictions are kept in
PostgreSQL (see tests/test_api_distributed.py for the harness)."""
from __future__ import annotations

import pytest

from appkit import BACKEND_ENV
from services import postgres_service  # noqa: F401  (the store and jobs on PostgreSQL in this mode)
from test_api_datasets import *  # noqa: F401,F403


@pytest.fixture(autouse=True)
def celery_backend(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "celery")


def test_dataset_jobs_run_on_the_celery_worker(app, client):
    import json

    from insights.distributed import CeleryBackend

    backend = app.extensions["insights"].jobs
    assert isinstance(backend, CeleryBackend)
    scored(client)  # noqa: F405
    kinds = [json.loads(row["request"])["kind"] for row in backend.table.recent(50)]
    assert "dataset_predict" in kinds
    rows = [row for row in backend.table.recent(50) if json.loads(row["request"])["kind"] == "dataset_predict"]
    assert all(row["status"] == "done" and row["worker"] for row in rows)
