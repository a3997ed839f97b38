"""Real Redis and PostgreSQL servers (and app processes) for the tests, on loopback only.

    from services import redis_service, postgres_service   # session-scoped pytest fixtures

    def test_something(redis_service, postgres_service):
        redis_service.url        # redis://127.0.0.1:P/0
        postgres_service.url     # postgresql+psycopg://insights:pw@127.0.0.1:P/insights (SQLAlchemy)
        postgres_service.dsn     # postgresql://insights:pw@127.0.0.1:P/insights (psycopg, libpq)

Both services run from Debian's binaries (`redis-server`, /usr/lib/postgresql/*/bin) in temporary
directories, on free ports of 127.0.0.1. Each is one object with `.stop()`, `.start()`,
`.restart()` (same port, same data), `.kill()` (SIGKILL), `.pause()`/`.resume()`
(SIGSTOP/SIGCONT: "up but not answering") and `.ensure_running()`. PostgreSQL refuses to run as
root: as root it runs as the unprivileged system user `insights-pg` (created once with useradd),
otherwise as the current user.

Where a binary or a Python client is missing, or a service cannot start, the fixtures skip with a
reason naming what failed; with INSIGHTS_REQUIRE_SERVICES=1 (as in .ci/run) they fail instead, so
CI never skips silently. `unavailable(reason)` is that switch for other fixtures.

`process(cmd, env=..., ready=...)` starts an app process (`python app.py`, a celery worker) in its
own process group, keeps its output in a file for error messages, and stops it by PID.

Every process started here is stopped by its PID (or its own process group) at teardown, at
interpreter exit (atexit), and — through PR_SET_PDEATHSIG — by the kernel when the test process
itself dies without running atexit.
"""
from __future__ import annotations

import atexit
import ctypes
import glob
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pytest

REQUIRE_ENV = "INSIGHTS_REQUIRE_SERVICES"
PG_OS_USER = "insights-pg"
LOOPBACK = "127.0.0.1"


class ServiceError(RuntimeError):
    """A service or process could not be started (or stopped); the message says why, with the
    tail of its output."""


# ----------------------------------------------------------------------------- skip or fail

def services_required() -> bool:
    """True when INSIGHTS_REQUIRE_SERVICES is set to 1/true/yes: a service that cannot start
    fails the test instead of skipping it."""
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def unavailable(reason: str):
    """Skips the current test (or fixture) with ``reason``; fails it instead when
    INSIGHTS_REQUIRE_SERVICES=1. Never returns."""
    if services_required():
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: services are required here)", pytrace=False)
    pytest.skip(reason)


def find_redis_server() -> str | None:
    """Path of `redis-server`, or None."""
    return shutil.which(os.environ.get("INSIGHTS_REDIS_SERVER", "redis-server"))


def find_postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding `postgres` and `initdb` (or the
    folder named by INSIGHTS_PG_BIN), or None."""
    override = os.environ.get("INSIGHTS_PG_BIN")
    candidates = [Path(override)] if override else []
    if not override:
        found = glob.glob("/usr/lib/postgresql/*/bin")
        candidates = sorted((Path(p) for p in found), key=_version_key, reverse=True)
        on_path = shutil.which("initdb")
        if on_path:
            candidates.append(Path(on_path).parent)
    for folder in candidates:
        if (folder / "postgres").is_file() and (folder / "initdb").is_file():
            return folder
    return None


def _version_key(path: Path):
    return [int(part) if part.isdigit() else 0 for part in re.split(r"[.]", path.parent.name)]


def require_services(*names: str) -> dict[str, str]:
    """Checks that the binaries and Python clients for ``names`` ("redis", "postgres") are here;
    returns {name: binary path}. Otherwise skips (or fails, see `unavailable`) naming what is
    missing. No name means both."""
    names = names or ("redis", "postgres")
    found, missing = {}, []
    for name in names:
        if name == "redis":
            binary = find_redis_server()
            if not binary:
                missing.append("redis-server (Debian package redis-server) is not on PATH")
            else:
                found[name] = binary
            if not _importable("redis"):
                missing.append("Python package redis is not installed (pip install -r requirements-scale.txt)")
        elif name == "postgres":
            folder = find_postgres_bin()
            if not folder:
                missing.append("PostgreSQL server binaries (Debian package postgresql) are not in "
                               "/usr/lib/postgresql/*/bin")
            else:
                found[name] = str(folder)
            if not _importable("psycopg"):
                missing.append("Python package psycopg is not installed (pip install -r requirements-scale.txt)")
        else:
            raise ValueError(f"unknown service {name!r}")
    if missing:
        unavailable("; ".join(missing))
    return found


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


# ----------------------------------------------------------------------------- processes

_LIVE: set = set()                       # objects with ._atexit_stop(), stopped at exit
_TEMP_LOGS: list[Path] = []              # logs made for processes given no log=, removed at exit
_LIVE_LOCK = threading.Lock()
try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:                           # pragma: no cover - not Linux
    _LIBC = None
_PR_SET_PDEATHSIG = 1


def _child_setup():
    """Runs in the child between fork and exec (after any change of user): the kernel sends it
    SIGKILL if the test process dies, so nothing outlives a crashed run."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _death_signal_setup():
    """_child_setup when called from the main thread, else None: the kernel's "parent death"
    is the death of the forking *thread*, so a process started from a helper thread (a thread
    pool starting servers in parallel) would die with that thread. Those rely on atexit."""
    return _child_setup if threading.current_thread() is threading.main_thread() else None


def _register(obj):
    with _LIVE_LOCK:
        _LIVE.add(obj)


def _unregister(obj):
    with _LIVE_LOCK:
        _LIVE.discard(obj)


@atexit.register
def _stop_everything():
    with _LIVE_LOCK:
        live = list(_LIVE)
    for obj in live:
        try:
            obj._atexit_stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    for path in _TEMP_LOGS:
        try:
            path.unlink()
        except OSError:
            pass


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.2) -> bool:
    """True when something accepts a TCP connection on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _processes() -> list[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgrp) of every process, from /proc."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()  # [0] state, [1] ppid, [2] pgrp
        if len(fields) > 2:
            out.append((int(stat.split("/")[2]), fields[0], int(fields[1]), int(fields[2])))
    return out


def _group_members(pgid: int) -> list[int]:
    """PIDs of live (not zombie) processes in process group ``pgid``."""
    return [pid for pid, state, _ppid, pgrp in _processes() if pgrp == pgid and state not in ("Z", "X")]


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (not zombies)."""
    return sorted(p for p, state, ppid, _pgrp in _processes() if ppid == pid and state not in ("Z", "X"))


def _signal_group(pgid: int, sig: int):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_members(pgid):
            return True
        time.sleep(0.02)
    return not _group_members(pgid)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output)"
    kept = text.splitlines()[-lines:]
    return "\n".join(kept) if kept else "(no output)"


class Process:
    """A child process in its own process group, with its stdout+stderr kept in ``log``.

    ``pid`` is the process itself (the group leader); ``stop()``, ``kill()`` end it and then
    everything left in its group (a celery worker's pool children, say)."""

    def __init__(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None, cwd=None,
                 log: Path | None = None, name: str | None = None, user: str | None = None,
                 stop_signal: int = signal.SIGTERM):
        self.cmd = [str(c) for c in cmd]
        self.name = name or Path(self.cmd[0]).name
        self.stop_signal = stop_signal
        if log is None:
            fd, path = tempfile.mkstemp(prefix=f"insights-{_safe(self.name)}-", suffix=".log")
            os.close(fd)
            log = Path(path)
            _TEMP_LOGS.append(log)
        self.log = Path(log)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        kwargs = {}
        if user is not None and os.geteuid() == 0:
            kwargs.update(user=user, group=_primary_group(user), extra_groups=[])
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.cmd, env=dict(env) if env is not None else None, cwd=cwd,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_death_signal_setup(), **kwargs)
        self.pid = self.popen.pid
        _register(self)

    # -- state
    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def children(self) -> list[int]:
        """PIDs of its direct children (a celery worker's pool processes)."""
        return _children(self.pid)

    def output(self, lines: int | None = None) -> str:
        """Its output so far (the last ``lines`` lines when given)."""
        if lines is not None:
            return _tail(self.log, lines)
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def describe(self, lines: int = 40) -> str:
        state = "running" if self.alive else f"exited with {self.returncode}"
        return (f"{self.name} (pid {self.pid}, {state}): {shlex.join(self.cmd)}\n"
                f"--- last output ({self.log}) ---\n{_tail(self.log, lines)}")

    # -- waiting
    def wait_ready(self, ready, timeout: float = 30.0, interval: float = 0.05):
        """Waits until ``ready`` holds: a callable returning truthy (exceptions count as not
        ready), a string or compiled regex to find in the output, or None (no wait). Raises
        ServiceError with the output's tail when the process exits first or time runs out."""
        if ready is None:
            return self
        check = _readiness(ready, self)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():
                    return self
            except Exception:  # noqa: BLE001 - not ready yet
                pass
            if not self.alive:
                raise ServiceError(f"{self.name} exited before it was ready\n{self.describe()}")
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.name} was not ready within {timeout:.0f} s\n{self.describe()}")
            time.sleep(interval)

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    # -- ending
    def signal(self, sig: int):
        """Sends ``sig`` to the process alone (not its group)."""
        if self.alive:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 10.0) -> int | None:
        """Asks it to end (stop_signal, SIGTERM by default), waits up to ``timeout`` s, then
        SIGKILLs it; then SIGKILLs whatever is left in its process group. Returns its exit code."""
        if self.alive:
            self.signal(self.stop_signal)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        self._reap_group()
        _unregister(self)
        return self.returncode

    def kill(self) -> int | None:
        """SIGKILL to the process alone — a crash; its children are left to notice (see
        ``kill_group`` for all of them)."""
        self.signal(signal.SIGKILL)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        return self.returncode

    def kill_group(self) -> int | None:
        """SIGKILL to the process and everything in its process group."""
        _signal_group(self.pid, signal.SIGCONT)
        _signal_group(self.pid, signal.SIGKILL)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        _wait_group_gone(self.pid, 5)
        _unregister(self)
        return self.returncode

    def pause(self):
        """SIGSTOP to the whole process group."""
        _signal_group(self.pid, signal.SIGSTOP)

    def resume(self):
        """SIGCONT to the whole process group."""
        _signal_group(self.pid, signal.SIGCONT)

    def _reap_group(self):
        if _group_members(self.pid):
            _signal_group(self.pid, signal.SIGCONT)
            _signal_group(self.pid, signal.SIGKILL)
            _wait_group_gone(self.pid, 5)

    def _atexit_stop(self):
        self.stop(timeout=3)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return f"<Process {self.name} pid={self.pid} alive={self.alive}>"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:40]


def _readiness(ready, proc: Process) -> Callable[[], bool]:
    if callable(ready):
        return ready
    if isinstance(ready, re.Pattern):
        return lambda: ready.search(proc.output()) is not None
    if isinstance(ready, str):
        return lambda: ready in proc.output()
    raise TypeError(f"ready must be a callable, a string or a regex, not {type(ready).__name__}")


def http_ok(url: str, timeout: float = 1.0) -> Callable[[], bool]:
    """A readiness check: True once GET ``url`` answers with a status below 500."""
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as answer:
                return answer.status < 500
        except urllib.error.HTTPError as err:
            return err.code < 500
    return check


def tcp_open(port: int, host: str = LOOPBACK) -> Callable[[], bool]:
    """A readiness check: True once host:port accepts connections."""
    return lambda: port_open(port, host)


def process(cmd: Sequence[str] | str, env: Mapping[str, str] | None = None, ready=None, *,
            timeout: float = 60.0, cwd=None, log: Path | None = None, name: str | None = None,
            inherit_env: bool = True, stop_signal: int = signal.SIGTERM) -> Process:
    """Starts ``cmd`` (a list, or a string split with shlex) and waits until ``ready`` (see
    `Process.wait_ready`: a callable such as ``http_ok(url)``, a string to find in its output, a
    regex, or None). ``env`` is added to os.environ (or used alone with inherit_env=False).
    Output goes to ``log`` (by default a temp file, removed at exit). On failure the process is
    stopped and ServiceError carries its output's tail. Stop it with ``.stop()`` (it is also
    stopped at exit); ``.kill()`` is a crash of it alone, ``.children()`` its pool processes.
    """
    if isinstance(cmd, str):
        cmd = shlex.split(cmd)
    full_env = dict(os.environ) if inherit_env else {}
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    proc = Process(cmd, env=full_env, cwd=cwd, log=log, name=name, stop_signal=stop_signal)
    try:
        proc.wait_ready(ready, timeout=timeout)
    except BaseException:
        proc.stop(timeout=3)
        raise
    return proc


# ----------------------------------------------------------------------------- services

class Service:
    """Common life cycle of a server process on a fixed loopback port."""

    kind = "service"

    def __init__(self, root: Path, port: int, start_timeout: float):
        self.root = Path(root)
        self.port = port
        self.start_timeout = start_timeout
        self.proc: Process | None = None
        self.log = self.root / f"{self.kind}.log"
        self.started_in: float | None = None   # seconds the last start() took

    # subclasses: _command(), _ready() -> bool, _user (OS user or None), stop_signal
    _user: str | None = None
    stop_signal = signal.SIGTERM

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive

    def start(self) -> "Service":
        """Starts the server (same port, same directory as before) and waits until it answers."""
        if self.alive:
            return self
        if port_open(self.port):
            raise ServiceError(f"{self.kind}: port {self.port} on {LOOPBACK} is taken by another process")
        self.proc = Process(self._command(), env=self._env(), log=self.log, name=self.kind,
                            user=self._user, stop_signal=self.stop_signal)
        started = time.monotonic()
        try:
            self.proc.wait_ready(self._ready, timeout=self.start_timeout, interval=0.05)
        except ServiceError:
            self.kill()
            raise
        self.started_in = time.monotonic() - started
        return self

    def stop(self, timeout: float = 15.0):
        """Clean shutdown (bounded, then SIGKILL); waits until every process of it is gone."""
        if self.proc is not None:
            self.proc.resume()
            self.proc.stop(timeout=timeout)

    def kill(self):
        """SIGKILL to every process of the server — a crash; open connections break at once."""
        if self.proc is not None:
            self.proc.kill_group()

    def restart(self, timeout: float = 15.0) -> "Service":
        """stop() then start(): same port, same data (what survives depends on persistence)."""
        self.stop(timeout)
        return self.start()

    def pause(self):
        """SIGSTOP to every process of it: the port still accepts connections but nothing
        answers (clients see timeouts) until resume()."""
        if self.proc is not None:
            self.proc.pause()

    def resume(self):
        """SIGCONT: answers again, with nothing lost."""
        if self.proc is not None:
            self.proc.resume()

    def ensure_running(self) -> "Service":
        """Resumes a paused server and starts a stopped or killed one (for teardown of fault
        tests that share the session's server)."""
        self.resume()
        if not self.alive:
            self.kill()  # leftovers of its group, if any
            self.start()
        return self

    def output(self, lines: int = 40) -> str:
        return _tail(self.log, lines)

    def _env(self):
        return None

    def _atexit_stop(self):
        self.resume()
        self.close()

    def close(self):
        """Stops it for good (and removes a folder it made for itself)."""
        self.stop(timeout=5)
        _unregister(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<{type(self).__name__} port={self.port} pid={self.pid} alive={self.alive}>"


class RedisServer(Service):
    """redis-server on 127.0.0.1:port, its files in ``root``.

    persistent=False: no RDB snapshots, no AOF — a restart (or a kill) loses every key.
    persistent=True: append-only file with appendfsync always — every acknowledged write
    survives stop/start and kill -9/start."""

    kind = "redis"

    def __init__(self, root: Path, port: int | None = None, *, persistent: bool = False,
                 binary: str | None = None, start_timeout: float = 15.0):
        super().__init__(root, port or free_port(), start_timeout)
        self.persistent = persistent
        self.binary = binary or find_redis_server()
        if not self.binary:
            raise ServiceError("redis-server is not on PATH (Debian package redis-server)")
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return self.url_db(0)

    def url_db(self, db: int) -> str:
        """redis://127.0.0.1:P/<db> (Redis has 16 databases: 0–15)."""
        return f"redis://{LOOPBACK}:{self.port}/{db}"

    def client(self, db: int = 0, **kwargs):
        """A redis.Redis client with short timeouts."""
        import redis
        kwargs.setdefault("socket_timeout", 2)
        kwargs.setdefault("socket_connect_timeout", 2)
        return redis.Redis(host=LOOPBACK, port=self.port, db=db, **kwargs)

    def flushall(self):
        """Empties every database."""
        with self.client() as c:
            c.flushall()

    def _command(self):
        cmd = [self.binary, "--port", str(self.port), "--bind", LOOPBACK, "--dir", str(self.root),
               "--save", "", "--daemonize", "no", "--logfile", "", "--protected-mode", "yes",
               "--databases", "16"]
        if self.persistent:
            cmd += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            cmd += ["--appendonly", "no"]
        return cmd

    def _ready(self) -> bool:
        with self.client(socket_timeout=0.5, socket_connect_timeout=0.5) as c:
            return bool(c.ping())


def redis_server(tmp_dir, *, persistent: bool = False, port: int | None = None,
                 start_timeout: float = 15.0) -> RedisServer:
    """Starts redis-server on a free loopback port with its files in ``tmp_dir`` and waits until
    it answers PING. Raises ServiceError (with its log's tail) when it cannot."""
    last = None
    for _ in range(3):  # a free port can be taken between choosing and binding it
        server = RedisServer(Path(tmp_dir), port, persistent=persistent, start_timeout=start_timeout)
        try:
            server.start()
            _register(server)
            return server
        except ServiceError as err:
            last = err
            if port is not None or "Address already in use" not in (server.output() + str(err)):
                break
    raise last


class PostgresServer(Service):
    """A PostgreSQL cluster (initdb) in ``root``/data, served by `postgres` on 127.0.0.1:port
    as an unprivileged OS user, with a database and a password role for the app.

    Tuned for tests: fsync and full_page_writes off, small shared_buffers; synchronous_commit
    on — a kill -9 of the server loses nothing committed (the OS keeps the files), a machine
    crash would."""

    kind = "postgres"
    stop_signal = signal.SIGINT          # "fast" shutdown: ends sessions, checkpoint, exit

    def __init__(self, root: Path, port: int | None = None, *, bindir: Path | None = None,
                 os_user: str | None = None, database: str = "insights", user: str = "insights",
                 password: str | None = None, start_timeout: float = 60.0):
        super().__init__(root, port or free_port(), start_timeout)
        self.bindir = Path(bindir) if bindir else find_postgres_bin()
        if not self.bindir:
            raise ServiceError("PostgreSQL server binaries are not in /usr/lib/postgresql/*/bin "
                               "(Debian package postgresql)")
        self._user = os_user
        self.database = database
        self.user = user
        self.password = password or secrets.token_hex(12)
        self.superuser = "postgres"
        self.superpassword = secrets.token_hex(12)
        self.data = self.root / "data"
        self.sockets = self.root / "s"
        self.initdb_seconds = None
        self._own_root = False          # True: root is a /tmp folder made for it, removed by close()

    # -- addresses
    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg 3 driver)."""
        return self.url_for(self.database)

    @property
    def dsn(self) -> str:
        """libpq/psycopg connection string."""
        return self.dsn_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@{LOOPBACK}:{self.port}/{database}"

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{self.user}:{self.password}@{LOOPBACK}:{self.port}/{database}"

    def connect(self, database: str | None = None, *, superuser: bool = False, timeout: float = 3, **kw):
        """A psycopg connection (autocommit off) as the app role, or as the superuser."""
        import psycopg
        user, password = (self.superuser, self.superpassword) if superuser else (self.user, self.password)
        return psycopg.connect(host=LOOPBACK, port=self.port, dbname=database or self.database,
                               user=user, password=password, connect_timeout=max(1, int(timeout)), **kw)

    def create_database(self, name: str | None = None) -> str:
        """Creates an empty database owned by the app role (a fresh one per test module, say);
        returns its SQLAlchemy URL (``dsn_for(name)`` gives the plain form)."""
        name = name or f"t_{secrets.token_hex(6)}"
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r}: use lower-case letters, digits and _")
        with self.connect("postgres", superuser=True, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}" OWNER "{self.user}"')
        return self.url_for(name)

    def drop_database(self, name: str):
        with self.connect("postgres", superuser=True, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # -- life cycle
    def initdb(self):
        """Creates the cluster (once) as the OS user; superuser password auth (scram) only."""
        for folder in (self.root, self.data, self.sockets):
            folder.mkdir(parents=True, exist_ok=True)
            _give(folder, self._user)
        os.chmod(self.data, 0o700)
        pwfile = self.root / "superuser.pw"
        pwfile.write_text(self.superpassword + "\n")
        _give(pwfile, self._user)
        os.chmod(pwfile, 0o600)
        cmd = [str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.superuser,
               f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--locale=C",
               "--no-sync"]
        started = time.monotonic()
        proc = Process(cmd, env=self._env(), log=self.root / "initdb.log", name="initdb", user=self._user)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.stop(1)
            raise ServiceError(f"initdb did not finish within 120 s\n{proc.describe()}")
        finally:
            _unregister(proc)
            pwfile.unlink(missing_ok=True)
        if code != 0:
            raise ServiceError(f"initdb failed (exit {code})\n{proc.describe()}")
        self.initdb_seconds = time.monotonic() - started

    def setup_app_role(self):
        """Creates the app's role (with its password) and database."""
        with self.connect("postgres", superuser=True, autocommit=True) as c:
            c.execute(f"CREATE ROLE \"{self.user}\" LOGIN PASSWORD '{self.password}'")
            c.execute(f'CREATE DATABASE "{self.database}" OWNER "{self.user}"')

    def _command(self):
        settings = {
            # fsync off: the OS keeps what was written, which a kill -9 of the server does
            # not lose. synchronous_commit stays on: off would leave the last commits in
            # shared memory, which a kill -9 does lose.
            "fsync": "off", "full_page_writes": "off",
            "shared_buffers": "32MB", "max_connections": "200",
            "max_wal_size": "256MB", "checkpoint_timeout": "30min",
            "logging_collector": "off", "log_min_messages": "warning",
            "dynamic_shared_memory_type": "posix",
        }
        cmd = [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
               "-k", str(self.sockets), "-h", LOOPBACK]
        for key, value in settings.items():
            cmd += ["-c", f"{key}={value}"]
        return cmd

    def _env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        if self._user is not None and os.geteuid() == 0:
            env["HOME"] = str(self.root)
            env["USER"] = env["LOGNAME"] = self._user
        return env

    def _ready(self) -> bool:
        with self.connect("postgres", superuser=True, timeout=1) as c:
            c.execute("SELECT 1")
        return True

    def close(self):
        super().close()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)


def _primary_group(user: str) -> int:
    import pwd
    return pwd.getpwnam(user).pw_gid


def _give(path: Path, user: str | None):
    if user is None or os.geteuid() != 0:
        return
    import pwd
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)


_USER_LOCK = threading.Lock()


def ensure_pg_os_user(name: str = PG_OS_USER) -> str | None:
    """The OS user PostgreSQL runs as: as root, the system user ``name`` (created once with
    useradd --system --no-create-home, no login shell); otherwise None (the current user)."""
    if os.geteuid() != 0:
        return None
    import pwd
    with _USER_LOCK:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        result = subprocess.run(
            [useradd, "--system", "--no-create-home", "--user-group", "--home-dir", "/nonexistent",
             "--shell", "/usr/sbin/nologin", "--comment", "Insights test PostgreSQL", name],
            capture_output=True, text=True, timeout=30)
        try:
            pwd.getpwnam(name)          # created now, or by a concurrent run
        except KeyError:
            raise ServiceError(f"could not create the OS user {name} for PostgreSQL: "
                               f"{(result.stderr or result.stdout).strip() or result.returncode}")
        return name


def _reachable_by(path: Path, user: str | None) -> bool:
    """Whether ``user`` may walk down to ``path`` (every ancestor searchable by it), and the
    socket path fits the 107-byte limit of Unix sockets."""
    if len(str(path / "s" / ".s.PGSQL.65535.lock")) > 100:
        return False
    if user is None or os.geteuid() != 0:
        return True
    import pwd
    entry = pwd.getpwnam(user)
    for folder in [path, *path.parents]:
        if not folder.exists():
            continue
        st = folder.stat()
        if st.st_uid == entry.pw_uid:
            bit = 0o100
        elif st.st_gid == entry.pw_gid:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            return False
    return True


def postgres_server(tmp_dir, *, port: int | None = None, database: str = "insights",
                    user: str = "insights", password: str | None = None,
                    start_timeout: float = 60.0) -> PostgresServer:
    """initdb + start PostgreSQL on a free loopback port as an unprivileged user (as root, the
    system user insights-pg), then creates the app role (password auth) and database.

    The cluster lives in ``tmp_dir``/postgres when that user can reach it (and the socket path
    is short enough); otherwise in a fresh /tmp/insights-pg-* folder, removed by close().
    Raises ServiceError (with the log's tail) when it cannot."""
    bindir = find_postgres_bin()
    if not bindir:
        raise ServiceError("PostgreSQL server binaries are not in /usr/lib/postgresql/*/bin "
                           "(Debian package postgresql)")
    os_user = ensure_pg_os_user()
    root = Path(tmp_dir) / "postgres"
    own_root = False
    if not _reachable_by(root, os_user):
        root = Path(tempfile.mkdtemp(prefix="insights-pg-"))
        os.chmod(root, 0o755)
        own_root = True
    server = PostgresServer(root, port, bindir=bindir, os_user=os_user, database=database,
                            user=user, password=password, start_timeout=start_timeout)
    server._own_root = own_root
    try:
        server.initdb()
        last = None
        for _ in range(3):  # the free port may be taken meanwhile
            try:
                server.start()
                break
            except ServiceError as err:
                last = err
                if port is not None or "already in use" not in (server.output() + str(err)):
                    raise
                server.port = free_port()
        else:
            raise last
        _register(server)
        server.setup_app_role()
    except BaseException:
        server.kill()
        if own_root:
            shutil.rmtree(root, ignore_errors=True)
        raise
    return server


# ----------------------------------------------------------------------------- fixtures

def _start_or_unavailable(what: str, start: Callable[[], Service]) -> Service:
    try:
        return start()
    except ServiceError as err:
        unavailable(f"{what} could not start: {err}")
    except OSError as err:
        unavailable(f"{what} could not start: {type(err).__name__}: {err}")


@pytest.fixture(scope="session")
def redis_service(tmp_path_factory):
    """A redis-server for the whole session (not persistent; see `redis_server`). Tests that
    kill or pause it call ``redis_service.ensure_running()`` at their end."""
    require_services("redis")
    server = _start_or_unavailable("redis-server", lambda: redis_server(tmp_path_factory.mktemp("redis")))
    yield server
    server.close()


@pytest.fixture(scope="session")
def postgres_service(tmp_path_factory):
    """A PostgreSQL server for the whole session (see `postgres_server`). Tests that kill, stop
    or pause it call ``postgres_service.ensure_running()`` at their end; ``create_database()``
    gives a test module an empty database of its own."""
    require_services("postgres")
    server = _start_or_unavailable("PostgreSQL", lambda: postgres_server(tmp_path_factory.mktemp("pg")))
    yield server
    server.close()


__all__ = [
    "REQUIRE_ENV", "ServiceError", "Process", "Service", "RedisServer", "PostgresServer",
    "services_required", "unavailable", "require_services", "find_redis_server", "find_postgres_bin",
    "free_port", "port_open", "http_ok", "tcp_open", "process", "redis_server", "postgres_server",
    "ensure_pg_os_user", "redis_service", "postgres_service",
]
