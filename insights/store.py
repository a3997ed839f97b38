"""Uploaded images and computed results on disk, indexed in a database, within a quota.

Layout under the store's folder (the instance folder or ``STORE_PATH``; with ``DATABASE_URL``,
``BLOB_DIR``, the folder every node mounts)::

    index.sqlite3                    the embedded index (without DATABASE_URL): one row per image
                                     and per result (its bytes on disk, when it was made and last
                                     used), and the store's secret key (tables: insights/db.py)
    images/<id[:2]>/<id>.jpg|.png    the normalised RGB upload, without metadata: JPEG (quality 92,
                                     no chroma subsampling) when it came as a JPEG, else PNG
    results/<id>/                    input.png, map.png, attribution.npz (the full map, compact:
                                     float16, see :func:`pack_map`), meta.json

Ids are keyed hashes: HMAC-SHA256 under a secret of 32 random bytes made with the index and kept
in it, of the content (an image's pixels, a result's image, model, method, parameters and
target). The same picture therefore keeps one id within a store, and nobody without the secret
can compute an id from a photo or try targets.

Writes: every file is written under a temporary ``.tmp-`` name in its folder and flushed to disk;
then, under the store's write lock (one lock for every node and process: :func:`db.lock_for_writing`),
in one transaction, the files are renamed into place (a result's folder whole) and the index row is
written last. When that transaction fails (the database went away), the files it renamed into place
are removed again. Deleting renames the files away to a ``.tmp-del-`` name, deletes the row, and
deletes the files once that has committed; an eviction whose transaction fails renames them back.
So no row ever points to half-written files, no file outlives a row that was never written, and a
reader on any node finds whole files or a 404. A crash between two steps leaves a ``.tmp-`` name or
a file no row indexes: :meth:`Store.open` finishes the deletions and removes such files under the
write lock (no writer is between two steps then), and removes temporary files older than
:attr:`Store.LEFTOVER_AGE` (younger ones may be another node's write in progress; the hourly sweep
removes them later).

Quota: every row records the bytes of its files, and before a write the sum of them plus the new
files must fit ``max_bytes``: uploads that no result uses go first, least recently used first,
then the least recently used results (an upload a removed result left unused goes before the next
result). The sum and the evictions happen in the write's own transaction, so nodes sharing the
store neither evict an item twice nor pass the quota together. A write that cannot fit however
much is removed raises :class:`StoreFull` (507) before anything is written. Retention: rows older
than ``retention_days`` are removed when the store opens and by writes at most once an hour.

A database that does not answer makes a call that needs the index raise
:class:`~insights.errors.StoreUnavailable` (503, ``Retry-After``) having written nothing; the
next call after the database is back succeeds (connections are checked before use).
"""
from __future__ import annotations

import calendar
import hashlib
import hmac
import io
import json
import os
import logging
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import sqlalchemy as sa
from PIL import Image

from . import db, imaging
from .db import SCHEMA_VERSION, images, results  # noqa: F401 - SCHEMA_VERSION: the store's, for callers
from .engine.errors import shown
from .errors import StoreUnavailable

log = logging.getLogger("insights.store")

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


def utc_now_precise() -> str:
    """The time in ISO 8601 UTC to the microsecond (sorts as text, after :func:`utc_now`'s second)."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


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


def write_temp(folder: str, data: bytes) -> str:
    """Writes ``data`` to a new ``.tmp-`` file in ``folder``, flushed to disk; returns its path."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink(tmp)
        raise
    return tmp


def write_atomic(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see the old file or the whole new one."""
    folder = os.path.dirname(path)
    tmp = write_temp(folder, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    _fsync_dir(folder)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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


class _Write:
    """One write transaction: its connection, what to undo on disk if it fails (files renamed
    into place or away), and what to delete once it has committed (files renamed away)."""

    def __init__(self, conn: sa.Connection):
        self.conn = conn
        self._undo: list[Callable[[], None]] = []
        self._after: list[Callable[[], None]] = []

    def on_failure(self, step: Callable[[], None]) -> None:
        self._undo.append(step)

    def after_commit(self, step: Callable[[], None]) -> None:
        self._after.append(step)

    def undo(self) -> None:
        while self._undo:  # newest first; each once, however often called
            try:
                self._undo.pop()()
            except OSError:
                log.warning("could not undo a step of a failed write", exc_info=True)

    def committed(self) -> None:
        for step in self._after:
            step()


def _rename_back(gone: str, path: str) -> Callable[[], None]:
    def step() -> None:
        if os.path.exists(gone) and not os.path.exists(path):
            os.replace(gone, path)
    return step


def _remove(path: str) -> Callable[[], None]:
    def step() -> None:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            _unlink(path)
    return step


_RESULT = sa.select(results.c.meta, results.c.accessed).where(results.c.id == sa.bindparam("key"))
_IMAGE = sa.select(images.c.id, images.c.width, images.c.height, images.c.format,
                   images.c.accessed).where(images.c.id == sa.bindparam("key"))
_TOTAL = sa.select(sa.func.coalesce(sa.select(sa.func.sum(images.c.bytes)).scalar_subquery(), 0)
                   + sa.func.coalesce(sa.select(sa.func.sum(results.c.bytes)).scalar_subquery(), 0))


class Store:
    """Images and results of one app. ``init_app`` points it at the app's instance folder (or
    ``STORE_PATH``; with ``DATABASE_URL``, at ``BLOB_DIR`` and that database) and reads the quota
    (``STORE_MAX_BYTES``) and retention (``RETENTION_DAYS``) settings."""

    TOUCH_EVERY = 60.0  # a read records an item's last use at most this often (seconds)
    SWEEP_EVERY = 3600.0  # writes run the retention sweep at most this often (seconds)
    LEFTOVER_AGE = 3600.0  # a temporary file younger than this may be a write in progress (seconds)
    SWEEP_BATCH = 200  # rows the sweep deletes per transaction (other writers wait at most one)
    RETRY_AFTER_S = 5  # what a 503 store_unavailable suggests
    npy_bytes = staticmethod(npy_bytes)  # for the views, which reach the store only

    def __init__(self, root: str | None = None, *, max_bytes: int | None = None,
                 retention_days: float | None = None, clock: Callable[[], float] = time.time,
                 database_url: str | None = None):
        self.root = root
        self.max_bytes = _setting(max_bytes, "STORE_MAX_BYTES", int)
        self.retention_days = _setting(retention_days, "RETENTION_DAYS", float)
        self.clock = clock
        self.database_url = database_url or None  # None: index.sqlite3 in the store's folder
        self.read_only = False  # a read-only mirror: serves, and leaves cleaning to the instance that writes
        self.engine: sa.Engine | None = None
        self._reader: sa.Engine | None = None  # the engine for reads (autocommit)
        self._lock = threading.RLock()  # this process's writers in turn (the database's lock is for all)
        self._local = threading.local()  # .write: the write transaction this thread is in
        self._secret = b""
        self._last_sweep = float("-inf")
        if root:
            self.open(root)

    def init_app(self, app) -> None:
        self.max_bytes = _setting(app.config.get("STORE_MAX_BYTES"), "STORE_MAX_BYTES", int)
        self.retention_days = _setting(app.config.get("RETENTION_DAYS"), "RETENTION_DAYS", float)
        flag = app.config.get("READ_ONLY")
        self.read_only = flag is True or str(flag).strip().lower() in ("1", "true", "yes", "on")
        url, blobs = app.config.get("DATABASE_URL") or None, app.config.get("BLOB_DIR") or None
        if url and not blobs:
            raise ValueError("setting BLOB_DIR must name the folder every node mounts for the files of "
                             "images and results when DATABASE_URL is set")
        if blobs and not url:
            raise ValueError("setting BLOB_DIR is used with DATABASE_URL only; without it the store is "
                             "STORE_PATH (or the instance folder)")
        if url:
            db.parse_url(url)  # a malformed URL is refused with the setting's name
        self.database_url = url
        self.open(blobs if url else (app.config["STORE_PATH"] or app.instance_path))

    def open(self, root: str) -> None:
        self.root = os.path.abspath(root)
        for sub in ("", "images", "results"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self.close()
        self.engine = db.make_engine(self.database_url, self.root)
        self._reader = db.reader(self.engine)
        with self._unavailable_as_503():
            self._secret = db.prepare(self.engine, self._upgrade_to_1)
        if self.read_only:  # another process may be writing here: its temporary files are its own
            return
        with self._lock:
            self._clean_up()
            self.sweep()

    def close(self) -> None:
        """Closes the index's connections (a later call opens new ones)."""
        if self.engine is not None:
            self.engine.dispose()

    # -- the index ------------------------------------------------------------------------

    @contextmanager
    def _unavailable_as_503(self) -> Iterator[None]:
        try:
            yield
        except sa.exc.SQLAlchemyError as exc:
            if not db.is_unavailable(exc):
                raise
            cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            log.warning("the store's index does not answer: %s", cause[0] if cause else type(exc).__name__)
            raise StoreUnavailable("the index of images and results (the database) does not answer; "
                                   f"try again in {self.RETRY_AFTER_S} s", self.RETRY_AFTER_S) from exc

    @contextmanager
    def _reading(self) -> Iterator[sa.Connection]:
        """A connection for reads; inside this thread's write, that write's own (a second
        connection to SQLite would wait for the lock this thread holds)."""
        write = getattr(self._local, "write", None)
        if write is not None:
            yield write.conn
            return
        with self._unavailable_as_503(), self._reader.connect() as conn:
            yield conn

    @contextmanager
    def _writing(self) -> Iterator[_Write]:
        """One write transaction under the store's write lock (this process's threads in turn,
        then the database's lock for every node); a write already open on this thread is joined.
        When it fails, the files it moved are moved back before the lock goes; once it has
        committed, the files it renamed away are deleted."""
        outer = getattr(self._local, "write", None)
        if outer is not None:
            yield outer
            return
        with self._lock:
            with self._unavailable_as_503(), self.engine.connect() as conn:
                conn.execution_options(**{db.WRITE: True})
                write = self._local.write = _Write(conn)
                try:
                    with conn.begin():
                        db.lock_for_writing(conn)
                        try:
                            yield write
                        except BaseException:
                            write.undo()  # still under the lock: no other node sees the moves
                            raise
                except BaseException:
                    write.undo()  # the commit failed
                    raise
                finally:
                    self._local.write = None
            write.committed()

    def _upgrade_to_1(self, conn: sa.Connection) -> None:
        """Schema 1: bytes and last use per row, the image's file format, the secret key; rows of
        an older index get their bytes from the disk and their last use from their creation,
        and stored metadata loses its link to the upload (:func:`public_meta`)."""
        for table, column in (("images", "bytes INTEGER NOT NULL DEFAULT 0"),
                              ("images", "accessed REAL NOT NULL DEFAULT 0"),
                              ("images", "format TEXT NOT NULL DEFAULT 'png'"),
                              ("results", "bytes INTEGER NOT NULL DEFAULT 0"),
                              ("results", "accessed REAL NOT NULL DEFAULT 0")):
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column}")
        for table in ("images", "results"):  # eviction and retention pick the oldest rows
            conn.exec_driver_sql(f"CREATE INDEX {table}_by_use ON {table} (accessed, created)")
            conn.exec_driver_sql(f"CREATE INDEX {table}_by_age ON {table} (created)")
        conn.exec_driver_sql("CREATE TABLE keys (name TEXT PRIMARY KEY, value BLOB NOT NULL)")
        conn.execute(sa.text("INSERT INTO keys (name, value) VALUES ('secret', :value)"), {"value": os.urandom(32)})
        now = self.clock()
        for row in conn.execute(sa.select(images.c.id, images.c.created)).all():
            conn.execute(images.update().where(images.c.id == row.id).values(
                bytes=_file_bytes(self.image_path(row.id)), accessed=_epoch(row.created, now)))
        for row in conn.execute(sa.select(results.c.id, results.c.created, results.c.meta)).all():
            conn.execute(results.update().where(results.c.id == row.id).values(
                bytes=_folder_bytes(self.result_dir(row.id)), accessed=_epoch(row.created, now),
                meta=json.dumps(public_meta(json.loads(row.meta)))))

    def _clean_up(self) -> None:
        """Clears what crashes left (at open, and hourly by writes): deletions a crash cut short
        (files renamed away, the row maybe still there) are finished, files no row indexes (a
        crash after the rename, before the row: never served, not counted by the quota) are
        removed, then temporary files old enough to be nobody's write. Both lists are made
        without the lock and each item checked again under it, where no writer is between two
        steps of a write, so the lock is held for the few items found, not for the listing."""
        deleting, orphans = self._renamed_away(), self._unindexed()
        if deleting or orphans:
            with self._writing() as write:
                for table, key, path in deleting:
                    if os.path.exists(path):  # else its writer has finished, or undone, it since
                        write.conn.execute(table.delete().where(table.c.id == key))
                        write.after_commit(_remove(path))
                for table, key, path in orphans:
                    if write.conn.execute(sa.select(table.c.id).where(table.c.id == key)).first() is None:
                        _remove(path)()
        self._remove_leftovers()

    def _renamed_away(self) -> list[tuple[sa.Table, str, str]]:
        found = [(results, name[len(".tmp-del-"):], os.path.join(self.root, "results", name))
                 for name in os.listdir(os.path.join(self.root, "results")) if name.startswith(".tmp-del-")]
        for folder, _dirs, names in os.walk(os.path.join(self.root, "images")):
            found += [(images, os.path.splitext(n[len(".tmp-del-"):])[0], os.path.join(folder, n))
                      for n in names if n.startswith(".tmp-del-")]
        return found

    def _unindexed(self) -> list[tuple[sa.Table, str, str]]:
        with self._reading() as conn:  # the rows first: a file renamed into place after is checked again
            kept_images = set(conn.execute(sa.select(images.c.id)).scalars())
            kept_results = set(conn.execute(sa.select(results.c.id)).scalars())
        found = [(results, name, os.path.join(self.root, "results", name))
                 for name in os.listdir(os.path.join(self.root, "results")) if is_id(name) and name not in kept_results]
        for folder, _dirs, names in os.walk(os.path.join(self.root, "images")):
            found += [(images, os.path.splitext(n)[0], os.path.join(folder, n)) for n in names
                      if is_id(os.path.splitext(n)[0]) and os.path.splitext(n)[0] not in kept_images]
        return found

    def _remove_leftovers(self) -> None:
        """Deletes temporary files and folders older than :attr:`LEFTOVER_AGE`: a crashed
        writer's (younger ones may be another node's write in progress)."""
        now = time.time()  # files' ages are the disk's, not the store's clock
        for folder, dirs, names in os.walk(self.root):
            for name in dirs + names:
                if not name.startswith(".tmp-") or name.startswith(".tmp-del-"):  # those: _clean_up
                    continue
                path = os.path.join(folder, name)
                try:
                    if now - os.lstat(path).st_mtime < self.LEFTOVER_AGE:
                        continue
                except FileNotFoundError:
                    continue
                _remove(path)()
            dirs[:] = [d for d in dirs if not d.startswith(".tmp-")]

    def _touch(self, table: sa.Table, key: str, accessed: float) -> None:
        """Records a use of a row, at most once per :attr:`TOUCH_EVERY` seconds."""
        now = self.clock()
        if now - accessed < self.TOUCH_EVERY or getattr(self._local, "write", None) is not None:
            return
        try:
            with self._reader.connect() as conn:  # one statement, committed by itself
                conn.execute(table.update().where(table.c.id == key).values(accessed=now))
        except sa.exc.SQLAlchemyError:  # a read-only, busy or unreachable index still serves what it found
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
        with self._reading() as conn:
            return int(conn.execute(_TOTAL).scalar_one())

    def _image_bytes(self, image_id: str | None) -> int:
        if image_id is None:
            return 0
        with self._reading() as conn:
            return int(conn.execute(sa.select(images.c.bytes).where(images.c.id == image_id)).scalar() or 0)

    def _check_fits(self, needed: int, protect: str | None = None) -> None:
        """Raises :class:`StoreFull` when ``needed`` bytes cannot fit the quota even with every
        other item removed (checked before anything is written)."""
        if self.max_bytes is not None and needed + self._image_bytes(protect) > self.max_bytes:
            raise StoreFull(f"{needed} bytes cannot be stored within the quota of {self.max_bytes} bytes "
                            "(STORE_MAX_BYTES), even with every other image and result removed")

    def _next_victim(self, conn: sa.Connection, protect: str | None,
                     keep: str | None = None) -> tuple[str, str, int] | None:
        unused = ~sa.exists().where(results.c.image_id == images.c.id)
        row = conn.execute(sa.select(images.c.id, images.c.bytes)
                           .where(images.c.id.is_distinct_from(protect), unused)
                           .order_by(images.c.accessed, images.c.created).limit(1)).first()
        if row is not None:
            return "image", row.id, int(row.bytes)
        row = conn.execute(sa.select(results.c.id, results.c.bytes).where(results.c.id.is_distinct_from(keep))
                           .order_by(results.c.accessed, results.c.created).limit(1)).first()
        return ("result", row.id, int(row.bytes)) if row is not None else None

    def _make_room(self, needed: int, protect: str | None = None, keep: str | None = None) -> None:
        """Evicts until ``needed`` more bytes fit the quota, or raises :class:`StoreFull` having
        evicted nothing. ``protect``: an image that stays (the one a new result is made from);
        ``keep``: a result that stays (the one a measurement is added to). Runs in the caller's
        write transaction: the bytes it counts are every node's."""
        if self.max_bytes is None:
            return
        with self._writing() as write:
            total = int(write.conn.execute(_TOTAL).scalar_one())
            if total + needed <= self.max_bytes:
                return
            self._check_fits(needed, protect)
            while total + needed > self.max_bytes:
                victim = self._next_victim(write.conn, protect, keep)
                if victim is None:  # cannot happen after the check above; never write past the quota
                    raise StoreFull(f"the store cannot make room for {needed} bytes (STORE_MAX_BYTES)")
                kind, key, size = victim
                (self._delete_image if kind == "image" else self._delete_result)(key)
                total -= size

    def sweep(self) -> int:
        """Deletes results, and uploads no result uses, made more than ``retention_days`` ago;
        returns how many rows went. At most :attr:`SWEEP_BATCH` rows per transaction."""
        self._last_sweep = self.clock()
        if not self.retention_days:
            return 0
        cutoff = _iso(self.clock() - self.retention_days * 86400)
        unused = ~sa.exists().where(results.c.image_id == images.c.id)
        gone = 0
        for table, delete, old in ((results, self._delete_result, results.c.created < cutoff),
                                   (images, self._delete_image, sa.and_(images.c.created < cutoff, unused))):
            while True:
                with self._writing() as write:
                    keys = list(write.conn.execute(sa.select(table.c.id).where(old).limit(self.SWEEP_BATCH)).scalars())
                    gone += sum(delete(key) for key in keys)
                if len(keys) < self.SWEEP_BATCH:
                    break
        return gone

    def _before_write(self) -> None:
        if self.clock() - self._last_sweep >= self.SWEEP_EVERY:
            self.sweep()
            self._clean_up()

    # -- images ---------------------------------------------------------------------------

    def image_path(self, image_id: str, fmt: str = "png") -> str:
        return os.path.join(self.root, "images", image_id[:2], image_id + IMAGE_FORMATS[fmt][0])

    def _image_row(self, image_id: str) -> sa.Row | None:
        if not is_id(image_id):
            return None
        with self._reading() as conn:
            return conn.execute(_IMAGE, {"key": image_id}).first()

    def put_image(self, img: Image.Image) -> dict:
        """Stores an RGB image (once per content) and returns its record. An image decoded from a
        JPEG (``img.info["source_format"]``, set by imaging.decode) is kept as a JPEG, others as
        PNG. Raises :class:`StoreFull` when it cannot fit the quota."""
        source = img.info.get("source_format") or img.format
        img = img.convert("RGB")
        iid = self.image_id(img)
        record = {"id": iid, "width": img.width, "height": img.height}
        row = self._image_row(iid)
        if row is not None and os.path.isfile(self.image_path(iid, row.format)):
            self._touch(images, iid, row.accessed)
            return record
        fmt = "jpeg" if source == "JPEG" else "png"
        data = encode_image(img, fmt)
        self._check_fits(len(data))
        folder = os.path.dirname(self.image_path(iid))
        os.makedirs(folder, exist_ok=True)
        tmp = write_temp(folder, data)
        try:
            self._before_write()
            with self._writing() as write:
                row = write.conn.execute(_IMAGE, {"key": iid}).first()
                if row is not None and os.path.isfile(self.image_path(iid, row.format)):
                    return record  # stored meanwhile, by another thread or node
                self._make_room(len(data))
                path = self.image_path(iid, fmt)
                os.replace(tmp, path)
                _fsync_dir(folder)
                write.on_failure(_remove(path))
                now = self.clock()
                values = {"width": img.width, "height": img.height, "created": _iso(now), "bytes": len(data),
                          "accessed": now, "format": fmt}
                if row is not None:  # its file was gone: the row is renewed
                    write.conn.execute(images.update().where(images.c.id == iid).values(**values))
                else:
                    db.insert_once(write.conn, images, {"id": iid, **values})
        finally:
            _unlink(tmp)
        return record

    def image(self, image_id: str) -> dict | None:
        """A stored image's record (``id``, ``width``, ``height``), or None."""
        row = self._image_row(image_id)
        if row is None:
            return None
        self._touch(images, image_id, row.accessed)
        return {"id": row.id, "width": row.width, "height": row.height}

    def image_file(self, image_id: str) -> tuple[bytes, str]:
        """The stored file of an image and its mimetype; :class:`Missing` when gone."""
        row = self._image_row(image_id)
        try:
            if row is None:
                raise FileNotFoundError(image_id)
            with open(self.image_path(image_id, row.format), "rb") as f:
                return f.read(), IMAGE_FORMATS[row.format][1]
        except FileNotFoundError:
            raise Missing(f"the image {shown(image_id)} is no longer stored; upload it again", "image") from None

    def load_image(self, image_id: str) -> Image.Image:
        data, _mimetype = self.image_file(image_id)
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")

    def _delete_image(self, image_id: str) -> bool:
        """Deletes an image's file and row, in a write (the caller's, or its own): rename, row,
        and the file once the write has committed."""
        with self._writing() as write:
            row = write.conn.execute(_IMAGE, {"key": image_id}).first()
            if row is None:
                return False
            path = self.image_path(image_id, row.format)
            gone = os.path.join(os.path.dirname(path), ".tmp-del-" + os.path.basename(path))
            if os.path.exists(path):
                os.replace(path, gone)
                _fsync_dir(os.path.dirname(path))
                write.on_failure(_rename_back(gone, path))
            write.conn.execute(images.delete().where(images.c.id == image_id))
            write.after_commit(_remove(gone))
        return True

    # -- results --------------------------------------------------------------------------

    def result_dir(self, rid: str) -> str:
        return os.path.join(self.root, "results", rid)

    def result(self, rid: str) -> dict | None:
        """The metadata of a stored result, or None (also for malformed ids)."""
        if not is_id(rid):
            return None
        with self._reading() as conn:
            row = conn.execute(_RESULT, {"key": rid}).first()
        if row is None:
            return None
        self._touch(results, rid, row.accessed)
        return json.loads(row.meta)

    def put_result(self, meta: dict, view: Image.Image, attribution: np.ndarray, map_png: bytes,
                   image_id: str | None = None) -> dict:
        """Stores a result whose ``meta["id"]`` is its id, made from the image ``image_id``
        (default ``meta["image"]["id"]``); returns the stored metadata (:func:`public_meta`).
        Raises :class:`StoreFull`, having written nothing, when it cannot fit the quota, and
        :class:`~insights.errors.StoreUnavailable`, having left nothing, when the index does
        not answer."""
        rid = meta["id"]
        if not is_id(rid):
            raise ValueError(f"result id {rid!r} is not 64 hex digits")
        image_id = image_id or meta["image"]["id"]
        meta = public_meta(meta)
        files = {"input.png": encode_image(view, "png"), "map.png": map_png,
                 "attribution.npz": pack_map(attribution), "meta.json": json.dumps(meta, indent=1).encode()}
        size = sum(len(data) for data in files.values())
        existing = self.result(rid)
        if existing is not None:
            return existing
        self._check_fits(size, protect=image_id)
        folder = os.path.join(self.root, "results")
        tmp = tempfile.mkdtemp(dir=folder, prefix=".tmp-")
        try:
            for name, data in files.items():
                write_atomic(os.path.join(tmp, name), data)
            self._before_write()
            with self._writing() as write:
                row = write.conn.execute(_RESULT, {"key": rid}).first()
                if row is not None:  # stored meanwhile, by another thread or node
                    return json.loads(row.meta)
                self._make_room(size, protect=image_id)
                final = self.result_dir(rid)
                if os.path.exists(final):  # left by a crash before its index row: not trusted
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(folder)
                write.on_failure(_remove(final))
                now = self.clock()
                if not db.insert_once(write.conn, results, {
                        "id": rid, "image_id": image_id, "model": meta["model"], "method": meta["method"],
                        "target": int(meta["target"]), "params": canonical_json(meta["params"]),
                        "created": _iso(now), "meta": json.dumps(meta), "bytes": size, "accessed": now}):
                    return json.loads(write.conn.execute(_RESULT, {"key": rid}).first().meta)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return meta

    def result_file(self, rid: str, name: str) -> bytes:
        """One stored file of a result; :class:`Missing` when the result is gone."""
        try:
            with open(os.path.join(self.result_dir(rid), name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise Missing(f"no result with id {shown(rid)}", "result") from None

    def derived_file(self, rid: str, name: str, make: Callable[[], bytes]) -> bytes:
        """A file made from a result once (its link-preview card), kept in its folder: the
        stored one, or ``make()``'s, written to a temporary name, renamed into place under the
        write lock while the result's row is there, its bytes counted in the result's (within
        the quota). A read-only store, a result gone meanwhile or a quota with no room answers
        the made file without keeping it."""
        try:
            return self.result_file(rid, name)
        except Missing:
            pass
        data = make()
        folder = self.result_dir(rid)
        if self.read_only or not os.path.isdir(folder):
            return data
        try:
            tmp = write_temp(folder, data)
        except OSError:  # the result was deleted meanwhile (its folder renamed away), or no room
            return data
        try:
            with self._writing() as write:
                if write.conn.execute(sa.select(results.c.id).where(results.c.id == rid)).first() is None:
                    return data  # deleted meanwhile: its folder is going
                final = os.path.join(folder, name)
                if os.path.exists(final):  # made meanwhile by another request or node
                    return self.result_file(rid, name)
                try:
                    self._make_room(len(data), keep=rid)
                except StoreFull:
                    return data  # served, not kept: the quota has no room for it
                os.replace(tmp, final)
                write.on_failure(_remove(final))
                write.conn.execute(results.update().where(results.c.id == rid)
                                   .values(bytes=results.c.bytes + len(data)))
        finally:
            _unlink(tmp)
        return data

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
        return self._delete_result(rid)

    def _delete_result(self, rid: str) -> bool:
        """Deletes a result's folder and row, in a write (the caller's, or its own)."""
        with self._writing() as write:
            if write.conn.execute(sa.select(results.c.id).where(results.c.id == rid)).first() is None:
                return False
            folder = os.path.join(self.root, "results")
            gone = os.path.join(folder, ".tmp-del-" + rid)
            if os.path.exists(gone):  # an earlier deletion's leftover
                shutil.rmtree(gone, ignore_errors=True)
            if os.path.isdir(self.result_dir(rid)):
                os.replace(self.result_dir(rid), gone)
                _fsync_dir(folder)
                write.on_failure(_rename_back(gone, self.result_dir(rid)))
            write.conn.execute(results.delete().where(results.c.id == rid))
            write.conn.execute(db.quality.delete().where(db.quality.c.result_id == rid))
            write.after_commit(_remove(gone))
        return True

    def results_for_image(self, image_id: str) -> list[dict]:
        with self._reading() as conn:
            rows = conn.execute(sa.select(results.c.meta).where(results.c.image_id == image_id)
                                .order_by(results.c.created.desc())).scalars().all()
        return [json.loads(m) for m in rows]

    # -- measurements of a result (quality: faithfulness metrics, sanity and box checks) -------

    def result_image(self, rid: str) -> str | None:
        """The id of the image a stored result was made from (never served), or None."""
        if not is_id(rid):
            return None
        with self._reading() as conn:
            return conn.execute(sa.select(results.c.image_id).where(results.c.id == rid)).scalar()

    def quality(self, rid: str) -> list[dict]:
        """The stored measurements of a result, oldest first (none for an unknown id)."""
        if not is_id(rid):
            return []
        q = db.quality
        with self._reading() as conn:
            rows = conn.execute(sa.select(q.c.answer).where(q.c.result_id == rid)
                                .order_by(q.c.created, q.c.key)).scalars().all()
        return [json.loads(row) for row in rows]

    def quality_entry(self, rid: str, key: str) -> dict | None:
        """One stored measurement of a result by its key, or None."""
        q = db.quality
        with self._reading() as conn:
            row = conn.execute(sa.select(q.c.answer).where(q.c.result_id == rid, q.c.key == key)).scalar()
        return None if row is None else json.loads(row)

    QUALITY_PER_RESULT = 24  # measurements kept per result: a new one past this replaces the oldest

    def put_quality(self, rid: str, entry: dict) -> dict:
        """Keeps a measurement (``entry["key"]``, ``entry["metric"]``) with the result ``rid``;
        its bytes count in the result's, within the quota (:class:`StoreFull` when it cannot fit;
        other results may be evicted, never this one), and past :attr:`QUALITY_PER_RESULT` the
        result's oldest measurements go (anyone may measure a shared result, and a box check
        costs no pass). :class:`Missing` when the result is gone; a measurement stored meanwhile
        (by another node) is answered instead."""
        data = json.dumps(entry)
        size = len(data.encode())
        self._check_fits(size)
        self._before_write()
        with self._writing() as write:
            row = write.conn.execute(sa.select(results.c.bytes).where(results.c.id == rid)).first()
            if row is None:
                raise Missing(f"no result with id {shown(rid)}", "result")
            self._make_room(size, keep=rid)
            if db.insert_once(write.conn, db.quality, {"result_id": rid, "key": entry["key"],
                                                       "metric": entry["metric"], "created": entry["created"],
                                                       "answer": data}):
                q = db.quality
                rows = write.conn.execute(sa.select(q.c.key, sa.func.length(q.c.answer)).where(q.c.result_id == rid)
                                          .order_by(q.c.created.desc(), q.c.key)).all()
                gone = rows[self.QUALITY_PER_RESULT:]
                for key, _length in gone:
                    write.conn.execute(q.delete().where(q.c.result_id == rid, q.c.key == key))
                freed = sum(int(length) for _key, length in gone)  # ASCII JSON: characters are bytes
                write.conn.execute(results.update().where(results.c.id == rid)
                                   .values(bytes=results.c.bytes + size - freed))
                return entry
        return self.quality_entry(rid, entry["key"]) or entry

    # -- dataset predictions (insights/dataset_jobs.py) ---------------------------------------

    PREDICTIONS_READ = 500  # items per query when reading predictions back

    def put_predictions(self, model: str, rows: list[tuple[str, int | None, float | None, float | None,
                                                          str | None]]) -> None:
        """Keeps dataset items' predictions by ``model``: (item, top class, its probability, the
        true class's probability, error); an item stored already (by another node) keeps its row."""
        if not rows or self.read_only:
            return
        created = utc_now()
        with self._writing() as write:
            for item, top, prob, true_prob, error in rows:
                db.insert_once(write.conn, db.predictions, {"model": model, "item": item, "top": top, "prob": prob,
                                                            "true_prob": true_prob, "error": error,
                                                            "created": created})

    def predictions(self, model: str, items: list[str]) -> dict[str, tuple]:
        """The stored (top, prob, true_prob, error) of those of ``items`` that ``model`` has scored."""
        found: dict[str, tuple] = {}
        p = db.predictions
        with self._reading() as conn:
            for start in range(0, len(items), self.PREDICTIONS_READ):
                chunk = items[start:start + self.PREDICTIONS_READ]
                query = sa.select(p.c.item, p.c.top, p.c.prob, p.c.true_prob, p.c.error).where(
                    p.c.model == model, p.c.item.in_(chunk))
                for row in conn.execute(query):
                    found[row.item] = (row.top, row.prob, row.true_prob, row.error)
        return found

    def files(self) -> list[str]:
        """Every file under the store (relative paths), for tests and diagnostics."""
        out = []
        for folder, _dirs, names in os.walk(self.root):
            out += [os.path.relpath(os.path.join(folder, n), self.root) for n in names]
        return sorted(out)
