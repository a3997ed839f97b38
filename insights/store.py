"""Uploaded images and computed results on disk, indexed in SQLite.

Layout under the instance folder::

    index.sqlite3                 one row per image and per result
    images/<id[:2]>/<id>.png      the normalised RGB upload
    results/<id>/                 input.png, map.png, attribution.npy, meta.json

Every file is written to a temporary name in the same folder, flushed to disk and renamed into
place; a result folder is renamed into place whole, and its index row is written last. A crash
therefore never leaves a half-written result that the index points to.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from contextlib import closing, contextmanager
from typing import Any, Iterator

import numpy as np
from PIL import Image

from . import imaging

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY, width INTEGER NOT NULL, height INTEGER NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    id TEXT PRIMARY KEY, image_id TEXT NOT NULL, model TEXT NOT NULL, method TEXT NOT NULL,
    target INTEGER NOT NULL, params TEXT NOT NULL, created TEXT NOT NULL, meta TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS results_by_image ON results (image_id);
"""


def is_id(value: str) -> bool:
    """Ids are 64 lowercase hex digits (SHA-256); anything else never touches the disk."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=lambda v: list(v) if isinstance(v, tuple) else str(v))


def result_id(image_id: str, model: str, method: str, params: dict, target: int) -> str:
    """The id of a result: a hash of everything that determines it (params with defaults filled)."""
    key = canonical_json({"image": image_id, "model": model, "method": method, "params": params,
                          "target": int(target)})
    return hashlib.sha256(key.encode()).hexdigest()


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see the old file or the whole new one."""
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


class Store:
    """Images and results of one app. ``init_app`` points it at the app's instance folder."""

    def __init__(self, root: str | None = None):
        self.root = root
        self._lock = threading.Lock()  # serialises writers; SQLite readers run freely
        if root:
            self.open(root)

    def init_app(self, app) -> None:
        self.open(app.config["STORE_PATH"] or app.instance_path)

    def open(self, root: str) -> None:
        self.root = os.path.abspath(root)
        for sub in ("", "images", "results"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        with self._db() as db:
            db.executescript(SCHEMA)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Deletes temporary files and folders a crashed writer left (nothing indexes them)."""
        for folder, dirs, names in os.walk(self.root):
            for name in dirs + names:
                if name.startswith(".tmp-"):
                    path = os.path.join(folder, name)
                    if os.path.isdir(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        os.unlink(path)
            dirs[:] = [d for d in dirs if not d.startswith(".tmp-")]

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(os.path.join(self.root, "index.sqlite3"), timeout=30)) as db:
            db.row_factory = sqlite3.Row
            with db:  # one transaction, committed on success
                yield db

    # -- images ---------------------------------------------------------------------------

    def image_path(self, image_id: str) -> str:
        return os.path.join(self.root, "images", image_id[:2], image_id + ".png")

    def put_image(self, img: Image.Image) -> dict:
        """Stores an RGB image (once per content) and returns its record."""
        img = img.convert("RGB")
        iid = imaging.image_id(img)
        with self._lock:
            record = self.image(iid)
            if record is not None and os.path.isfile(self.image_path(iid)):
                return record
            os.makedirs(os.path.dirname(self.image_path(iid)), exist_ok=True)
            write_atomic(self.image_path(iid), imaging.png_bytes(img))
            with self._db() as db:
                db.execute("INSERT OR REPLACE INTO images (id, width, height, created) VALUES (?, ?, ?, ?)",
                           (iid, img.width, img.height, utc_now()))
        return {"id": iid, "width": img.width, "height": img.height}

    def image(self, image_id: str) -> dict | None:
        if not is_id(image_id):
            return None
        with self._db() as db:
            row = db.execute("SELECT id, width, height FROM images WHERE id = ?", (image_id,)).fetchone()
        return dict(row) if row else None

    def load_image(self, image_id: str) -> Image.Image:
        with Image.open(self.image_path(image_id)) as img:
            return img.convert("RGB")

    def image_png(self, image_id: str) -> bytes:
        with open(self.image_path(image_id), "rb") as f:
            return f.read()

    # -- results --------------------------------------------------------------------------

    def result_dir(self, rid: str) -> str:
        return os.path.join(self.root, "results", rid)

    def result(self, rid: str) -> dict | None:
        """The metadata of a stored result, or None (also for malformed ids)."""
        if not is_id(rid):
            return None
        with self._db() as db:
            row = db.execute("SELECT meta FROM results WHERE id = ?", (rid,)).fetchone()
        return json.loads(row["meta"]) if row else None

    def put_result(self, meta: dict, view: Image.Image, attribution: np.ndarray, map_png: bytes) -> dict:
        """Stores a result whose ``meta["id"]`` is its content id; returns the stored metadata."""
        rid = meta["id"]
        if not is_id(rid):
            raise ValueError(f"result id {rid!r} is not a SHA-256 hex digest")
        npy = io.BytesIO()
        np.save(npy, np.ascontiguousarray(attribution, dtype=np.float32), allow_pickle=False)
        files = {"input.png": imaging.png_bytes(view.convert("RGB")), "map.png": map_png,
                 "attribution.npy": npy.getvalue(), "meta.json": json.dumps(meta, indent=1).encode()}
        with self._lock:
            existing = self.result(rid)
            if existing is not None:
                return existing
            final = self.result_dir(rid)
            tmp = tempfile.mkdtemp(dir=os.path.join(self.root, "results"), prefix=".tmp-")
            try:
                for name, data in files.items():
                    write_atomic(os.path.join(tmp, name), data)
                if os.path.exists(final):  # left by a crash before its index row: not trusted
                    shutil.rmtree(final)
                os.replace(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _fsync_dir(os.path.join(self.root, "results"))
            with self._db() as db:
                db.execute("INSERT INTO results (id, image_id, model, method, target, params, created, meta) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (rid, meta["image"]["id"], meta["model"], meta["method"], int(meta["target"]),
                            canonical_json(meta["params"]), meta["created"], json.dumps(meta)))
        return meta

    def result_file(self, rid: str, name: str) -> bytes:
        with open(os.path.join(self.result_dir(rid), name), "rb") as f:
            return f.read()

    def attribution(self, rid: str) -> np.ndarray:
        return np.load(os.path.join(self.result_dir(rid), "attribution.npy"), allow_pickle=False)

    def results_for_image(self, image_id: str) -> list[dict]:
        with self._db() as db:
            rows = db.execute("SELECT meta FROM results WHERE image_id = ? ORDER BY created DESC",
                              (image_id,)).fetchall()
        return [json.loads(r["meta"]) for r in rows]

    def files(self) -> list[str]:
        """Every file under the store (relative paths), for tests and diagnostics."""
        out = []
        for folder, _dirs, names in os.walk(self.root):
            out += [os.path.relpath(os.path.join(folder, n), self.root) for n in names]
        return sorted(out)
