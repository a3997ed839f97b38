"""HTTP quality: measuring a stored result's map with a faithfulness metric (POST and GET
/api/results/<id>/quality, GET /api/metrics); the measurement is kept with the result."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from appkit import app, client, extra_methods, image_id, wait_job  # noqa: F401
from insights import engine


def explained(client, image_id, method="saliency", params=None, target=1) -> dict:
    r = client.post("/api/explain", json={"image": image_id, "method": method, "params": params or {},
                                          "target": target})
    assert r.status_code == 200, r.json
    return r.json["result"]


def direct(app, rid: str, metric: str, **params) -> dict:
    """The engine's own answer for the stored result (the same input, map and target)."""
    service = app.extensions["insights"]
    meta = service.store.result(rid)
    spec = service.models.spec(meta["model"])
    x, _view = spec.prepare(service.store.load_image(service.store.result_image(rid)))
    attr = torch.from_numpy(service.store.attribution(rid))
    return engine.evaluate(service.models.get(meta["model"]), x, attr, meta["target"], metric, **params)


def test_metrics_are_described_with_their_parameters(client):
    r = client.get("/api/metrics?model=tiny")
    assert r.status_code == 200
    by_id = {m["id"]: m for m in r.json["metrics"]}
    assert list(by_id)[:2] == ["deletion", "insertion"]
    assert by_id["deletion"]["better"] == "lower" and by_id["insertion"]["better"] == "higher"
    assert by_id["deletion"]["needs_method"] is False
    params = {p["name"]: p for p in by_id["deletion"]["params"]}
    assert params["baseline"]["choices"] == ["blur", "mean", "zero"]
    assert params["sigma"]["default"] == 1.6  # a twentieth of the tiny model's 32-pixel input
    assert params["steps"]["default"] == 16 and params["steps"]["max"] == 256
    assert client.get("/api").json["endpoints"]["metrics"] == "/api/metrics"


def test_a_cheap_measurement_is_answered_now_equals_the_engine_and_is_kept(client, app, image_id):
    result = explained(client, image_id)
    rid = result["id"]
    service = app.extensions["insights"]
    before = service.store.total_bytes()
    params = {"steps": 4, "reference": "none", "baseline": "zero"}  # 2 + 3 passes: inline (limit 5)
    r = client.post(f"/api/results/{rid}/quality", json={"metric": "deletion", "params": params})
    assert r.status_code == 200, r.json
    assert r.json["status"] == "done" and r.json["cached"] is False
    q = r.json["quality"]
    want = direct(app, rid, "deletion", **params)
    assert q["metric"] == "deletion" and q["label"] == "Deletion" and q["better"] == "lower"
    assert q["result"] == rid and len(q["key"]) == 64
    assert q["params"] == {**{p["name"]: p["default"] for p in engine.metric_info("deletion", shape=(3, 32, 32))["params"]},
                           **params}
    assert q["answer"]["fractions"] == want["fractions"] == [0, 0.25, 0.5, 0.75, 1]
    assert q["answer"]["scores"][0] == pytest.approx(want["scores"][0], abs=1e-6)
    assert q["answer"]["area"] == pytest.approx(want["area"], abs=1e-6)
    assert "reference" not in q["answer"]
    # Kept with the result: asked again it is answered from the store; listed; counted in the quota.
    again = client.post(f"/api/results/{rid}/quality", json={"metric": "deletion", "params": params})
    assert again.status_code == 200 and again.json["cached"] is True and again.json["quality"] == q
    listed = client.get(f"/api/results/{rid}/quality")
    assert listed.status_code == 200 and listed.json == {"quality": [q]}
    assert service.store.total_bytes() == before + len(json.dumps(q).encode())
    # Other parameters are another measurement; both are listed, oldest first.
    other = client.post(f"/api/results/{rid}/quality", json={"metric": "insertion", "params": params}).json["quality"]
    assert other["key"] != q["key"] and other["better"] == "higher"
    assert [e["metric"] for e in client.get(f"/api/results/{rid}/quality").json["quality"]] == ["deletion", "insertion"]
    assert service.store.delete_result(rid)
    assert client.get(f"/api/results/{rid}/quality").status_code == 404


def test_deleting_a_result_gives_back_its_measurements_bytes(client, app, image_id):
    service = app.extensions["insights"]
    empty = service.store.total_bytes()
    rid = explained(client, image_id)["id"]
    with_result = service.store.total_bytes()
    r = client.post(f"/api/results/{rid}/quality", json={"metric": "insertion",
                                                         "params": {"steps": 2, "reference": "none"}})
    assert r.status_code == 200, r.json
    assert service.store.total_bytes() > with_result
    assert service.store.delete_result(rid)
    assert service.store.total_bytes() == empty
    assert service.store.quality(rid) == []


def test_a_costly_measurement_is_a_job_whose_result_is_the_measurement(client, app, image_id):
    rid = explained(client, image_id, target=2)["id"]
    r = client.post(f"/api/results/{rid}/quality", json={"metric": "deletion", "params": {"steps": 8}})
    assert r.status_code == 202, r.json
    job = r.json["job"]
    assert job["total"] == 2 + 7 * 6 and job["cancel_token"]
    final = wait_job(client, job["id"])
    assert final["status"] == "done" and final["done"] == final["total"]
    q = final["result"]
    want = direct(app, rid, "deletion", steps=8)
    assert q["answer"]["area"] == pytest.approx(want["area"], abs=1e-6)
    assert q["answer"]["reference"]["mean"] == pytest.approx(want["reference"]["mean"], abs=1e-6)
    assert len(q["answer"]["reference"]["areas"][0]) == 5
    assert client.get(f"/api/results/{rid}/quality").json["quality"] == [q]


def test_a_cancelled_measurement_keeps_nothing(client, app, image_id, monkeypatch):
    rid = explained(client, image_id)["id"]
    service = app.extensions["insights"]
    app.config["MEMORY_BUDGET"] = 1  # one image per batch: progress after every pass
    real = engine.evaluate

    def slow(*args, progress=None, **kwargs):
        def report(done, total):
            time.sleep(0.02)
            progress(done, total)
        return real(*args, progress=report, **kwargs)

    monkeypatch.setattr(engine, "evaluate", slow)
    r = client.post(f"/api/results/{rid}/quality", json={"metric": "insertion", "params": {"steps": 20}})
    assert r.status_code == 202
    job = r.json["job"]
    deadline = time.time() + 10
    while client.get(f"/api/jobs/{job['id']}").json["done"] < 3 and time.time() < deadline:
        time.sleep(0.01)
    cancelled = client.delete(f"/api/jobs/{job['id']}", headers={"X-Cancel-Token": job["cancel_token"]})
    assert cancelled.status_code == 200
    final = wait_job(client, job["id"])
    assert final["status"] == "cancelled" and final["done"] < final["total"] and final["result"] is None
    assert service.store.quality(rid) == []


@pytest.mark.parametrize("body, status, code, field, words", [
    ({"metric": "nope"}, 400, "bad_param", "metric", "unknown metric 'nope'; known metrics: deletion, insertion"),
    ({"metric": 7}, 400, "bad_param", "metric", "unknown metric 7"),
    ({"metric": "deletion", "params": [1]}, 400, "bad_param", "params", "must be a JSON object"),
    ({"metric": "deletion", "params": {"steps": 0}}, 400, "bad_param", "steps", "must be at least 1"),
    ({"metric": "deletion", "params": {"baseline": "grey"}}, 400, "bad_param", "baseline", "must be one of blur"),
    ({"metric": "deletion", "params": {"colour": 1}}, 400, "bad_param", "colour", "is not a parameter of deletion"),
    ({"metric": "deletion", "params": {"steps": 256, "reference_seeds": 32}}, 400, "over_budget", "params",
     "need 8417 forward passes, more than the limit of 5000"),
])
def test_bad_requests_name_the_problem_and_keep_nothing(client, app, image_id, body, status, code, field, words):
    rid = explained(client, image_id)["id"]
    r = client.post(f"/api/results/{rid}/quality", json=body)
    assert r.status_code == status, r.json
    assert r.json["error"]["code"] == code and r.json["error"]["field"] == field
    assert words in r.json["error"]["message"]
    assert app.extensions["insights"].store.quality(rid) == []


def test_an_unknown_result_is_a_404(client):
    for r in (client.post("/api/results/" + "a" * 64 + "/quality", json={"metric": "deletion"}),
              client.get("/api/results/" + "a" * 64 + "/quality"), client.get("/api/results/nope/quality")):
        assert r.status_code == 404 and r.json["error"]["field"] == "result"


def test_a_metric_that_re_runs_the_method_gets_the_results_method_and_parameters(client, app, image_id):
    rid = explained(client, image_id, method="integrated_gradients", params={"n_steps": 4})["id"]
    params = {"n_perturb_samples": 3, "seed": 5}
    described = {m["id"]: m for m in client.get("/api/metrics").json["metrics"]}["sensitivity_max"]
    assert described["needs_method"] is True
    r = client.post(f"/api/results/{rid}/quality", json={"metric": "sensitivity_max", "params": params})
    assert r.status_code in (200, 202), r.json
    q = r.json["quality"] if r.status_code == 200 else wait_job(client, r.json["job"]["id"])["result"]
    want = direct(app, rid, "sensitivity_max", method="integrated_gradients", method_params={"n_steps": 4},
                  **params)
    assert q["metric"] == "sensitivity_max" and q["better"] == "lower"
    assert q["answer"]["value"] == pytest.approx(want["value"], rel=1e-5)


def test_a_result_keeps_its_newest_measurements_only(client, app, image_id):
    service = app.extensions["insights"]
    service.store.QUALITY_PER_RESULT = 3
    rid = explained(client, image_id)["id"]
    with_result = service.store.total_bytes()
    boxes = [[0, 0, 8 + i, 8 + i] for i in range(5)]  # a box check costs no pass: five measurements
    for box in boxes:
        r = client.post(f"/api/results/{rid}/quality", json={"metric": "pointing", "params": {"box": box}})
        assert r.status_code == 200, r.json
    kept = client.get(f"/api/results/{rid}/quality").json["quality"]
    assert [q["params"]["box"] for q in kept] == boxes[2:]  # oldest first, the two oldest gone
    assert service.store.total_bytes() == with_result + sum(len(json.dumps(q).encode()) for q in kept)
