"""insights/datasets.py: label matching (names, indices, WordNet ids, ambiguity), the four kinds of
source, item errors, and the predictions table of the store's index."""
from __future__ import annotations

import os
import sqlite3
from contextlib import closing

import numpy as np
import pytest
import torch
from PIL import Image

from insights import datasets as ds
from insights.datasets import DatasetError, ItemError, label_index, open_source
from insights.models import imagenet_labels
from insights.store import Store

LABELS = ["apple", "banana", "cherry", "date", "elderberry", "golden retriever"]
IMAGENET = imagenet_labels()


def picture(path, color=(200, 40, 40), size=(40, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


# --------------------------------------------------------------------------- labels


@pytest.mark.parametrize("value, index", [("apple", 0), ("Banana", 1), ("golden_retriever", 5),
                                          ("GOLDEN RETRIEVER", 5), ("3", 3), (4, 4), (np.int64(2), 2)])
def test_labels_are_matched_by_name_spelling_or_index(value, index):
    assert label_index(value, LABELS) == index


def test_wordnet_ids_name_imagenet_classes():
    assert label_index("n02124075", IMAGENET) == 285 and IMAGENET[285] == "Egyptian cat"
    assert label_index("n07920052", IMAGENET) == IMAGENET.index("espresso")
    assert label_index("n01440764", IMAGENET) == 0  # the first synset: tench
    assert len(ds.imagenet_wnids()) == 1000 and ds.imagenet_wnids() == tuple(sorted(ds.imagenet_wnids()))


def test_an_ambiguous_name_is_refused_naming_the_indices_and_ids():
    with pytest.raises(DatasetError) as err:
        label_index("crane", IMAGENET)
    message = str(err.value)
    assert "ambiguous" in message and "134 (n02012849)" in message and "517 (n03126707)" in message
    assert "index" in message and "WordNet id" in message
    # torchvision calls the bird "crane bird"; WordNet, whose names folders use, calls both "crane".
    assert (IMAGENET[134], IMAGENET[517]) == ("crane bird", "crane")
    assert label_index("134", IMAGENET) == 134 and label_index("n03126707", IMAGENET) == 517
    assert label_index("crane bird", IMAGENET) == 134  # unique: accepted
    with pytest.raises(DatasetError, match="'maillot' is ambiguous: 2 classes"):
        label_index("maillot", IMAGENET)


def test_imagenet_classes_answer_to_their_wordnet_names():
    assert label_index("tabby cat", IMAGENET) == label_index("tabby", IMAGENET) == 281
    assert label_index("Egyptian_cat", IMAGENET) == 285
    # A label that is only another class's secondary WordNet name stays that label's: "partridge" is
    # 86, though the ruffed grouse (82) is also called a partridge.
    for name in ("partridge", "crayfish", "polecat", "gong", "harp", "missile", "tub"):
        assert label_index(name, IMAGENET) == IMAGENET.index(name)
    ambiguous = []
    for label in set(IMAGENET):
        try:
            label_index(label, IMAGENET)
        except DatasetError:
            ambiguous.append(label)
    assert sorted(ambiguous) == ["crane", "maillot"]


@pytest.mark.parametrize("value, words", [
    ("kumquat", "matches no class of the model (6 classes"),
    ("9", "label index 9 is out of range: the model has 6 classes (0–5)"),
    (-1, "out of range"),
    ("n02124075", "is a WordNet id, but the model's labels are not ImageNet's"),
    ("", "an empty label names no class"),
    (True, "is not a class name or index"),
])
def test_unknown_labels_are_refused_with_a_message(value, words):
    with pytest.raises(DatasetError, match=words.replace("(", r"\(").replace(")", r"\)")):
        label_index(value, LABELS)


# --------------------------------------------------------------------------- sources


def test_an_image_folder_numbers_items_by_class_folder_then_file(tmp_path):
    root = tmp_path / "fruit"
    picture(str(root / "banana" / "b2.png"))
    picture(str(root / "banana" / "b1.jpg"))
    picture(str(root / "apple" / "nested" / "a1.png"))  # below the class folder counts too
    picture(str(root / "3" / "d.png"))  # by index: date
    picture(str(root / ".hidden" / "x.png"))
    (root / "apple" / "notes.txt").write_text("not an image")
    picture(str(root / "loose.png"))  # in no class folder: left out, and said so
    d = open_source(str(root), LABELS)
    assert d.describe()["notes"] == ["1 image at the top of the folder (loose.png) is in no class folder and left out"]
    assert d.name == "fruit" and d.kind == "folder" and len(d) == 4
    assert [(i.key, i.label, i.label_name) for i in d.items] == [
        ("3/d.png", 3, "3"), ("apple/nested/a1.png", 0, "apple"), ("banana/b1.jpg", 1, "banana"),
        ("banana/b2.png", 1, "banana")]
    assert d.describe()["classes"] == [{"index": 1, "label": "banana", "count": 2},
                                       {"index": 0, "label": "apple", "count": 1},
                                       {"index": 3, "label": "date", "count": 1}]
    img = d.image(2)
    assert img.mode == "RGB" and img.size == (40, 30)


def test_a_class_folder_without_a_label_stops_the_dataset_at_open(tmp_path):
    root = tmp_path / "birds"
    picture(str(root / "crane" / "c.png"))
    picture(str(root / "n01440764" / "t.png"))
    with pytest.raises(DatasetError) as err:
        open_source(str(root), IMAGENET)
    assert f"dataset folder {root}" in str(err.value) and "class folder 'crane'" in str(err.value)
    assert "134 (n02012849), 517 (n03126707)" in str(err.value)
    os.rename(root / "crane", root / "n02012849")
    d = open_source(str(root), IMAGENET, name="birds")
    assert sorted(i.label for i in d.items) == [0, 134]


@pytest.mark.parametrize("make, words", [
    (lambda p: None, "does not exist"),
    (lambda p: os.makedirs(p), "holds no images"),
    (lambda p: (os.makedirs(p), open(os.path.join(p, "a.txt"), "w").close()), "holds no images"),
])
def test_bad_dataset_paths_are_refused_with_a_message(tmp_path, make, words):
    path = str(tmp_path / "data")
    make(path)
    with pytest.raises(DatasetError, match=words):
        open_source(path, LABELS)


def test_a_folder_of_loose_images_and_one_image_are_unlabelled(tmp_path):
    picture(str(tmp_path / "loose" / "a.png"))
    picture(str(tmp_path / "loose" / "b.jpeg"))
    d = open_source(str(tmp_path / "loose"), LABELS)
    assert d.kind == "images" and [i.key for i in d.items] == ["a.png", "b.jpeg"]
    assert all(i.label is None for i in d.items) and d.describe()["labelled"] == 0
    one = open_source(str(tmp_path / "loose" / "a.png"), LABELS)
    assert len(one) == 1 and one.items[0].key == "a.png"


def test_a_dataset_larger_than_the_limit_is_refused(tmp_path):
    for k in range(3):
        picture(str(tmp_path / "many" / "apple" / f"{k}.png"))
    with pytest.raises(DatasetError, match="holds 3 items, more than DATASET_MAX_ITEMS \\(2\\)"):
        open_source(str(tmp_path / "many"), LABELS, max_items=2)


def test_a_csv_lists_paths_and_labels_with_per_item_errors(tmp_path):
    picture(str(tmp_path / "img" / "a.png"))
    picture(str(tmp_path / "img" / "b.png"))
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "list.csv").write_text("path,label\nimg/a.png,cherry\nimg/b.png,kumquat\n"
                                       "img/missing.png,apple\nimg/broken.png,2\nimg/a.png,\n")
    d = open_source(str(tmp_path / "list.csv"), LABELS)
    assert d.kind == "csv" and d.name == "list" and len(d) == 5
    assert [i.label for i in d.items] == [2, None, 0, 2, None]
    assert d.items[0].error is None and d.items[4].error is None and d.items[4].label_name is None
    assert "img/b.png" in d.items[1].error and "'kumquat' matches no class" in d.items[1].error
    assert "img/missing.png: cannot be read" in d.items[2].error
    with pytest.raises(ItemError, match="img/broken.png"):
        d.image(3)
    assert "img/broken.png" in d.describe_item(3)["error"]  # remembered for the grid
    assert d.describe()["errors"] == 3  # the unknown label, the missing file, the broken file
    (tmp_path / "bad.csv").write_text("only-one-column\n")
    with pytest.raises(DatasetError, match="row 1: expected path,label"):
        open_source(str(tmp_path / "bad.csv"), LABELS)


def test_item_images_get_the_upload_limits(tmp_path):
    picture(str(tmp_path / "odd" / "apple" / "strip.png"), size=(400, 10))
    os.mkfifo(tmp_path / "odd" / "apple" / "z-pipe.png")  # would block a plain open().read()
    d = open_source(str(tmp_path / "odd"), LABELS)
    with pytest.raises(ItemError, match="aspect ratio") as err:
        d.image(0)
    assert err.value.lasting  # the file itself is bad: its failure may be kept
    with pytest.raises(ItemError, match="z-pipe.png: not a plain file"):
        d.image(1)
    with pytest.raises(DatasetError, match="has no item 5"):
        d.image(5)


def test_python_objects_are_a_dataset(tmp_path):
    cat = Image.new("RGB", (20, 10), (250, 0, 0))
    pairs = [(cat, 0), (np.full((8, 8, 3), 9, np.uint8), "banana"), (torch.full((3, 6, 6), 0.5), torch.tensor(2)),
             (torch.zeros(1, 5, 5, dtype=torch.uint8), None), (cat, "kumquat")]
    d = ds.from_python("mine", iter(pairs), LABELS)
    assert d.kind == "python" and [i.label for i in d.items] == [0, 1, 2, None, None]
    assert "'kumquat' matches no class" in d.items[4].error
    assert d.image(0).getpixel((0, 0)) == (250, 0, 0)
    assert d.image(2).getpixel((0, 0)) == (128, 128, 128)  # 0.5 of 255, rounded
    assert d.image(3).mode == "RGB" and d.image(3).size == (5, 5)

    import torchvision

    fake = torchvision.datasets.FakeData(size=7, image_size=(3, 16, 16), num_classes=6, random_offset=3)
    d2 = ds.from_python("fake", fake, LABELS)
    assert len(d2) == 7 and [i.label for i in d2.items] == [int(fake[i][1]) for i in range(7)]
    assert np.array_equal(np.asarray(d2.image(4)), np.asarray(fake[4][0]))
    with pytest.raises(DatasetError, match="dataset name"):
        ds.from_python("no spaces allowed", pairs, LABELS)
    with pytest.raises(DatasetError, match="expected \\(image, label\\)"):
        ds.from_python("bad", [42], LABELS)


def test_the_registry_refuses_two_datasets_of_one_name(tmp_path):
    picture(str(tmp_path / "a" / "apple" / "x.png"))
    reg = ds.DatasetRegistry()
    reg.add(open_source(str(tmp_path / "a"), LABELS))
    with pytest.raises(DatasetError, match="two datasets are called 'a'"):
        reg.add(open_source(str(tmp_path / "a"), LABELS))
    assert reg.names() == ["a"] and reg.get("a").name == "a"
    with pytest.raises(Exception, match="no dataset named 'b'; datasets: a"):
        reg.get("b")
    assert ds.parse_entry("fruit=/data/x") == ("fruit", "/data/x") and ds.parse_entry("/data/x") == (None, "/data/x")


# --------------------------------------------------------------------------- the predictions table


def test_predictions_are_kept_in_the_index_and_an_index_of_schema_2_gains_the_table(tmp_path):
    store = Store(str(tmp_path / "s"))
    store.put_predictions("m", [("k1", 2, 0.625, 0.125, None), ("k2", None, None, None, "broken")])
    store.put_predictions("m", [("k1", 0, 0.5, None, None)])  # kept: the first row wins
    assert store.predictions("m", ["k1", "k2", "k3"]) == {"k1": (2, 0.625, 0.125, None),
                                                          "k2": (None, None, None, "broken")}
    assert store.predictions("other", ["k1"]) == {}
    store.close()
    with closing(sqlite3.connect(os.path.join(store.root, "index.sqlite3"))) as db:
        db.execute("DROP TABLE predictions")
        db.execute("DROP TABLE quality")  # schema 4's
        db.execute("UPDATE meta SET value = '2' WHERE name = 'schema_version'")
        db.execute("PRAGMA user_version = 2")
        db.commit()
    again = Store(store.root)
    assert again.predictions("m", ["k1"]) == {}
    again.put_predictions("m", [("k1", 1, 0.75, None, None)])
    assert again.predictions("m", ["k1"]) == {"k1": (1, 0.75, None, None)}
    with closing(sqlite3.connect(os.path.join(store.root, "index.sqlite3"))) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 4
