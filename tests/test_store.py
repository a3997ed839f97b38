"""The store: keyed ids, atomic writes, the SQLite index and its upgrade, compact files, deletion,
and results across restarts (quota and retention: tests/test_quota.py)."""
from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import sqlite3
import time
from contextlib import closing

import numpy as np
import pytest
import skimage.data
from PIL import Image

from insights import imaging, store as store_module
from insights.store import Store, canonical_json


def meta_for(rid: str, image: dict) -> dict:
    return {"id": rid, "model": "m", "method": "saliency", "params": {"abs": True}, "target": 3,
            "image": image, "created": "2026-01-01T00:00:00Z", "signed": False}


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(str(tmp_path / "inst"))


@pytest.fixture
def image() -> Image.Image:
    return Image.fromarray(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3))


def save(store: Store, image: Image.Image, target: int = 3) -> str:
    rec = store.put_image(image)
    rid = store.result_id(rec["id"], "m", "saliency", {"abs": True}, target)
    store.put_result(meta_for(rid, rec), image, np.full((1, 3, 4, 6), 0.5, np.float32), b"PNGDATA")
    return rid


def test_image_is_stored_once_by_content(store, image):
    a = store.put_image(image)
    b = store.put_image(image.copy())
    assert a == b == {"id": store.image_id(image), "width": 6, "height": 4}
    assert [f for f in store.files() if f.startswith("images/")] == [f"images/{a['id'][:2]}/{a['id']}.png"]
    assert np.array_equal(np.asarray(store.load_image(a["id"])), np.asarray(image))


def test_result_id_is_canonical(store):
    a = store.result_id("i", "m", "occlusion", {"strides": (3, 8, 8), "baselines": 0.0}, 1)
    b = store.result_id("i", "m", "occlusion", {"baselines": 0.0, "strides": [3, 8, 8]}, 1)
    assert a == b and len(a) == 64
    assert a != store.result_id("i", "m", "occlusion", {"baselines": 0.0, "strides": [3, 8, 8]}, 2)
    assert a != store.result_id("i", "m2", "occlusion", {"baselines": 0.0, "strides": [3, 8, 8]}, 1)
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'


def test_result_files_and_metadata(store, image):
    rid = save(store, image)
    assert store.result(rid)["target"] == 3
    assert store.result_file(rid, "map.png") == b"PNGDATA"
    assert np.array_equal(store.attribution(rid), np.full((1, 3, 4, 6), 0.5, np.float32))
    assert np.array_equal(np.asarray(Image.open(os.path.join(store.result_dir(rid), "input.png"))), np.asarray(image))
    assert [r["id"] for r in store.results_for_image(store.image_id(image))] == [rid]
    assert not [f for f in store.files() if ".tmp-" in f]


def test_results_survive_a_restart(store, image):
    rid = save(store, image)
    again = Store(store.root)
    assert again.result(rid) == store.result(rid)
    assert again.result_file(rid, "map.png") == b"PNGDATA"


def test_storing_twice_keeps_the_first(store, image):
    rid = save(store, image)
    first = store.result(rid)
    rec = store.put_image(image)
    kept = store.put_result({**meta_for(rid, rec), "created": "later"}, image, np.zeros((1, 3, 4, 6)), b"OTHER")
    assert kept == first and store.result_file(rid, "map.png") == b"PNGDATA"


def test_crash_while_writing_leaves_no_result(store, image, monkeypatch):
    real = store_module.write_atomic

    def crash_on_meta(path, data):
        if path.endswith("meta.json"):
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(store_module, "write_atomic", crash_on_meta)
    with pytest.raises(OSError, match="disk full"):
        save(store, image)
    rid = store.result_id(store.image_id(image), "m", "saliency", {"abs": True}, 3)
    assert store.result(rid) is None
    assert not [f for f in store.files() if f.startswith("results/")]
    monkeypatch.setattr(store_module, "write_atomic", real)
    assert save(store, image) == rid and store.result(rid) is not None


def age(path: str, seconds: float) -> None:
    """Makes a file look ``seconds`` old."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_leftovers_of_a_crash_are_removed_on_open(store, image):
    rid = save(store, image)
    os.makedirs(os.path.join(store.root, "results", ".tmp-abc"))
    open(os.path.join(store.root, "results", ".tmp-abc", "map.png"), "wb").close()
    open(os.path.join(store.root, "images", ".tmp-def"), "wb").close()
    for path in ("results/.tmp-abc", "results/.tmp-abc/map.png", "images/.tmp-def"):
        age(os.path.join(store.root, path), store.LEFTOVER_AGE + 60)
    Store(store.root)
    assert not [f for f in store.files() if ".tmp-" in f]
    assert store.result_file(rid, "map.png") == b"PNGDATA"


def test_a_young_temporary_file_may_be_another_writers_and_stays_until_it_is_old(store, image):
    """A store folder shared by nodes (BLOB_DIR) or processes: a .tmp- file younger than
    LEFTOVER_AGE may be a write in progress elsewhere; the hourly clean-up takes it once old."""
    in_flight = os.path.join(store.root, "results", ".tmp-writing")
    os.makedirs(in_flight)
    open(os.path.join(in_flight, "map.png"), "wb").close()
    again = Store(store.root)
    assert os.path.isfile(os.path.join(in_flight, "map.png"))
    age(in_flight, again.LEFTOVER_AGE + 60)
    again.SWEEP_EVERY = 0  # the next write runs the hourly clean-up
    save(again, image)
    assert not os.path.exists(in_flight) and not [f for f in again.files() if ".tmp-" in f]


def test_folder_without_index_row_is_replaced(store, image):
    """A crash after the rename but before the index row leaves a folder nobody trusts."""
    rec = store.put_image(image)
    rid = store.result_id(rec["id"], "m", "saliency", {"abs": True}, 3)
    os.makedirs(store.result_dir(rid))
    with open(os.path.join(store.result_dir(rid), "map.png"), "wb") as f:
        f.write(b"HALF")
    assert store.result(rid) is None
    save(store, image)
    assert store.result_file(rid, "map.png") == b"PNGDATA"


def test_write_atomic_replaces_whole_files(tmp_path):
    path = str(tmp_path / "f.bin")
    store_module.write_atomic(path, b"one")
    store_module.write_atomic(path, b"two")
    assert open(path, "rb").read() == b"two" and os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("bad", ["", "abc", "../" + "a" * 61, "A" * 64, None])
def test_malformed_ids_never_touch_the_disk(store, bad):
    assert store.result(bad) is None and store.image(bad) is None


# --------------------------------------------------------------------------- keyed ids


def test_ids_are_keyed_hashes_stable_across_restart_and_distinct_across_stores(tmp_path, image):
    a, b = Store(str(tmp_path / "a")), Store(str(tmp_path / "b"))
    iid = a.put_image(image)["id"]
    plain = imaging.image_id(image)  # what anyone can compute from the photo
    assert store_module.is_id(iid) and iid != plain
    assert iid == hmac.new(secret_of(a), f"image:{plain}".encode(), hashlib.sha256).hexdigest()
    params = {"abs": True}
    rid = a.result_id(iid, "m", "saliency", params, 3)
    guessable = hashlib.sha256(canonical_json({"image": iid, "model": "m", "method": "saliency",
                                               "params": params, "target": 3}).encode()).hexdigest()
    assert store_module.is_id(rid) and rid != guessable
    again = Store(a.root)
    assert again.image_id(image) == iid and again.result_id(iid, "m", "saliency", params, 3) == rid
    assert again.put_image(image)["id"] == iid  # the same picture keeps one record in a store
    assert b.image_id(image) != iid and b.result_id(iid, "m", "saliency", params, 3) != rid


def test_the_secret_is_32_random_bytes_in_an_index_only_its_owner_reads(store):
    assert len(secret_of(store)) == 32
    assert os.stat(os.path.join(store.root, "index.sqlite3")).st_mode & 0o777 == 0o600


def secret_of(store: Store) -> bytes:
    with closing(sqlite3.connect(os.path.join(store.root, "index.sqlite3"))) as db:
        return bytes.fromhex(db.execute("SELECT value FROM meta WHERE name = 'secret'").fetchone()[0])


# --------------------------------------------------------------------------- compact files


def test_full_map_is_stored_compact_within_the_stated_tolerance():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((1, 3, 224, 224)) * np.logspace(-7, 2, 224)).astype(np.float32)  # 9 decades
    a[0, 0, 0, :5] = 0.0
    packed = store_module.pack_map(a)
    back = store_module.unpack_map(packed)
    assert back.dtype == np.float32 and back.shape == a.shape
    # docs/api.md: |npy - map| <= 1e-3 |map| + 1e-9 max|map|
    assert np.all(np.abs(back.astype(np.float64) - a) <= 1e-3 * np.abs(a) + 1e-9 * np.abs(a).max())
    assert (back[0, 0, 0, :5] == 0).all()
    assert len(packed) < 0.5 * a.nbytes + 1000  # float16, and the high bytes compress
    npy = np.load(io.BytesIO(store_module.npy_bytes(packed)), allow_pickle=False)
    assert npy.dtype == np.float32 and np.array_equal(npy, back)


@pytest.mark.parametrize("values", [np.zeros((1, 1, 4, 4)), np.full((1, 1, 2, 2), -3e-30),
                                    np.array([[[[np.inf, -np.inf], [np.nan, 1.0]]]])])
def test_full_map_packing_keeps_zero_tiny_and_non_finite_maps(values):
    back = store_module.unpack_map(store_module.pack_map(values.astype(np.float32)))
    np.testing.assert_allclose(back, values.astype(np.float32), rtol=1e-3, equal_nan=True)


def jpeg_of(img: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", **options)
    return out.getvalue()


def test_an_upload_decoded_from_jpeg_is_kept_as_a_small_jpeg_without_metadata(store):
    photo = Image.fromarray(skimage.data.chelsea())
    exif = Image.Exif()
    exif[0x010F] = "Camera maker"  # Make
    upload = jpeg_of(photo, quality=90, exif=exif.tobytes(), comment=b"where it was taken")
    img = imaging.decode(upload, "cat.jpg")
    img.info["source_format"] = "JPEG"  # imaging.decode's mark (set here too: this tests the store)
    rec = store.put_image(img)
    data, mimetype = store.image_file(rec["id"])
    assert mimetype == "image/jpeg" and data[:2] == b"\xff\xd8"
    assert [f for f in store.files() if f.startswith("images/")] == [f"images/{rec['id'][:2]}/{rec['id']}.jpg"]
    assert len(data) < 2 * len(upload) and len(data) < len(imaging.png_bytes(img)) / 3
    with Image.open(io.BytesIO(data)) as kept:
        assert not {"exif", "icc_profile", "comment"} & set(kept.info)
        assert all(layer[1:3] == (1, 1) for layer in kept.layer)  # 4:4:4: colours not subsampled
    loaded = store.load_image(rec["id"])
    assert loaded.mode == "RGB" and loaded.size == img.size
    assert np.abs(np.asarray(loaded, np.int16) - np.asarray(img, np.int16)).mean() < 2


def test_other_uploads_are_kept_as_png(store, image):
    rec = store.put_image(image)
    data, mimetype = store.image_file(rec["id"])
    assert mimetype == "image/png" and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(store.load_image(rec["id"])), np.asarray(image))


def test_result_files_are_the_compact_set_and_the_metadata_does_not_link_the_upload(store, image):
    rid = save(store, image)
    assert sorted(os.listdir(store.result_dir(rid))) == ["attribution.npz", "input.png", "map.png", "meta.json"]
    meta = store.result(rid)
    assert meta["image"] == {"width": 6, "height": 4}
    assert "url" not in json.dumps(meta["image"]) and store.image_id(image) not in json.dumps(meta)
    on_disk = json.loads(store.result_file(rid, "meta.json"))
    assert on_disk["image"] == {"width": 6, "height": 4}


# --------------------------------------------------------------------------- deletion


def test_delete_result_removes_its_files_and_row_and_keeps_its_upload(store, image):
    rid = save(store, image)
    image_bytes = os.path.getsize(store.image_path(store.image_id(image)))
    assert store.delete_result(rid) is True
    assert store.result(rid) is None and not os.path.exists(store.result_dir(rid))
    assert not [f for f in store.files() if f.startswith("results/")]
    with pytest.raises(store_module.Missing):
        store.result_file(rid, "map.png")
    assert store.delete_result(rid) is False and store.delete_result("../x") is False
    assert store.image(store.image_id(image)) is not None
    assert store.total_bytes() == image_bytes


def test_a_deletion_cut_after_its_rename_is_finished_when_the_store_opens(store, image):
    rid = save(store, image)
    os.replace(store.result_dir(rid), os.path.join(store.root, "results", ".tmp-del-" + rid))  # then a crash
    with pytest.raises(store_module.Missing):  # a reader meanwhile gets a 404, not a 500
        store.result_file(rid, "input.png")
    again = Store(store.root)
    assert again.result(rid) is None
    assert not [f for f in again.files() if f.startswith("results/")]
    assert again.total_bytes() == os.path.getsize(again.image_path(again.image_id(image)))


def test_files_no_row_indexes_are_removed_when_the_store_opens(store, image):
    rid = save(store, image)
    orphan = "b" * 64
    os.makedirs(store.result_dir(orphan))
    with open(os.path.join(store.result_dir(orphan), "map.png"), "wb") as f:
        f.write(b"HALF")
    os.makedirs(os.path.join(store.root, "images", "cc"))
    open(os.path.join(store.root, "images", "cc", "c" * 64 + ".png"), "wb").close()
    again = Store(store.root)
    assert not os.path.exists(again.result_dir(orphan))
    assert not os.path.exists(os.path.join(store.root, "images", "cc", "c" * 64 + ".png"))
    assert again.result_file(rid, "map.png") == b"PNGDATA"


# --------------------------------------------------------------------------- upgrade

# The index as the first schema (before keyed ids, quota and compact results) made it.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY, width INTEGER NOT NULL, height INTEGER NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    id TEXT PRIMARY KEY, image_id TEXT NOT NULL, model TEXT NOT NULL, method TEXT NOT NULL,
    target INTEGER NOT NULL, params TEXT NOT NULL, created TEXT NOT NULL, meta TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS results_by_image ON results (image_id);
"""


def old_instance(root: str, image: Image.Image) -> tuple[str, str, np.ndarray]:
    """An instance folder as the first schema wrote it: plain SHA-256 ids, the upload as PNG, a
    float32 attribution.npy and metadata linking the upload. Returns (image id, result id, map)."""
    iid = imaging.image_id(image)
    os.makedirs(os.path.join(root, "images", iid[:2]))
    image.save(os.path.join(root, "images", iid[:2], iid + ".png"))
    params = {"abs": True}
    rid = hashlib.sha256(canonical_json({"image": iid, "model": "m", "method": "saliency", "params": params,
                                         "target": 3}).encode()).hexdigest()
    folder = os.path.join(root, "results", rid)
    os.makedirs(folder)
    attr = np.random.default_rng(1).standard_normal((1, 3, 4, 6)).astype(np.float32)
    np.save(os.path.join(folder, "attribution.npy"), attr)
    image.save(os.path.join(folder, "input.png"))
    with open(os.path.join(folder, "map.png"), "wb") as f:
        f.write(b"OLDMAP")
    links = {k: f"/api/results/{rid}/{f}" for k, f in (("input", "input.png"), ("map", "map.png"),
                                                       ("overlay", "overlay.png"), ("npy", "attribution.npy"))}
    meta = {**meta_for(rid, {"id": iid, "width": 6, "height": 4, "url": f"/api/images/{iid}"}),
            "target_label": "three", "elapsed_s": 0.1, "batch_size": 1, "output": "pixel", "layer": None,
            "cost": {"forward": 1, "backward": 1}, "completeness": None,
            "predictions": [{"index": 3, "label": "three", "prob": 0.5}], "range": {"min": 0.0, "max": 1.0},
            "encoding": {"zero": 0, "scale": 1.0}, "size": [4, 6], "shape": [1, 3, 4, 6],
            "links": {**links, "share": f"/r/{rid}"}}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    with closing(sqlite3.connect(os.path.join(root, "index.sqlite3"))) as db:
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO images VALUES (?, 6, 4, '2026-01-01T00:00:00Z')", (iid,))
        db.execute("INSERT INTO results VALUES (?, ?, 'm', 'saliency', 3, ?, '2026-01-01T00:00:00Z', ?)",
                   (rid, iid, canonical_json(params), json.dumps(meta)))
        db.commit()
    return iid, rid, attr


def test_an_index_of_the_first_schema_is_upgraded_and_keeps_serving(tmp_path, image):
    root = str(tmp_path / "old")
    iid, rid, attr = old_instance(root, image)
    on_disk = sum(os.path.getsize(os.path.join(d, n)) for d, _s, names in os.walk(root) for n in names
                  if n != "index.sqlite3")
    store = Store(root)
    with closing(sqlite3.connect(os.path.join(root, "index.sqlite3"))) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == store_module.SCHEMA_VERSION == 4
        assert db.execute("SELECT 1 FROM sqlite_master WHERE name = 'predictions'").fetchall()
        assert db.execute("SELECT 1 FROM sqlite_master WHERE name = 'quality'").fetchall()
    assert store.total_bytes() == on_disk  # bytes counted from the files once, at the upgrade
    meta = store.result(rid)
    assert meta["image"] == {"width": 6, "height": 4} and meta["target"] == 3  # the link is gone
    assert store.result_file(rid, "map.png") == b"OLDMAP"
    assert np.array_equal(store.attribution(rid), attr)  # the old .npy, exact
    assert store.npy_bytes(store.attribution_file(rid)) == open(os.path.join(root, "results", rid,
                                                                              "attribution.npy"), "rb").read()
    assert store.image(iid) == {"id": iid, "width": 6, "height": 4}
    assert np.array_equal(np.asarray(store.load_image(iid)), np.asarray(image))
    # New writes get keyed ids beside the old rows; the upgrade runs once.
    new = store.put_image(image)["id"]
    assert new != iid and Store(root).image_id(image) == new
    assert Store(root).result(rid)["image"] == {"width": 6, "height": 4}
    assert store.delete_result(rid) and store.result(rid) is None


# The index as schema 1 made it (the store before it moved to SQLAlchemy): sqlite_master's
# statements, as dumped from an index.sqlite3 that the schema-1 store wrote.
V1_SCHEMA = """
CREATE TABLE images (id TEXT PRIMARY KEY, width INTEGER NOT NULL, height INTEGER NOT NULL, created TEXT NOT NULL, bytes INTEGER NOT NULL DEFAULT 0, accessed REAL NOT NULL DEFAULT 0, format TEXT NOT NULL DEFAULT 'png');
CREATE TABLE results (id TEXT PRIMARY KEY, image_id TEXT NOT NULL, model TEXT NOT NULL, method TEXT NOT NULL, target INTEGER NOT NULL, params TEXT NOT NULL, created TEXT NOT NULL, meta TEXT NOT NULL, bytes INTEGER NOT NULL DEFAULT 0, accessed REAL NOT NULL DEFAULT 0);
CREATE INDEX results_by_image ON results (image_id);
CREATE INDEX images_by_use ON images (accessed, created);
CREATE INDEX images_by_age ON images (created);
CREATE INDEX results_by_use ON results (accessed, created);
CREATE INDEX results_by_age ON results (created);
CREATE TABLE keys (name TEXT PRIMARY KEY, value BLOB NOT NULL);
PRAGMA user_version = 1;
"""


def v1_instance(root: str, image: Image.Image) -> tuple[bytes, str, str, np.ndarray]:
    """An instance folder as the schema-1 store wrote it (keyed ids, compact results, the secret
    in the table keys, journal mode delete). Returns (secret, image id, result id, map)."""
    secret = os.urandom(32)

    def key(kind: str, content: str) -> str:
        return hmac.new(secret, f"{kind}:{content}".encode(), hashlib.sha256).hexdigest()

    iid = key("image", imaging.image_id(image))
    os.makedirs(os.path.join(root, "images", iid[:2]))
    png = store_module.encode_image(image, "png")
    with open(os.path.join(root, "images", iid[:2], iid + ".png"), "wb") as f:
        f.write(png)
    rid = key("result", canonical_json({"image": iid, "model": "m", "method": "saliency",
                                        "params": {"abs": True}, "target": 3}))
    folder = os.path.join(root, "results", rid)
    os.makedirs(folder)
    attr = np.random.default_rng(2).standard_normal((1, 3, 4, 6)).astype(np.float32)
    meta = store_module.public_meta(meta_for(rid, {"id": iid, "width": 6, "height": 4}))
    files = {"input.png": png, "map.png": b"V1MAP", "attribution.npz": store_module.pack_map(attr),
             "meta.json": json.dumps(meta, indent=1).encode()}
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    with closing(sqlite3.connect(os.path.join(root, "index.sqlite3"))) as db:
        db.executescript(V1_SCHEMA)
        db.execute("INSERT INTO keys VALUES ('secret', ?)", (secret,))
        db.execute("INSERT INTO images VALUES (?, 6, 4, '2026-11-30T12:46:19Z', ?, 1796042779.95, 'png')",
                   (iid, len(png)))
        db.execute("INSERT INTO results VALUES (?, ?, 'm', 'saliency', 3, ?, '2026-11-30T12:46:19Z', ?, ?, "
                   "1796042779.96)", (rid, iid, canonical_json({"abs": True}), json.dumps(meta),
                                      sum(len(d) for d in files.values())))
        db.commit()
    os.chmod(os.path.join(root, "index.sqlite3"), 0o600)
    return secret, iid, rid, attr


def test_an_index_of_schema_1_is_upgraded_keeping_its_secret_ids_and_bytes(tmp_path, image):
    root = str(tmp_path / "v1")
    secret, iid, rid, attr = v1_instance(root, image)
    on_disk = sum(os.path.getsize(os.path.join(d, n)) for d, _s, names in os.walk(root) for n in names
                  if n != "index.sqlite3")
    store = Store(root)
    with closing(sqlite3.connect(os.path.join(root, "index.sqlite3"))) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4  # an older Insights refuses it
        assert dict(db.execute("SELECT name, value FROM meta")) == {"schema_version": "4", "secret": secret.hex()}
        assert db.execute("SELECT 1 FROM sqlite_master WHERE name = 'predictions'").fetchall()
        assert db.execute("SELECT 1 FROM sqlite_master WHERE name = 'quality'").fetchall()
        assert not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'keys'").fetchall()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert secret_of(store) == secret
    # The same secret: share links keep working and the same picture finds its stored upload.
    assert store.image_id(image) == iid and store.put_image(image)["id"] == iid
    assert store.result_id(iid, "m", "saliency", {"abs": True}, 3) == rid
    assert store.result(rid)["id"] == rid and store.result_file(rid, "map.png") == b"V1MAP"
    np.testing.assert_allclose(store.attribution(rid), attr, rtol=1e-3)
    assert store.total_bytes() == on_disk and len(store.files()) == len(Store(root).files())
    rid2 = save(store, image, target=4)
    assert Store(root).result(rid2) is not None and Store(root).delete_result(rid)
    assert store.result(rid) is None


def test_an_index_newer_than_this_version_is_refused(store):
    with closing(sqlite3.connect(os.path.join(store.root, "index.sqlite3"))) as db:
        db.execute("UPDATE meta SET value = '5' WHERE name = 'schema_version'")
        db.commit()
    with pytest.raises(RuntimeError, match="schema 5, newer than this version of Insights reads"):
        Store(store.root)


def test_a_read_only_mirror_leaves_the_writers_files_alone(store, image):
    rid = save(store, image)
    in_flight = os.path.join(store.root, "results", ".tmp-writing")
    os.makedirs(in_flight)  # another process's write, not yet renamed into place
    orphan = store.result_dir("d" * 64)
    os.makedirs(orphan)
    mirror = Store()
    mirror.read_only = True
    mirror.open(store.root)
    assert os.path.isdir(in_flight) and os.path.isdir(orphan)
    assert mirror.result(rid) == store.result(rid) and mirror.result_file(rid, "map.png") == b"PNGDATA"
