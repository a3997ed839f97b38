"""The JSON API through Flask's test client: every endpoint, every bad input, caching and jobs."""
from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from appkit import (ENGINE, TINY_CONFIG, app, client, extra_methods, image_id, png, snapshot,  # noqa: F401
                    upload, wait_job)


def error_of(r, status: int, code: str, field=None, words: str = "") -> dict:
    assert r.status_code == status, r.data[:300]
    assert r.is_json
    err = r.json["error"]
    assert err["code"] == code, err
    assert err["field"] == field, err
    assert words.lower() in err["message"].lower(), err
    return err


# --------------------------------------------------------------------------- discovery


def test_index_lists_limits_and_endpoints(client):
    r = client.get("/api")
    assert r.status_code == 200
    assert r.json["limits"]["INLINE_MAX_PASSES"] == 5
    assert r.json["limits"]["MAX_CONTENT_LENGTH"] == 200_000
    assert r.json["endpoints"]["explain"] == "/api/explain"


def test_models_lists_availability_without_loading(client, app):
    models = {m["name"]: m for m in client.get("/api/models").json["models"]}
    assert list(models) == ["tiny", "broken", "missing"]
    assert models["tiny"]["available"] and models["tiny"]["default"]
    assert models["tiny"]["input_size"] == [3, 32, 32] and models["tiny"]["num_classes"] == 5
    assert models["tiny"]["cam_layer"] == "features.2"
    assert models["missing"]["available"] is False
    assert "missing.pt" in models["missing"]["reason"]
    assert not any(m["loaded"] for m in models.values())
    assert app.extensions["insights"].models.loaded() == []


def test_methods_come_from_the_engine_registry(client):
    listed = [m["id"] for m in client.get("/api/methods").json["methods"]]
    assert listed == ENGINE.methods()
    assert {"saliency", "input_x_gradient", "fixed_map_test"} <= set(listed)
    sal = next(m for m in client.get("/api/methods").json["methods"] if m["id"] == "saliency")
    assert sal == ENGINE.method_info("saliency")


@pytest.mark.parametrize("query", ["an", "", "ERRY", "zzz"])
def test_label_search(client, query):
    r = client.get(f"/api/models/tiny/labels?q={query}")
    assert r.status_code == 200
    got = [(h["index"], h["label"]) for h in r.json["results"]]
    labels = ["apple", "banana", "cherry", "date", "elderberry"]
    assert got == [(i, lab) for i, lab in enumerate(labels) if query.lower() in lab]
    assert r.json["total"] == len(got)


def test_label_search_limit_and_errors(client):
    assert len(client.get("/api/models/tiny/labels?limit=2").json["results"]) == 2
    error_of(client.get("/api/models/tiny/labels?limit=0"), 400, "bad_param", "limit", "between 1 and 1000")
    error_of(client.get("/api/models/nope/labels"), 400, "unknown_model", "model", "'nope'")


def test_unknown_api_path_answers_json_404(client):
    error_of(client.get("/api/nothing-here"), 404, "not_found")
    r = client.put("/api/models")
    assert r.status_code == 405 and r.json["error"]["code"] == "bad_request"


# --------------------------------------------------------------------------- images


def test_upload_answers_content_id_and_stores_png(client, app):
    data = png()
    r = upload(client, data)
    assert r.status_code == 201
    assert (r.json["width"], r.json["height"]) == (48, 40)
    again = upload(client, png(fmt="BMP"), "same.bmp")  # same pixels, other format: same id
    assert again.json["id"] == r.json["id"]
    got = client.get(r.json["url"])
    assert got.status_code == 200 and got.mimetype == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(got.data))), np.asarray(Image.open(io.BytesIO(data))))


def _truncated() -> bytes:
    return png(size=(200, 200))[:300]


BAD_UPLOADS = [
    ("empty", lambda: b"", "x.png", 400, "bad_image", "empty"),
    ("not an image", lambda: b"hello, this is text" * 10, "x.png", 400, "bad_image", "not an image"),
    ("truncated", _truncated, "x.png", 400, "bad_image", "truncated"),
    ("wrong extension", lambda: png(fmt="PNG"), "x.jpg", 400, "bad_image", "does not match"),
    ("unsupported extension", lambda: png(), "x.exe", 400, "bad_image", "unsupported file extension"),
    ("over pixel limit", lambda: png(size=(600, 500)), "x.png", 413, "too_large", "MAX_IMAGE_PIXELS"),
    ("over byte limit", lambda: b"\x89PNG" + bytes(250_000), "x.png", 413, "too_large", "MAX_CONTENT_LENGTH"),
]


@pytest.mark.parametrize("case, make, name, status, code, words", BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS])
def test_bad_upload_is_refused_and_nothing_written(client, app, case, make, name, status, code, words):
    before = snapshot(app.instance_path)
    r = upload(client, make(), name)
    error_of(r, status, code, "image", words)
    assert snapshot(app.instance_path) == before


def test_upload_without_field(client):
    error_of(client.post("/api/images", data={}, content_type="multipart/form-data"), 400, "bad_request", "image",
             "field 'image'")


def test_samples_list_and_store(client):
    names = [s["name"] for s in client.get("/api/samples").json["samples"]]
    assert names[:2] == ["chelsea", "coffee"]
    r = client.post("/api/samples/coffee")
    assert r.status_code == 201 and (r.json["width"], r.json["height"]) == (600, 400)
    error_of(client.post("/api/samples/nope"), 404, "not_found", "name", "'nope'")


def test_image_etag_and_304(client, image_id):
    r = client.get(f"/api/images/{image_id}")
    assert r.headers["ETag"] == f'"{image_id}"'
    assert "immutable" in r.headers["Cache-Control"] and "max-age=31536000" in r.headers["Cache-Control"]
    again = client.get(f"/api/images/{image_id}", headers={"If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304 and again.data == b""
    error_of(client.get("/api/images/" + "0" * 64), 404, "not_found", "image")
    error_of(client.get("/api/images/../../etc/passwd"), 404, "not_found")


# --------------------------------------------------------------------------- predict


def test_predict_top_k(client, app, image_id):
    r = client.post("/api/predict", json={"model": "tiny", "image": image_id, "top_k": 3})
    assert r.status_code == 200
    preds = r.json["predictions"]
    assert len(preds) == 3 and preds[0]["prob"] >= preds[1]["prob"] >= preds[2]["prob"]
    labels = ["apple", "banana", "cherry", "date", "elderberry"]
    assert all(p["label"] == labels[p["index"]] for p in preds)
    full = client.post("/api/predict", json={"image": image_id, "top_k": 5}).json["predictions"]
    assert abs(sum(p["prob"] for p in full) - 1) < 1e-5  # default model is tiny; all 5 classes
    assert app.extensions["insights"].models.loaded() == ["tiny"]


def _bad_requests(image_id):
    ok = {"model": "tiny", "image": image_id, "method": "saliency"}
    return [
        ("not json", None, 400, "bad_request", None, "JSON object"),
        ("unknown model", {**ok, "model": "nope"}, 400, "unknown_model", "model", "'nope'"),
        ("unavailable model", {**ok, "model": "missing"}, 503, "model_unavailable", "model", "missing.pt"),
        ("load failure", {**ok, "model": "broken"}, 503, "model_unavailable", "model", "corrupt"),
        ("unknown image", {**ok, "image": "f" * 64}, 404, "not_found", "image", "upload it first"),
        ("image not a string", {**ok, "image": 5}, 400, "bad_request", "image", "id of an uploaded image"),
        ("unknown method", {**ok, "method": "magic"}, 400, "unknown_method", "method", "'magic'"),
        ("target too big", {**ok, "target": 5}, 400, "bad_target", "target", "between 0 and 4"),
        ("target negative", {**ok, "target": -1}, 400, "bad_target", "target", "between 0 and 4"),
        ("target not int", {**ok, "target": "cat"}, 400, "bad_target", "target", "integer"),
        ("target bool", {**ok, "target": True}, 400, "bad_target", "target", "integer"),
        ("param type", {**ok, "params": {"abs": "maybe"}}, 400, "bad_param", "abs", "true or false"),
        ("param unknown", {**ok, "params": {"n_steps": 3}}, 400, "bad_param", "n_steps", "not a parameter"),
        ("param range", {**ok, "params": {"nt_samples": 0, "nt_type": "smoothgrad"}}, 400, "bad_param",
         "nt_samples", "at least 1"),
        ("params not object", {**ok, "params": [1]}, 400, "bad_param", "params", "JSON object"),
        ("over budget", {**ok, "method": "slow_test", "params": {"steps": 6000}}, 400, "over_budget", "params",
         "MAX_PASSES"),
    ]


CASES = [c[0] for c in _bad_requests("x")]


@pytest.mark.parametrize("case", CASES)
def test_bad_explain_request_is_refused_and_nothing_written(client, app, image_id, case):
    _name, payload, status, code, field, words = next(c for c in _bad_requests(image_id) if c[0] == case)
    before = snapshot(app.instance_path)
    if payload is None:
        r = client.post("/api/explain", data="{nope", content_type="application/json")
    else:
        r = client.post("/api/explain", json=payload)
    error_of(r, status, code, field, words)
    assert snapshot(app.instance_path) == before


def test_failed_load_marks_model_unavailable(client):
    client.post("/api/explain", json={"model": "broken", "image": "0" * 64, "method": "saliency"})
    models = {m["name"]: m for m in client.get("/api/models").json["models"]}
    assert models["broken"]["available"] is True  # never tried: unknown image was refused first
    img = upload(client, png()).json["id"]
    client.post("/api/predict", json={"model": "broken", "image": img})
    models = {m["name"]: m for m in client.get("/api/models").json["models"]}
    assert models["broken"]["available"] is False
    assert "RuntimeError: weights file is corrupt" in models["broken"]["reason"]


def test_predict_bad_top_k(client, image_id):
    error_of(client.post("/api/predict", json={"image": image_id, "top_k": 6}), 400, "bad_param", "top_k",
             "between 1 and 5")


def test_tensor_param_is_refused_from_json(client, image_id):
    r = client.post("/api/explain", json={"image": image_id, "method": "feature_ablation",
                                          "params": {"feature_mask": [[1]]}})
    error_of(r, 400, "bad_param", "feature_mask", "only settable from Python")


# --------------------------------------------------------------------------- explain


def test_explain_inline_saliency_and_result_files(client, image_id):
    r = client.post("/api/explain", json={"model": "tiny", "image": image_id, "method": "saliency", "target": 2})
    assert r.status_code == 200 and r.json["status"] == "done" and r.json["cached"] is False
    meta = r.json["result"]
    assert meta["target"] == 2 and meta["target_label"] == "cherry"
    assert meta["params"] == {"abs": True, "nt_type": "none", "nt_samples": 10, "stdevs": 0.3, "seed": 0}
    assert meta["signed"] is False and meta["encoding"]["zero"] == 0 and meta["size"] == [32, 32]
    rid = meta["id"]
    assert client.get(f"/api/results/{rid}").json == meta
    npy = np.load(io.BytesIO(client.get(meta["links"]["npy"]).data), allow_pickle=False)
    assert npy.shape == (1, 3, 32, 32) and npy.dtype == np.float32
    summed = npy[0].sum(0)
    assert meta["encoding"]["scale"] == pytest.approx(float(summed.max()), rel=1e-3)  # stored as float16
    m = np.asarray(Image.open(io.BytesIO(client.get(meta["links"]["map"]).data)))
    assert m.shape == (32, 32) and m.dtype == np.uint8
    assert np.abs(m / 255 * meta["encoding"]["scale"] - summed).max() <= meta["encoding"]["scale"] / 255
    view = Image.open(io.BytesIO(client.get(meta["links"]["input"]).data))
    assert view.size == (32, 32) and view.mode == "RGB"


def test_explain_without_target_uses_top_prediction(client, image_id):
    top = client.post("/api/predict", json={"image": image_id, "top_k": 1}).json["predictions"][0]["index"]
    meta = client.post("/api/explain", json={"image": image_id, "method": "input_x_gradient"}).json["result"]
    assert meta["target"] == top and meta["signed"] is True and meta["encoding"]["zero"] == 128


def test_identical_request_is_served_from_the_store(client, image_id, monkeypatch):
    calls = []
    original = ENGINE.attribute

    def counting(*a, **k):
        calls.append(a[2])
        return original(*a, **k)

    monkeypatch.setattr(ENGINE, "attribute", counting)
    first = client.post("/api/explain", json={"image": image_id, "method": "saliency", "target": 1,
                                              "params": {"abs": True}})
    # The same request spelt differently: defaults explicit, params in another order.
    second = client.post("/api/explain", json={"image": image_id, "method": "saliency", "target": 1,
                                               "params": {"seed": 0, "abs": "true", "nt_type": "none"}})
    assert first.json["cached"] is False and second.json["cached"] is True
    assert first.json["result"] == second.json["result"]
    assert calls == ["saliency"]
    third = client.post("/api/explain", json={"image": image_id, "method": "saliency", "target": 0})
    assert third.json["result"]["id"] != first.json["result"]["id"] and calls == ["saliency", "saliency"]


def test_grad_cam_uses_the_models_cam_layer(client, image_id):
    meta = client.post("/api/explain", json={"image": image_id, "method": "grad_cam", "target": 0}).json["result"]
    assert meta["layer"] == "features.2" and meta["params"]["layer"] == "features.2"
    assert meta["output"] == "cam" and meta["shape"] == [1, 1, 32, 32]
    r = client.post("/api/explain", json={"image": image_id, "method": "grad_cam", "target": 0,
                                          "params": {"layer": "nope"}})
    error_of(r, 400, "bad_param", "layer", "no module named 'nope'")


# --------------------------------------------------------------------------- overlays and caching


@pytest.fixture
def fixed_result(client, image_id) -> dict:
    r = client.post("/api/explain", json={"image": image_id, "method": "fixed_map_test", "target": 0,
                                          "params": {"value": 2.0}})
    assert r.status_code == 200, r.json
    return r.json["result"]


def test_map_png_encodes_the_known_map(client, fixed_result):
    assert fixed_result["encoding"] == {"zero": 0, "scale": 6.0}  # 3 channels × 2.0
    m = np.asarray(Image.open(io.BytesIO(client.get(fixed_result["links"]["map"]).data)))
    assert (m[:, :16] == 255).all() and (m[:, 16:] == 0).all()


@pytest.mark.parametrize("query, left, right", [
    ("mode=heat_map&sign=absolute_value&cmap=Blues", (8, 48, 107), (247, 251, 255)),  # Blues: 1 → dark
    ("mode=heat_map&sign=positive&cmap=gray", (255, 255, 255), (0, 0, 0)),
    ("mode=masked_image&sign=positive", None, (0, 0, 0)),  # right half masked out
    ("mode=alpha_scaling&sign=absolute_value", None, (255, 255, 255)),  # transparent over white
])
def test_overlay_is_hot_where_the_map_is_high(client, fixed_result, query, left, right):
    r = client.get(fixed_result["links"]["overlay"] + "?" + query)
    assert r.status_code == 200 and r.mimetype == "image/png"
    px = np.asarray(Image.open(io.BytesIO(r.data)).convert("RGB")).astype(int)
    view = np.asarray(Image.open(io.BytesIO(client.get(fixed_result["links"]["input"]).data))).astype(int)
    assert px.shape == (32, 32, 3)
    if left is None:  # the image shows through unchanged where the map is at its maximum
        assert np.abs(px[:, :16] - view[:, :16]).max() <= 1
    else:
        assert np.abs(px[:, :16] - left).max() <= 1
    assert np.abs(px[:, 16:] - right).max() <= 1


def test_blended_overlay_mixes_grey_image_and_heat(client, fixed_result):
    px = np.asarray(Image.open(io.BytesIO(client.get(
        fixed_result["links"]["overlay"] + "?mode=blended_heat_map&sign=positive&cmap=gray&alpha=1").data))).astype(int)
    assert (px[:, :16] == 255).all() and (px[:, 16:] == 0).all()
    half = np.asarray(Image.open(io.BytesIO(client.get(
        fixed_result["links"]["overlay"] + "?sign=positive&cmap=gray&alpha=0").data))).astype(int)
    view = np.asarray(Image.open(io.BytesIO(client.get(fixed_result["links"]["input"]).data))).astype(float)
    assert np.abs(half[..., 0] - np.round(view.mean(axis=2))).max() <= 1


@pytest.mark.parametrize("query, field, words", [
    ("mode=sketch", "mode", "one of"),
    ("sign=up", "sign", "one of"),
    ("cmap=NoSuchMap", "cmap", "unknown matplotlib colormap"),
    ("alpha=2", "alpha", "between 0.0 and 1.0"),
    ("alpha=x", "alpha", "must be a number"),
    ("outlier=60", "outlier", "between 0.0 and 50.0"),
])
def test_overlay_bad_options(client, fixed_result, query, field, words):
    error_of(client.get(fixed_result["links"]["overlay"] + "?" + query), 400, "bad_param", field, words)


@pytest.mark.parametrize("mode", ["masked_image", "alpha_scaling"])
def test_magnitude_modes_with_sign_all_show_the_magnitude(client, fixed_result, mode):
    url = fixed_result["links"]["overlay"] + f"?mode={mode}"
    every, magnitude = client.get(url + "&sign=all"), client.get(url + "&sign=absolute_value")
    assert every.status_code == 200 and every.mimetype == "image/png"
    assert every.data == magnitude.data  # the page draws |v| for these modes too


@pytest.mark.parametrize("link", ["input", "map", "overlay", "npy"])
def test_result_resources_are_revalidated_with_etag(client, fixed_result, link):
    """Share links can be deleted: caches keep them but ask again (304) on every use."""
    url = fixed_result["links"][link]
    r = client.get(url)
    assert r.status_code == 200 and r.headers["ETag"]
    assert set(r.headers["Cache-Control"].split(", ")) == {"public", "no-cache"}
    again = client.get(url, headers={"If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304 and again.data == b""
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200


def test_overlay_etag_depends_on_options(client, fixed_result):
    url = fixed_result["links"]["overlay"]
    assert client.get(url + "?alpha=0.2").headers["ETag"] != client.get(url + "?alpha=0.3").headers["ETag"]


def test_overlay_etag_changes_with_the_overlay_rules_and_matplotlib(client, fixed_result, monkeypatch):
    from insights import overlay

    url = fixed_result["links"]["overlay"]
    before = client.get(url).headers["ETag"]
    overlay.fingerprint.cache_clear()
    monkeypatch.setattr(overlay, "VERSION", overlay.VERSION + 1)
    try:
        after = client.get(url, headers={"If-None-Match": before})
        assert after.status_code == 200 and after.headers["ETag"] != before
    finally:
        overlay.fingerprint.cache_clear()


def test_unknown_result_is_404(client):
    for suffix in ("", "/map.png", "/overlay.png", "/attribution.npy", "/input.png"):
        error_of(client.get("/api/results/" + "a" * 64 + suffix), 404, "not_found", "result")


def test_json_is_compressed_and_binaries_are_not(client, fixed_result):
    r = client.get("/api/methods", headers={"Accept-Encoding": "gzip"})
    assert r.headers["Content-Encoding"] == "gzip"
    assert json.loads(__import__("gzip").decompress(r.data))["methods"]
    for link in ("map", "npy", "overlay"):
        r = client.get(fixed_result["links"][link], headers={"Accept-Encoding": "gzip, br"})
        assert "Content-Encoding" not in r.headers


# --------------------------------------------------------------------------- jobs


def test_costly_explain_runs_as_a_job_with_progress(client, image_id):
    r = client.post("/api/explain", json={"image": image_id, "method": "slow_test", "target": 0,
                                          "params": {"steps": 30, "delay": 0.01}})
    assert r.status_code == 202 and r.json["status"] == "queued"
    job = r.json["job"]
    assert r.headers["Location"] == f"/api/jobs/{job['id']}"
    seen = []
    deadline = time.time() + 20
    while time.time() < deadline:
        state = client.get(f"/api/jobs/{job['id']}").json
        seen.append(state["done"])
        if state["status"] == "done":
            break
        time.sleep(0.01)
    assert state["status"] == "done" and state["total"] == 30 and state["done"] == 30
    assert seen == sorted(seen) and len(set(seen)) > 2  # progress grew step by step
    meta = client.get(f"/api/results/{state['result_id']}").json
    assert meta["method"] == "slow_test" and meta["params"] == {"steps": 30, "delay": 0.01}
    again = client.post("/api/explain", json={"image": image_id, "method": "slow_test", "target": 0,
                                              "params": {"steps": 30, "delay": 0.01}})
    assert again.status_code == 200 and again.json["cached"] is True


def test_identical_costly_requests_share_one_job(client, image_id):
    payload = {"image": image_id, "method": "slow_test", "target": 0, "params": {"steps": 40, "delay": 0.01}}
    a = client.post("/api/explain", json=payload).json["job"]
    b = client.post("/api/explain", json=payload).json["job"]
    assert a["id"] == b["id"] and a["cancel_token"] != b["cancel_token"]  # one job, a token per submitter
    for job in (a, b):
        client.delete(f"/api/jobs/{job['id']}", headers={"X-Cancel-Token": job["cancel_token"]})


def test_cancel_a_running_job(client, app, image_id):
    r = client.post("/api/explain", json={"image": image_id, "method": "slow_test", "target": 0,
                                          "params": {"steps": 500, "delay": 0.01}})
    job_id = r.json["job"]["id"]
    deadline = time.time() + 10
    while client.get(f"/api/jobs/{job_id}").json["done"] < 3 and time.time() < deadline:
        time.sleep(0.01)
    answer = client.delete(f"/api/jobs/{job_id}", headers={"X-Cancel-Token": r.json["job"]["cancel_token"]})
    assert answer.status_code == 200
    final = wait_job(client, job_id)
    assert final["status"] == "cancelled" and final["done"] < 500 and final["result_id"] is None
    assert not [p for p in snapshot(app.instance_path) if p.startswith("results/")]


def test_job_errors_and_unknown_job(client, image_id):
    error_of(client.get("/api/jobs/nope"), 404, "not_found", "job")
    error_of(client.delete("/api/jobs/nope"), 404, "not_found", "job")
    error_of(client.get("/api/jobs/nope/events"), 404, "not_found", "job")


def test_job_events_stream_until_done(client, image_id):
    r = client.post("/api/explain", json={"image": image_id, "method": "slow_test", "target": 1,
                                          "params": {"steps": 10, "delay": 0.02}})
    stream = client.get(f"/api/jobs/{r.json['job']['id']}/events")
    assert stream.mimetype == "text/event-stream" and "Content-Encoding" not in stream.headers
    events = [json.loads(line[6:]) for line in stream.get_data(as_text=True).splitlines()
              if line.startswith("data: ")]
    assert events[-1]["status"] == "done" and events[-1]["done"] == 10
    done = [e["done"] for e in events]
    assert done == sorted(done) and len(events) >= 3


def test_model_work_never_overlaps(app, client, image_id, monkeypatch):
    """Inline requests from several threads run one at a time on the worker."""
    active, peak = [0], [0]
    lock = threading.Lock()
    original = ENGINE.attribute

    def tracking(*a, **k):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02)
        try:
            return original(*a, **k)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(ENGINE, "attribute", tracking)
    codes = []

    def call(target):  # four clients
        codes.append(client.post("/api/explain", json={"image": image_id, "method": "saliency", "target": target},
                                 environ_base={"REMOTE_ADDR": f"10.0.0.{target + 1}"}).status_code)

    threads = [threading.Thread(target=call, args=(t,)) for t in range(4)]  # MAX_INLINE_WAITS may wait
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 4 and peak[0] == 1
    kept = list(app.extensions["insights"].jobs._jobs.values())
    # No tensors held: a kept job has let its task go and keeps only the result's id.
    assert len(kept) >= 4 and all(j.work is None and (j.result is None or isinstance(j.result, str)) for j in kept)


# --------------------------------------------------------------------------- app factory


def test_settings_from_the_environment(tmp_path, monkeypatch):
    from insights import create_app

    monkeypatch.setenv("INSIGHTS_MAX_PASSES", "7")
    monkeypatch.setenv("INSIGHTS_ALLOW_DOWNLOAD", "true")
    monkeypatch.setenv("INSIGHTS_DEVICE", "cpu")
    app = create_app({"INSTANCE_PATH": str(tmp_path), "BUILTIN_MODELS": False, "MODELS_CONFIG": TINY_CONFIG,
                      "INLINE_MAX_PASSES": 3})
    assert app.config["MAX_PASSES"] == 7 and app.config["ALLOW_DOWNLOAD"] is True
    assert app.config["INLINE_MAX_PASSES"] == 3  # the factory's config wins over the environment
    assert app.extensions["insights"].models.allow_download is True


def test_fast_path_settings_reach_the_engine(tmp_path, monkeypatch, extra_methods):
    from insights import create_app
    from insights.engine import EngineOptions

    monkeypatch.setenv("INSIGHTS_CPU_SLICES", "0")
    app = create_app({"INSTANCE_PATH": str(tmp_path), "BUILTIN_MODELS": False, "MODELS_CONFIG": TINY_CONFIG,
                      "DEVICE": "cpu", "TWIN": False, "MEMORY_BUDGET": 12345})
    seen = []
    original = ENGINE.attribute

    def recording(*a, **k):
        seen.append((k["options"], k["memory_budget"]))
        return original(*a, **k)

    monkeypatch.setattr(ENGINE, "attribute", recording)
    try:
        client = app.test_client()
        iid = upload(client, png()).json["id"]
        r = client.post("/api/explain", json={"image": iid, "method": "saliency", "target": 0})
        assert r.status_code == 200, r.json
    finally:
        app.extensions["insights"].jobs.shutdown()
    assert seen == [(EngineOptions(twin=False, cuda_graphs=True, cuda_fused=True, cpu_slices=False), 12345)]


@pytest.mark.parametrize("raw, on", [("off", False), ("No", False), ("0", False), ("false", False),
                                     ("on", True), ("yes", True), ("1", True)])
def test_fast_path_switches_read_from_the_environment(tmp_path, monkeypatch, raw, on):
    from insights import create_app

    monkeypatch.setenv("INSIGHTS_CPU_SLICES", raw)
    app = create_app({"INSTANCE_PATH": str(tmp_path), "BUILTIN_MODELS": False, "MODELS_CONFIG": TINY_CONFIG})
    assert app.config["CPU_SLICES"] is on
    assert app.extensions["insights"].engine_settings()["options"].cpu_slices is on


def test_a_switch_that_is_not_on_or_off_is_refused_at_start(tmp_path, monkeypatch):
    from insights import create_app

    monkeypatch.setenv("INSIGHTS_TWIN", "maybe")
    with pytest.raises(ValueError, match="setting TWIN must be true or false, got 'maybe'"):
        create_app({"INSTANCE_PATH": str(tmp_path), "BUILTIN_MODELS": False, "MODELS_CONFIG": TINY_CONFIG})


def test_labels_of_an_unknown_model_name_the_model_before_the_limit(client):
    error_of(client.get("/api/models/nope/labels?limit=0"), 400, "unknown_model", "model", "'nope'")


def test_services_and_pages_are_attached(app, client):
    services = app.extensions["insights"]
    assert services.store is app.extensions["insights.store"] and services.models.default == "tiny"
    assert app.static_folder.endswith("static") and app.template_folder.endswith("templates")
    assert "pages" in app.blueprints
    assert client.get("/").status_code == 200


# --------------------------------------------------------------------------- documentation


def test_every_setting_and_endpoint_is_documented(app):
    import os
    import re

    from insights.app import DEFAULTS

    doc = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "api.md"), encoding="utf-8").read()
    settings = doc.split("## Settings", 1)[1]
    missing = [k for k in DEFAULTS if f"`{k}`" not in settings]
    assert missing == [], f"settings missing from docs/api.md: {missing}"
    documented = {re.sub(r"<[^>]+>", "<>", p) for p in re.findall(r"(/api[^\s`?|]*)", doc)}
    routes = {re.sub(r"<[^>]+>", "<>", r.rule) for r in app.url_map.iter_rules() if r.rule.startswith("/api")}
    assert routes - documented == set()


def test_concurrent_explanations_batch_and_equal_one_at_a_time(app):
    """Saliency requests on different images arriving together run as one batch (the dynamic
    batcher), and each map equals the one computed for that image alone."""
    client = app.test_client()
    ids = [upload(client, png(color=(30 * i, 200 - 20 * i, 90))).json["id"] for i in range(4)]
    jobs = app.extensions["insights"].jobs
    gate, busy = threading.Event(), threading.Event()
    jobs.submit(lambda job: (busy.set(), gate.wait(10)))  # hold the worker so requests queue up
    assert busy.wait(5)
    answers = {}

    def ask(i):
        answers[i] = app.test_client().post("/api/explain", json={
            "model": "tiny", "image": ids[i], "method": "saliency", "target": i, "params": {"abs": False}})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.time() + 5
    while time.time() < deadline and sum(1 for j in list(jobs._jobs.values()) if j.status == "queued") < 4:
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(20)
    results = [answers[i].json["result"] for i in range(4)]
    assert all(answers[i].status_code == 200 for i in range(4))
    assert [r["batch_size"] for r in results] == [4, 4, 4, 4]
    batched = [np.load(io.BytesIO(client.get(r["links"]["npy"]).data)) for r in results]

    store = app.extensions["insights"].store
    assert [store.result(r["id"])["target"] for r in results] == [0, 1, 2, 3]
    # Each image alone through the engine gives the same map as its row of the batch.
    model = app.extensions["insights"].models.get("tiny")
    spec = app.extensions["insights"].models.spec("tiny")
    from insights import attribute, imaging
    for i in range(4):
        x, _view = imaging.preprocess(store.load_image(ids[i]), spec.preprocessing)
        solo = attribute(model, x, "saliency", i, abs=False).numpy()
        # rtol: the .npy is made from the stored float16 copy (docs/api.md, Results)
        assert np.allclose(batched[i], solo, rtol=1e-3, atol=1e-6 * np.abs(solo).max())
        assert np.abs(solo).max() > 0


def test_a_cost_that_follows_a_layer_counts_once_the_model_is_loaded(app, client, image_id, monkeypatch):
    """A method whose passes are a layer's channel count (the way Score-CAM costs): the budget
    check counts them when the model is in memory, and the result states the engine's count."""
    import torch

    from insights.engine import registry
    from insights.engine.method import Method
    from insights.engine.params import Cost, Param

    class PerChannel(Method):
        id, label, family = "per_channel_test", "Per channel (test)", "test"
        params = (Param("layer", "string", None, "Layer."),)

        def cost(self, p, facts):
            shape = facts.layer_shape(p["layer"])
            return Cost(shape[0] if shape else 1, 0)

        def run(self, ctx, p):
            ctx.advance(ctx.inputs.shape[0])
            return torch.zeros_like(ctx.inputs)

    monkeypatch.setitem(registry._methods, PerChannel.id, PerChannel())
    ask = {"image": image_id, "method": PerChannel.id, "target": 0, "params": {"layer": "features.2"}}
    app.config["MAX_PASSES"] = 7
    first = client.post("/api/explain", json=ask)  # the model is not loaded yet: 1 pass is assumed
    assert first.status_code == 200 and first.json["result"]["cost"] == {"forward": 8, "backward": 0}
    ask["target"] = 1  # not stored yet; now the model is in memory and its 8 channels count
    error_of(client.post("/api/explain", json=ask), 400, "over_budget", "params", "need 8 forward passes")
    ask["params"] = {"layer": "features.0"}  # 6 channels: within the limit, over INLINE_MAX_PASSES
    queued = client.post("/api/explain", json=ask)
    assert queued.status_code == 202 and queued.json["job"]["total"] == 6
    state = wait_job(client, queued.json["job"]["id"])
    assert client.get(f"/api/results/{state['result_id']}").json["cost"] == {"forward": 6, "backward": 0}


def test_noisy_methods_are_not_batched(app, image_id):
    from insights.tasks import ExplainTask

    service = app.extensions["insights"]
    record = {"id": image_id, "width": 48, "height": 40}
    noisy = ExplainTask(service, "tiny", record, "saliency", {"nt_type": "smoothgrad", "seed": 0}, 0, "r", {})
    shap = ExplainTask(service, "tiny", record, "gradient_shap", {"seed": 0, "n_samples": 5}, 0, "r", {})
    plain = ExplainTask(service, "tiny", record, "saliency", {"nt_type": "none", "seed": 0, "abs": True}, 0, "r", {})
    assert noisy.batch_key is None and shap.batch_key is None
    assert plain.batch_key[:3] == ("explain", "tiny", "saliency")
    # Only tasks submitted for batching carry their key to the runner.
    plain.finish = lambda computed: computed  # keep the computed value (its batch size) as the answer
    job = service.jobs.submit(plain, urgent=True, batch=True)
    assert job.batch_key == plain.batch_key
    assert service.jobs.submit(lambda j: None, batch=True).batch_key is None
    assert job.wait(20) and job.status == "done"
    assert job.result.batch_size == 1  # computed alone


def test_predictions_are_computed_once_per_model_and_image(client, app, image_id, monkeypatch):
    """The scores of an image are kept: predicting again, and explaining it, run no extra forward."""
    other = upload(client, png(color=(10, 200, 40))).json["id"]
    warm = client.post("/api/explain", json={"model": "tiny", "image": other, "method": "saliency", "target": 0})
    assert warm.status_code == 200  # loads the model and probes it (one extra forward, once)
    model = app.extensions["insights"].models.get("tiny")
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        first = client.post("/api/predict", json={"model": "tiny", "image": image_id, "top_k": 3})
        again = client.post("/api/predict", json={"model": "tiny", "image": image_id, "top_k": 2})
        assert calls == [1]
        assert again.json["predictions"] == first.json["predictions"][:2]
        r = client.post("/api/explain", json={"model": "tiny", "image": image_id, "method": "saliency",
                                              "target": 1})
        assert r.status_code == 200
        assert calls == [1, 1]  # the saliency pass only
        assert r.json["result"]["predictions"][:3] == first.json["predictions"]
    finally:
        handle.remove()
