"""tests/test_api_quality.py again, in distributed mode: measurements run as jobs on a Celery
worker (a thread of this process, on a fresh real Redis), the store's index on the session's
PostgreSQL (see tests/test_api_distributed.py for the set-up)."""
from __future__ import annotations

import json

import pytest

from appkit import BACKEND_ENV
from services import postgres_service  # noqa: F401  (the store and jobs on PostgreSQL in this mode)
from test_api_quality import *  # noqa: F401,F403
from test_api_quality import explained


@pytest.fixture(autouse=True)
def celery_backend(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "celery")


def test_a_measurement_runs_on_the_worker_from_its_payload(app, client, image_id):
    backend = app.extensions["insights"].jobs
    rid = explained(client, image_id)["id"]
    r = client.post(f"/api/results/{rid}/quality", json={"metric": "deletion", "params": {"steps": 3,
                                                                                           "reference": "none"}})
    assert r.status_code == 200, r.json
    rows = [row for row in backend.table.recent(10) if json.loads(row["request"]).get("kind") == "quality"]
    assert len(rows) == 1 and rows[0]["status"] == "done" and rows[0]["worker"]
    assert json.loads(rows[0]["request"]) == {"kind": "quality", "result": rid, "metric": "deletion",
                                              "params": r.json["quality"]["params"], "key": r.json["quality"]["key"]}
