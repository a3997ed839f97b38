"""A hosted instance under load, under a flood and through crashes: the real server (``python app.py``)
on loopback, driven by insights.bench_load in a short form (the long form is the benchmark:
``python -m insights.bench_load``). Every server started here is stopped by its PID."""
from __future__ import annotations

import http.client
import json
import os
import random
import sqlite3
import threading
import time

import pytest

from insights.bench_load import Client, ServerProcess, flood, load, noise_png, tokens_for

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = {"INSIGHTS_MODELS_CONFIG": json.dumps([os.path.join(HERE, "tiny_models.py")]),
        "INSIGHTS_BUILTIN_MODELS": "false"}
COSTLY = {"method": "occlusion", "params": {"sliding_window_shapes": [3, 4, 4], "strides": [3, 1, 1]}}


@pytest.fixture
def server_factory(tmp_path):
    started: list[ServerProcess] = []

    def start(tokens, instance=None, env=None) -> ServerProcess:
        server = ServerProcess(str(instance or tmp_path / "instance"), tokens=tokens, env={**TINY, **(env or {})})
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def test_load_short_form_has_no_failures_and_bounded_memory(server_factory):
    tokens = tokens_for(12)
    server = server_factory(tokens)
    out = load(server, tokens, seconds=20, model="tiny", num_classes=5, costly=COSTLY, warmup=8)
    assert out["failures"] == 0, out["failure_examples"]
    assert out["requests"] > 200
    kinds = out["by_kind"]
    for kind in ("read", "predict", "explain"):
        assert kinds[kind]["statuses"].get("200", 0) > 0, kinds[kind]
    assert out["rss_growth_mb_per_1000"] < 50, out


def test_a_flood_from_one_client_is_shed_and_others_keep_being_served(server_factory):
    tokens = tokens_for(2)
    server = server_factory(tokens)
    out = flood(server, tokens, 150, model="tiny", num_classes=5, costly=COSTLY, hold=3.0)
    assert out["flood_failures"] == 0 and out["other_failures"] == 0, out
    shed = out["statuses"].get("429", 0) + out["statuses"].get("503", 0)
    assert out["accepted"] + shed + out["statuses"].get("200", 0) == 150, out
    # The flooding client is shed: at most MAX_JOBS_PER_CLIENT (4) jobs of its own at a time (its
    # identical requests join them; one that ends lets the next in), and past RATE_LIMIT_PER_MIN
    # (120) every request is refused ...
    assert out["jobs"] <= 4 + out["ended"] and shed >= 150 - 120, out
    assert out["other_shed"] == 0 and out["other_requests"] >= 2, out  # ... and the other one is not


def stored_files(client: Client, result: dict) -> dict[str, bytes]:
    """The bytes of a result's metadata and files, as a client downloads them."""
    rid = result["id"]
    paths = [f"/api/results/{rid}"] + [result["links"][k] for k in ("input", "map", "npy")]
    out = {}
    for path in paths:
        status, _h, body = client.call("GET", path)
        assert status == 200, (path, status)
        out[path] = body
    return out


def writer(port: int, token: str, seed: int, acknowledged: dict, lock: threading.Lock, stop: threading.Event):
    """Uploads and explains until the server dies; records each acknowledged result's bytes."""
    rng = random.Random(seed)
    c = Client(port, token, timeout=30)
    try:
        for i in range(10_000):
            if stop.is_set():
                return
            status, _h, image = c.upload(noise_png(seed * 10_000 + i, size=48))
            if status != 201:
                continue
            payload = {"image": image["id"], "method": "integrated_gradients", "target": rng.randrange(5),
                       "params": {"n_steps": rng.randrange(2, 40)}}
            status, _h, answer = c.json("POST", "/api/explain", payload)
            if status == 200 and answer.get("result"):
                files = stored_files(c, answer["result"])
                with lock:
                    acknowledged[answer["result"]["id"]] = files
    except (OSError, http.client.HTTPException, AssertionError, ValueError):
        return  # the server was killed mid-request


def test_kill_9_during_writes_three_times_keeps_every_acknowledged_result(server_factory, tmp_path):
    instance = tmp_path / "crash"
    token = tokens_for(1)[0]
    acknowledged: dict[str, dict[str, bytes]] = {}
    lock = threading.Lock()
    for round_ in range(3):
        server = server_factory([token], instance=instance)
        check = Client(server.port, token)
        for rid, files in acknowledged.items():  # everything acknowledged before a kill, byte-identical
            for path, data in files.items():
                status, _h, body = check.call("GET", path)
                assert status == 200 and body == data, (round_, path, status)
        before = len(acknowledged)
        stop = threading.Event()
        threads = [threading.Thread(target=writer, args=(server.port, token, 100 * round_ + k, acknowledged, lock,
                                                         stop), daemon=True) for k in range(2)]
        for t in threads:
            t.start()
        deadline = time.time() + 60
        while time.time() < deadline and len(acknowledged) < before + 3:
            time.sleep(0.05)
        time.sleep(random.Random(round_).uniform(0.1, 0.8))  # somewhere in the middle of a write
        server.kill()
        stop.set()
        for t in threads:
            t.join(30)
        assert len(acknowledged) >= before + 3
    server = server_factory([token], instance=instance)
    check = Client(server.port, token)
    for rid, files in acknowledged.items():
        for path, data in files.items():
            status, _h, body = check.call("GET", path)
            assert status == 200 and body == data, path
    # Nothing half-written answers 5xx: every result the index knows is whole.
    with sqlite3.connect(instance / "index.sqlite3") as db:
        rids = [row[0] for row in db.execute("SELECT id FROM results")]
    assert len(rids) >= len(acknowledged)
    for rid in rids:
        status, _h, body = check.call("GET", f"/api/results/{rid}")
        assert status == 200, rid
        meta = json.loads(body)
        for key in ("input", "map", "npy"):
            status, _h, _b = check.call("GET", meta["links"][key])
            assert status == 200, (rid, key)


def test_hostile_uploads_and_bodies_through_the_real_server(server_factory, tmp_path):
    """tests/test_hostile_uploads.py's refusals and a fuzz of explain bodies, sent to a real
    ``python app.py`` (waitress in front): no answer 5xx, nothing written, the server serving."""
    import uuid

    from appkit import snapshot as snapshot_of
    from test_fuzz import LISTS, SCALARS, raw_json
    from test_hostile_uploads import LIMITS, REFUSALS

    env = {f"INSIGHTS_{k}": json.dumps(v) for k, v in LIMITS.items()}
    server = server_factory(None, env=env)
    c = Client(server.port)
    status, _h, image = c.upload(noise_png(3, size=40))
    assert status == 201
    instance = server.instance
    answers: dict[int, int] = {}
    for case in REFUSALS:
        before = snapshot_of(instance)
        if case.content_type is not None:
            status, head, body = c.call("POST", "/api/images", case.make(), {"Content-Type": case.content_type})
        else:
            boundary = uuid.uuid4().hex
            name = case.filename or ""
            data = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{case.field}\"; "
                    f"filename=\"{name}\"\r\n\r\n").encode() + case.make() + f"\r\n--{boundary}--\r\n".encode()
            status, head, body = c.call("POST", "/api/images", data,
                                        {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        answers[status] = answers.get(status, 0) + 1
        assert 400 <= status < 500, (case.id, status, body[:200])
        if head.get("Content-Type", "").startswith("application/json"):
            assert json.loads(body)["error"]["code"] == case.code, case.id
        else:  # waitress itself refuses a body over MAX_CONTENT_LENGTH, in plain text
            assert status == 413 and case.status == 413, (case.id, status, body[:200])
        assert snapshot_of(instance) == before, f"{case.id} wrote to the instance folder"
    for value in SCALARS + LISTS:
        for name in ("n_steps", "sliding_window_shapes", "layer"):
            method = {"n_steps": "integrated_gradients", "sliding_window_shapes": "occlusion"}.get(name, "grad_cam")
            payload = {"image": image["id"], "method": method, "target": 1, "params": {name: value}}
            status, _h, body = c.call("POST", "/api/explain", raw_json(payload).encode(),
                                      {"Content-Type": "application/json"})
            answers[status] = answers.get(status, 0) + 1
            assert status < 500, (payload, status, body[:200])
    assert c.call("GET", "/api/models")[0] == 200
    print(f"real server: {sum(answers.values())} hostile requests, answers {sorted(answers.items())}")
