"""The store on both of its databases, SQLite (embedded) and PostgreSQL (DATABASE_URL with
BLOB_DIR): ids, writes and reads, the quota, retention and deletion; two Store objects on one
database and one folder, standing for two nodes (or two processes on one machine), writing at
once; and PostgreSQL going away under a running app (503 store_unavailable, nothing
half-written, recovery without a restart). The SQLite-only details (the upgrade of older index
files, crash leftovers) are in tests/test_store.py and tests/test_quota.py."""
from __future__ import annotations

import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from appkit import TINY_CONFIG, png, snapshot  # noqa: F401
from insights import db as db_module
from insights import store as store_module
from insights.errors import StoreUnavailable
from insights.store import Store, StoreFull
from services import postgres_service  # noqa: F401 - the session's PostgreSQL
from test_quota import Clock, on_disk, picture


def add_result(store: Store, iid: str, target: int = 0, view: Image.Image | None = None) -> str:
    """Stores a result of the upload ``iid`` (its picture ``view``, else loaded from the store)."""
    rid = store.result_id(iid, "m", "saliency", {"abs": True}, target)
    meta = {"id": rid, "model": "m", "method": "saliency", "params": {"abs": True}, "target": target,
            "image": {"width": 20, "height": 16}, "created": "2027-01-15T08:00:00Z", "signed": False}
    attr = np.random.default_rng(target).standard_normal((1, 3, 16, 20)).astype(np.float32)
    store.put_result(meta, view or store.load_image(iid), attr, b"MAP%d" % target, image_id=iid)
    return rid


def whole(store: Store) -> None:
    """Every row's files are there and add up to its bytes; no file without a row; the total the
    index counts is what is on disk; no temporary file is left."""
    engine = store.engine
    with engine.connect() as conn:
        image_rows = conn.execute(sa.select(db_module.images)).all()
        result_rows = conn.execute(sa.select(db_module.results)).all()
    for row in image_rows:
        assert os.path.getsize(store.image_path(row.id, row.format)) == row.bytes, row.id
    for row in result_rows:
        folder = store.result_dir(row.id)
        assert sorted(os.listdir(folder)) == ["attribution.npz", "input.png", "map.png", "meta.json"]
        assert sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)) == row.bytes
    files = [f for f in store.files() if not f.startswith("index.sqlite3")]
    assert not [f for f in files if ".tmp-" in f]
    assert {f.split("/")[1] for f in files if f.startswith("results/")} == {r.id for r in result_rows}
    assert len([f for f in files if f.startswith("images/")]) == len(image_rows)
    assert store.total_bytes() == on_disk(store)


@pytest.fixture(params=["sqlite", "postgres"])
def database(request):
    """None (the embedded SQLite index in the store's folder) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_service").create_database()


@pytest.fixture
def nodes(database, tmp_path):
    """Makes Store objects on one database and one folder (BLOB_DIR): each one a node."""
    made = []

    def node(**settings) -> Store:
        made.append(Store(str(tmp_path / "blobs"), database_url=database, **settings))
        return made[-1]

    yield node
    for store in made:
        store.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


# --------------------------------------------------------------------------- one node, both databases


def test_a_fresh_index_has_the_current_schema_and_one_secret_for_every_node(nodes, database):
    a, b = nodes(), nodes()
    with a.engine.connect() as conn:
        stored = dict(conn.execute(sa.select(db_module.meta.c.name, db_module.meta.c.value)).all())
    assert stored["schema_version"] == str(db_module.SCHEMA_VERSION) == "4" and len(stored["secret"]) == 64
    assert a._secret == b._secret == bytes.fromhex(stored["secret"])
    assert (database is None) == os.path.isfile(os.path.join(a.root, "index.sqlite3"))
    iid = a.put_image(picture(0))["id"]
    assert store_module.is_id(iid) and b.image_id(picture(0)) == iid and b.image(iid)["id"] == iid


def test_images_and_results_round_trip_and_delete(nodes):
    store = nodes()
    rec = store.put_image(picture(0))
    assert store.put_image(picture(0)) == rec == store.image(rec["id"]) | {"id": rec["id"]}
    rid = add_result(store, rec["id"], target=3)
    assert store.result(rid)["target"] == 3 and store.result_file(rid, "map.png") == b"MAP3"
    assert [m["id"] for m in store.results_for_image(rec["id"])] == [rid]
    assert np.array_equal(np.asarray(store.load_image(rec["id"])), np.asarray(picture(0)))
    whole(store)
    assert store.delete_result(rid) is True and store.delete_result(rid) is False
    assert store.result(rid) is None and not os.path.exists(store.result_dir(rid))
    with pytest.raises(store_module.Missing):
        store.result_file(rid, "map.png")
    whole(store)


def test_eviction_order_across_nodes(nodes, clock, monkeypatch):
    """Unused uploads first (least recently used first), then results by last use, then the
    uploads they leave unused; the upload a new result is made from stays. Uses on one node
    count on the other."""
    a, b = nodes(clock=clock), nodes(clock=clock)
    a.TOUCH_EVERY = b.TOUCH_EVERY = 0

    def put(node, seed):
        clock.t += 10
        return node.put_image(picture(seed))["id"]

    unused_old = put(a, 1)
    img_a = put(b, 2)
    clock.t += 10
    result_a = add_result(a, img_a)
    unused_new = put(b, 3)
    img_b = put(a, 4)
    clock.t += 10
    result_b = add_result(b, img_b)
    clock.t += 10
    assert b.result(result_a) is not None  # read on b: result_a is now used more recently than result_b
    newcomer = picture(5)
    a.max_bytes = b.max_bytes = a.total_bytes() + len(store_module.encode_image(newcomer, "png")) - 1
    clock.t += 10
    a.put_image(newcomer)
    assert a.image(unused_old) is None and b.image(unused_new) is not None
    whole(a)

    # A new result of img_b that needs everything else: img_b stays (the result is made from it).
    scratch = Store(a.root + "-scratch", clock=clock)
    add_result(scratch, scratch.put_image(picture(4))["id"], target=7)
    a.max_bytes = b.max_bytes = scratch.total_bytes()  # img_b and the new result, exactly
    scratch.close()
    evicted = []
    for kind in ("image", "result"):
        real = getattr(b, f"_delete_{kind}")
        monkeypatch.setattr(b, f"_delete_{kind}", lambda key, real=real: evicted.append(key) or real(key))
    clock.t += 10
    newest = add_result(b, img_b, target=7)
    assert evicted == [unused_new, a.image_id(newcomer), result_b, result_a, img_a]
    assert a.result(newest) is not None and a.image(img_b) is not None
    whole(b)
    assert b.total_bytes() == b.max_bytes


def test_a_write_that_cannot_fit_is_refused_with_507_and_writes_nothing(nodes):
    a, b = nodes(), nodes()
    kept = a.put_image(picture(0))["id"]
    a.max_bytes = b.max_bytes = a.total_bytes() + 100
    before = {f: v for f, v in snapshot(a.root).items() if not f.startswith("index.sqlite3")}
    with pytest.raises(StoreFull) as err:
        b.put_image(picture(1, size=(64, 64)))
    assert err.value.status == 507 and err.value.code == "store_full"
    assert {f: v for f, v in snapshot(a.root).items() if not f.startswith("index.sqlite3")} == before
    assert a.image(kept) is not None
    whole(a)


def test_retention_sweeps_what_any_node_wrote(nodes, clock):
    a, b = nodes(clock=clock), nodes(clock=clock)
    old = a.put_image(picture(0))["id"]
    old_result = add_result(b, old)
    clock.t += 3 * 86400
    young = b.put_image(picture(1))["id"]
    c = nodes(clock=clock, retention_days=2)  # its sweep at start-up
    assert c.result(old_result) is None and a.image(old) is None and b.image(young) is not None
    whole(c)


def test_insert_once_treats_a_concurrent_identical_row_as_already_stored(nodes):
    store = nodes()
    row = {"id": "a" * 64, "width": 1, "height": 1, "created": "2027-01-01T00:00:00Z", "bytes": 0,
           "accessed": 0.0, "format": "png"}
    with store.engine.begin() as conn:
        assert db_module.insert_once(conn, db_module.images, row) is True
    with store.engine.begin() as conn:  # another node's transaction, after the first committed
        assert db_module.insert_once(conn, db_module.images, {**row, "width": 2}) is False
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(db_module.images.c.width)).scalar_one() == 1


# --------------------------------------------------------------------------- two nodes at once


def test_two_nodes_writing_at_once_stay_within_the_quota_and_whole(nodes):
    """Two nodes (own engines, own process locks) upload and store results at the same time,
    the same items on both and others on one, under a quota that forces evictions: every
    identical write is stored once, nothing is evicted twice, the quota holds, and every row's
    files are whole."""
    a, b = nodes(), nodes()
    shared = [picture(100 + i) for i in range(4)]
    base = [a.put_image(p)["id"] for p in shared]
    one = sum(len(store_module.encode_image(picture(i), "png")) for i in range(1))
    a.max_bytes = b.max_bytes = a.total_bytes() + 14 * one  # room for some, not all, of what follows
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(node: Store, k: int):
        try:
            barrier.wait()
            for i in range(6):
                node.put_image(picture(10 * k + i))  # new on this node
                # the same results on every node (their upload may have been evicted meanwhile)
                add_result(node, base[i % 4], target=i % 3, view=shared[i % 4])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda args: work(*args), [(a, 1), (b, 2), (a, 3), (b, 4)]))
    assert not errors, errors
    whole(a)
    assert a.total_bytes() <= a.max_bytes
    with a.engine.connect() as conn:
        ids = conn.execute(sa.select(db_module.results.c.id)).scalars().all()
    assert len(ids) == len(set(ids))
    survivors = [r for r in ids if a.result(r) is not None]
    assert survivors and all(b.result(r) == a.result(r) for r in survivors)


def test_the_same_result_from_two_nodes_at_once_is_stored_once(nodes):
    a, b = nodes(), nodes()
    iid = a.put_image(picture(0))["id"]
    barrier = threading.Barrier(2)

    def write(node):
        barrier.wait()
        return add_result(node, iid, target=4)

    with ThreadPoolExecutor(2) as pool:
        rids = list(pool.map(write, [a, b]))
    assert rids[0] == rids[1] and a.result(rids[0]) == b.result(rids[0])
    whole(a)


def test_a_new_node_leaves_another_nodes_write_in_progress_alone(nodes):
    a = nodes()
    iid = a.put_image(picture(0))["id"]
    in_flight = os.path.join(a.root, "results", ".tmp-othernode")
    os.makedirs(in_flight)
    with open(os.path.join(in_flight, "input.png"), "wb") as f:
        f.write(b"half")
    nodes()  # starts, cleans up
    assert os.path.isfile(os.path.join(in_flight, "input.png")) and a.image(iid) is not None


# --------------------------------------------------------------------------- the index failing mid-write


def failing_insert(monkeypatch, fail):
    """Makes the next row insert fail as a lost database does (``fail()`` raises or kills it)."""
    real = db_module.insert_once

    def insert_once(conn, table, values):
        monkeypatch.setattr(db_module, "insert_once", real)
        fail()
        return real(conn, table, values)

    monkeypatch.setattr(db_module, "insert_once", insert_once)


def lost_connection():
    raise sa.exc.OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))


def test_a_result_whose_row_cannot_be_written_leaves_nothing_and_evicts_nothing(nodes, monkeypatch):
    store = nodes()
    iid = store.put_image(picture(0))["id"]
    victim = store.put_image(picture(1, size=(64, 64)))["id"]  # unused, ~12 kB: the first to go for room
    victim_file = open(store.image_path(victim), "rb").read()
    store.max_bytes = store.total_bytes() + 100  # the result needs the victim's room
    before = store.total_bytes()
    failing_insert(monkeypatch, lost_connection)
    with pytest.raises(StoreUnavailable) as err:
        add_result(store, iid)
    assert err.value.status == 503 and err.value.code == "store_unavailable" and err.value.retry_after >= 1
    assert not [f for f in store.files() if f.startswith("results/")]
    assert open(store.image_path(victim), "rb").read() == victim_file  # renamed back
    assert store.image(victim) is not None and store.total_bytes() == before
    whole(store)
    rid = add_result(store, iid)  # the next try succeeds, evicting the victim this time
    assert store.result(rid) is not None and store.image(victim) is None
    whole(store)


# --------------------------------------------------------------------------- PostgreSQL going away


@pytest.fixture
def pg(postgres_service):
    yield postgres_service
    postgres_service.ensure_running()


@pytest.fixture
def pg_app(pg, tmp_path):
    from insights import create_app

    app = create_app({"INSTANCE_PATH": str(tmp_path / "instance"), "BUILTIN_MODELS": False,
                      "MODELS_CONFIG": TINY_CONFIG, "DEVICE": "cpu", "DATABASE_URL": pg.create_database(),
                      "BLOB_DIR": str(tmp_path / "blobs")})
    yield app
    app.extensions["insights"].jobs.shutdown()
    app.extensions["insights"].store.close()


def upload(client, data: bytes):
    return client.post("/api/images", data={"image": (io.BytesIO(data), "x.png")},
                       content_type="multipart/form-data")


def test_the_app_stores_in_postgresql_and_blob_dir(pg_app, tmp_path):
    client = pg_app.test_client()
    iid = upload(client, png()).json["id"]
    r = client.post("/api/explain", json={"image": iid, "method": "saliency", "target": 1})
    assert r.status_code == 200, r.json
    rid = r.json["result"]["id"]
    assert os.path.isdir(tmp_path / "blobs" / "results" / rid)
    assert not os.path.exists(tmp_path / "blobs" / "index.sqlite3")
    assert not os.path.exists(tmp_path / "instance" / "results" / rid)
    assert client.get(f"/r/{rid}").status_code == 200


@pytest.mark.parametrize("outage", ["stop", "kill"])
def test_postgresql_down_answers_503_writes_nothing_and_recovers_without_restart(pg_app, pg, tmp_path, outage):
    client = pg_app.test_client()
    iid = upload(client, png()).json["id"]
    rid = client.post("/api/explain", json={"image": iid, "method": "saliency", "target": 1}).json["result"]["id"]
    blobs = str(tmp_path / "blobs")
    before = snapshot(blobs)

    getattr(pg, outage)()
    answers = {
        "metadata": client.get(f"/api/results/{rid}"),
        "upload": upload(client, png(color=(10, 200, 10))),
        "explain": client.post("/api/explain", json={"image": iid, "method": "saliency", "target": 2}),
        "delete": client.delete(f"/api/results/{rid}"),
        "image": client.get(f"/api/images/{iid}"),
        "map": client.get(f"/api/results/{rid}/map.png"),  # a result's files are served once the index knows it
    }
    for what, r in answers.items():
        assert r.status_code == 503, (what, r.status_code, r.data[:300])
        assert r.json["error"]["code"] == "store_unavailable" and int(r.headers["Retry-After"]) >= 1, what
        assert "postgresql" not in r.json["error"]["message"] and pg.password not in r.get_data(as_text=True)
    page = client.get(f"/r/{rid}")
    assert page.status_code == 503 and int(page.headers["Retry-After"]) >= 1
    assert snapshot(blobs) == before  # nothing written, nothing half-written, nothing deleted

    pg.start()  # the same app, not restarted
    assert client.get(f"/api/results/{rid}").status_code == 200
    assert client.get(f"/r/{rid}").status_code == 200
    new = upload(client, png(color=(10, 200, 10)))
    assert new.status_code == 201
    r = client.post("/api/explain", json={"image": new.json["id"], "method": "saliency", "target": 2})
    assert r.status_code == 200, r.json
    whole(pg_app.extensions["insights"].store)


def test_a_restart_of_postgresql_between_requests_is_not_noticed(pg_app, pg):
    client = pg_app.test_client()
    iid = upload(client, png()).json["id"]
    assert client.get(f"/api/images/{iid}").status_code == 200
    pg.restart()  # every pooled connection is broken now
    assert client.get(f"/api/images/{iid}").status_code == 200  # checked before use and replaced
    assert upload(client, png(color=(1, 2, 3))).status_code == 201


def test_a_result_whose_row_insert_meets_a_dead_postgresql_leaves_no_files(pg, tmp_path, monkeypatch):
    """The real thing behind the simulated failure above: PostgreSQL killed between the rename of
    a result's folder into place and its row."""
    store = Store(str(tmp_path / "blobs"), database_url=pg.create_database())
    try:
        iid = store.put_image(picture(0))["id"]
        failing_insert(monkeypatch, pg.kill)
        with pytest.raises(StoreUnavailable):
            add_result(store, iid)
        assert not [f for f in store.files() if f.startswith("results/")]
        pg.start()
        rid = add_result(store, iid)
        assert store.result(rid) is not None
        whole(store)
    finally:
        store.close()


def test_settings_database_url_needs_blob_dir_and_the_reverse(tmp_path):
    from insights import create_app

    base = {"INSTANCE_PATH": str(tmp_path / "i"), "BUILTIN_MODELS": False, "MODELS_CONFIG": TINY_CONFIG,
            "DEVICE": "cpu"}
    with pytest.raises(ValueError, match="BLOB_DIR must name"):
        create_app({**base, "DATABASE_URL": "postgresql://u:p@127.0.0.1:1/x"})
    with pytest.raises(ValueError, match="BLOB_DIR is used with DATABASE_URL only"):
        create_app({**base, "BLOB_DIR": str(tmp_path / "b")})
    with pytest.raises(ValueError, match="DATABASE_URL"):
        create_app({**base, "DATABASE_URL": "mysql://u:p@h/x", "BLOB_DIR": str(tmp_path / "b")})
    assert db_module.parse_url("postgresql://u:p@h/x").drivername == "postgresql+psycopg"
    assert db_module.parse_url("postgres://u:p@h/x").drivername == "postgresql+psycopg"
    assert "p@" not in db_module.shown_url(db_module.parse_url("postgresql://u:secretpw@h/x"))


def test_json_of_results_is_the_same_on_both_databases(tmp_path, postgres_service):
    """The metadata served is the JSON stored, whatever the database (no float or key drift)."""
    stores = [Store(str(tmp_path / "s")), Store(str(tmp_path / "p"), database_url=postgres_service.create_database())]
    try:
        metas = []
        for store in stores:
            iid = store.put_image(picture(0))["id"]
            rid = add_result(store, iid, target=2)
            metas.append({k: v for k, v in store.result(rid).items() if k != "id"})
        assert json.dumps(metas[0], sort_keys=True) == json.dumps(metas[1], sort_keys=True)
    finally:
        for store in stores:
            store.close()


def test_a_postgresql_taking_no_new_connections_answers_503_within_the_connect_timeout(pg, tmp_path, monkeypatch):
    """Paused (SIGSTOP to its postmaster: connections are accepted by the kernel, never served),
    PostgreSQL makes a request that needs a new connection give up after CONNECT_TIMEOUT_S with a
    503; resumed, the next request succeeds. (Backends already connected keep answering: their
    processes are not in the postmaster's process group.)"""
    from insights import create_app

    monkeypatch.setattr(db_module, "CONNECT_TIMEOUT_S", 2)  # libpq's least
    app = create_app({"INSTANCE_PATH": str(tmp_path / "instance"), "BUILTIN_MODELS": False,
                      "MODELS_CONFIG": TINY_CONFIG, "DEVICE": "cpu", "DATABASE_URL": pg.create_database(),
                      "BLOB_DIR": str(tmp_path / "blobs")})
    store = app.extensions["insights"].store
    try:
        client = app.test_client()
        iid = upload(client, png()).json["id"]
        pg.pause()
        store.engine.dispose()  # no pooled connection left: the next request must connect
        started = time.monotonic()
        r = client.get(f"/api/images/{iid}")
        assert r.status_code == 503 and r.headers["Retry-After"] and time.monotonic() - started < 10
        pg.resume()
        assert client.get(f"/api/images/{iid}").status_code == 200
    finally:
        pg.resume()
        app.extensions["insights"].jobs.shutdown()
        store.close()
