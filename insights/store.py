"""Uploaded images and computed results on disk, indexed in SQLite, within a quota.

Layout under the instance folder::

    index.sqlite3                    one row per image and per result (its bytes on disk, when it
                                     was made and last used), and the store's secret key
    images/<id[:2]>/<id>.jpg|.png    the normalised RGB upload, without metadata: JPEG (quality 92,
                                     no chroma subsampling) when it came as a JPEG, else PNG
    results/<id>/                    input.png, map.png, attribution.npz (the full map, compact:
                                     float16, see :func:`pack_map`), meta.json

Ids are keyed hashes: HMAC-SHA256 under a secret of 32 random bytes made with the index and kept
in it, of the content (an image's pixels, a result's image, model, method, parameters and
target). The same picture therefore keeps one id within a store, and nobody without the secret
can compute an id from a photo or try targets.

Every file is written to a temporary name in the same folder, flushed to disk and renamed into
place; a result folder is renamed into place whole, and its index row is written last. Deleting
renames the files away to a ``.tmp-del-`` name first, then deletes the row, then the files; a
crash between two steps leaves a ``.tmp-`` name that :meth:`Store.open` clears (with the row it
names). So no row ever points to half-written files, and a reader finds whole files or a 404.

Quota: every row records the bytes of its files, and before a write the sum of them plus the new
files must fit ``max_bytes``: uploads that no result uses go first, least recently used first,
then the least recently used results (an upload a removed result left unused goes before the next
result). A write that cannot fit however much is removed raises :class:`StoreFull` (507) before
anything is written. Retention: rows older than ``retention_days`` are removed when the store
opens and by writes at most once an hour.
"""
from __future__ import annotations

import calendar
import hashlib
import hmac
import io
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from contextlib import closing, contextmanager
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from . import imaging
from .engine.errors import shown

# The first schema, kept as it was: a fresh index is made with it and then upgraded, so new and
# old index files go through the same steps.
BASE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS images (id TEXT PRIMARY KEY, width INTEGER NOT NULL, "
    "height INTEGER NOT NULL, created TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS results (id TEXT PRIMARY KEY, image_id TEXT NOT NULL, model TEXT NOT NULL, "
    "method TEXT NOT NULL, target INTEGER NOT NULL, params TEXT NOT NULL, created TEXT NOT NULL, meta TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS results_by_image ON results (image_id)",
)
SCHEMA_VERSION = 1  # PRAGMA user_version; 0 is the first schema
IMAGE_FORMATS = {"png": (".png", "image/png"), "jpeg": (".jpg", "image/jpeg")}
JPEG_OPTIONS = {"quality": 92, "subsampling": 0, "optimize": True}  # 4:4:4; no EXIF, ICC or comments
HALF_TOP = 32768.0  # the map's largest magnitude is stored as this float16 value (65504 is float16's largest)
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


class StoreFull(Exception):
    """A write that cannot fit the quota even with everything else evicted (HTTP 507)."""

    status, code, field = 507, "store_full", None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class Missing(LookupError):
    """A stored file that is gone (deleted or evicted while asked for): a 404."""

    status, code = 404, "not_found"

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.message, self.field = message, field


def is_id(value: str) -> bool:
    """Ids are 64 lowercase hex digits; anything else never touches the disk."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=lambda v: list(v) if isinstance(v, tuple) else str(v))


def utc_now() -> str:
    return time.strftime(TIME_FORMAT, time.gmtime())


def _iso(seconds: float) -> str:
    return time.strftime(TIME_FORMAT, time.gmtime(seconds))


def _epoch(iso: str, default: float) -> float:
    try:
        return float(calendar.timegm(time.strptime(iso, TIME_FORMAT)))
    except (TypeError, ValueError):
        return default


def public_meta(meta: dict) -> dict:
    """A result's metadata as it is stored and served: the upload it came from is described by
    its size only, never linked (the share page shows the model's crop, not the original)."""
    image = meta.get("image")
    if isinstance(image, dict):
        meta = {**meta, "image": {k: image[k] for k in ("width", "height") if k in image}}
    return meta


# --------------------------------------------------------------------------- files


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


def encode_image(img: Image.Image, fmt: str) -> bytes:
    """An RGB image as the store keeps it: JPEG or PNG, no metadata."""
    clean = img.convert("RGB")
    clean.info.clear()  # PNG would write an ICC profile found here
    if fmt == "jpeg":
        out = io.BytesIO()
        clean.save(out, format="JPEG", **JPEG_OPTIONS)
        return out.getvalue()
    return imaging.png_bytes(clean)


def pack_map(attribution: Any) -> bytes:
    """The full N×C×H×W map, compact: float16 scaled so that its largest magnitude is 32768 (the
    whole float16 range serves the map, whatever its units), the two bytes of each value in two
    planes (the high bytes compress well) in a compressed .npz. Unpacked values are within
    float16's rounding, 2^-11 of themselves, or 2^-40 of the largest magnitude for the tiniest."""
    a = np.ascontiguousarray(attribution, dtype=np.float32)
    finite = np.abs(a[np.isfinite(a)])
    peak = float(finite.max()) if finite.size else 0.0
    scale = peak / HALF_TOP if peak > 0 else 1.0
    half = (a.astype(np.float64) / scale).astype("<f2")
    planes = half.reshape(-1).view(np.uint8).reshape(-1, 2)
    out = io.BytesIO()
    np.savez_compressed(out, shape=np.asarray(a.shape, np.int64), scale=np.float64(scale),
                        low=planes[:, 0], high=planes[:, 1])
    return out.getvalue()


def unpack_map(data: bytes) -> np.ndarray:
    """Inverse of :func:`pack_map`: the float32 map. A stored ``.npy`` (results written before
    the compact format) is read as it is."""
    if data[:6] == b"\x93NUMPY":
        return np.load(io.BytesIO(data), allow_pickle=False)
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        half = np.stack([z["low"], z["high"]], axis=1).reshape(-1).view("<f2")
        return (half.astype(np.float64) * float(z["scale"])).astype(np.float32).reshape(tuple(z["shape"]))


def npy_bytes(stored: bytes) -> bytes:
    """The ``attribution.npy`` download of a stored map (:func:`pack_map`, or an old ``.npy``)."""
    if stored[:6] == b"\x93NUMPY":
        return stored
    out = io.BytesIO()
    np.save(out, unpack_map(stored), allow_pickle=False)
    return out.getvalue()


def _folder_bytes(path: str) -> int:
    try:
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file())
    except OSError:
        return 0


def _file_bytes(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _setting(value: Any, name: str, cast: Callable) -> Any:
    """A quota or retention setting: None (or null, empty) for none, else a positive number."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "null", "none")):
        return None
    try:
        number = cast(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or number <= 0:
        raise ValueError(f"setting {name} must be a positive number or null, got {value!r}")
    return number


class Store:
    """Images and results of one app. ``init_app`` points it at the app's instance folder and
    reads the quota (``STORE_MAX_BYTES``) and retention (``RETENTION_DAYS``) settings."""

    TOUCH_EVERY = 60.0  # a read records an item's last use at most this often (seconds)
    SWEEP_EVERY = 3600.0  # writes run the retention sweep at most this often (seconds)
    npy_bytes = staticmethod(npy_bytes)  # for the views, which reach the store only

    def __init__(self, root: str | None = None, *, max_bytes: int | None = None,
                 retention_days: float | None = None, clock: Callable[[], float] = time.time):
        self.root = root
        self.max_bytes = _setting(max_bytes, "STORE_MAX_BYTES", int)
        self.retention_days = _setting(retention_days, "RETENTION_DAYS", float)
        self.clock = clock
        self.read_only = False  # a read-only mirror: serves, and leaves cleaning to the instance that writes
        self._lock = threading.RLock()  # serialises writers; SQLite readers run freely
        self._secret = b""
        self._last_sweep = float("-inf")
        if root:
            self.open(root)

    def init_app(self, app) -> None:
        self.max_bytes = _setting(app.config.get("STORE_MAX_BYTES"), "STORE_MAX_BYTES", int)
        self.retention_days = _setting(app.config.get("RETENTION_DAYS"), "RETENTION_DAYS", float)
        flag = app.config.get("READ_ONLY")
        self.read_only = flag is True or str(flag).strip().lower() in ("1", "true", "yes", "on")
        self.open(app.config["STORE_PATH"] or app.instance_path)

    def open(self, root: str) -> None:
        self.root = os.path.abspath(root)
        for sub in ("", "images", "results"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self._migrate()
        if self.read_only:  # another process may be writing here: its temporary files are its own
            return
        with self._lock:
            self._finish_deletions()
            self._remove_leftovers()
            self._remove_orphans()
            self.sweep()

    # -- the index ------------------------------------------------------------------------

    def _index_path(self) -> str:
        return os.path.join(self.root, "index.sqlite3")

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self._index_path(), timeout=30)) as db:
            db.row_factory = sqlite3.Row
            with db:  # one transaction, committed on success
                yield db

    def _migrate(self) -> None:
        """Makes the index, or brings an older one up to :data:`SCHEMA_VERSION`, in one
        transaction (a second process opening the store at once waits, then finds it done)."""
        with closing(sqlite3.connect(self._index_path(), timeout=30, isolation_level=None)) as db:
            db.row_factory = sqlite3.Row
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in BASE_SCHEMA:
                    db.execute(statement)
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise RuntimeError(f"{self._index_path()} has schema {version}, newer than this "
                                       f"version of Insights reads ({SCHEMA_VERSION})")
                if version < 1:
                    self._upgrade_to_1(db)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                secret = db.execute("SELECT value FROM keys WHERE name = 'secret'").fetchone()["value"]
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        self._secret = bytes(secret)

    def _upgrade_to_1(self, db: sqlite3.Connection) -> None:
        """Schema 1: bytes and last use per row, the image's file format, the secret key; rows of
        an older index get their bytes from the disk and their last use from their creation,
        and stored metadata loses its link to the upload (:func:`public_meta`)."""
        for table, column in (("images", "bytes INTEGER NOT NULL DEFAULT 0"),
                              ("images", "accessed REAL NOT NULL DEFAULT 0"),
                              ("images", "format TEXT NOT NULL DEFAULT 'png'"),
                              ("results", "bytes INTEGER NOT NULL DEFAULT 0"),
                              ("results", "accessed REAL NOT NULL DEFAULT 0")):
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        for table in ("images", "results"):  # eviction and retention pick the oldest rows
            db.execute(f"CREATE INDEX {table}_by_use ON {table} (accessed, created)")
            db.execute(f"CREATE INDEX {table}_by_age ON {table} (created)")
        db.execute("CREATE TABLE keys (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
        db.execute("INSERT INTO keys (name, value) VALUES ('secret', ?)", (os.urandom(32),))
        now = self.clock()
        for row in db.execute("SELECT id, created FROM images").fetchall():
            db.execute("UPDATE images SET bytes = ?, accessed = ? WHERE id = ?",
                       (_file_bytes(self.image_path(row["id"])), _epoch(row["created"], now), row["id"]))
        for row in db.execute("SELECT id, created, meta FROM results").fetchall():
            meta = json.dumps(public_meta(json.loads(row["meta"])))
            db.execute("UPDATE results SET bytes = ?, accessed = ?, meta = ? WHERE id = ?",
                       (_folder_bytes(self.result_dir(row["id"])), _epoch(row["created"], now), meta, row["id"]))
        try:
            os.chmod(self._index_path(), 0o600)  # it holds the secret now
        except OSError:
            pass

    def _finish_deletions(self) -> None:
        """Removes the rows of deletions a crash interrupted (files renamed, row not yet gone)."""
        gone = [("results", name[len(".tmp-del-"):]) for name in os.listdir(os.path.join(self.root, "results"))
                if name.startswith(".tmp-del-")]
        for folder, _dirs, names in os.walk(os.path.join(self.root, "images")):
            gone += [("images", os.path.splitext(n[len(".tmp-del-"):])[0]) for n in names if n.startswith(".tmp-del-")]
        if gone:
            with self._db() as db:
                for table, key in gone:
                    db.execute(f"DELETE FROM {table} WHERE id = ?", (key,))

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

    def _remove_orphans(self) -> None:
        """Deletes stored files no row indexes (a crash after the rename, before the row): they
        could never be served, and the quota does not count them."""
        with self._db() as db:
            images = {r["id"] for r in db.execute("SELECT id FROM images")}
            results = {r["id"] for r in db.execute("SELECT id FROM results")}
        for name in os.listdir(os.path.join(self.root, "results")):
            if is_id(name) and name not in results:
                shutil.rmtree(os.path.join(self.root, "results", name), ignore_errors=True)
        for folder, _dirs, names in os.walk(os.path.join(self.root, "images")):
            for name in names:
                stem = os.path.splitext(name)[0]
                if is_id(stem) and stem not in images:
                    os.unlink(os.path.join(folder, name))

    def _touch(self, table: str, key: str, accessed: float) -> None:
        """Records a use of a row, at most once per :attr:`TOUCH_EVERY` seconds."""
        now = self.clock()
        if now - accessed < self.TOUCH_EVERY:
            return
        try:
            with self._db() as db:
                db.execute(f"UPDATE {table} SET accessed = ? WHERE id = ?", (now, key))
        except sqlite3.OperationalError:  # a read-only or busy index still serves
            pass

    # -- ids --------------------------------------------------------------------------------

    def _key(self, kind: str, content: str) -> str:
        return hmac.new(self._secret, f"{kind}:{content}".encode(), hashlib.sha256).hexdigest()

    def image_id(self, img: Image.Image) -> str:
        """The public id of an image: keyed hash of its pixels and size (imaging.image_id)."""
        return self._key("image", imaging.image_id(img))

    def result_id(self, image_id: str, model: str, method: str, params: dict, target: int) -> str:
        """The public id of a result: keyed hash of everything that determines it (the params
        with defaults filled, in canonical JSON)."""
        return self._key("result", canonical_json({"image": image_id, "model": model, "method": method,
                                                   "params": params, "target": int(target)}))

    # -- quota and retention ----------------------------------------------------------------

    def total_bytes(self) -> int:
        """Bytes of every stored image and result, as the index counts them."""
        with self._db() as db:
            row = db.execute("SELECT (SELECT COALESCE(SUM(bytes), 0) FROM images) + "
                             "(SELECT COALESCE(SUM(bytes), 0) FROM results) AS total").fetchone()
        return int(row["total"])

    def _next_victim(self, db: sqlite3.Connection, protect: str | None) -> tuple[str, str, int] | None:
        row = db.execute("SELECT id, bytes FROM images WHERE id IS NOT ? AND NOT EXISTS "
                         "(SELECT 1 FROM results WHERE results.image_id = images.id) "
                         "ORDER BY accessed, created LIMIT 1", (protect,)).fetchone()
        if row is not None:
            return "image", row["id"], int(row["bytes"])
        row = db.execute("SELECT id, bytes FROM results ORDER BY accessed, created LIMIT 1").fetchone()
        return ("result", row["id"], int(row["bytes"])) if row is not None else None

    def _make_room(self, needed: int, protect: str | None = None) -> None:
        """Evicts until ``needed`` more bytes fit the quota, or raises :class:`StoreFull` having
        evicted nothing. ``protect``: an image that stays (the one a new result is made from)."""
        if self.max_bytes is None:
            return
        total = self.total_bytes()
        if total + needed <= self.max_bytes:
            return
        with self._db() as db:
            row = db.execute("SELECT bytes FROM images WHERE id = ?", (protect,)).fetchone()
        kept = int(row["bytes"]) if row is not None else 0
        if needed + kept > self.max_bytes:
            raise StoreFull(f"{needed} bytes cannot be stored within the quota of {self.max_bytes} bytes "
                            "(STORE_MAX_BYTES), even with every other image and result removed")
        while total + needed > self.max_bytes:
            with self._db() as db:
                victim = self._next_victim(db, protect)
            if victim is None:  # cannot happen after the check above; never write past the quota
                raise StoreFull(f"the store cannot make room for {needed} bytes (STORE_MAX_BYTES)")
            kind, key, size = victim
            (self._delete_image if kind == "image" else self._delete_result)(key)
            total -= size

    def sweep(self) -> int:
        """Deletes results, and uploads no result uses, made more than ``retention_days`` ago;
        returns how many rows went."""
        self._last_sweep = self.clock()
        if not self.retention_days:
            return 0
        cutoff = _iso(self.clock() - self.retention_days * 86400)
        gone = 0
        with self._lock:
            with self._db() as db:
                old = [r["id"] for r in db.execute("SELECT id FROM results WHERE created < ?", (cutoff,))]
            gone += sum(self._delete_result(rid) for rid in old)
            with self._db() as db:
                old = [r["id"] for r in db.execute(
                    "SELECT id FROM images WHERE created < ? AND NOT EXISTS "
                    "(SELECT 1 FROM results WHERE results.image_id = images.id)", (cutoff,))]
            gone += sum(self._delete_image(iid) for iid in old)
        return gone

    def _before_write(self) -> None:
        if self.retention_days and self.clock() - self._last_sweep >= self.SWEEP_EVERY:
            self.sweep()

    # -- images ---------------------------------------------------------------------------

    def image_path(self, image_id: str, fmt: str = "png") -> str:
        return os.path.join(self.root, "images", image_id[:2], image_id + IMAGE_FORMATS[fmt][0])

    def _image_row(self, image_id: str) -> sqlite3.Row | None:
        if not is_id(image_id):
            return None
        with self._db() as db:
            return db.execute("SELECT id, width, height, format, accessed FROM images WHERE id = ?",
                              (image_id,)).fetchone()

    def put_image(self, img: Image.Image) -> dict:
        """Stores an RGB image (once per content) and returns its record. An image decoded from a
        JPEG (``img.info["source_format"]``, set by imaging.decode) is kept as a JPEG, others as
        PNG. Raises :class:`StoreFull` when it cannot fit the quota."""
        source = img.info.get("source_format") or img.format
        img = img.convert("RGB")
        iid = self.image_id(img)
        record = {"id": iid, "width": img.width, "height": img.height}
        row = self._image_row(iid)
        if row is not None and os.path.isfile(self.image_path(iid, row["format"])):
            self._touch("images", iid, row["accessed"])
            return record
        fmt = "jpeg" if source == "JPEG" else "png"
        data = encode_image(img, fmt)
        with self._lock:
            self._before_write()
            row = self._image_row(iid)
            if row is not None and os.path.isfile(self.image_path(iid, row["format"])):
                return record
            self._make_room(len(data))
            os.makedirs(os.path.dirname(self.image_path(iid)), exist_ok=True)
            write_atomic(self.image_path(iid, fmt), data)
            now = self.clock()
            with self._db() as db:
                db.execute("INSERT OR REPLACE INTO images (id, width, height, created, bytes, accessed, format) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?)", (iid, img.width, img.height, _iso(now), len(data), now, fmt))
        return record

    def image(self, image_id: str) -> dict | None:
        """A stored image's record (``id``, ``width``, ``height``), or None."""
        row = self._image_row(image_id)
        if row is None:
            return None
        self._touch("images", image_id, row["accessed"])
        return {"id": row["id"], "width": row["width"], "height": row["height"]}

    def image_file(self, image_id: str) -> tuple[bytes, str]:
        """The stored file of an image and its mimetype; :class:`Missing` when gone."""
        row = self._image_row(image_id)
        try:
            if row is None:
                raise FileNotFoundError(image_id)
            with open(self.image_path(image_id, row["format"]), "rb") as f:
                return f.read(), IMAGE_FORMATS[row["format"]][1]
        except FileNotFoundError:
            raise Missing(f"the image {shown(image_id)} is no longer stored; upload it again", "image") from None

    def load_image(self, image_id: str) -> Image.Image:
        data, _mimetype = self.image_file(image_id)
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")

    def _delete_image(self, image_id: str) -> bool:
        """Deletes an image's file and row (under the write lock): rename, row, file."""
        row = self._image_row(image_id)
        if row is None:
            return False
        path = self.image_path(image_id, row["format"])
        gone = os.path.join(os.path.dirname(path), ".tmp-del-" + os.path.basename(path))
        if os.path.exists(path):
            os.replace(path, gone)
            _fsync_dir(os.path.dirname(path))
        with self._db() as db:
            db.execute("DELETE FROM images WHERE id = ?", (image_id,))
        if os.path.exists(gone):
            os.unlink(gone)
        return True

    # -- results --------------------------------------------------------------------------

    def result_dir(self, rid: str) -> str:
        return os.path.join(self.root, "results", rid)

    def result(self, rid: str) -> dict | None:
        """The metadata of a stored result, or None (also for malformed ids)."""
        if not is_id(rid):
            return None
        with self._db() as db:
            row = db.execute("SELECT meta, accessed FROM results WHERE id = ?", (rid,)).fetchone()
        if row is None:
            return None
        self._touch("results", rid, row["accessed"])
        return json.loads(row["meta"])

    def put_result(self, meta: dict, view: Image.Image, attribution: np.ndarray, map_png: bytes,
                   image_id: str | None = None) -> dict:
        """Stores a result whose ``meta["id"]`` is its id, made from the image ``image_id``
        (default ``meta["image"]["id"]``); returns the stored metadata (:func:`public_meta`).
        Raises :class:`StoreFull`, having written nothing, when it cannot fit the quota."""
        rid = meta["id"]
        if not is_id(rid):
            raise ValueError(f"result id {rid!r} is not 64 hex digits")
        image_id = image_id or meta["image"]["id"]
        meta = public_meta(meta)
        files = {"input.png": encode_image(view, "png"), "map.png": map_png,
                 "attribution.npz": pack_map(attribution), "meta.json": json.dumps(meta, indent=1).encode()}
        size = sum(len(data) for data in files.values())
        with self._lock:
            self._before_write()
            existing = self.result(rid)
            if existing is not None:
                return existing
            self._make_room(size, protect=image_id)
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
            now = self.clock()
            with self._db() as db:
                db.execute("INSERT INTO results (id, image_id, model, method, target, params, created, meta, bytes, "
                           "accessed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (rid, image_id, meta["model"], meta["method"], int(meta["target"]),
                            canonical_json(meta["params"]), _iso(now), json.dumps(meta), size, now))
        return meta

    def result_file(self, rid: str, name: str) -> bytes:
        """One stored file of a result; :class:`Missing` when the result is gone."""
        try:
            with open(os.path.join(self.result_dir(rid), name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise Missing(f"no result with id {shown(rid)}", "result") from None

    def attribution_file(self, rid: str) -> bytes:
        """The stored full map (compact .npz, or the .npy of a result stored before it)."""
        try:
            return self.result_file(rid, "attribution.npz")
        except Missing:
            return self.result_file(rid, "attribution.npy")

    def attribution(self, rid: str) -> np.ndarray:
        """The full float32 map (see :func:`pack_map` for its precision)."""
        return unpack_map(self.attribution_file(rid))

    def delete_result(self, rid: str) -> bool:
        """Deletes a result's files and row; False when there was none."""
        if not is_id(rid):
            return False
        with self._lock:
            return self._delete_result(rid)

    def _delete_result(self, rid: str) -> bool:
        with self._db() as db:
            if db.execute("SELECT 1 FROM results WHERE id = ?", (rid,)).fetchone() is None:
                return False
        folder = os.path.join(self.root, "results")
        gone = os.path.join(folder, ".tmp-del-" + rid)
        if os.path.exists(gone):  # an earlier deletion's leftover
            shutil.rmtree(gone, ignore_errors=True)
        if os.path.isdir(self.result_dir(rid)):
            os.replace(self.result_dir(rid), gone)
            _fsync_dir(folder)
        with self._db() as db:
            db.execute("DELETE FROM results WHERE id = ?", (rid,))
        shutil.rmtree(gone, ignore_errors=True)
        return True

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
