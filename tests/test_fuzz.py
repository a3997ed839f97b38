"""A schema fuzz of every endpoint and of every parameter /api/methods describes: hostile values
(integers beyond any float, NaN and Infinity literals, wrong types, huge lists, long strings,
path tricks) must never answer 5xx; every refusal has the JSON error shape and writes nothing."""
from __future__ import annotations

import json
import os

import pytest

from appkit import TINY_CONFIG, extra_methods, png, snapshot, upload, wait_job  # noqa: F401
from insights import create_app

HUGE = "1" + "0" * 400
RAW = {"__HUGE__": HUGE, "__NEGHUGE__": "-" + HUGE, "__NAN__": "NaN", "__INF__": "Infinity",
       "__NEGINF__": "-Infinity", "__BIGFLOAT__": "1e400"}
SCALARS = [None, True, False, 0, -1, 1.5, -0.0, 2 ** 63, -(2 ** 63), "", "abc", "12", " 7 ", "1e3", "0x10",
           "9" * 5000, "é\u0000\ud7ff", [], {}, [1], {"a": 1}, *RAW]
LISTS = [[], [1], [1] * 1000, ["a", "b", "c"], [-1, -1, -1], [0, 0, 0], [1.5, 2, 3], [[1], [2], [3]],
         [None, None, None], ["__HUGE__", 1, 1], [1, "__NAN__", 1], "3x8x8", "x", "1,2,3,4,5"]
WEIRD_IDS = ["x", "0" * 64, "g" * 64, "../" * 10 + "etc/passwd", "%2e%2e%2f", "a" * 5000, "ü", " ", "null"]


def raw_json(value) -> str:
    """JSON text with the placeholders above written as raw literals (json.dumps cannot)."""
    text = json.dumps(value)
    for key, literal in RAW.items():
        text = text.replace(json.dumps(key), literal)
    return text


@pytest.fixture
def fuzz_app(tmp_path, extra_methods):
    app = create_app({"INSTANCE_PATH": str(tmp_path / "instance"), "BUILTIN_MODELS": False,
                      "MODELS_CONFIG": TINY_CONFIG, "DEVICE": "cpu", "INLINE_MAX_PASSES": 5,
                      "MAX_PASSES": 5000, "MAX_CONTENT_LENGTH": 200_000, "MAX_IMAGE_PIXELS": 250_000,
                      "RATE_LIMIT_PER_MIN": 10 ** 9, "MAX_JOBS_PER_CLIENT": 10 ** 6, "MAX_QUEUED_JOBS": 10 ** 6,
                      "INLINE_TIMEOUT_S": 60})
    # A read records an item's last use once a minute (Store.TOUCH_EVERY): in a fuzz run longer than
    # that, a refused request that reads the image would write that row, which is not its doing.
    app.extensions["insights"].store.TOUCH_EVERY = float("inf")
    yield app
    app.extensions["insights"].jobs.shutdown()


class Fuzzer:
    """Sends requests, checks each answer, and counts them."""

    def __init__(self, app):
        self.app, self.client, self.count, self.statuses = app, app.test_client(), 0, {}

    def send(self, method: str, path: str, body: str | None = None, **kw):
        before = snapshot(self.app.instance_path)
        r = self.client.open(path, method=method, data=body,
                             content_type="application/json" if body is not None else None, **kw)
        self.count += 1
        self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
        where = f"{method} {path} {(body or '')[:200]}"
        assert r.status_code < 500, (where, r.status_code, r.get_data(as_text=True)[:300])
        if r.status_code >= 400:
            if path.startswith("/api"):
                err = r.get_json(silent=True)
                assert isinstance(err, dict) and set(err["error"]) == {"code", "message", "field"}, (where, err)
                assert err["error"]["code"] and err["error"]["message"], where
                assert len(err["error"]["message"]) < 1000, where  # no echo of a huge input
            assert snapshot(self.app.instance_path) == before, where  # a refusal writes nothing
        if r.status_code == 202:  # accepted work finishes before the next request's snapshot
            wait_job(self.client, r.get_json()["job"]["id"], timeout=120)
        return r


def test_every_parameter_of_every_method_survives_hostile_values(fuzz_app):
    f = Fuzzer(fuzz_app)
    image = upload(f.client, png((40, 40))).json["id"]
    methods = f.send("GET", "/api/methods?model=tiny").json["methods"]
    for m in methods:
        for param in m["params"]:
            values = LISTS + SCALARS if param["type"] == "int_list" else SCALARS
            for value in values:
                body = {"model": "tiny", "image": image, "method": m["id"], "target": 1,
                        "params": {param["name"]: value}}
                f.send("POST", "/api/explain", raw_json(body))
    print(f"fuzz of method parameters: {f.count} requests, answers {sorted(f.statuses.items())}")
    assert f.count > 1200
    assert f.statuses.get(400, 0) > 1000  # most are refused, each with its message


def test_every_parameter_of_every_metric_survives_hostile_values(fuzz_app):
    f = Fuzzer(fuzz_app)
    image = upload(f.client, png((40, 40))).json["id"]
    rid = f.send("POST", "/api/explain", raw_json({"model": "tiny", "image": image, "method": "saliency",
                                                   "target": 1})).json["result"]["id"]
    metrics = f.send("GET", "/api/metrics?model=tiny").json["metrics"]
    for m in metrics:
        for param in m["params"]:
            values = LISTS + SCALARS if param["type"] == "int_list" else SCALARS
            for value in values:
                f.send("POST", f"/api/results/{rid}/quality",
                       raw_json({"metric": m["id"], "params": {param["name"]: value}}))
    for value in SCALARS + WEIRD_IDS:
        f.send("POST", f"/api/results/{rid}/quality", raw_json({"metric": value}))
        f.send("POST", f"/api/results/{rid}/quality", raw_json({"metric": "deletion", "params": value}))
    for weird in WEIRD_IDS:
        f.send("GET", f"/api/results/{weird}/quality")
        f.send("POST", f"/api/results/{weird}/quality", raw_json({"metric": "deletion"}))
    print(f"fuzz of metric parameters: {f.count} requests, answers {sorted(f.statuses.items())}")
    assert f.statuses.get(400, 0) > 200 and f.statuses.get(404, 0) >= len(WEIRD_IDS)


def test_every_field_of_every_endpoint_survives_hostile_values(fuzz_app):
    f = Fuzzer(fuzz_app)
    image = upload(f.client, png((40, 40))).json["id"]
    for value in SCALARS + WEIRD_IDS:
        for field in ("model", "image", "method", "target", "params", "top_k"):
            base = {"model": "tiny", "image": image, "method": "saliency", "target": 1}
            f.send("POST", "/api/explain", raw_json({**base, field: value}))
            f.send("POST", "/api/predict", raw_json({"model": "tiny", "image": image, field: value}))
    for text in ["", "null", "[]", "1", '"x"', "{", '{"a":', "\ufeff{}", "{}" * 1000, '{"image": NaN}',
                 '{"model": "tiny", "image": "%s", "top_k": 1e400}' % image]:
        f.send("POST", "/api/predict", text)
        f.send("POST", "/api/explain", text)
    job_answer = f.send("POST", "/api/explain", raw_json({"model": "tiny", "image": image, "method": "slow_test",
                                                          "target": 1, "params": {"steps": 30, "delay": 0.0}}))
    rid = wait_job(f.client, job_answer.json["job"]["id"])["result_id"]
    for weird in WEIRD_IDS:
        for path in (f"/api/jobs/{weird}", f"/api/jobs/{weird}/events", f"/api/results/{weird}",
                     f"/api/results/{weird}/map.png", f"/api/results/{weird}/input.png",
                     f"/api/results/{weird}/attribution.npy", f"/api/results/{weird}/overlay.png",
                     f"/api/images/{weird}", f"/api/colormaps/{weird}.png", f"/api/models/{weird}/labels",
                     f"/api/methods?model={weird}", f"/r/{weird}"):
            f.send("GET", path)
        f.send("DELETE", f"/api/jobs/{weird}")
        f.send("POST", f"/api/samples/{weird}")
    for value in ["", "x", "-1", "0", "1e400", "NaN", "inf", "9" * 5000, "1001"]:
        f.send("GET", f"/api/models/tiny/labels?limit={value}")
        f.send("GET", f"/api/models/tiny/labels?q={value}")
        for key in ("mode", "sign", "cmap", "alpha", "outlier"):
            f.send("GET", f"/api/results/{rid}/overlay.png?{key}={value}")
    for method in ("PUT", "PATCH", "DELETE"):
        f.send(method, "/api/predict", "{}")
    print(f"fuzz of endpoints: {f.count} requests, answers {sorted(f.statuses.items())}")
    assert f.count > 600
    assert os.path.isdir(fuzz_app.instance_path)
