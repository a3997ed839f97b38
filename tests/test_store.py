"""The store: content ids, atomic writes, the SQLite index, and results across restarts."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from insights import imaging, store as store_module
from insights.store import Store, canonical_json, result_id


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
    rid = result_id(rec["id"], "m", "saliency", {"abs": True}, target)
    store.put_result(meta_for(rid, rec), image, np.full((1, 3, 4, 6), 0.5, np.float32), b"PNGDATA")
    return rid


def test_image_is_stored_once_by_content(store, image):
    a = store.put_image(image)
    b = store.put_image(image.copy())
    assert a == b == {"id": imaging.image_id(image), "width": 6, "height": 4}
    assert [f for f in store.files() if f.startswith("images/")] == [f"images/{a['id'][:2]}/{a['id']}.png"]
    assert np.array_equal(np.asarray(store.load_image(a["id"])), np.asarray(image))


def test_result_id_is_canonical():
    a = result_id("i", "m", "occlusion", {"strides": (3, 8, 8), "baselines": 0.0}, 1)
    b = result_id("i", "m", "occlusion", {"baselines": 0.0, "strides": [3, 8, 8]}, 1)
    assert a == b and len(a) == 64
    assert a != result_id("i", "m", "occlusion", {"baselines": 0.0, "strides": [3, 8, 8]}, 2)
    assert a != result_id("i", "m2", "occlusion", {"baselines": 0.0, "strides": [3, 8, 8]}, 1)
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'


def test_result_files_and_metadata(store, image):
    rid = save(store, image)
    assert store.result(rid)["target"] == 3
    assert store.result_file(rid, "map.png") == b"PNGDATA"
    assert np.array_equal(store.attribution(rid), np.full((1, 3, 4, 6), 0.5, np.float32))
    assert np.array_equal(np.asarray(Image.open(os.path.join(store.result_dir(rid), "input.png"))), np.asarray(image))
    assert [r["id"] for r in store.results_for_image(imaging.image_id(image))] == [rid]
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
    rid = result_id(imaging.image_id(image), "m", "saliency", {"abs": True}, 3)
    assert store.result(rid) is None
    assert not [f for f in store.files() if f.startswith("results/")]
    monkeypatch.setattr(store_module, "write_atomic", real)
    assert save(store, image) == rid and store.result(rid) is not None


def test_leftovers_of_a_crash_are_removed_on_open(store, image):
    rid = save(store, image)
    os.makedirs(os.path.join(store.root, "results", ".tmp-abc"))
    open(os.path.join(store.root, "results", ".tmp-abc", "map.png"), "wb").close()
    open(os.path.join(store.root, "images", ".tmp-def"), "wb").close()
    Store(store.root)
    assert not [f for f in store.files() if ".tmp-" in f]
    assert store.result_file(rid, "map.png") == b"PNGDATA"


def test_folder_without_index_row_is_replaced(store, image):
    """A crash after the rename but before the index row leaves a folder nobody trusts."""
    rec = store.put_image(image)
    rid = result_id(rec["id"], "m", "saliency", {"abs": True}, 3)
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
