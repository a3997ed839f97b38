"""The datasets API (docs/api.md, "Datasets") on the tiny test model: every answer is checked
against predictions computed here with the model and the same preprocessing. With
INSIGHTS_TEST_BACKEND=celery (tests/test_api_datasets_distributed.py) the same tests run on Celery
workers, Redis and PostgreSQL."""
from __future__ import annotations

import math
import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from appkit import TINY_CONFIG, distributed, distributed_app, extra_methods, wait_job  # noqa: F401
from insights import create_app, dataset_jobs
from insights.datasets import DatasetError

LABELS = ["apple", "banana", "cherry", "date", "elderberry"]
# class folder → colours of its pictures: the tiny random model tells them apart somehow, and the
# expected answers are computed here from the model itself.
FOLDERS = {"apple": [(220, 30, 30), (30, 30, 220), (240, 240, 240)], "banana": [(230, 220, 40), (10, 10, 10)],
           "2": [(120, 20, 90), (20, 200, 120), (90, 90, 90)], "n-o-t-e": []}


def make_folder(root) -> list[tuple[str, int]]:
    """An ImageFolder of coloured pictures with a gradient (classes by name and by index), a
    broken file; answers (key, true index) in item order."""
    items = []
    for folder in sorted(FOLDERS):
        for k, color in enumerate(FOLDERS[folder]):
            path = os.path.join(root, folder, f"{k}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            arr = np.zeros((36, 44, 3), np.uint8)
            arr[:] = color
            arr[:, :22] //= 2
            Image.fromarray(arr).save(path)
    os.makedirs(os.path.join(root, "banana"), exist_ok=True)
    with open(os.path.join(root, "banana", "zz-broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nbroken")
    for folder in sorted(f for f in FOLDERS if FOLDERS[f]):
        names = sorted(os.listdir(os.path.join(root, folder)))
        true = int(folder) if folder.isdigit() else LABELS.index(folder)
        items += [(f"{folder}/{n}", true) for n in names]
    return items


@pytest.fixture
def folder(tmp_path):
    root = str(tmp_path / "fruit")
    return root, make_folder(root)


def build(tmp_path, monkeypatch, request, database: str | None = None, **extra):
    """The app on the dataset folder, and a function that stops it. In distributed mode the
    index is ``database`` (a PostgreSQL URL: an app started again on the same one), else a new
    one, remembered as ``app.config["DATABASE_URL"]``."""
    config = {"INSTANCE_PATH": str(tmp_path / "instance"), "BUILTIN_MODELS": False, "MODELS_CONFIG": TINY_CONFIG,
              "DEVICE": "cpu", "MAX_PASSES": 5000, "SSE_HEARTBEAT_S": 0.2, "DATASETS": [str(tmp_path / "fruit")],
              **extra}
    if not distributed():
        app = create_app(config)
        return app, lambda: (app.extensions["insights"].dataset_work.shutdown(),
                             app.extensions["insights"].jobs.shutdown())
    url = database or request.getfixturevalue("postgres_service").create_database()
    cm = distributed_app(tmp_path, {**config, "DATABASE_URL": url, "BLOB_DIR": config["INSTANCE_PATH"]}, monkeypatch)
    app = cm.__enter__()
    return app, lambda: (app.extensions["insights"].dataset_work.shutdown(), cm.__exit__(None, None, None))


@pytest.fixture
def app(tmp_path, folder, monkeypatch, request, extra_methods):  # noqa: F811
    app, close = build(tmp_path, monkeypatch, request)
    yield app
    close()


@pytest.fixture
def client(app):
    return app.test_client()


def oracle(app, folder) -> dict:
    """Each readable item's (predicted index, top probability, true probability), computed here."""
    root, items = folder
    svc = app.extensions["insights"]
    model, spec = svc.models.get("tiny"), svc.models.spec("tiny")
    out = {}
    for index, (key, true) in enumerate(items):
        if key.endswith("broken.png"):
            continue
        x, _view = spec.prepare(Image.open(os.path.join(root, key)).convert("RGB"))
        with torch.no_grad():
            probs = torch.softmax(model(x).float()[0], 0)
        out[index] = (int(probs.argmax()), float(probs.max()), float(probs[true]))
    return out


def scored(client, name="fruit", timeout=30.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = client.get(f"/api/datasets/{name}/predictions?model=tiny").json
        if state["status"] == "done":
            return state
        if state["status"] == "idle":
            client.get(f"/api/datasets/{name}/items")  # starts them
        time.sleep(0.05)
    raise AssertionError(f"predictions of {name} did not finish: {state}")


def all_items(client, query="") -> list[dict]:
    r = client.get(f"/api/datasets/fruit/items?per_page=200&{query}")
    assert r.status_code == 200, r.json
    return r.json["items"]


def test_the_dataset_is_listed_with_its_classes(client, folder):
    r = client.get("/api/datasets")
    assert r.status_code == 200
    (d,) = r.json["datasets"]
    assert (d["name"], d["kind"], d["size"], d["labelled"]) == ("fruit", "folder", 9, 9)
    assert d["classes"] == [{"index": 0, "label": "apple", "count": 3}, {"index": 1, "label": "banana", "count": 3},
                            {"index": 2, "label": "cherry", "count": 3}]
    assert d["links"]["items"] == "/api/datasets/fruit/items"


def test_items_carry_the_models_predictions(app, client, folder):
    first = client.get("/api/datasets/fruit/items").json
    assert first["predictions"]["tiny"]["status"] in ("running", "done") and first["size"] == 9
    assert scored(client)["done"] == 9
    expected = oracle(app, folder)
    items = all_items(client)
    assert [i["key"] for i in items] == [k for k, _t in folder[1]]
    for item in items:
        entry = item["models"]["tiny"]
        assert item["true"]["index"] == folder[1][item["index"]][1]
        if item["key"].endswith("broken.png"):
            assert "banana/zz-broken.png" in entry["error"] and "not an image" in entry["error"]
            continue
        pred, prob, true_prob = expected[item["index"]]
        assert entry["predicted"] == {"index": pred, "label": LABELS[pred]}
        assert entry["prob"] == pytest.approx(prob, abs=1e-5)
        assert entry["true_prob"] == pytest.approx(true_prob, abs=1e-5)
        assert entry["loss"] == pytest.approx(-math.log(true_prob), rel=1e-2)
        assert entry["correct"] is (pred == item["true"]["index"])
        assert item["thumb"] == f"/api/datasets/fruit/items/{item['index']}/thumb"


def test_filters_sort_and_pages_follow_the_predictions(app, client, folder):
    scored(client)
    expected = oracle(app, folder)
    truth = {i: t for i, (_k, t) in enumerate(folder[1])}
    wrong = sorted(i for i, (p, _q, _t) in expected.items() if p != truth[i])
    right = sorted(i for i, (p, _q, _t) in expected.items() if p == truth[i])
    assert [i["index"] for i in all_items(client, "correct=false")] == wrong
    assert [i["index"] for i in all_items(client, "correct=true")] == right
    assert len(all_items(client, "correct=all")) == 9
    assert [i["index"] for i in all_items(client, "true=banana")] == [6, 7, 8]  # folders: 2, apple, banana
    assert [i["index"] for i in all_items(client, "true=2")] == [0, 1, 2]
    pred = expected[0][0]
    assert [i["index"] for i in all_items(client, f"predicted={LABELS[pred]}")] == \
        sorted(i for i, v in expected.items() if v[0] == pred)
    outside = sorted(i for i, v in expected.items() if v[0] not in (0, 1, 2))  # 3, 4: no item's true class
    assert [i["index"] for i in all_items(client, "predicted=other")] == outside
    mid = sorted(v[1] for v in expected.values())[4]
    assert [i["index"] for i in all_items(client, f"min_prob={mid}")] == sorted(i for i, v in expected.items()
                                                                               if v[1] >= mid - 1e-3)
    by_loss = [i["index"] for i in all_items(client, "sort=-loss")]
    assert by_loss[:8] == sorted(expected, key=lambda i: -expected[i][2])[:8] or \
        [round(expected[i][2], 2) for i in by_loss[:8]] == sorted(round(expected[i][2], 2) for i in expected)
    assert by_loss[-1] == 8  # the broken item (no score) comes last
    by_confidence = [i["index"] for i in all_items(client, "sort=confidence")]
    probs = [expected[i][1] for i in by_confidence[:8]]
    assert probs == sorted(probs, key=lambda p: round(p, 2)) or np.all(np.diff(probs) >= -2e-3)
    page = client.get("/api/datasets/fruit/items?per_page=4&page=3").json
    assert (page["total"], page["pages"], page["page"], [i["index"] for i in page["items"]]) == (9, 3, 3, [8])


def test_the_summary_has_accuracy_counts_and_a_confusion_matrix(app, client, folder):
    scored(client)
    expected = oracle(app, folder)
    truth = {i: t for i, (_k, t) in enumerate(folder[1])}
    s = client.get("/api/datasets/fruit/summary").json
    m = s["models"]["tiny"]
    right = sum(1 for i, v in expected.items() if v[0] == truth[i])
    assert (m["scored"], m["failed"], m["evaluated"], m["correct"]) == (8, 1, 8, right)
    assert m["accuracy"] == pytest.approx(right / 8)
    assert [c["label"] for c in m["confusion"]["classes"]] == ["apple", "banana", "cherry"]
    matrix = np.zeros((3, 4), int)
    for i, (pred, _p, _t) in expected.items():
        matrix[truth[i], pred if pred < 3 else 3] += 1
    assert m["confusion"]["matrix"] == matrix.tolist()


def test_bad_queries_name_the_parameter(client):
    for query, field, words in [("correct=maybe", "correct", "must be true, false or all"),
                                ("sort=random", "sort", "must be one of index, confidence"),
                                ("true=kumquat", "true", "'kumquat' matches no class"),
                                ("predicted=7", "predicted", "must be between 0 and 4"),
                                ("min_prob=2", "min_prob", "between 0 and 1"),
                                ("per_page=1000", "per_page", "between 1 and 200"),
                                ("model=nope", "model", "unknown model 'nope'")]:
        r = client.get(f"/api/datasets/fruit/items?{query}")
        assert r.status_code == 400 and r.json["error"]["field"] == field and words in r.json["error"]["message"], \
            (query, r.json)
    r = client.get("/api/datasets/vegetables/items")
    assert r.status_code == 404 and "no dataset named 'vegetables'; datasets: fruit" in r.json["error"]["message"]


def test_thumbnails_and_opening_an_item(client):
    r = client.get("/api/datasets/fruit/items/0/thumb?size=96")
    assert r.status_code == 200 and r.mimetype == "image/jpeg"
    thumb = Image.open(__import__("io").BytesIO(r.data))
    assert thumb.size == (44, 36) and r.headers["Cache-Control"].startswith("private")  # never enlarged
    right, left = np.array(thumb.getpixel((33, 18))), np.array(thumb.getpixel((5, 18)))
    assert np.abs(right - (120, 20, 90)).max() < 12 and np.abs(left - (60, 10, 45)).max() < 12  # item 0's picture
    broken = client.get("/api/datasets/fruit/items/8/thumb")
    assert broken.status_code == 400 and "banana/zz-broken.png" in broken.json["error"]["message"]
    assert client.get("/api/datasets/fruit/items/99/thumb").status_code == 400
    opened = client.post("/api/datasets/fruit/items/6/image")
    assert opened.status_code == 201
    assert opened.json["true"] == {"index": 1, "label": "banana"} and opened.json["key"] == "banana/0.png"
    image = opened.json["image"]
    assert (image["width"], image["height"]) == (44, 36) and client.get(image["url"]).status_code == 200
    p = client.post("/api/predict", json={"image": image["id"], "top_k": 5})
    assert p.status_code == 200 and len(p.json["predictions"]) == 5


def test_a_batch_explanation_stores_each_result(app, client, folder):
    scored(client)
    expected = oracle(app, folder)
    r = client.post("/api/datasets/fruit/explain", json={"method": "fixed_map_test", "items": [0, 4, 8, 7],
                                                         "target": "true"})
    assert r.status_code == 202, r.json
    job = wait_job(client, r.json["job"]["id"])
    assert job["status"] == "done" and job["total"] == 4 and job["done"] == 4
    result = job["result"]
    assert (result["explained"], result["cached"], result["failed"]) == (3, 0, 1)
    rows = {row["index"]: row for row in result["rows"]}
    assert sorted(rows) == [0, 4, 7, 8] and "banana/zz-broken.png" in rows[8]["error"]
    for i in (0, 4, 7):
        row = rows[i]
        assert row["target"] == folder[1][i][1] and row["true"]["index"] == folder[1][i][1]
        assert row["prediction"]["index"] == expected[i][0]
        meta = client.get(f"/api/results/{row['result']}").json
        assert meta["target"] == row["target"] and meta["method"] == "fixed_map_test"
        assert client.get(f"/r/{row['result']}").status_code == 200
        assert client.get(f"/api/results/{row['result']}/overlay.png").status_code == 200
    again = client.post("/api/datasets/fruit/explain", json={"method": "fixed_map_test", "items": [0, 4, 7],
                                                             "target": "true"})
    rerun = wait_job(client, again.json["job"]["id"])["result"]
    assert (rerun["explained"], rerun["cached"]) == (0, 3)
    predicted = client.post("/api/datasets/fruit/explain", json={"method": "fixed_map_test", "items": [0]})
    row = wait_job(client, predicted.json["job"]["id"])["result"]["rows"][0]
    assert row["target"] == expected[0][0]  # target: the predicted class by default


def test_a_batch_by_filter_covers_the_matching_items(app, client, folder):
    scored(client)
    expected = oracle(app, folder)
    truth = {i: t for i, (_k, t) in enumerate(folder[1])}
    wrong = sorted(i for i, (p, _q, _t) in expected.items() if p != truth[i])
    r = client.post("/api/datasets/fruit/explain", json={"method": "fixed_map_test",
                                                         "filter": {"correct": "false"}})
    if not wrong:
        assert r.status_code == 400 and "no item matches the filter" in r.json["error"]["message"]
        return
    rows = wait_job(client, r.json["job"]["id"])["result"]["rows"]
    assert [row["index"] for row in rows] == wrong


def test_batch_limits_and_bad_requests(tmp_path, folder, monkeypatch, request, extra_methods):  # noqa: F811
    app, close = build(tmp_path, monkeypatch, request, BATCH_MAX_ITEMS=3, BATCH_MAX_PASSES=40)
    try:
        client = app.test_client()
        for body, status, code, words in [
            ({"method": "fixed_map_test", "items": [0, 1, 2, 3]}, 400, "over_budget", "more than one batch may cover (3"),
            ({"method": "slow_test", "params": {"steps": 20}, "items": [0, 1, 2]}, 400, "over_budget",
             "needs 60 forward passes, more than the limit of 40"),
            ({"method": "fixed_map_test", "items": [42]}, 400, "bad_param", "items must be item indices 0–8"),
            ({"method": "fixed_map_test", "items": []}, 400, "bad_param", "non-empty list"),
            ({"method": "fixed_map_test"}, 400, "bad_param", "name the items"),
            ({"method": "fixed_map_test", "filter": {"colour": "red"}}, 400, "bad_param",
             "filter: unknown key 'colour'; a filter has correct, max_prob"),
            ({"method": "nope", "items": [0]}, 400, "unknown_method", "nope"),
            ({"method": "fixed_map_test", "items": [0], "target": 9}, 400, "bad_target", "between 0 and 4"),
            ({"method": "fixed_map_test", "items": [0], "params": {"value": 99}}, 400, "bad_param", "value"),
        ]:
            r = client.post("/api/datasets/fruit/explain", json=body)
            assert (r.status_code, r.json["error"]["code"]) == (status, code), (body, r.json)
            assert words in r.json["error"]["message"], (body, r.json)
    finally:
        close()


def test_cancelling_a_batch_stops_it_and_keeps_what_finished(app, client):
    r = client.post("/api/datasets/fruit/explain", json={"method": "slow_test", "params": {"steps": 30, "delay": 0.05},
                                                         "items": [0, 1, 2, 3, 4]})
    assert r.status_code == 202 and r.json["job"]["total"] == 150
    job = r.json["job"]
    deadline = time.time() + 20
    while client.get(f"/api/jobs/{job['id']}").json["done"] < 5 and time.time() < deadline:
        time.sleep(0.02)
    c = client.delete(f"/api/jobs/{job['id']}", headers={"X-Cancel-Token": job["cancel_token"]})
    assert c.status_code == 200
    final = wait_job(client, job["id"])
    assert final["status"] == "cancelled" and final["done"] < 150  # (it had reached 5 before)


def test_predictions_survive_a_restart_and_a_changed_file_is_scored_again(tmp_path, folder, monkeypatch, request,
                                                                         extra_methods):  # noqa: F811
    app, close = build(tmp_path, monkeypatch, request)
    client = app.test_client()
    scored(client)
    before = {i["index"]: i["models"]["tiny"] for i in all_items(client)}
    close()
    database = app.config.get("DATABASE_URL")
    # Item 7 changes; every other item is read back from the index, not scored again.
    path = os.path.join(folder[0], folder[1][7][0])
    Image.new("RGB", (44, 36), (255, 255, 0)).save(path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    seen = []
    original = dataset_jobs.DatasetPredictTask.__init__

    def spy(self, service, dataset, model, indices):
        seen.append(list(indices))
        original(self, service, dataset, model, indices)

    monkeypatch.setattr(dataset_jobs.DatasetPredictTask, "__init__", spy)
    app, close = build(tmp_path, monkeypatch, request, database=database)
    try:
        client = app.test_client()
        assert scored(client)["done"] == 9
        after = {i["index"]: i["models"]["tiny"] for i in all_items(client)}
        assert seen and all(chunk == [7] for chunk in seen)  # (a worker rebuilds the task too)
        assert {i: v for i, v in after.items() if i != 7} == {i: v for i, v in before.items() if i != 7}
        assert after[7] is not None and "predicted" in after[7]
    finally:
        close()


def test_stopping_predictions_keeps_them_stopped_until_asked_again(tmp_path, monkeypatch, request,
                                                                   extra_methods):  # noqa: F811
    root = tmp_path / "fruit"
    for k in range(80):
        path = root / LABELS[k % 3] / f"{k:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (k * 3 % 255, 90, 200 - k)).save(path)
    gate = threading.Event()
    original = dataset_jobs.DatasetPredictTask._score

    def held(self, job):
        if self.indices[0] > 0:
            gate.wait(10)  # chunks after the first wait until the test lets them go
        return original(self, job)

    monkeypatch.setattr(dataset_jobs.DatasetPredictTask, "_score", held)
    app, close = build(tmp_path, monkeypatch, request)
    try:
        client = app.test_client()
        client.get("/api/datasets/fruit/items")
        deadline = time.time() + 20
        while client.get("/api/datasets/fruit/predictions?model=tiny").json["done"] < 32 and time.time() < deadline:
            time.sleep(0.02)
        stopped = client.delete("/api/datasets/fruit/predictions?model=tiny")
        assert stopped.status_code == 200
        gate.set()
        deadline = time.time() + 20
        while client.get("/api/datasets/fruit/predictions?model=tiny").json["status"] == "running" \
                and time.time() < deadline:
            time.sleep(0.02)
        state = client.get("/api/datasets/fruit/predictions?model=tiny").json
        assert state["status"] in ("cancelled", "stopped") and 32 <= state["done"] < 80
        client.get("/api/datasets/fruit/items")  # a read does not restart it
        time.sleep(0.3)
        assert client.get("/api/datasets/fruit/predictions?model=tiny").json["done"] == state["done"]
        resumed = client.post("/api/datasets/fruit/predictions", json={"model": "tiny"})
        assert resumed.status_code == 202 and resumed.json["model"] == "tiny"
        assert scored(client)["done"] == 80
    finally:
        gate.set()
        close()


@pytest.mark.parametrize("entry, name, words", [
    ("/nowhere/at/all", "all", "dataset /nowhere/at/all does not exist"),
    ("{root}/bad", "bad", "class folder 'kumquat': label 'kumquat' matches no class"),
    ("fruit={root}/fruit", "fruit", "two datasets are called 'fruit'"),
])
def test_a_dataset_that_cannot_be_opened_is_listed_with_why_and_the_server_serves_on(tmp_path, folder, entry, name,
                                                                                       words):
    bad = tmp_path / "bad" / "kumquat"
    bad.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(bad / "k.png")
    app = create_app({"INSTANCE_PATH": str(tmp_path / "i"), "BUILTIN_MODELS": False, "MODELS_CONFIG": TINY_CONFIG,
                      "DEVICE": "cpu", "DATASETS": [str(tmp_path / "fruit"), entry.format(root=tmp_path)]})
    try:
        client = app.test_client()
        listed = client.get("/api/datasets").json
        assert [d["name"] for d in listed["datasets"]] == ["fruit"]
        (missing,) = listed["unavailable"]
        assert missing["name"] == name and words in missing["error"]
        if name != "fruit":
            r = client.get(f"/api/datasets/{name}/items")
            assert r.status_code == 404 and f"dataset '{name}' is not served: " in r.json["error"]["message"]
        assert client.get("/api/datasets/fruit/items").status_code == 200
        with pytest.raises(DatasetError, match="each entry is a path or name=path"):
            create_app({"INSTANCE_PATH": str(tmp_path / "j"), "BUILTIN_MODELS": False, "MODELS_CONFIG": TINY_CONFIG,
                        "DATASETS": [42]})
    finally:
        app.extensions["insights"].dataset_work.shutdown()
        app.extensions["insights"].jobs.shutdown()


def test_a_larger_python_dataset_pages_through_every_item_once(app, client):
    """torchvision's FakeData (300 pictures) handed over as Python objects, as a notebook does:
    pages of 64 cover every item exactly once in every sort order, and the filters split it."""
    import torchvision

    from insights.datasets import from_python

    fake = torchvision.datasets.FakeData(size=300, image_size=(3, 24, 24), num_classes=5, random_offset=11)
    svc = app.extensions["insights"]
    svc.datasets.add(from_python("fake", fake, LABELS))
    assert scored(client, "fake", timeout=60)["done"] == 300
    for sort in ("index", "-confidence", "loss"):
        seen = []
        for page in range(1, 6):
            r = client.get(f"/api/datasets/fake/items?per_page=64&page={page}&sort={sort}").json
            assert r["pages"] == 5 and r["total"] == 300
            seen += [i["index"] for i in r["items"]]
        assert sorted(seen) == list(range(300)), sort
    right = client.get("/api/datasets/fake/items?correct=true&per_page=1").json["total"]
    wrong = client.get("/api/datasets/fake/items?correct=false&per_page=1").json["total"]
    summary = client.get("/api/datasets/fake/summary").json["models"]["tiny"]
    assert right + wrong == 300 and summary["correct"] == right and summary["accuracy"] == pytest.approx(right / 300)
    labels = [int(fake[i][1]) for i in range(300)]
    listed = {d["name"]: d for d in client.get("/api/datasets").json["datasets"]}["fake"]
    assert sorted((c["index"], c["count"]) for c in listed["classes"]) == [(k, labels.count(k)) for k in range(5)]
    matrix = np.array(summary["confusion"]["matrix"])
    assert matrix.sum() == 300 and np.trace(matrix) == right and matrix[:, 5:].sum() == 0  # 5 classes: no "other"


def test_a_picture_listed_twice_is_explained_once(app, client):
    from insights.datasets import from_python

    same = Image.new("RGB", (30, 30), (10, 200, 90))
    other = Image.new("RGB", (30, 30), (200, 10, 90))
    app.extensions["insights"].datasets.add(from_python("twice", [(same, 0), (other, 1), (same, 0)], LABELS))
    r = client.post("/api/datasets/twice/explain", json={"method": "fixed_map_test", "items": [0, 1, 2],
                                                         "target": "true"})
    result = wait_job(client, r.json["job"]["id"])["result"]
    rows = result["rows"]
    assert rows[0]["result"] == rows[2]["result"] != rows[1]["result"] and rows[0]["image"] == rows[2]["image"]
    assert result["explained"] == 2 and client.get(f"/api/results/{rows[2]['result']}").status_code == 200


# --------------------------------------------------------------------------- after review


def test_a_worker_refuses_a_dataset_whose_files_differ(app, folder):
    svc = app.extensions["insights"]
    ds = svc.datasets.get("fruit")
    task = dataset_jobs.DatasetPredictTask(svc, ds, "tiny", [0, 1])
    payload = task.to_payload()
    assert payload["fingerprint"] == ds.fingerprint
    again = dataset_jobs.Task.from_payload(svc, payload)
    assert again.indices == [0, 1] and again.dataset is ds
    with pytest.raises(DatasetError, match="this worker's copy of dataset 'fruit' differs from the web node's"):
        dataset_jobs.Task.from_payload(svc, {**payload, "fingerprint": "0" * 16})


def test_an_item_that_fails_is_its_own_error_and_reads_do_not_retry(app, client, monkeypatch):
    """A Python dataset whose reading raises for one item: the others are scored, the run is done,
    and later reads start no new job (only a POST does)."""
    from insights.datasets import from_python

    class Flaky:
        def __len__(self):
            return 5

        def __getitem__(self, i):
            if i == 2:
                raise RuntimeError("the disk said no")
            return Image.new("RGB", (20, 20), (40 * i, 90, 200)), i % 5

    assert from_python("labels", Flaky(), LABELS).items[2].label is None  # its label could not be read either
    app.extensions["insights"].datasets.add(from_python("flaky", Flaky(), LABELS))
    client.get("/api/datasets/flaky/items")
    state = scored(client, "flaky")
    assert state["done"] == 5
    items = all_items_of(client, "flaky")
    assert "#2: RuntimeError: the disk said no" in items[2]["models"]["tiny"]["error"]
    assert all("predicted" in items[k]["models"]["tiny"] for k in (0, 1, 3, 4))
    submitted = []
    monkeypatch.setattr(dataset_jobs.DatasetPredictTask, "__init__",
                        lambda self, *a: submitted.append(a) or (_ for _ in ()).throw(AssertionError("no job")))
    for _ in range(3):
        assert client.get("/api/datasets/flaky/items").status_code == 200
    assert submitted == []


def test_a_run_cancelled_while_queued_can_be_asked_again(app, client):
    """Two models: the second waits for the first (one run at a time); stopped while waiting, it
    ends, and a POST later scores it."""
    svc = app.extensions["insights"]
    spec = svc.models.spec("tiny")
    svc.models.register("tiny2", spec.loader, spec.preprocessing, spec.labels)
    gate = threading.Event()
    original = dataset_jobs.DatasetPredictTask._score

    def held(self, job):
        gate.wait(10)
        return original(self, job)

    dataset_jobs.DatasetPredictTask._score = held
    try:
        first = client.get("/api/datasets/fruit/items?model=tiny&model=tiny2").json["predictions"]
        assert first["tiny2"]["status"] == "queued"
        stopped = client.delete("/api/datasets/fruit/predictions?model=tiny2").json
        assert stopped["status"] in ("queued", "cancelled")
        deadline = time.time() + 10
        while client.get("/api/datasets/fruit/predictions?model=tiny2").json["status"] != "stopped" \
                and time.time() < deadline:
            time.sleep(0.02)
        gate.set()
        assert scored(client)["done"] == 9
        assert client.get("/api/datasets/fruit/predictions?model=tiny2").json["done"] == 0
        client.post("/api/datasets/fruit/predictions", json={"model": "tiny2"})
        deadline = time.time() + 20
        while client.get("/api/datasets/fruit/predictions?model=tiny2").json["status"] != "done" \
                and time.time() < deadline:
            time.sleep(0.05)
        assert client.get("/api/datasets/fruit/predictions?model=tiny2").json["done"] == 9
    finally:
        gate.set()
        dataset_jobs.DatasetPredictTask._score = original


def test_a_file_gone_for_a_while_is_not_kept_as_failed(tmp_path, folder, monkeypatch, request,
                                                       extra_methods):  # noqa: F811
    root, items = folder
    gone = os.path.join(root, items[3][0])
    app, close = build(tmp_path, monkeypatch, request)
    os.rename(gone, gone + ".away")  # listed at start-up, gone when it is read
    client = app.test_client()
    scored(client)
    assert "cannot be read" in all_items(client)[3]["models"]["tiny"]["error"]
    close()
    database = app.config.get("DATABASE_URL")
    os.rename(gone + ".away", gone)  # back, unchanged: the same path, size and time
    app, close = build(tmp_path, monkeypatch, request, database=database)
    try:
        client = app.test_client()
        client.post("/api/datasets/fruit/predictions", json={"model": "tiny"})
        scored(client)
        assert "predicted" in all_items(client)[3]["models"]["tiny"]
    finally:
        close()


def test_concurrent_first_reads_after_a_restart_score_nothing_again(tmp_path, folder, monkeypatch, request,
                                                                     extra_methods):  # noqa: F811
    app, close = build(tmp_path, monkeypatch, request)
    scored(app.test_client())
    close()
    database = app.config.get("DATABASE_URL")
    seen = []
    original = dataset_jobs.DatasetPredictTask.__init__
    monkeypatch.setattr(dataset_jobs.DatasetPredictTask, "__init__",
                        lambda self, *a: seen.append(a[3]) or original(self, *a))
    app, close = build(tmp_path, monkeypatch, request, database=database)
    try:
        answers = []

        def read(path):
            answers.append(app.test_client().get(path).json)

        threads = [threading.Thread(target=read, args=(p,)) for p in
                   ("/api/datasets/fruit/items", "/api/datasets/fruit/summary",
                    "/api/datasets/fruit/predictions?model=tiny", "/api/datasets/fruit/items?sort=-loss")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert seen == [] and len(answers) == 4
        done = [a["predictions"]["tiny"]["done"] if "items" in a else a["models"]["tiny"]["scored"] + 1
                if "models" in a and isinstance(a["models"], dict) else a["done"] for a in answers]
        assert done == [9, 9, 9, 9]  # every first answer already has every prediction (8 scored + 1 broken)
    finally:
        close()


def test_another_models_labels_find_the_true_class_by_name_or_wordnet_id(tmp_path):
    from insights.datasets import imagenet_wnids, open_source
    from insights.models import imagenet_labels

    imagenet = imagenet_labels()
    for folder in ("Egyptian cat", "n07920052"):
        (tmp_path / "d" / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "d" / folder / "x.png")
    ds = open_source(str(tmp_path / "d"), imagenet)
    by_wnid = list(imagenet_wnids())  # a model whose labels are the WordNet ids
    assert dataset_jobs.truth(ds, by_wnid).tolist() == [285, imagenet.index("espresso")]
    few = ["espresso", "cat"]  # a model that knows only one of the two classes by name
    assert dataset_jobs.truth(ds, few).tolist() == [-1, 0]


def test_the_model_key_follows_the_labels(app):
    from insights.models import ModelSpec, Preprocessing

    make = lambda labels: ModelSpec("m", lambda: None, Preprocessing(8, 8), labels)  # noqa: E731
    assert dataset_jobs.model_key(make(["a", "b"])) == dataset_jobs.model_key(make(["a", "b"]))
    assert dataset_jobs.model_key(make(["a", "b"])) != dataset_jobs.model_key(make(["a", "b", "c"]))
    assert dataset_jobs.model_key(make(["a"])).startswith("m@")


def all_items_of(client, name) -> list[dict]:
    return client.get(f"/api/datasets/{name}/items?per_page=200").json["items"]
