"""The store's index: its tables, the engine that reaches them, the write lock and the schema.

One code path for both databases, on SQLAlchemy Core: an embedded SQLite file (``index.sqlite3``
in the store's folder, the default) or PostgreSQL (``DATABASE_URL``, shared by every node). What
differs between the two is kept here, in three places: the connection settings (SQLite: WAL, a
busy timeout; PostgreSQL: a liveness check before each use, a connect timeout, a lock timeout),
the write lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: a transaction-scoped advisory lock), and
the schema version's second home (SQLite also keeps it in ``PRAGMA user_version``, which is where
an older Insights looks, so it refuses a newer index rather than misread it).

Schema versions: 0, the first (images and results); 1, bytes and last use per row, the image's
format, the keyed-id secret in a table ``keys``; 2, a table ``meta`` holding the schema version
and the secret (``keys`` goes); 3, a table ``predictions`` of dataset items' scores per model; 4, a table ``quality`` of a
result's measurements (faithfulness metrics, sanity and box checks). A fresh index is made at :data:`SCHEMA_VERSION` directly; an older
SQLite index is upgraded in place, in one transaction, when a store opens it.
"""
from __future__ import annotations

import os
import weakref
from typing import Callable

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite

SCHEMA_VERSION = 4
INDEX_FILE = "index.sqlite3"  # the embedded index, in the store's folder
BUSY_TIMEOUT_S = 30  # SQLite: how long a writer waits for another's lock
CONNECT_TIMEOUT_S = 5  # PostgreSQL: a server that does not answer a new connection within this is down
TCP_USER_TIMEOUT_MS = 15_000  # PostgreSQL: a connection whose data goes unacknowledged this long is dead
LOCK_TIMEOUT_MS = 30_000  # PostgreSQL: a write waits this long for another node's, then gives up (503)
IDLE_IN_TRANSACTION_MS = 60_000  # PostgreSQL ends a transaction left open this long (a frozen node's)
WRITE_LOCK_KEY = 0x1A51_6475  # pg_advisory_xact_lock's key: one lock for every write to the store
WRITE = "insights_write"  # the execution option that marks a write transaction

metadata = sa.MetaData()

images = sa.Table(
    "images", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("created", sa.Text, nullable=False),  # ISO 8601 UTC to the second: sorts as text
    sa.Column("bytes", sa.BigInteger, nullable=False, server_default="0"),  # its file on disk
    sa.Column("accessed", sa.Float, nullable=False, server_default="0"),  # last use, epoch seconds
    sa.Column("format", sa.Text, nullable=False, server_default="png"),  # png or jpeg
    sa.Index("images_by_use", "accessed", "created"),  # eviction takes the least recently used
    sa.Index("images_by_age", "created"),  # retention takes the oldest
)

results = sa.Table(
    "results", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("image_id", sa.Text, nullable=False),
    sa.Column("model", sa.Text, nullable=False),
    sa.Column("method", sa.Text, nullable=False),
    sa.Column("target", sa.Integer, nullable=False),
    sa.Column("params", sa.Text, nullable=False),  # canonical JSON
    sa.Column("created", sa.Text, nullable=False),
    sa.Column("meta", sa.Text, nullable=False),  # the metadata served, JSON
    sa.Column("bytes", sa.BigInteger, nullable=False, server_default="0"),  # its folder's files
    sa.Column("accessed", sa.Float, nullable=False, server_default="0"),
    sa.Index("results_by_image", "image_id"),
    sa.Index("results_by_use", "accessed", "created"),
    sa.Index("results_by_age", "created"),
)

meta = sa.Table(
    "meta", metadata,
    sa.Column("name", sa.Text, primary_key=True),  # schema_version, secret
    sa.Column("value", sa.Text, nullable=False),  # the secret as 64 hex digits
)


# A dataset item's prediction by one model (insights/dataset_jobs.py): computed once, kept across
# restarts. ``model`` names the model and digests its labels, so a model served again under the same
# name with other classes starts afresh.
predictions = sa.Table(
    "predictions", metadata,
    sa.Column("model", sa.Text, primary_key=True),
    sa.Column("item", sa.Text, primary_key=True),  # a digest of the item's file (path, size, mtime)
    sa.Column("top", sa.Integer),  # the top class; null when the item could not be scored
    sa.Column("prob", sa.Float),  # its probability (fp32, as the single-image view computes it)
    sa.Column("true_prob", sa.Float),  # the true class's probability; null without one
    sa.Column("error", sa.Text),  # why the item could not be scored (an image that does not decode)
    sa.Column("created", sa.Text, nullable=False),
)

# A measurement of a stored result's map (a faithfulness metric, the sanity or the box check):
# kept with the result, deleted with it, its bytes counted in the result's own.
quality = sa.Table(
    "quality", metadata,
    sa.Column("result_id", sa.Text, primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),  # a digest of the metric and its parameters
    sa.Column("metric", sa.Text, nullable=False),
    sa.Column("created", sa.Text, nullable=False),
    sa.Column("answer", sa.Text, nullable=False),  # the measurement served, JSON
)

# --------------------------------------------------------------------------- engines

_ENGINES: "weakref.WeakSet[sa.Engine]" = weakref.WeakSet()


def _forget_connections_after_fork() -> None:
    """A forked child (a Celery worker's pool process) must not use its parent's connections:
    it gets new ones, and the parent's stay the parent's (SQLAlchemy's advice for pools)."""
    for engine in list(_ENGINES):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_connections_after_fork)


def parse_url(url: str) -> sa.URL:
    """``DATABASE_URL`` as SQLAlchemy's URL: ``postgresql://`` (and ``postgres://``) mean the
    psycopg 3 driver, the one requirements-scale.txt installs; ``sqlite:///path`` works too."""
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError, TypeError):
        raise ValueError("setting DATABASE_URL must be a database URL such as "
                         "postgresql://user:password@host/db") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("postgresql", "sqlite"):
        raise ValueError(f"setting DATABASE_URL names {parsed.get_backend_name()!r}: the store's index "
                         "lives in PostgreSQL (postgresql://...) or SQLite")
    return parsed


def shown_url(url: sa.URL) -> str:
    """A URL for messages and logs: its password hidden."""
    return url.render_as_string(hide_password=True)


def make_engine(url: str | None, folder: str) -> sa.Engine:
    """The engine of a store's index: ``url`` (``DATABASE_URL``), or with none the SQLite file
    ``index.sqlite3`` in ``folder``, made readable by its owner only (it holds the secret)."""
    if url:
        parsed = parse_url(url)
    else:
        path = os.path.join(folder, INDEX_FILE)
        _private_file(path)
        parsed = sa.URL.create("sqlite+pysqlite", database=path)
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(parsed, connect_args={"check_same_thread": False, "timeout": BUSY_TIMEOUT_S})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    else:
        # A server that goes away (a crashed host, a cut network) is noticed within seconds,
        # idle (keepalives) or not (tcp_user_timeout: sent data unacknowledged).
        args = {"connect_timeout": CONNECT_TIMEOUT_S, "keepalives": 1, "keepalives_idle": 10,
                "keepalives_interval": 5, "keepalives_count": 3, "tcp_user_timeout": TCP_USER_TIMEOUT_MS}
        if "options" not in parsed.query:
            args["options"] = (f"-c lock_timeout={LOCK_TIMEOUT_MS} "
                               f"-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}")
        # pool_pre_ping: a connection that a restart of the server broke is noticed when it is
        # taken from the pool and replaced, so the app recovers without a restart of its own.
        engine = sa.create_engine(parsed, pool_pre_ping=True, connect_args=args)
    _ENGINES.add(engine)
    return engine


def _private_file(path: str) -> None:
    """Creates ``path`` (mode 0600) before SQLite does, so that neither it nor the WAL file SQLite
    makes beside it with the same mode is readable by others; an existing file is made 0600."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
    except OSError:  # a read-only mirror's folder: SQLite says what is wrong when it opens
        pass


def _sqlite_connect(dbapi_connection, _record) -> None:
    # The driver's own transactions would begin lazily and never lock for writing: SQLAlchemy's
    # "begin" event below starts them instead (SQLAlchemy's documented recipe for pysqlite).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
        try:  # readers never wait for a writer; kept in the file once set
            cursor.execute("PRAGMA journal_mode = WAL")
        except Exception:  # noqa: BLE001 - another process holds the file: stays in its journal mode
            pass
    finally:
        cursor.close()


def _sqlite_begin(connection) -> None:
    # A write takes SQLite's write lock when it begins, so that what it reads (the bytes in use,
    # whether a row exists) stays true until it commits; reads (autocommit) begin nothing.
    options = connection.get_execution_options()
    if options.get("isolation_level") != "AUTOCOMMIT":
        connection.exec_driver_sql("BEGIN IMMEDIATE" if options.get(WRITE) else "BEGIN")


def reader(engine: sa.Engine) -> sa.Engine:
    """``engine`` for reads of one statement each: autocommit, so a read costs its statement (and
    PostgreSQL's check of the connection) and no BEGIN or ROLLBACK; the same pool."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def lock_for_writing(conn: sa.Connection) -> None:
    """Takes the store's write lock for the rest of ``conn``'s transaction, on every node: two
    writes, evictions or clean-ups never interleave. SQLite took it when the transaction began
    (``BEGIN IMMEDIATE``, for a connection with the :data:`WRITE` option)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": WRITE_LOCK_KEY})


def is_unavailable(exc: BaseException) -> bool:
    """True for a database that does not answer (down, restarting, unreachable, a lock or pool
    wait that ran out): the request may succeed later. Other database errors are bugs."""
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)):
        return True
    return isinstance(exc, sa.exc.DBAPIError) and bool(exc.connection_invalidated)


def insert_once(conn: sa.Connection, table: sa.Table, values: dict) -> bool:
    """Inserts a row unless its key is there already (``INSERT ... ON CONFLICT DO NOTHING``, the
    same SQL in both databases); False when it was. A write made at the same moment by another
    node is thus "already stored", not an error."""
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    done = conn.execute(insert(table).values(**values).on_conflict_do_nothing(),
                        execution_options={"preserve_rowcount": True})  # else psycopg's is not kept
    return done.rowcount == 1


# --------------------------------------------------------------------------- schema


def prepare(engine: sa.Engine, upgrade_to_1: Callable[[sa.Connection], None]) -> bytes:
    """Makes the index, or brings an older one up to :data:`SCHEMA_VERSION`, in one transaction
    under the write lock (another node or process opening the store at once waits, then finds it
    done); returns the store's secret. ``upgrade_to_1`` is the store's step from schema 0 (it
    reads the files' sizes), run on an index of the first schema only."""
    with engine.connect() as conn:
        conn.execution_options(**{WRITE: True})
        with conn.begin():
            lock_for_writing(conn)
            version = schema_version(conn)
            if version is None:
                metadata.create_all(conn)
                conn.execute(meta.insert(), [{"name": "secret", "value": os.urandom(32).hex()}])
            elif version > SCHEMA_VERSION:
                raise RuntimeError(f"the store's index ({shown_url(engine.url)}) has schema {version}, newer "
                                   f"than this version of Insights reads ({SCHEMA_VERSION})")
            else:
                if version < 1:
                    upgrade_to_1(conn)
                if version < 2:
                    _upgrade_to_2(conn)
                if version < 3:
                    predictions.create(conn)
                if version < 4:
                    quality.create(conn, checkfirst=True)
            if version != SCHEMA_VERSION:
                _set_version(conn)
            secret = conn.execute(sa.select(meta.c.value).where(meta.c.name == "secret")).scalar_one()
    return bytes.fromhex(secret)


def schema_version(conn: sa.Connection) -> int | None:
    """The index's schema version, or None for an empty database."""
    inspector = sa.inspect(conn)
    if not inspector.has_table("images"):
        return None
    if inspector.has_table("meta"):
        value = conn.execute(sa.select(meta.c.value).where(meta.c.name == "schema_version")).scalar()
        if value is not None:
            return int(value)
    if conn.dialect.name == "sqlite":  # schemas 0 and 1 kept their version here
        return int(conn.exec_driver_sql("PRAGMA user_version").scalar())
    raise RuntimeError(f"the database {shown_url(conn.engine.url)} has a table 'images' but no schema "
                       "version: it is not an Insights index")


def _upgrade_to_2(conn: sa.Connection) -> None:
    """Schema 2: the secret moves from ``keys`` to ``meta``, beside the schema version."""
    meta.create(conn)
    secret = conn.exec_driver_sql("SELECT value FROM keys WHERE name = 'secret'").scalar_one()
    conn.execute(meta.insert(), [{"name": "secret", "value": bytes(secret).hex()}])
    conn.exec_driver_sql("DROP TABLE keys")


def _set_version(conn: sa.Connection) -> None:
    conn.execute(meta.delete().where(meta.c.name == "schema_version"))
    conn.execute(meta.insert(), [{"name": "schema_version", "value": str(SCHEMA_VERSION)}])
    if conn.dialect.name == "sqlite":  # where an older Insights reads it, and refuses a newer one
        conn.exec_driver_sql(f"PRAGMA user_version = {SCHEMA_VERSION}")
