"""The real-service helpers of tests/services.py: Redis and PostgreSQL start on loopback, keep
or lose data as promised across restart and kill, break and recover connections, and the
skip/fail switch (INSIGHTS_REQUIRE_SERVICES) turns a missing service into a failure."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import services
from services import postgres_service, redis_service  # noqa: F401 - fixtures

HERE = Path(__file__).resolve().parent


def _uid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


@pytest.fixture
def redis_binary():
    services.require_services("redis")


# ----------------------------------------------------------------------------- Redis

def test_redis_answers_ping_on_loopback(redis_service):
    assert redis_service.url == f"redis://127.0.0.1:{redis_service.port}/0"
    import redis
    client = redis.Redis.from_url(redis_service.url, socket_timeout=2)
    assert client.ping() is True
    client.set("services:hello", "world")
    assert client.get("services:hello") == b"world"
    assert client.config_get("bind")["bind"] == "127.0.0.1"
    client.close()


def test_redis_restart_loses_keys_unless_persistent(tmp_path, redis_binary):
    volatile = services.redis_server(tmp_path / "volatile")
    durable = services.redis_server(tmp_path / "durable", persistent=True)
    try:
        for server in (volatile, durable):
            with server.client() as c:
                c.set("job:1", "queued")
        ports, pids = (volatile.port, durable.port), (volatile.pid, durable.pid)
        volatile.restart()
        durable.restart()
        assert (volatile.port, durable.port) == ports and (volatile.pid, durable.pid) != pids
        with volatile.client() as c:
            assert c.get("job:1") is None
        with durable.client() as c:
            assert c.get("job:1") == b"queued"
            c.set("job:2", "running")      # acknowledged just before a crash
        durable.kill()
        durable.start()
        with durable.client() as c:
            assert c.mget("job:1", "job:2") == [b"queued", b"running"]
    finally:
        volatile.close()
        durable.close()


def test_redis_kill_breaks_clients_and_restart_serves_again(tmp_path, redis_binary):
    import redis
    server = services.redis_server(tmp_path)
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
        assert client.ping()
        pid = server.pid
        server.kill()
        assert _gone(pid) and not server.alive
        with pytest.raises(redis.ConnectionError):
            client.ping()
        server.start()
        assert client.ping()                       # the same client reconnects by itself
        server.pause()
        with pytest.raises((redis.TimeoutError, redis.ConnectionError)):
            client.ping()
        server.resume()
        assert redis.Redis.from_url(server.url, socket_timeout=1).ping()
    finally:
        server.close()
    assert _gone(pid) and _gone(server.pid)


# ----------------------------------------------------------------------------- PostgreSQL

def test_postgres_psycopg_and_sqlalchemy(postgres_service):
    import psycopg
    import sqlalchemy as sa
    pg = postgres_service
    assert pg.url.startswith(f"postgresql+psycopg://insights:") and pg.url.endswith(f"@127.0.0.1:{pg.port}/insights")
    assert pg.dsn == pg.url.replace("postgresql+psycopg://", "postgresql://")
    engine = sa.create_engine(pg.url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS svc_items (id int PRIMARY KEY, name text)"))
            conn.execute(sa.text("INSERT INTO svc_items VALUES (1, 'one') ON CONFLICT DO NOTHING"))
    finally:
        engine.dispose()
    with psycopg.connect(pg.dsn, connect_timeout=3) as conn:
        assert conn.execute("SELECT name FROM svc_items WHERE id = 1").fetchone() == ("one",)
        user, superuser, listen = conn.execute(
            "SELECT current_user, rolsuper, current_setting('listen_addresses') "
            "FROM pg_roles WHERE rolname = current_user").fetchone()
    assert (user, superuser, listen) == ("insights", False, "127.0.0.1")
    with pytest.raises(psycopg.OperationalError):   # a password is required
        psycopg.connect(pg.dsn.replace(pg.password, "wrong"), connect_timeout=3)
    assert _uid_of(pg.pid) != 0                     # never as root
    other = pg.create_database()
    with psycopg.connect(other.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=3) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'svc_items'").fetchone() == (0,)


def test_postgres_restart_keeps_data(postgres_service):
    import psycopg
    pg = postgres_service
    with psycopg.connect(pg.dsn, connect_timeout=3) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS svc_restart (n int)")
        conn.execute("INSERT INTO svc_restart VALUES (7)")
    port, pid = pg.port, pg.pid
    try:
        pg.restart()
        assert pg.port == port and pg.pid != pid and _gone(pid)
        with psycopg.connect(pg.dsn, connect_timeout=3) as conn:
            assert (7,) in conn.execute("SELECT n FROM svc_restart").fetchall()
    finally:
        pg.ensure_running()


def test_postgres_kill_fails_connections_and_restart_recovers(postgres_service):
    import psycopg
    import sqlalchemy as sa
    pg = postgres_service
    engine = sa.create_engine(pg.url, pool_pre_ping=True, connect_args={"connect_timeout": 2})
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS svc_kill (n int)"))
            conn.execute(sa.text("INSERT INTO svc_kill VALUES (42)"))
        held = psycopg.connect(pg.dsn, connect_timeout=3)
        pid = pg.pid
        pg.kill()
        assert _gone(pid) and not pg.alive
        with pytest.raises(psycopg.OperationalError):
            held.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg.dsn, connect_timeout=2)
        with pytest.raises(sa.exc.OperationalError):
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        pg.start()                                   # crash recovery, same port
        with engine.connect() as conn:               # the pool recovers without a restart
            assert conn.execute(sa.text("SELECT n FROM svc_kill")).fetchall() == [(42,)]
    finally:
        engine.dispose()
        pg.ensure_running()


def test_postgres_pause_times_out_then_resumes_and_stop_start(postgres_service):
    import psycopg
    pg = postgres_service
    try:
        pg.pause()
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg.dsn, connect_timeout=1)
        assert time.monotonic() - started < 5
        pg.resume()
        with psycopg.connect(pg.dsn, connect_timeout=3) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        pg.stop()                                    # unavailable …
        assert not pg.alive and not services.port_open(pg.port)
        pg.start()                                   # … then back
        with psycopg.connect(pg.dsn, connect_timeout=3) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pg.ensure_running()


# ----------------------------------------------------------------------------- app processes

def test_process_waits_until_ready_and_stops_by_pid(tmp_path):
    port = services.free_port()
    web = services.process([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                           ready=services.http_ok(f"http://127.0.0.1:{port}/"), cwd=tmp_path, name="web")
    assert web.alive and services.port_open(port)
    pid = web.pid
    web.stop()
    assert _gone(pid) and not services.port_open(port)
    assert "GET /" in web.output()                  # its output is kept


def test_process_stop_ends_its_children_and_failure_shows_output(tmp_path):
    parent = services.process(
        [sys.executable, "-c", textwrap.dedent("""
            import subprocess, sys, time
            kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            print("ready", kid.pid, flush=True)
            time.sleep(60)
        """)], ready="ready", name="pool")
    kids = parent.children()
    assert len(kids) == 1
    parent.kill()                                   # the main process dies alone …
    assert _gone(parent.pid) and not _gone(kids[0])
    parent.stop()                                   # … stop() ends what is left of its group
    assert _gone(kids[0])
    with pytest.raises(services.ServiceError, match=r"exited before it was ready[\s\S]*no such broker"):
        services.process([sys.executable, "-c", "import sys; print('no such broker'); sys.exit(3)"],
                         ready=lambda: False, name="worker")
    with pytest.raises(services.ServiceError, match="not ready within"):
        services.process([sys.executable, "-c", "import time; time.sleep(30)"], ready="never", timeout=0.5)


# ----------------------------------------------------------------------------- skip or fail

def test_missing_binary_skips_or_fails_by_switch(monkeypatch):
    monkeypatch.setenv("INSIGHTS_REDIS_SERVER", "/nonexistent/redis-server")
    monkeypatch.setenv("INSIGHTS_PG_BIN", "/nonexistent/bin")
    monkeypatch.delenv(services.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server .* is not on PATH"):
        services.require_services("redis")
    with pytest.raises(pytest.skip.Exception, match="PostgreSQL server binaries"):
        services.require_services("postgres")
    monkeypatch.setenv(services.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="redis-server .* is not on PATH.*required"):
        services.require_services("redis")
    with pytest.raises(pytest.fail.Exception, match="PostgreSQL server binaries"):
        services.require_services()


def test_fixture_switch_end_to_end(tmp_path):
    """A test using the fixtures, in its own pytest run, with binaries that are not there:
    SKIPPED with the reason by default, an error naming it under INSIGHTS_REQUIRE_SERVICES=1."""
    (tmp_path / "test_inner.py").write_text(textwrap.dedent("""
        from services import redis_service, postgres_service

        def test_needs_redis(redis_service):
            pass

        def test_needs_postgres(postgres_service):
            pass
    """))
    env = {k: v for k, v in os.environ.items() if k != services.REQUIRE_ENV}
    env.update(PYTHONPATH=str(HERE), INSIGHTS_REDIS_SERVER="/nonexistent/redis-server",
               INSIGHTS_PG_BIN="/nonexistent/bin")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "no:cacheprovider", "-p", "no:benchmark",
           "--rootdir", str(tmp_path), "test_inner.py"]
    skipped = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert skipped.returncode == 0, skipped.stdout + skipped.stderr
    assert "2 skipped" in skipped.stdout
    assert "redis-server (Debian package redis-server) is not on PATH" in skipped.stdout
    assert "PostgreSQL server binaries" in skipped.stdout
    env[services.REQUIRE_ENV] = "1"
    failed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "2 error" in failed.stdout and "skipped" not in failed.stdout
    assert "services are required here" in failed.stdout


def test_start_failure_names_the_cause(tmp_path, redis_binary, monkeypatch):
    """A service whose binary runs but cannot serve (its port is taken) raises ServiceError
    naming why, which the fixtures turn into the skip/fail reason."""
    monkeypatch.delenv(services.REQUIRE_ENV, raising=False)
    first = services.redis_server(tmp_path / "a")
    try:
        with pytest.raises(services.ServiceError, match="port .* is taken"):
            services.RedisServer(tmp_path / "b", first.port).start()
        with pytest.raises(pytest.skip.Exception, match="redis-server could not start: .*is taken"):
            services._start_or_unavailable(
                "redis-server", lambda: services.redis_server(tmp_path / "c", port=first.port))
    finally:
        first.close()
