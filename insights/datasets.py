"""Labelled datasets: where their items come from and what their labels mean to a model.

A dataset is a list of items, each an image and (maybe) a true label, from one of four sources:

* a folder in ImageFolder layout: one sub-folder per class, images anywhere below it;
* a CSV file of ``path,label`` rows (paths relative to the file's folder; a header row is optional);
* a folder of images without class sub-folders, or one image file (unlabelled items);
* Python objects (a notebook's): a ``torch.utils.data.Dataset`` or any iterable of (image, label).

Class names are matched to a model's labels by :func:`label_index`: the exact name, the index when
numeric, or the WordNet id for a model with ImageNet's 1000 classes. A name that is ambiguous in
the label list (ImageNet has two "crane" classes) is refused with a message asking for the index or
the id. A class folder that matches nothing is refused when the dataset opens (start-up); a CSV row
whose label matches nothing, and an image that cannot be read, make that item's ``error`` only; a
dataset that cannot be opened at start-up is logged and listed as unavailable with the reason, and
the server serves on without it.

No Flask and no model work here: :mod:`insights.dataset_jobs` computes predictions and explanations.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from . import imaging
from .engine.errors import shown

log = logging.getLogger("insights.datasets")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
WNID = re.compile(r"n\d{8}")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_FILE_BYTES = 64 * 1024 * 1024  # an item file larger than this is refused (its own error)
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


class DatasetError(ValueError):
    """A dataset that cannot be served as given; the message names the problem."""

    status, code = 400, "bad_dataset"

    def __init__(self, message: str, field: str | None = "dataset"):
        super().__init__(message)
        self.field = field


class ItemError(ValueError):
    """One item that cannot be read (its file is gone, not an image, too large). ``lasting``: the
    file itself is bad, so a prediction's failure may be kept."""

    status, code = 400, "bad_image"

    def __init__(self, message: str, field: str | None = "item", lasting: bool = False):
        super().__init__(message)
        self.field = field
        self.lasting = lasting


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """ImageNet-1k's WordNet ids in class-index order (the sorted synset list every ImageNet
    classifier indexes by; the file ships with the package)."""
    with open(os.path.join(DATA, "imagenet_wnids.txt"), encoding="ascii") as f:
        ids = tuple(line.strip() for line in f if line.strip())
    if len(ids) != 1000:
        raise RuntimeError(f"{DATA}/imagenet_wnids.txt holds {len(ids)} ids, not 1000")
    return ids


@lru_cache(maxsize=1)
def imagenet_lemmas() -> tuple[tuple[str, ...], ...]:
    """Each ImageNet-1k class's WordNet names (its synset's lemmas, e.g. "crane" for both the bird
    and the machine), in class-index order."""
    with open(os.path.join(DATA, "imagenet_lemmas.txt"), encoding="utf-8") as f:
        return tuple(tuple(n.strip() for n in line.split(",") if n.strip()) for line in f if line.strip())


@lru_cache(maxsize=1)
def _imagenet_labels() -> tuple[str, ...]:
    from .models import imagenet_labels

    return tuple(imagenet_labels())


def is_imagenet(labels: Sequence[str]) -> bool:
    """Whether a label list is ImageNet-1k's (torchvision's class names, in its order)."""
    return len(labels) == 1000 and tuple(labels) == _imagenet_labels()


def _plain(name: str) -> str:
    """A class name as folders often write it: case, underscores and spaces do not count."""
    return re.sub(r"[\s_]+", " ", name.strip().lower())


class LabelIndex:
    """Finds a class name's index in one label list (see :func:`label_index`)."""

    def __init__(self, labels: Sequence[str]):
        self.labels = list(labels)
        self.exact: dict[str, list[int]] = {}
        self.plain: dict[str, list[int]] = {}
        for i, label in enumerate(self.labels):
            self.exact.setdefault(label, []).append(i)
            self.plain.setdefault(_plain(label), []).append(i)
        self.wnids = {w: i for i, w in enumerate(imagenet_wnids())} if is_imagenet(self.labels) else {}
        if self.wnids:
            # ImageNet's WordNet names count too. A class's first name is as good as its label, so
            # "crane" (the first name of the bird, which torchvision calls "crane bird", and of the
            # machine) and "maillot" are ambiguous; its other names ("tabby cat") are matched when
            # nothing matches exactly, and only when they name one class.
            for i, names in enumerate(imagenet_lemmas()):
                for table, keys in ((self.exact, names[:1]), (self.plain, [_plain(n) for n in names])):
                    for key in keys:
                        if i not in table.setdefault(key, []):
                            table[key].append(i)

    def find(self, value: Any) -> int:
        """The index ``value`` names; :class:`DatasetError` when it names none or several."""
        if isinstance(value, bool):
            raise DatasetError(f"label {value!r} is not a class name or index", "label")
        if isinstance(value, (int, np.integer)):
            index = int(value)
            if not 0 <= index < len(self.labels):
                raise DatasetError(f"label index {index} is out of range: the model has {len(self.labels)} "
                                   f"classes (0–{len(self.labels) - 1})", "label")
            return index
        text = str(value).strip()
        if not text:
            raise DatasetError("an empty label names no class", "label")
        for table, key in ((self.exact, text), (self.plain, _plain(text))):
            hits = table.get(key)
            if hits and len(hits) > 1:
                raise DatasetError(self._ambiguous(text, hits), "label")
            if hits:
                return hits[0]
        if text.isdigit():
            return self.find(int(text))
        if WNID.fullmatch(text):
            if text in self.wnids:
                return self.wnids[text]
            if not self.wnids:
                raise DatasetError(f"label {shown(text)} is a WordNet id, but the model's labels are not "
                                   "ImageNet's 1000 classes; name the class or its index", "label")
        raise DatasetError(f"label {shown(text)} matches no class of the model ({len(self.labels)} classes, "
                           f"e.g. {', '.join(repr(v) for v in self.labels[:3])}); name a class exactly, by its index"
                           + (" or by its WordNet id" if self.wnids else ""), "label")

    def _ambiguous(self, text: str, hits: list[int]) -> str:
        ways = [f"{i}" + (f" ({imagenet_wnids()[i]})" if self.wnids else "") for i in sorted(hits)]
        return (f"label {shown(text)} is ambiguous: {len(hits)} classes are called that ({', '.join(ways)}); "
                "name it by its index" + (" or its WordNet id" if self.wnids else ""))


def label_index(value: Any, labels: Sequence[str]) -> int:
    """The index of the class ``value`` names in ``labels``: the exact name (or the same name with
    case, spaces and underscores aside), the index when numeric, or the WordNet id (``n02124075``)
    for ImageNet's classes. Raises :class:`DatasetError` naming the problem."""
    return LabelIndex(labels).find(value)


@dataclass
class Item:
    index: int
    key: str  # the path relative to the source's folder, or "#<n>" for Python objects
    label: int | None  # the true class's index in the dataset's labels; None: unlabelled or unknown
    label_name: str | None  # the label as the source wrote it
    error: str | None = None  # why the item cannot be used (an unknown label, an unreadable file)
    path: str | None = field(default=None, repr=False)  # the file, for file sources
    stamp: str = field(default="", repr=False)  # what identifies its content for the predictions cache

    def describe(self, labels: Sequence[str]) -> dict:
        true = None if self.label is None else {"index": self.label, "label": labels[self.label]}
        return {"index": self.index, "key": self.key, "true": true, "error": self.error}


class Dataset:
    """A named list of items and the label list their ``label`` indices refer to."""

    def __init__(self, name: str, kind: str, labels: Sequence[str], items: list[Item], loader=None):
        self.name, self.kind, self.labels, self.items = name, kind, list(labels), items
        self._loader = loader  # index → PIL image, for Python objects
        # Upload limits apply to dataset files too (the registry sets them from the settings).
        self.limits = {"max_pixels": 40_000_000, "max_aspect": 16, "max_side": 2048}
        self._errors_lock = threading.Lock()
        self.read_errors: dict[int, str] = {}  # items whose last read failed, and why
        self.fingerprint = hashlib.sha256("\n".join(i.stamp for i in items).encode()).hexdigest()[:16]
        self.notes: list[str] = []  # what the source held that is not an item (shown with the dataset)

    def __len__(self) -> int:
        return len(self.items)

    def item(self, index: Any) -> Item:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= int(index) < len(self.items):
            raise DatasetError(f"dataset {self.name!r} has no item {shown(index)} (items 0–{len(self.items) - 1})",
                               "item")
        return self.items[int(index)]

    def image(self, index: int, max_side: int | None = None) -> Image.Image:
        """The item's image, RGB, decoded with the upload limits (``max_side``: smaller still,
        for thumbnails); :class:`ItemError` when it cannot be read, whose ``lasting`` says whether
        the file itself is bad (it does not decode) rather than unreachable for now (gone, not a
        plain file, a Python dataset's error)."""
        item = self.item(index)
        side = min(max_side or self.limits["max_side"], self.limits["max_side"])
        try:
            if self._loader is not None:
                img = imaging.to_rgb(to_pil(self._loader(item.index)), side)
            else:
                img = imaging.decode(self._read(item), item.key, self.limits["max_pixels"],
                                     self.limits["max_aspect"], side)
        except ItemError as err:
            self._failed(item, err)
            raise
        except imaging.ImageError as err:
            raise self._failed(item, ItemError(f"{item.key}: {err}", lasting=True)) from None
        except OSError as err:
            raise self._failed(item, ItemError(f"{item.key}: cannot be read ({err.strerror or type(err).__name__})")) \
                from None
        except Exception as err:  # noqa: BLE001 - a Python dataset's own code, a conversion
            raise self._failed(item, ItemError(f"{item.key}: {type(err).__name__}: {err}")) from None
        with self._errors_lock:
            self.read_errors.pop(item.index, None)
        return img

    @staticmethod
    def _read(item: Item) -> bytes:
        """The item's file, refused unless it is a plain file of at most MAX_FILE_BYTES (a FIFO
        or a device would block or never end)."""
        # O_NONBLOCK: opening a FIFO for reading would wait for a writer (no effect on plain files).
        with os.fdopen(os.open(item.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ItemError(f"{item.key}: not a plain file", lasting=True)
            if st.st_size > MAX_FILE_BYTES:
                raise ItemError(f"{item.key}: the file is {st.st_size} bytes, more than {MAX_FILE_BYTES}", lasting=True)
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ItemError(f"{item.key}: the file is more than {MAX_FILE_BYTES} bytes", lasting=True)
        return data

    def _failed(self, item: Item, err: "ItemError") -> "ItemError":
        with self._errors_lock:
            self.read_errors[item.index] = str(err)
        return err

    def describe_item(self, index: int) -> dict:
        item = self.items[index]
        entry = item.describe(self.labels)
        entry["error"] = item.error or self.read_errors.get(index)
        return entry

    def classes(self) -> list[dict]:
        """Each true class present, with its count, most frequent first."""
        counts: dict[int, int] = {}
        for item in self.items:
            if item.label is not None:
                counts[item.label] = counts.get(item.label, 0) + 1
        return [{"index": i, "label": self.labels[i], "count": n}
                for i, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]

    def describe(self) -> dict:
        labelled = sum(1 for i in self.items if i.label is not None)
        return {"name": self.name, "kind": self.kind, "size": len(self.items), "labelled": labelled,
                "errors": len({i.index for i in self.items if i.error} | set(self.read_errors)), "classes": self.classes(), "notes": list(self.notes)}


# --------------------------------------------------------------------------- sources


def _images_below(folder: str) -> list[str]:
    """Image files below ``folder`` (hidden files and folders skipped), sorted."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append(os.path.join(root, name))
    return found


def _stamp(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}"


def _file_item(index: int, root: str, path: str, label: int | None, label_name: str | None,
               error: str | None = None) -> Item:
    key = os.path.relpath(path, root).replace(os.sep, "/")
    try:
        stamp = _stamp(path)
    except OSError as err:
        stamp, error = f"{path}\0missing", error or f"{key}: cannot be read ({err.strerror or type(err).__name__})"
    return Item(index, key, label, label_name, error, path, stamp)


def _check_size(n: int, max_items: int, where: str) -> None:
    if n > max_items:
        raise DatasetError(f"{where} holds {n} items, more than DATASET_MAX_ITEMS ({max_items})")


def open_folder(path: str, labels: Sequence[str], name: str, max_items: int = 100_000) -> Dataset:
    """An ImageFolder (class sub-folders) or, without sub-folders holding images, a folder of
    unlabelled images."""
    classes = sorted(d for d in os.listdir(path) if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))
    per_class = [(c, _images_below(os.path.join(path, c))) for c in classes]
    per_class = [(c, files) for c, files in per_class if files]
    if not per_class:
        files = [os.path.join(path, f) for f in sorted(os.listdir(path))
                 if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)
                 and os.path.isfile(os.path.join(path, f))]
        if not files:
            raise DatasetError(f"dataset folder {path} holds no images (looked for {', '.join(IMAGE_SUFFIXES)} "
                               "files in class sub-folders, or in the folder itself)")
        _check_size(len(files), max_items, f"dataset folder {path}")
        return Dataset(name, "images", labels, [_file_item(i, path, f, None, None) for i, f in enumerate(files)])
    index = LabelIndex(labels)
    resolved, problems = {}, []
    for c, _files in per_class:
        try:
            resolved[c] = index.find(c)
        except DatasetError as err:
            problems.append(f"class folder {c!r}: {err}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DatasetError(f"dataset folder {path}: " + "; ".join(problems[:3]) + more)
    _check_size(sum(len(f) for _c, f in per_class), max_items, f"dataset folder {path}")
    items = []
    for c, files in per_class:
        for f in files:
            items.append(_file_item(len(items), path, f, resolved[c], c))
    dataset = Dataset(name, "folder", labels, items)
    loose = [f for f in os.listdir(path) if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)
             and os.path.isfile(os.path.join(path, f))]
    if loose:
        dataset.notes.append(f"{len(loose)} image{'s' * (len(loose) != 1)} at the top of the folder "
                             f"({', '.join(sorted(loose)[:3])}{', …' if len(loose) > 3 else ''}) "
                             f"{'are' if len(loose) != 1 else 'is'} in no class folder and left out")
    return dataset


def open_csv(path: str, labels: Sequence[str], name: str, max_items: int = 100_000) -> Dataset:
    """A CSV of ``path,label`` rows; paths relative to the CSV's folder. A label that matches no
    class, or a missing file, is that item's error."""
    root = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and any(cell.strip() for cell in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DatasetError(f"dataset file {path} cannot be read as CSV: {err}") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    if not rows:
        raise DatasetError(f"dataset file {path} has no rows (expected path,label)")
    _check_size(len(rows), max_items, f"dataset file {path}")
    index = LabelIndex(labels)
    items = []
    for n, row in enumerate(rows):
        if len(row) < 2 or not row[0].strip():
            raise DatasetError(f"dataset file {path}, row {n + 1}: expected path,label; got {shown(','.join(row))}")
        file, label_name = row[0].strip(), row[1].strip()
        full = os.path.normpath(os.path.join(root, file))
        label, error = None, None
        if label_name:
            try:
                label = index.find(label_name)
            except DatasetError as err:
                error = f"{file}: {err}"
        item = _file_item(len(items), root, full, label, label_name or None, error)
        item.key = file
        items.append(item)
    return Dataset(name, "csv", labels, items)


def open_source(path: str, labels: Sequence[str], name: str | None = None, max_items: int = 100_000) -> Dataset:
    """The dataset at ``path``: a folder (ImageFolder, or unlabelled images), a ``.csv`` file, or
    one image file. Raises :class:`DatasetError` naming the problem."""
    if not isinstance(path, str) or not path.strip():
        raise DatasetError("a dataset needs a path")
    path = os.path.abspath(os.path.expanduser(path.strip()))
    name = name or default_name(path)
    if not os.path.exists(path):
        raise DatasetError(f"dataset {path} does not exist")
    try:
        if os.path.isdir(path):
            return open_folder(path, labels, name, max_items)
        if path.lower().endswith(".csv"):
            return open_csv(path, labels, name, max_items)
        if path.lower().endswith(IMAGE_SUFFIXES):
            root = os.path.dirname(path)
            return Dataset(name, "images", labels, [_file_item(0, root, path, None, None)])
    except PermissionError as err:
        raise DatasetError(f"dataset {path} cannot be read: {err.strerror}") from None
    raise DatasetError(f"dataset {path} is not a folder, a .csv file or an image ({', '.join(IMAGE_SUFFIXES)})")


def default_name(path: str) -> str:
    base = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "dataset"
    return cleaned[:64]


def parse_entry(entry: str) -> tuple[str | None, str]:
    """``name=DIR`` or ``DIR`` (a setting's or ``--dataset``'s value)."""
    if "=" in entry:
        name, path = entry.split("=", 1)
        if NAME.fullmatch(name.strip()):
            return name.strip(), path
    return None, entry


# --------------------------------------------------------------------------- Python objects


def to_pil(image: Any) -> Image.Image:
    """A PIL image from what datasets hold: a PIL image, an H×W(×C) uint8 array, or a C×H×W
    tensor (floats in 0–1, or uint8)."""
    if isinstance(image, Image.Image):
        return image
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() == 2:
            t = t.unsqueeze(0)
        if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
            raise ValueError(f"an image tensor must be C×H×W with 1, 3 or 4 channels; got {tuple(image.shape)}")
        if t.dtype == torch.uint8:
            arr = t.permute(1, 2, 0).numpy()
        else:
            arr = (t.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        image = arr
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
                arr = np.clip(np.nan_to_num(arr) * 255, 0, 255).round()
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ValueError(f"an image array must be H×W or H×W×C with 3 or 4 channels; got {image.shape}")
        return Image.fromarray(arr)
    raise ValueError(f"an item's image must be a PIL image, an array or a tensor, not {type(image).__name__}")


def _label_value(label: Any) -> Any:
    if label is None:
        return None
    try:
        import torch

        if isinstance(label, torch.Tensor):
            return int(label.item()) if label.numel() == 1 else None
    except ImportError:  # pragma: no cover
        pass
    if isinstance(label, np.ndarray):
        return int(label.item()) if label.size == 1 else None
    return label


def from_python(name: str, data: Any, labels: Sequence[str], max_items: int = 100_000) -> Dataset:
    """A dataset of Python objects: a map-style dataset (``len`` and ``[i]``, e.g. a
    ``torch.utils.data.Dataset``) read lazily, or any iterable of ``(image, label)`` pairs (read
    once, here). An image is a PIL image, an array or a tensor (:func:`to_pil`); a label a class
    index, a class name or None."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise DatasetError(f"dataset name {shown(name)} must be letters, digits, '-', '_' or '.' (up to 64)", "name")
    index = LabelIndex(labels)
    if hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(data, (list, tuple)):
        n = len(data)
        _check_size(n, max_items, f"dataset {name!r}")
        targets = getattr(data, "targets", None)
        if targets is None or len(targets) != n:
            targets = [_label_of(data, i) for i in range(n)]

        def load(i):
            return _pair(data[i], i)[0]
        raw = list(targets)
    else:
        pairs = []
        for i, pair in enumerate(data):
            if i >= max_items:
                raise DatasetError(f"dataset {name!r} holds more than DATASET_MAX_ITEMS ({max_items}) items")
            pairs.append(_pair(pair, i))
        raw = [label for _image, label in pairs]
        images = [image for image, _label in pairs]

        def load(i):
            return images[i]
    salt = os.urandom(8).hex()  # Python objects are not the same after a restart: nothing to reuse
    items = []
    for i, value in enumerate(raw):
        value = _label_value(value)
        label, error = None, None
        if value is not None:
            try:
                label = index.find(value)
            except DatasetError as err:
                error = f"#{i}: {err}"
        items.append(Item(i, f"#{i}", label, None if value is None else str(value), error, None, f"{salt}:{i}"))
    if not items:
        raise DatasetError(f"dataset {name!r} is empty")
    return Dataset(name, "python", labels, items, loader=load)


def _label_of(data: Any, i: int) -> Any:
    """Item ``i``'s label, read with its image (None when reading it fails: the item's image
    fails again when it is read, and that is its error)."""
    try:
        return _pair(data[i], i)[1]
    except DatasetError:
        raise
    except Exception:  # noqa: BLE001 - the dataset's own code
        return None


def _pair(pair: Any, i: int) -> tuple[Any, Any]:
    if isinstance(pair, (tuple, list)) and len(pair) >= 2:
        return pair[0], pair[1]
    if isinstance(pair, (tuple, list)) and len(pair) == 1:
        return pair[0], None
    if isinstance(pair, Image.Image) or hasattr(pair, "shape"):
        return pair, None
    raise DatasetError(f"item {i} of the dataset is a {type(pair).__name__}; expected (image, label)", "dataset")


# --------------------------------------------------------------------------- the registry


class DatasetRegistry:
    """The datasets one app serves. ``init_app`` opens the ``DATASETS`` setting's entries
    against the default model's labels; :meth:`add` takes others (a notebook's)."""

    def __init__(self):
        self._datasets: dict[str, Dataset] = {}
        self.unavailable: dict[str, str] = {}  # DATASETS entries that could not be opened, and why
        self.limits = {"max_pixels": 40_000_000, "max_aspect": 16, "max_side": 2048}
        self._guard = threading.Lock()

    def init_app(self, app, labels: Sequence[str]) -> None:
        cfg = app.config
        self.limits = {"max_pixels": int(cfg.get("MAX_IMAGE_PIXELS") or 40_000_000),
                       "max_aspect": cfg.get("MAX_ASPECT_RATIO") or 16,
                       "max_side": int(cfg.get("UPLOAD_MAX_SIDE") or 2048)}
        max_items = int(cfg.get("DATASET_MAX_ITEMS") or 100_000)
        entries = cfg.get("DATASETS") or []
        if isinstance(entries, str):
            entries = [entries]
        for entry in entries:
            if not isinstance(entry, str):
                raise DatasetError(f"setting DATASETS: each entry is a path or name=path, not {shown(entry)}")
            name, path = parse_entry(entry)
            name = name or default_name(os.path.abspath(os.path.expanduser(path.strip())))
            try:
                self.add(open_source(path, labels, name, max_items))
            except DatasetError as err:
                # The server serves on without it: the dataset list says why it is missing.
                self.unavailable[name] = str(err)
                log.error("dataset %s is not served: %s", name, err)

    def add(self, dataset: Dataset) -> Dataset:
        with self._guard:
            if dataset.name in self._datasets:
                raise DatasetError(f"two datasets are called {dataset.name!r}; name one with name=DIR", "name")
            dataset.limits = dict(self.limits)
            self._datasets[dataset.name] = dataset
        return dataset

    def names(self) -> list[str]:
        return list(self._datasets)

    def get(self, name: Any) -> Dataset:
        dataset = self._datasets.get(name) if isinstance(name, str) else None
        if dataset is None:
            from .errors import NotFound

            if isinstance(name, str) and name in self.unavailable:
                raise NotFound(f"dataset {name!r} is not served: {self.unavailable[name]}", "dataset")
            known = ", ".join(self._datasets) or "none"
            raise NotFound(f"no dataset named {shown(name)}; datasets: {known}", "dataset")
        return dataset


def image_bytes(img: Image.Image, size: int) -> bytes:
    """A JPEG thumbnail whose longer side is ``size`` pixels."""
    thumb = img.copy()
    thumb.thumbnail((size, size), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    thumb.convert("RGB").save(out, "JPEG", quality=82, optimize=True)
    return out.getvalue()


def iter_indices(values: Iterable[Any], size: int) -> list[int]:
    """Item indices from a request, each checked to be in range."""
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < size:
            raise DatasetError(f"items must be item indices 0–{size - 1}; got {shown(v)}", "items")
        out.append(v)
    return out
