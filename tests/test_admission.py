"""Admission control: clients, the bounds on jobs and writes, inline timeouts, event streams, cancel
tokens, the light lane for predictions, queued jobs without tensors, and a flood."""
from __future__ import annotations

import io
import json
import threading
import time

import pytest
import torch
from PIL import Image

from appkit import (TINY_CONFIG, app, client, extra_methods, image_id, png, snapshot,  # noqa: F401
                    upload, wait_job)
from insights import create_app
from insights.admission import Admission, RateLimiter, Slots, client_id
from insights.engine import registry
from insights.engine.method import Method
from insights.engine.params import Cost, Param
from insights.errors import Busy, Forbidden

BASE = {"BUILTIN_MODELS": False, "MODELS_CONFIG": TINY_CONFIG, "DEVICE": "cpu", "INLINE_MAX_PASSES": 5,
        "MAX_PASSES": 100_000, "MAX_CONTENT_LENGTH": 200_000, "MAX_IMAGE_PIXELS": 250_000, "SSE_HEARTBEAT_S": 0.2}


@pytest.fixture
def make_app(tmp_path, extra_methods):
    """Apps with their own limits (the BASE settings plus ``config``), shut down after the test."""
    made = []

    def make(**config):
        a = create_app({"INSTANCE_PATH": str(tmp_path / f"instance{len(made)}"), **BASE, **config})
        made.append(a)
        return a

    yield make
    for a in made:
        a.extensions["insights"].jobs.shutdown()


def error_of(r, status: int, words: str = "", code: str = "busy") -> dict:
    assert r.status_code == status, r.data[:300]
    err = r.json["error"]
    assert err["code"] == code and words.lower() in err["message"].lower(), err
    return err


def as_client(n: int) -> dict:
    return {"environ_base": {"REMOTE_ADDR": f"10.0.0.{n}"}}


def slow(image: str, variant: int = 0, steps: int = 100, delay: float = 0.02) -> dict:
    """A costly explanation (a job of ``steps`` × ``delay`` s); each ``variant`` is another job."""
    return {"model": "tiny", "image": image, "method": "slow_test", "target": 0,
            "params": {"steps": steps, "delay": round(delay + variant / 10_000, 4)}}


def hold_worker(app, lane: str = "main") -> threading.Event:
    """Keeps a lane of the job runner busy until the returned event is set."""
    gate, busy = threading.Event(), threading.Event()
    app.extensions["insights"].jobs.submit(lambda job: (busy.set(), gate.wait(30)), lane=lane)
    assert busy.wait(5)
    return gate


def cancel(client, job: dict, **kw):
    return client.delete(f"/api/jobs/{job['id']}", headers={"X-Cancel-Token": job["cancel_token"]}, **kw)


# --------------------------------------------------------------------------- the bookkeeping alone


def test_client_is_its_token_else_its_address(app):
    import hashlib

    from flask import g

    with app.test_request_context("/api/predict", environ_base={"REMOTE_ADDR": "192.0.2.7"}):
        assert client_id() == "addr:192.0.2.7"
        g.token = "a-long-enough-secret-token"
        expected = "token:" + hashlib.sha256(b"a-long-enough-secret-token").hexdigest()[:16]
        assert client_id() == expected and "secret" not in client_id()


@pytest.mark.parametrize("addr, expected", [
    ("192.0.2.7", "addr:192.0.2.7"),
    ("::ffff:192.0.2.7", "addr:192.0.2.7"),
    ("2001:db8:1:2::1", "addr:2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:fffe", "addr:2001:db8:1:2::/64"),
    ("fe80::1%eth0", "addr:fe80::/64"),
    ("::1", "addr:::/64"),
    (None, "addr:unknown"),
    ("not an address", "addr:not an address"),
])
def test_an_ipv6_client_is_its_64_network(app, addr, expected):
    """Found in review: clients were counted by their whole address, and an IPv6 host picks its
    address from a /64 of them (2^64), one per request if it likes, so each request was a new client
    for MAX_JOBS_PER_CLIENT, RATE_LIMIT_PER_MIN and the sign-in attempts."""
    environ = {"REMOTE_ADDR": addr} if addr is not None else {}
    with app.test_request_context("/api/predict", environ_base=environ):
        if addr is None:
            from flask import request
            request.environ.pop("REMOTE_ADDR", None)
        assert client_id() == expected


def test_a_client_rotating_ipv6_addresses_is_one_client(app):
    client = app.test_client()
    app.extensions["insights"].jobs.admission.rate = RateLimiter(3)
    answers = [client.post("/api/predict", json={}, environ_base={"REMOTE_ADDR": f"2001:db8::{n:x}"}).status_code
               for n in range(5)]
    assert answers == [400, 400, 400, 429, 429]  # the body is refused; the fourth is not counted at all
    other = client.post("/api/predict", json={}, environ_base={"REMOTE_ADDR": "2001:db8:0:1::1"})
    assert other.status_code == 400  # the next /64 is another client


def test_token_bucket_allows_bursts_then_one_per_interval():
    now = [100.0]
    bucket = RateLimiter(6, clock=lambda: now[0])  # one every 10 s, bursts of 6
    assert [bucket.take("a") for _ in range(6)] == [0.0] * 6
    assert bucket.take("a") == pytest.approx(10.0)
    assert bucket.take("b") == 0.0  # clients are counted apart
    now[0] += 4.0
    assert bucket.take("a") == pytest.approx(6.0)  # refused takes nothing
    now[0] += 6.0
    assert bucket.take("a") == 0.0 and bucket.take("a") == pytest.approx(10.0)
    assert RateLimiter(None).take("a") == 0.0  # no limit


def test_admission_counts_distinct_jobs_per_client_and_holds_per_submitter():
    adm = Admission(max_jobs=3, per_client=2, rate_per_min=None)
    a1, a2 = adm.hold("j1", "A"), adm.hold("j2", "A")
    with pytest.raises(Busy) as refused:
        adm.check("A", wait=lambda ids: 7.2)
    assert refused.value.status == 429 and refused.value.retry_after == 8 and refused.value.reason == "client_jobs"
    adm.check("A", joining="j1")  # joining a job it holds adds no job
    adm.hold("j3", "B")
    with pytest.raises(Busy) as full:
        adm.check("C")
    assert full.value.status == 503 and full.value.retry_after == 5
    adm.check("C", joining="j3")  # joining adds no work to a full server
    b = adm.hold("j1", "B", new=False)
    with pytest.raises(Forbidden):
        adm.release("j1", "not-a-token")
    with pytest.raises(Forbidden):
        adm.release("j2", b)  # B's token holds j1, not j2
    assert adm.release("j1", a1) == 1 and adm.release("j1", b) == 0
    adm.ended("j2")
    assert adm.counts()["active"] == 2
    adm.hold("j2", "C", new=False)  # joined just as it ended: it does not count again
    assert adm.counts()["active"] == 2
    adm.check("A")  # j1 still active but A no longer holds it; j2 ended
    with pytest.raises(Forbidden):
        adm.release("j1", a1)  # a token is good once
    adm.forget("j2")
    with pytest.raises(Forbidden):
        adm.release("j2", a2)


def test_slots_bound_places_and_tell_when_one_frees():
    slots = Slots(2)
    a, b = slots.take(), slots.take()
    assert a and b and slots.take() is None
    assert 59 <= slots.seconds_to_free(60) <= 60
    a.release()
    a.release()  # twice is harmless
    assert slots.taken == 1 and slots.take() is not None
    assert all(Slots(None).take() for _ in range(100))


# --------------------------------------------------------------------------- jobs per client, queue


def test_a_client_past_its_jobs_gets_429_with_retry_after_and_others_do_not(client, image_id):
    jobs = []
    for t in range(4):
        r = client.post("/api/explain", json=slow(image_id, t))
        assert r.status_code == 202 and r.json["job"]["cancel_token"]
        jobs.append(r.json["job"])
    while client.get(f"/api/jobs/{jobs[0]['id']}").json["done"] < 5:
        time.sleep(0.01)  # the first job runs and knows its rate: about 2 s left
    refused = client.post("/api/explain", json=slow(image_id, 4))
    error_of(refused, 429, "MAX_JOBS_PER_CLIENT")
    assert 1 <= int(refused.headers["Retry-After"]) <= 3  # the running job's ETA, rounded up
    assert client.post("/api/explain", json=slow(image_id, 0)).status_code == 202  # joining its own job
    other = client.post("/api/explain", json=slow(image_id, 5), **as_client(9))
    assert other.status_code == 202  # another client is not held back
    assert cancel(client, jobs[1]).status_code == 200  # a cancelled job frees its place at once
    assert client.post("/api/explain", json=slow(image_id, 4)).status_code == 202


def test_a_full_server_answers_503_and_still_lets_a_client_join_an_active_job(make_app):
    app = make_app(MAX_QUEUED_JOBS=3)
    c = app.test_client()
    image = upload(c, png()).json["id"]
    fresh = upload(c, png(color=(9, 99, 199))).json["id"]  # no scores known: predicting it is work
    held = [c.post("/api/explain", json=slow(image, n, steps=500), **as_client(n)) for n in range(3)]
    assert [r.status_code for r in held] == [202] * 3
    before = snapshot(app.instance_path)
    refused = c.post("/api/explain", json=slow(image, 7), **as_client(7))
    error_of(refused, 503, "MAX_QUEUED_JOBS")
    assert int(refused.headers["Retry-After"]) >= 1
    refused_predict = c.post("/api/predict", json={"model": "tiny", "image": fresh}, **as_client(7))
    error_of(refused_predict, 503)
    assert snapshot(app.instance_path) == before  # refused requests write nothing
    joined = c.post("/api/explain", json=slow(image, 0, steps=500), **as_client(7))
    assert joined.status_code == 202 and joined.json["job"]["id"] == held[0].json["job"]["id"]
    assert c.get("/api/models").status_code == 200 and c.get("/api").json["limits"]["MAX_QUEUED_JOBS"] == 3


def test_rate_limit_on_writes_with_retry_after_and_nothing_written(make_app):
    app = make_app(RATE_LIMIT_PER_MIN=3)
    now = [1000.0]
    app.extensions["insights"].jobs.admission.rate.clock = lambda: now[0]
    c = app.test_client()
    assert [upload(c, png(color=(n, 9, 9))).status_code for n in range(3)] == [201] * 3
    before = snapshot(app.instance_path)
    refused = upload(c, png(color=(99, 9, 9)))
    error_of(refused, 429, "RATE_LIMIT_PER_MIN")
    assert refused.headers["Retry-After"] == "20"  # one write every 20 s
    assert snapshot(app.instance_path) == before
    error_of(c.post("/api/predict", json={"image": "x"}), 429)  # every kind of write counts
    error_of(c.delete("/api/jobs/x"), 429)
    assert c.get("/api/models").status_code == 200 and c.get("/api/jobs/x").status_code == 404  # reads do not
    assert c.post("/api/samples/chelsea", **as_client(2)).status_code in (201, 404)  # another client
    now[0] += 20
    assert upload(c, png(color=(99, 9, 9))).status_code == 201


# --------------------------------------------------------------------------- inline requests


def test_an_inline_explanation_not_done_in_time_answers_202_and_finishes(make_app):
    app = make_app(INLINE_TIMEOUT_S=0.3)
    c = app.test_client()
    image = upload(c, png()).json["id"]
    gate = hold_worker(app)
    start = time.monotonic()
    r = c.post("/api/explain", json={"model": "tiny", "image": image, "method": "saliency", "target": 1})
    assert time.monotonic() - start < 5  # did not wait for the worker
    assert r.status_code == 202 and r.json["status"] == "queued"
    job = r.json["job"]
    assert job["status"] == "queued" and job["cancel_token"] and r.headers["Location"] == f"/api/jobs/{job['id']}"
    gate.set()
    final = wait_job(c, job["id"])
    assert final["status"] == "done" and final["result"] is None
    meta = c.get(f"/api/results/{final['result_id']}").json
    assert meta["method"] == "saliency" and meta["target"] == 1
    again = c.post("/api/explain", json={"model": "tiny", "image": image, "method": "saliency", "target": 1})
    assert again.status_code == 200 and again.json["cached"] is True


def test_a_prediction_not_done_in_time_answers_202_and_its_job_carries_the_predictions(make_app):
    app = make_app(INLINE_TIMEOUT_S=0.3)
    c = app.test_client()
    image = upload(c, png()).json["id"]
    gate = hold_worker(app, lane="light")  # where predictions run
    r = c.post("/api/predict", json={"model": "tiny", "image": image, "top_k": 3})
    assert r.status_code == 202 and r.json["job"]["cancel_token"]
    gate.set()
    final = wait_job(c, r.json["job"]["id"])
    assert final["status"] == "done" and final["result_id"] is None
    answer = final["result"]
    assert answer["model"] == "tiny" and answer["image"] == image and len(answer["predictions"]) == 3
    direct = c.post("/api/predict", json={"model": "tiny", "image": image, "top_k": 3})
    assert direct.status_code == 200 and direct.json == answer


def test_past_max_inline_waits_a_request_answers_202_at_once(make_app):
    app = make_app(INLINE_TIMEOUT_S=30, MAX_INLINE_WAITS=1)
    c = app.test_client()
    image = upload(c, png()).json["id"]
    gate = hold_worker(app)
    waiting = {}
    t = threading.Thread(target=lambda: waiting.update(r=app.test_client().post(
        "/api/explain", json={"model": "tiny", "image": image, "method": "saliency", "target": 0})))
    t.start()
    service = app.extensions["insights"]
    while service.waits.taken < 1:
        time.sleep(0.01)
    start = time.monotonic()
    r = c.post("/api/explain", json={"model": "tiny", "image": image, "method": "saliency", "target": 1})
    assert r.status_code == 202 and time.monotonic() - start < 5  # not 30 s
    gate.set()
    t.join(20)
    assert waiting["r"].status_code == 200  # the one that waited got its answer
    assert wait_job(c, r.json["job"]["id"])["status"] == "done"


# --------------------------------------------------------------------------- event streams


def test_event_streams_are_capped_with_503_and_end_after_their_lifetime(make_app):
    app = make_app(MAX_EVENT_STREAMS=1, EVENT_STREAM_MAX_S=0.6)
    c = app.test_client()
    image = upload(c, png()).json["id"]
    job = c.post("/api/explain", json=slow(image, steps=400, delay=0.02)).json["job"]
    first = c.get(f"/api/jobs/{job['id']}/events", buffered=False)
    assert first.status_code == 200
    refused = c.get(f"/api/jobs/{job['id']}/events")
    error_of(refused, 503, "MAX_EVENT_STREAMS")
    assert 1 <= int(refused.headers["Retry-After"]) <= 1  # the open stream ends within a second
    start = time.monotonic()
    text = first.get_data(as_text=True)
    first.close()
    assert time.monotonic() - start < 5  # ended at its lifetime, long before the 8 s job
    assert text.rstrip().endswith("event: expired\ndata: {}")
    states = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {\"")]
    assert states and states[-1]["status"] in ("queued", "running")
    assert app.extensions["insights"].streams.taken == 0
    again = c.get(f"/api/jobs/{job['id']}/events")  # the place is free again
    assert again.status_code == 200
    again.close()
    cancel(c, job)


def test_a_stream_never_read_gives_its_place_back_when_closed(make_app):
    app = make_app(MAX_EVENT_STREAMS=1)
    c = app.test_client()
    image = upload(c, png()).json["id"]
    job = c.post("/api/explain", json=slow(image, steps=400)).json["job"]
    c.get(f"/api/jobs/{job['id']}/events", buffered=False).close()
    assert app.extensions["insights"].streams.taken == 0
    cancel(c, job)


# --------------------------------------------------------------------------- cancel tokens


def test_cancelling_needs_the_submitters_token(client, image_id):
    job = client.post("/api/explain", json=slow(image_id, steps=300)).json["job"]
    other = client.post("/api/explain", json=slow(image_id, 1, steps=300)).json["job"]
    assert "cancel_token" not in client.get(f"/api/jobs/{job['id']}").json  # only the submitter saw it
    error_of(client.delete(f"/api/jobs/{job['id']}"), 403, "cancel_token", code="forbidden")
    error_of(client.delete(f"/api/jobs/{job['id']}", headers={"X-Cancel-Token": "guess"}), 403, code="forbidden")
    error_of(client.delete(f"/api/jobs/{job['id']}", headers={"X-Cancel-Token": other["cancel_token"]}), 403,
             code="forbidden")
    assert client.get(f"/api/jobs/{job['id']}").json["status"] in ("queued", "running")
    r = client.delete(f"/api/jobs/{job['id']}?cancel_token={job['cancel_token']}")  # the query works too
    assert r.status_code == 200
    assert wait_job(client, job["id"])["status"] == "cancelled"
    r = client.delete(f"/api/jobs/{other['id']}", json={"cancel_token": other["cancel_token"]})  # and the body
    assert r.status_code == 200 and wait_job(client, other["id"])["status"] == "cancelled"


def test_a_shared_job_runs_until_its_last_submitter_cancels(client, image_id):
    mine = client.post("/api/explain", json=slow(image_id, steps=300)).json["job"]
    theirs = client.post("/api/explain", json=slow(image_id, steps=300), **as_client(2)).json["job"]
    assert mine["id"] == theirs["id"] and mine["cancel_token"] != theirs["cancel_token"]
    first = cancel(client, mine)
    assert first.status_code == 200 and first.json["status"] in ("queued", "running")
    time.sleep(0.1)
    assert client.get(f"/api/jobs/{mine['id']}").json["status"] in ("queued", "running")  # goes on for them
    error_of(cancel(client, mine), 403, code="forbidden")  # a token cancels once
    assert cancel(client, theirs, **as_client(2)).status_code == 200
    final = wait_job(client, mine["id"])
    assert final["status"] == "cancelled" and final["done"] < 300


# --------------------------------------------------------------------------- queued jobs, the light lane


def test_queued_jobs_hold_ids_not_tensors(app, client, image_id):
    gate = hold_worker(app)
    job = client.post("/api/explain", json=slow(image_id, steps=10, delay=0.0)).json["job"]
    task = app.extensions["insights"].jobs.get(job["id"]).work
    held = [name for name, value in vars(task).items() if isinstance(value, (torch.Tensor, Image.Image))]
    assert held == [] and task.image_id == image_id and task.view is None
    gate.set()
    final = wait_job(client, job["id"])
    assert final["status"] == "done"
    assert client.get(f"/api/results/{final['result_id']}").json["size"] == [32, 32]  # loaded when it ran


@pytest.mark.parametrize("loaded", [True, False])
def test_a_prediction_is_answered_while_a_job_runs(app, client, image_id, loaded):
    if loaded:
        assert client.post("/api/predict", json={"model": "tiny", "image": image_id}).status_code == 200
    other = upload(client, png(color=(20, 90, 200))).json["id"]
    job = client.post("/api/explain", json=slow(image_id, steps=150, delay=0.02)).json["job"]  # about 3 s
    if not loaded:  # the job uses "tiny"; the prediction asks for another model, not in memory yet
        def small():
            return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                       torch.nn.Linear(4, 5))

        models = app.extensions["insights"].models
        models.register("tiny2", small, {"resize": 40, "crop": 32}, ["a", "b", "c", "d", "e"])
        assert models.peek("tiny2") is None
    while client.get(f"/api/jobs/{job['id']}").json["status"] != "running":
        time.sleep(0.01)
    start = time.monotonic()
    r = client.post("/api/predict", json={"model": "tiny" if loaded else "tiny2", "image": other})
    took = time.monotonic() - start
    assert r.status_code == 200 and len(r.json["predictions"]) == 5
    state = client.get(f"/api/jobs/{job['id']}").json
    assert state["status"] == "running" and state["done"] < 150  # answered before the job ended
    assert took < 1.5  # the job had seconds left
    cancel(client, job)


class HookedWait(Method):
    """Test method with hooks on the model: counts the forward passes its hook sees while it
    holds the model, for ``delay`` seconds."""

    id, label, family = "hooked_wait_test", "Hooked wait (test)", "test"
    exclusive = True
    params = (Param("delay", "float", 0.5, "Seconds to hold the model.", min=0.0, max=5.0),)
    started = threading.Event()
    seen: list = []

    def cost(self, p, facts):
        return Cost(50, 0)

    def run(self, ctx, p):
        passes = []
        handle = ctx.model.register_forward_hook(lambda module, inputs, output: passes.append(inputs[0].shape[0]))
        try:
            ctx.model(ctx.inputs)
            HookedWait.started.set()
            time.sleep(p["delay"])
        finally:
            handle.remove()
        HookedWait.seen = passes
        ctx.advance(50)
        return torch.zeros_like(ctx.inputs)


def test_a_prediction_waits_while_a_method_has_hooks_on_the_model(client, image_id, monkeypatch):
    monkeypatch.setitem(registry._methods, HookedWait.id, HookedWait())
    HookedWait.started.clear()
    assert client.post("/api/predict", json={"model": "tiny", "image": image_id}).status_code == 200
    other = upload(client, png(color=(20, 90, 200))).json["id"]
    job = client.post("/api/explain", json={"model": "tiny", "image": image_id, "method": HookedWait.id,
                                            "target": 0, "params": {"delay": 0.5}}).json["job"]
    assert HookedWait.started.wait(10)
    r = client.post("/api/predict", json={"model": "tiny", "image": other})
    assert r.status_code == 200
    assert client.get(f"/api/jobs/{job['id']}").json["status"] in ("running", "done")
    assert HookedWait.seen == [1]  # the hook saw the method's own pass only, never the prediction's


# --------------------------------------------------------------------------- flood


def test_one_client_flooding_costly_jobs_is_shed_and_another_is_served(app, client, image_id):
    flood = {"submitted": 0, "accepted": [], "shed": {}}
    before = {p for p in snapshot(app.instance_path) if p.startswith("results/")}
    for n in range(300):
        r = client.post("/api/explain", json=slow(image_id, n % 10, steps=100, delay=0.02))
        flood["submitted"] += 1
        if r.status_code == 202:
            flood["accepted"].append(r.json["job"])
        else:
            assert r.status_code == 429 and r.json["error"]["code"] == "busy" and int(r.headers["Retry-After"]) >= 1
            reason = "rate" if "RATE_LIMIT" in r.json["error"]["message"] else "jobs"
            flood["shed"][reason] = flood["shed"].get(reason, 0) + 1
    # Identical requests join their job, so at most MAX_JOBS_PER_CLIENT distinct jobs run for it.
    assert len({j["id"] for j in flood["accepted"]}) == 4
    assert sum(flood["shed"].values()) >= 300 - 120 and flood["shed"]["rate"] >= 300 - 120
    assert {p for p in snapshot(app.instance_path) if p.startswith("results/")} == before  # nothing written
    other = as_client(77)
    start = time.monotonic()
    mine = client.post("/api/images", data={"image": (io.BytesIO(png(color=(1, 2, 3))), "x.png")},
                       content_type="multipart/form-data", **other)
    assert mine.status_code == 201
    assert client.post("/api/predict", json={"model": "tiny", "image": mine.json["id"]}, **other).status_code == 200
    assert client.get("/api/models", **other).status_code == 200
    r = client.post("/api/explain", json={"model": "tiny", "image": mine.json["id"], "method": "saliency",
                                          "target": 0}, **other)
    assert r.status_code == 200 and r.json["status"] == "done"  # ahead of the flood's queued jobs
    assert time.monotonic() - start < 8  # behind at most the one running job (2 s)
    for job in flood["accepted"]:
        cancel(client, job)


def test_cheap_requests_keep_answering_while_requests_wait_and_streams_are_open(make_app):
    """A real server with 4 threads: waiting requests and event streams never take them all."""
    import urllib.error
    import urllib.request

    from waitress import create_server

    app = make_app(MAX_INLINE_WAITS=2, MAX_EVENT_STREAMS=1, INLINE_TIMEOUT_S=30, MAX_JOBS_PER_CLIENT=None)
    c = app.test_client()
    image = upload(c, png()).json["id"]
    server = create_server(app, host="127.0.0.1", port=0, threads=4, asyncore_use_poll=True)  # many fds open in a full run
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{server.effective_port}"

    def call(method, path, body=None, timeout=60):
        req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    cheap = ("/", "/api/models", "/api/methods")
    for path in cheap:  # templates compiled, method descriptions built: what is timed below is the wait
        assert call("GET", path)[0] == 200
    gate = hold_worker(app)
    job = c.post("/api/explain", json=slow(image, steps=20, delay=0.01)).json["job"]
    answers: list = []
    askers = [threading.Thread(target=lambda t=t: answers.append(call("POST", "/api/explain", {
        "model": "tiny", "image": image, "method": "saliency", "target": t % 5, "params": {"abs": t < 5}})))
        for t in range(6)]
    streamed: list = []
    reader = threading.Thread(target=lambda: streamed.append(call("GET", f"/api/jobs/{job['id']}/events")))
    reader.start()
    for t in askers:
        t.start()
    service = app.extensions["insights"]
    deadline = time.monotonic() + 10
    while (service.waits.taken < 2 or service.streams.taken < 1 or len(answers) < 4) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert service.waits.taken == 2 and service.streams.taken == 1 and len(answers) == 4
    assert sorted(a[0] for a in answers) == [202] * 4  # beyond MAX_INLINE_WAITS: 202 at once
    status, headers, _ = call("GET", f"/api/jobs/{job['id']}/events")
    assert status == 503 and int(headers["Retry-After"]) >= 1
    for path in (*cheap, f"/api/jobs/{job['id']}"):
        start = time.monotonic()
        assert call("GET", path, timeout=5)[0] == 200
        assert time.monotonic() - start < 1.0, path
    gate.set()
    for t in [*askers, reader]:
        t.join(30)
    assert sorted(a[0] for a in answers) == [200, 200, 202, 202, 202, 202]
    assert streamed[0][0] == 200 and b'"status": "done"' in streamed[0][2]
    server.close()
