"""The store's quota and retention, and what a hosted instance's share links promise: deletion,
revalidated caching, the compact full map and uploads kept without growth (docs/api.md, Results)."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import skimage.data
from PIL import Image

from appkit import ENGINE, TINY_CONFIG, app, client, extra_methods, image_id, png, snapshot, upload  # noqa: F401
from insights import store as store_module
from insights.store import Store, StoreFull, encode_image


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def picture(seed: int, size=(20, 16)) -> Image.Image:
    """A noisy picture (so its PNG has some bytes), different for every seed."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def add_result(store: Store, iid: str, target: int = 0) -> str:
    rid = store.result_id(iid, "m", "saliency", {"abs": True}, target)
    meta = {"id": rid, "model": "m", "method": "saliency", "params": {"abs": True}, "target": target,
            "image": {"width": 20, "height": 16}, "created": "2027-01-15T08:00:00Z", "signed": False}
    attr = np.random.default_rng(target).standard_normal((1, 3, 16, 20)).astype(np.float32)
    store.put_result(meta, store.load_image(iid), attr, b"MAP", image_id=iid)
    return rid


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path, clock) -> Store:
    s = Store(str(tmp_path / "inst"), clock=clock)
    s.TOUCH_EVERY = 0  # every read counts as a use
    return s


def on_disk(store: Store) -> int:
    """Bytes of the stored files (not the index: index.sqlite3 and its -wal and -shm files)."""
    return sum(os.path.getsize(os.path.join(store.root, f)) for f in store.files() if not f.startswith("index.sqlite3"))


# --------------------------------------------------------------------------- quota


def test_bytes_are_counted_in_the_index_as_they_are_on_disk(store):
    iid = store.put_image(picture(0))["id"]
    add_result(store, iid)
    store.put_image(picture(1))
    assert store.total_bytes() == on_disk(store) > 0


def test_eviction_takes_unused_uploads_then_least_recently_used_results_then_their_uploads(store, clock,
                                                                                               monkeypatch):
    def put(seed):
        clock.t += 10
        return store.put_image(picture(seed))["id"]

    unused_old = put(1)
    a = put(2)
    clock.t += 10
    result_a = add_result(store, a)
    unused_new = put(3)
    b = put(4)
    clock.t += 10
    result_b = add_result(store, b)
    clock.t += 10
    assert store.result(result_a) is not None  # a read: result_a is now used more recently than result_b
    evicted = []
    for kind in ("image", "result"):
        real = getattr(store, f"_delete_{kind}")
        monkeypatch.setattr(store, f"_delete_{kind}", lambda key, real=real: evicted.append(key) or real(key))

    # Just one byte short: only the oldest unused upload goes.
    newcomer = picture(5)
    store.max_bytes = store.total_bytes() + len(encode_image(newcomer, "png")) - 1
    clock.t += 10
    store.put_image(newcomer)
    assert evicted == [unused_old]
    assert store.total_bytes() <= store.max_bytes and store.total_bytes() == on_disk(store)

    # A new result of b that needs everything else: b itself stays (the result is made from it).
    scratch = Store(store.root + "-scratch", clock=clock)
    twin = scratch.put_image(picture(4))["id"]
    add_result(scratch, twin, target=7)
    store.max_bytes = scratch.total_bytes()  # b and the new result, exactly
    evicted.clear()
    clock.t += 10
    newest = add_result(store, b, target=7)
    newcomer_id = store.image_id(newcomer)
    assert evicted == [unused_new, newcomer_id, result_b, result_a, a]
    assert store.result(newest) is not None and store.image(b) is not None
    assert store.total_bytes() == on_disk(store) <= store.max_bytes


def test_a_write_bigger_than_the_quota_is_refused_with_nothing_evicted_or_written(store):
    kept = store.put_image(picture(0))["id"]
    store.max_bytes = store.total_bytes() + 100
    before = snapshot(store.root)
    with pytest.raises(StoreFull) as err:
        store.put_image(picture(1, size=(64, 64)))  # ~12 kB of noise
    assert err.value.status == 507 and err.value.code == "store_full" and "STORE_MAX_BYTES" in err.value.message
    assert snapshot(store.root) == before and store.image(kept) is not None


def test_a_result_that_cannot_fit_beside_its_upload_is_refused_and_nothing_half_written(store):
    iid = store.put_image(picture(0))["id"]
    other = store.put_image(picture(1))["id"]
    store.max_bytes = store.total_bytes() + 10
    with pytest.raises(StoreFull):
        add_result(store, iid)
    assert not [f for f in store.files() if f.startswith("results/")]
    assert store.image(iid) is not None and store.image(other) is not None  # nothing evicted for nothing


@pytest.mark.parametrize("name, value", [("STORE_MAX_BYTES", -1), ("STORE_MAX_BYTES", "lots"),
                                         ("RETENTION_DAYS", 0), ("RETENTION_DAYS", True)])
def test_bad_quota_or_retention_settings_are_refused(tmp_path, name, value):
    from insights import create_app

    with pytest.raises(ValueError, match=name):
        create_app({"INSTANCE_PATH": str(tmp_path / "i"), "BUILTIN_MODELS": False, "MODELS_CONFIG": TINY_CONFIG,
                    "DEVICE": "cpu", name: value})


# --------------------------------------------------------------------------- retention


def test_retention_sweeps_old_results_and_unused_uploads_at_open_and_on_writes(tmp_path, clock):
    root = str(tmp_path / "inst")
    store = Store(root, clock=clock)
    unused = store.put_image(picture(0))["id"]
    a = store.put_image(picture(1))["id"]
    result_a = add_result(store, a)
    clock.t += 86400
    b = store.put_image(picture(2))["id"]
    result_b = add_result(store, b)
    clock.t += 1.5 * 86400  # result_a and the first uploads are 2.5 days old, result_b 1.5 days

    store = Store(root, clock=clock, retention_days=2)  # the sweep at start-up
    assert store.result(result_a) is None and store.image(unused) is None and store.image(a) is None
    assert store.result(result_b) is not None and store.image(b) is not None
    assert store.total_bytes() == on_disk(store)

    clock.t += 86400  # result_b is 2.5 days old now, but a write sweeps at most once an hour ...
    store.SWEEP_EVERY = 3 * 86400
    store.put_image(picture(3))
    assert store.result(result_b) is not None
    store.SWEEP_EVERY = 3600  # ... and once the hour is over, it does
    store.put_image(picture(4))
    assert store.result(result_b) is None and store.image(b) is None
    assert store.total_bytes() == on_disk(store)


# --------------------------------------------------------------------------- through the API


def explain(client, image_id: str, target: int = 1) -> dict:
    r = client.post("/api/explain", json={"image": image_id, "method": "saliency", "target": target})
    assert r.status_code == 200, r.json
    return r.json["result"]


def test_upload_over_the_quota_answers_507_store_full_and_writes_nothing(client, app):
    app.extensions["insights"].store.max_bytes = 500
    data = io.BytesIO()
    picture(0, size=(64, 64)).save(data, "PNG")
    before = snapshot(app.instance_path)
    r = upload(client, data.getvalue())
    assert r.status_code == 507 and r.json["error"]["code"] == "store_full"
    assert "STORE_MAX_BYTES" in r.json["error"]["message"]
    assert snapshot(app.instance_path) == before


def test_explain_over_the_quota_answers_507_store_full_and_leaves_no_result(client, app, image_id):
    store = app.extensions["insights"].store
    store.max_bytes = store.total_bytes() + 200  # the upload fits, a result beside it does not
    r = client.post("/api/explain", json={"image": image_id, "method": "saliency", "target": 1})
    assert r.status_code == 507 and r.json["error"]["code"] == "store_full"
    assert not [f for f in store.files() if f.startswith("results/")]
    assert client.get(f"/api/images/{image_id}").status_code == 200


def test_delete_result_then_its_metadata_files_and_share_page_answer_404(client, image_id):
    meta = explain(client, image_id)
    rid = meta["id"]
    links = [f"/api/results/{rid}"] + [meta["links"][k] for k in ("input", "map", "overlay", "npy")]
    assert all(client.get(url).status_code == 200 for url in links) and client.get(f"/r/{rid}").status_code == 200
    r = client.delete(f"/api/results/{rid}")
    assert r.status_code == 200 and r.json == {"deleted": rid}
    for url in links:
        gone = client.get(url)
        assert gone.status_code == 404 and gone.json["error"]["code"] == "not_found", url
    assert client.get(f"/r/{rid}").status_code == 404
    again = client.delete(f"/api/results/{rid}")
    assert again.status_code == 404 and again.json["error"]["code"] == "not_found"
    assert client.get(f"/api/images/{image_id}").status_code == 200  # the upload stays
    assert explain(client, image_id)["id"] == rid  # asked again, made again under its id


def test_without_tokens_only_this_machine_deletes_results(app, client, image_id):
    """Found in review: with no token (a public demo, --public-without-token) anyone holding a share
    link could delete the result for everyone else: the link is permission to look. Deletion also
    counts as a write against the rate limit now."""
    rid = explain(client, image_id)["id"]
    for addr in ("203.0.113.5", "2001:db8::5", "10.0.0.2"):
        r = client.delete(f"/api/results/{rid}", environ_base={"REMOTE_ADDR": addr})
        assert r.status_code == 403 and r.json["error"]["code"] == "forbidden", addr
        assert "access token" in r.json["error"]["message"]
    assert client.get(f"/r/{rid}").status_code == 200
    assert client.delete(f"/api/results/{rid}", environ_base={"REMOTE_ADDR": "::1"}).status_code == 200
    from insights.admission import RateLimiter

    app.extensions["insights"].jobs.admission.rate = RateLimiter(1)
    assert client.delete(f"/api/results/{rid}").status_code == 404  # gone already; the one write a minute
    assert client.delete(f"/api/results/{rid}").status_code == 429


@pytest.mark.parametrize("link", ["meta", "input", "map", "overlay", "npy"])
def test_share_files_are_revalidated_with_a_strong_etag(client, image_id, link):
    meta = explain(client, image_id)
    url = f"/api/results/{meta['id']}" if link == "meta" else meta["links"][link]
    r = client.get(url)
    assert r.status_code == 200
    assert set(r.headers["Cache-Control"].split(", ")) == {"public", "no-cache"}
    assert r.headers["ETag"].startswith('"') and not r.headers["ETag"].startswith('W/')
    again = client.get(url, headers={"If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304 and again.data == b""
    client.delete(f"/api/results/{meta['id']}")
    assert client.get(url, headers={"If-None-Match": r.headers["ETag"]}).status_code == 404


def test_uploads_stay_immutable(client, image_id):
    r = client.get(f"/api/images/{image_id}")
    assert set(r.headers["Cache-Control"].split(", ")) == {"public", "max-age=31536000", "immutable"}


def test_npy_download_is_float32_and_equals_the_computed_map_within_the_stated_tolerance(client, image_id,
                                                                                        monkeypatch):
    computed = []
    original = ENGINE.attribute

    def keep(*a, **k):
        out = original(*a, **k)
        computed.append(out.detach().cpu().numpy().copy())
        return out

    monkeypatch.setattr(ENGINE, "attribute", keep)
    meta = explain(client, image_id)
    npy = np.load(io.BytesIO(client.get(meta["links"]["npy"]).data), allow_pickle=False)
    exact = computed[0]
    assert npy.dtype == np.float32 and npy.shape == exact.shape == tuple(meta["shape"])
    # docs/api.md: |npy - map| <= 1e-3 |map| + 1e-9 max|map|
    assert np.all(np.abs(npy.astype(np.float64) - exact) <= 1e-3 * np.abs(exact) + 1e-9 * np.abs(exact).max())
    assert not np.array_equal(npy, np.zeros_like(npy))


def test_a_jpeg_upload_stays_a_small_jpeg_and_still_explains(client, app):
    photo = Image.fromarray(skimage.data.chelsea())
    sent = io.BytesIO()
    photo.resize((150, 100)).save(sent, "JPEG", quality=90)
    r = upload(client, sent.getvalue(), "cat.jpg")
    assert r.status_code == 201, r.json
    got = client.get(r.json["url"])
    assert got.status_code == 200 and got.mimetype == "image/jpeg" and got.data[:2] == b"\xff\xd8"
    assert len(got.data) < 2 * len(sent.getvalue())
    meta = explain(client, r.json["id"])
    assert client.get(meta["links"]["input"]).status_code == 200 and meta["image"] == {"width": 150, "height": 100}


def test_result_metadata_never_links_the_upload(client, image_id):
    meta = explain(client, image_id)
    assert meta["image"] == {"width": 48, "height": 40}
    assert image_id not in client.get(f"/api/results/{meta['id']}").get_data(as_text=True)
    assert image_id not in client.get(f"/r/{meta['id']}").get_data(as_text=True)


def test_ids_in_answers_are_keyed_not_plain_content_hashes(client, app):
    from insights import imaging

    data = png()
    r = upload(client, data)
    assert r.json["id"] != imaging.image_id(imaging.decode(data, "x.png"))
    assert r.json["id"] == app.extensions["insights"].store.image_id(imaging.decode(data, "x.png"))


def test_an_old_instance_folder_keeps_serving_after_the_upgrade(tmp_path, extra_methods):
    from insights import create_app
    from test_store import old_instance

    root = str(tmp_path / "old")
    _iid, rid, attr = old_instance(root, picture(0, size=(6, 4)))
    app = create_app({"INSTANCE_PATH": root, "BUILTIN_MODELS": False, "MODELS_CONFIG": TINY_CONFIG, "DEVICE": "cpu"})
    try:
        client = app.test_client()
        meta = client.get(f"/api/results/{rid}").json
        assert meta["id"] == rid and meta["image"] == {"width": 6, "height": 4}
        npy = np.load(io.BytesIO(client.get(f"/api/results/{rid}/attribution.npy").data), allow_pickle=False)
        assert np.array_equal(npy, attr)
        assert client.get(f"/r/{rid}").status_code == 200
        assert client.delete(f"/api/results/{rid}").status_code == 200
        assert client.get(f"/r/{rid}").status_code == 404
    finally:
        app.extensions["insights"].jobs.shutdown()
