"""The partial map of an occlusion job again, in distributed mode: the worker publishes it through
Redis and the web node shows it in the job (see tests/test_api_distributed.py for the set-up)."""
from __future__ import annotations

import pytest

from appkit import BACKEND_ENV
from services import postgres_service  # noqa: F401  (the store and jobs on PostgreSQL in this mode)
from test_progressive import app, client, extra_methods, image_id  # noqa: F401
from test_progressive import test_an_occlusion_job_shows_its_partial_map_and_stores_the_unchanged_final_one  # noqa: F401


@pytest.fixture(autouse=True)
def celery_backend(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "celery")
