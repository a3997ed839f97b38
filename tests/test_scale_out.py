"""The scale-out integration suite (issue 14): real processes on 127.0.0.1, as deployed.

One stack for the module: a real PostgreSQL (a fresh database of the session's server), a real Redis
of its own (a test restarts it), a shared blob folder, two web nodes (``python app.py``) and two
Celery workers (``celery -A insights.worker worker --concurrency 1``), each a process of its own,
started with the commands of deploy/compose.yaml (read from it: one source of truth) and the
settings named in deploy/insights.env. Requests go over HTTP with an access token, as a team's
would. The tests:

* the happy path across nodes: an upload on web A, a prediction on web B, an explanation submitted
  on A and followed on B, a costly one cancelled from B with its cancel token; the result JSON, its
  files and its share page byte-identical on both nodes;
* faults, each followed by the stack's restoration: a web node killed -9 (the other serves the same
  jobs and results), a worker's pool process killed -9 mid-job and, separately, a worker's main
  process (the job ends on the other worker, or fails saying why; never "running" forever), Redis
  restarted empty (jobs recover, web nodes reconnect by themselves), PostgreSQL stopped (503 with
  Retry-After, then the same request works once it is back, nothing restarted).

Every wait is bounded; every process is stopped by its PID at the end (tests/services.py). Where
Redis, PostgreSQL or a process cannot start the tests skip saying why (fail under
INSIGHTS_REQUIRE_SERVICES=1, as in .ci/run). About a minute on 2 shared cores.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import signal
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

import services
from appkit import TINY_CONFIG, png
from services import postgres_service  # noqa: F401 - fixture

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEPLOY = ROOT / "deploy"
FINAL = ("done", "failed", "cancelled")


# --------------------------------------------------------------------------- deploy/, the source of truth


def load_compose_yaml(text: str):
    """The YAML subset deploy/compose.yaml is written in, read without PyYAML (not a dependency):
    block mappings and sequences (``- key: value`` items too), flow collections written as JSON,
    plain scalars (strings, integers, true/false/null) and double-quoted ones, whole-line comments.
    Anything else raises ValueError. (The test below checks it against PyYAML where that is here.)"""
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError(f"line {number}: a tab in the indentation")
        lines.append([len(raw) - len(raw.lstrip(" ")), stripped, number])
    if not lines:
        return None
    value, end = _yaml_block(lines, 0, lines[0][0])
    if end != len(lines):
        raise ValueError(f"line {lines[end][2]}: unexpected indentation")
    return value


_KEY = re.compile(r"^([A-Za-z0-9_.-]+):(?:\s+(.*))?$")


def _yaml_block(lines, i, indent):
    if lines[i][1] == "-" or lines[i][1].startswith("- "):
        items = []
        while i < len(lines) and lines[i][0] == indent and (lines[i][1] == "-" or lines[i][1].startswith("- ")):
            rest = lines[i][1][1:].strip()
            if not rest:
                if i + 1 >= len(lines) or lines[i + 1][0] <= indent:
                    raise ValueError(f"line {lines[i][2]}: an empty item")
                item, i = _yaml_block(lines, i + 1, lines[i + 1][0])
            elif _KEY.match(rest) and not rest.startswith(('"', "[", "{")):
                lines[i] = [indent + 2, rest, lines[i][2]]  # a mapping item: its first pair opens it
                item, i = _yaml_block(lines, i, indent + 2)
            else:
                item, i = _yaml_scalar(rest, lines[i][2]), i + 1
            items.append(item)
        return items, i
    mapping = {}
    while i < len(lines) and lines[i][0] == indent:
        match = _KEY.match(lines[i][1])
        if not match:
            raise ValueError(f"line {lines[i][2]}: not a 'key: value' line: {lines[i][1]!r}")
        key, rest = match.group(1), match.group(2)
        if key in mapping:
            raise ValueError(f"line {lines[i][2]}: {key!r} again")
        if rest:
            mapping[key], i = _yaml_scalar(rest, lines[i][2]), i + 1
        elif i + 1 < len(lines) and lines[i + 1][0] > indent:
            mapping[key], i = _yaml_block(lines, i + 1, lines[i + 1][0])
        else:
            mapping[key], i = None, i + 1
    return mapping, i


def _yaml_scalar(text: str, number: int):
    if text.startswith(('"', "[", "{")):
        try:
            return json.loads(text)
        except ValueError as err:
            raise ValueError(f"line {number}: not JSON: {err}") from None
    if text.startswith(("'", "&", "*", "!", "|", ">")) or " #" in text:
        raise ValueError(f"line {number}: outside the subset: {text!r}")
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~"):
        return None
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    return text


def read_env_file(path: Path) -> dict[str, str]:
    """NAME=value lines of an env file (comments and blank lines skipped), as compose reads them."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            out[name.strip()] = value.strip()
    return out


COMPOSE = load_compose_yaml((DEPLOY / "compose.yaml").read_text())
WEB_COMMAND: list[str] = COMPOSE["services"]["web-a"]["command"]
WORKER_COMMAND: list[str] = COMPOSE["services"]["worker-gpu0"]["command"]
SHARED_SETTINGS = sorted(read_env_file(DEPLOY / "insights.env"))  # BROKER_URL, DATABASE_URL, BLOB_DIR
WEB_SETTINGS = sorted(COMPOSE["services"]["web-a"]["environment"])  # DEVICE, TOKENS_FILE
WORKER_SETTINGS = sorted(COMPOSE["services"]["worker-gpu0"]["environment"])  # DEVICE
# What one machine adds to those commands: loopback, a free port and a folder of its own per web
# node (argparse takes the last --host/--port), a node name per worker (containers differ by host name).
WEB_ON_ONE_MACHINE = ["--host", "127.0.0.1", "--port", "0", "--instance"]  # + the node's folder
WORKER_ON_ONE_MACHINE = ["-n"]  # + NAME@%h


def local_command(command: list[str]) -> list[str]:
    """A command of the compose file, run with this interpreter (its venv's celery)."""
    if command[0] == "python":
        return [sys.executable, *command[1:]]
    if command[0] == "celery":
        return [sys.executable, "-m", "celery", *command[1:]]
    raise ValueError(f"unexpected program {command[0]!r}")


# The workers (and the web nodes, which check parameters) load appkit's test methods through a
# second models config: slow_test (steps × delay seconds, with progress) makes a job that runs long
# enough to be cancelled or to lose its worker.
TEST_METHODS = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
from appkit import FixedMap, SlowSteps
from insights.engine import registry

for method in (FixedMap(), SlowSteps()):
    registry._methods.setdefault(method.id, method)
"""


# --------------------------------------------------------------------------- HTTP


class Answer:
    def __init__(self, status: int, headers, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<{self.status} {self.body[:300]!r}>"


def http(base: str, method: str, path: str, *, body=None, headers: dict | None = None, token: str | None = None,
         timeout: float = 30) -> Answer:
    """One request; an error status is an answer too, no answer raises OSError."""
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if isinstance(body, (dict, list)):
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    elif isinstance(body, bytes):
        data = body
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return Answer(answer.status, answer.headers, answer.read())
    except urllib.error.HTTPError as err:
        return Answer(err.code, err.headers, err.read())


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def wait_for(check, timeout: float, what: str, interval: float = 0.05):
    """``check()``'s first truthy value within ``timeout`` seconds (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            value = check()
            if value:
                return value
            last = value
        except (OSError, ValueError, KeyError) as err:
            last = err
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s (last: {last!r})")
        time.sleep(interval)


# --------------------------------------------------------------------------- the stack


class Stack:
    """PostgreSQL, Redis, a blob folder, web nodes and workers by name; ``restore()`` brings back
    whatever a fault test stopped or killed."""

    def __init__(self, root: Path, pg, database_url: str):
        self.root, self.pg = root, pg
        self.database = database_url.rsplit("/", 1)[1]
        self.redis = services.redis_server(root / "redis")
        self.blobs = root / "blobs"
        self.blobs.mkdir()
        self.token = secrets.token_urlsafe(24)
        tokens = root / "tokens.txt"
        tokens.write_text(self.token + "\n")
        methods = root / "test_methods.py"
        methods.write_text(TEST_METHODS)
        values = {"INSIGHTS_BROKER_URL": self.redis.url, "INSIGHTS_DATABASE_URL": database_url,
                  "INSIGHTS_BLOB_DIR": str(self.blobs), "INSIGHTS_DEVICE": "cpu",
                  "INSIGHTS_TOKENS_FILE": str(tokens)}
        # Only for the tests: tiny models and the test methods, one client (the token) allowed more.
        extra = {"INSIGHTS_MODELS_CONFIG": json.dumps([TINY_CONFIG, str(methods)]), "INSIGHTS_BUILTIN_MODELS": "false",
                 "INSIGHTS_RATE_LIMIT_PER_MIN": "2000", "INSIGHTS_MAX_JOBS_PER_CLIENT": "8",
                 "INSIGHTS_INSTANCE": str(root / "worker-instance"), "OMP_NUM_THREADS": "1",
                 "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("INSIGHTS_")}
        self.web_env = {**inherited, **{k: values[k] for k in SHARED_SETTINGS + WEB_SETTINGS}, **extra}
        self.worker_env = {**inherited, **{k: values[k] for k in SHARED_SETTINGS + WORKER_SETTINGS}, **extra}
        self.webs: dict[str, services.Process] = {}
        self.bases: dict[str, str] = {}
        self.workers: dict[str, services.Process] = {}
        self.commands: dict[str, list[str]] = {}  # name → the argv it runs
        self.starts = 0  # each start logs to a file of its own (a readiness check reads it)

    # -- processes
    def start(self, webs=(), workers=()) -> None:
        """Starts web nodes and workers at once, then waits for each (a web node's banner, a
        worker's pool process having built its app)."""
        self.starts += 1
        for name in workers:
            cmd = local_command(WORKER_COMMAND) + WORKER_ON_ONE_MACHINE + [f"{name}@%h"]
            self.commands[name] = cmd
            self.workers[name] = services.process(cmd, self.worker_env, cwd=ROOT, name=f"worker-{name}",
                                                  inherit_env=False, log=self.root / f"worker-{name}-{self.starts}.log")
        for name in webs:
            cmd = local_command(WEB_COMMAND) + WEB_ON_ONE_MACHINE + [str(self.root / f"web-{name}")]
            self.commands[name] = cmd
            self.webs[name] = services.process(cmd, self.web_env, cwd=ROOT, name=f"web-{name}",
                                               inherit_env=False, log=self.root / f"web-{name}-{self.starts}.log")
        for name in webs:
            proc = self.webs[name]
            proc.wait_ready(re.compile(r"Insights is serving on (http://127\.0\.0\.1:\d+)/"), timeout=120)
            self.bases[name] = re.findall(r"Insights is serving on (http://127\.0\.0\.1:\d+)/", proc.output())[-1]
        for name in workers:
            self.workers[name].wait_ready("insights worker ready", timeout=120)

    def restore(self) -> None:
        """Everything running again: Redis, PostgreSQL, every web node and worker."""
        self.redis.ensure_running()
        self.pg.ensure_running()
        dead_webs = [n for n, p in self.webs.items() if not p.alive]
        dead_workers = [n for n, p in self.workers.items() if not p.alive]
        for proc in [self.webs[n] for n in dead_webs] + [self.workers[n] for n in dead_workers]:
            proc.stop(timeout=1)  # what is left of its process group
        if dead_webs or dead_workers:
            self.start(dead_webs, dead_workers)

    def close(self) -> None:
        for proc in list(self.webs.values()) + list(self.workers.values()):
            proc.stop(timeout=10)
        self.redis.close()

    def logs(self) -> str:
        return "\n".join(p.describe(25) for p in list(self.webs.values()) + list(self.workers.values()))

    # -- requests
    def call(self, web: str, method: str, path: str, **kw) -> Answer:
        kw.setdefault("token", self.token)
        return http(self.bases[web], method, path, **kw)

    def upload(self, web: str, image: bytes) -> str:
        body, kind = multipart("image", "photo.png", image)
        r = self.call(web, "POST", "/api/images", body=body, headers={"Content-Type": kind})
        assert r.status == 201, r
        return r.json["id"]

    def explain(self, web: str, image: str, steps: int, delay: float, target: int = 1) -> Answer:
        return self.call(web, "POST", "/api/explain", body={"image": image, "method": "slow_test", "target": target,
                                                             "params": {"steps": steps, "delay": delay}})

    def job(self, web: str, job_id: str) -> dict:
        r = self.call(web, "GET", f"/api/jobs/{job_id}", timeout=10)
        assert r.status == 200, r
        return r.json

    def wait_job(self, web: str, job_id: str, done, timeout: float, what: str = "") -> dict:
        return wait_for(lambda: (lambda s: s if done(s) else None)(self.job(web, job_id)), timeout,
                        f"job {job_id} on web {web} {what}".strip())

    def wait_final(self, web: str, job_id: str, timeout: float) -> dict:
        return self.wait_job(web, job_id, lambda s: s["status"] in FINAL, timeout, "to end")

    def row(self, job_id: str) -> dict:
        """The job's row, read from PostgreSQL directly."""
        with self.pg.connect(self.database) as db:
            found = db.execute("SELECT status, worker, tries, error FROM jobs WHERE id = %s", (job_id,)).fetchone()
        return dict(zip(("status", "worker", "tries", "error"), found)) if found else {}

    def holder(self, job_id: str) -> tuple[str, int]:
        """The worker name and pool-process pid of the run holding a job (``name@host/pid/run``)."""
        node, pid, _run = self.row(job_id)["worker"].split("/")
        return node.split("@")[0], int(pid)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, postgres_service):  # noqa: F811 - the services fixture
    services.require_services("redis", "postgres")
    made = None
    try:
        made = Stack(tmp_path_factory.mktemp("scale"), postgres_service, postgres_service.create_database())
        made.start(webs=("a", "b"), workers=("w1", "w2"))
    except services.ServiceError as err:
        if made is not None:
            made.close()
        services.unavailable(f"the scale-out stack could not start: {err}")
    yield made
    made.close()


@pytest.fixture
def restored(stack):
    """The stack as it was, after a fault test (whatever it stopped or killed comes back)."""
    stack.restore()
    yield stack
    try:
        stack.restore()
    finally:
        if os.environ.get("INSIGHTS_TEST_WORKER_LOGS"):
            print(stack.logs())


RESULT_FILES = ("", "/map.png", "/input.png", "/overlay.png", "/attribution.npy")


def served(stack, web: str, rid: str) -> dict[str, bytes]:
    """The result's JSON, its files and its share page as one web node serves them."""
    out = {}
    for suffix in RESULT_FILES:
        r = stack.call(web, "GET", f"/api/results/{rid}{suffix}")
        assert r.status == 200, (web, suffix, r)
        out[suffix or "json"] = r.body
    r = stack.call(web, "GET", f"/r/{rid}", token=None)  # a share link needs no token
    assert r.status == 200, (web, r)
    out["share"] = r.body
    return out


@pytest.fixture(scope="module")
def seeded(stack):
    """An upload on web A and an explanation submitted on A and followed on B to its end."""
    stack.restore()
    image = stack.upload("a", png(color=(30, 160, 90)))
    submitted = stack.explain("a", image, steps=120, delay=0.01, target=2)
    assert submitted.status == 202, submitted
    job = submitted.json["job"]
    seen = []
    final = stack.wait_job("b", job["id"], lambda s: seen.append(s) or s["status"] in FINAL, 60, "to end")
    return {"image": image, "job": job, "states": seen, "final": final, "result": final.get("result_id")}


# --------------------------------------------------------------------------- the compose file


def test_the_compose_file_parses_and_holds_what_this_suite_runs():
    services_ = COMPOSE["services"]
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:  # the subset reader reads it as YAML does
        assert yaml.safe_load((DEPLOY / "compose.yaml").read_text()) == COMPOSE
    assert {"redis", "postgres", "web-a", "web-b", "worker-gpu0", "worker-gpu1"} <= set(services_)
    webs = [s for n, s in services_.items() if n.startswith("web")]
    workers = [s for n, s in services_.items() if n.startswith("worker")]
    # Every web node and worker runs the command this suite runs, with the shared settings.
    assert all(s["command"] == WEB_COMMAND for s in webs)
    assert all(s["command"] == WORKER_COMMAND for s in workers)
    assert WORKER_COMMAND[:6] == ["celery", "-A", "insights.worker", "worker", "--concurrency", "1"]
    assert WEB_COMMAND[:2] == ["python", "app.py"]
    assert set(SHARED_SETTINGS) == {"INSIGHTS_BROKER_URL", "INSIGHTS_DATABASE_URL", "INSIGHTS_BLOB_DIR"}
    blob_dir = read_env_file(DEPLOY / "insights.env")["INSIGHTS_BLOB_DIR"]
    for service in webs + workers:
        assert service["env_file"] == ["insights.env"]
        assert f"blobs:{blob_dir}" in service["volumes"]  # one shared blob folder, at one path
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["image"] == "insights:latest" and service["build"]["dockerfile"] == "deploy/Dockerfile"
    assert all(sorted(s["environment"]) == WEB_SETTINGS for s in webs)
    assert all(sorted(s["environment"]) == WORKER_SETTINGS for s in workers)
    assert all("/healthz" in " ".join(s["healthcheck"]["test"]) for s in webs)
    assert all(s["healthcheck"]["test"] for s in services_.values())
    # One GPU per worker, each its own.
    gpus = []
    for service in workers:
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1 and devices[0]["capabilities"] == ["gpu"]
        gpus += devices[0]["device_ids"]
        assert service["environment"]["INSIGHTS_DEVICE"] == "cuda:0"
    assert len(gpus) == len(set(gpus)) == len(workers)
    assert (DEPLOY / "Dockerfile").is_file()
    # The README shows these commands.
    readme = (ROOT / "README.md").read_text()
    assert " ".join(WORKER_COMMAND) in readme


def test_the_compose_reader_refuses_what_it_does_not_read():
    for text in ("a: &x 1\n", "a:\n  - *x\n", "a: 'q'\n", "a: b # c\n", "a:\n  b: 1\n c: 2\n", "a: [1,\n"):
        with pytest.raises(ValueError):
            load_compose_yaml(text)
    read = load_compose_yaml("a:\n  - b: 1\n    c: [\"x\"]\n  - 2\nd: true\n")
    assert read == {"a": [{"b": 1, "c": ["x"]}, 2], "d": True}


# --------------------------------------------------------------------------- across nodes


def test_upload_on_a_predict_on_b_explain_on_a_followed_on_b_cancel_from_b(stack, seeded):
    # The upload made on A is B's too.
    r = stack.call("b", "GET", f"/api/images/{seeded['image']}")
    assert r.status == 200, r
    r = stack.call("b", "POST", "/api/predict", body={"image": seeded["image"], "top_k": 3})
    assert r.status == 200 and len(r.json["predictions"]) == 3, r

    # The explanation submitted on A was followed on B: progress (with an ETA) and its end.
    final = seeded["final"]
    assert final["status"] == "done" and final["result_id"], final
    running = [s for s in seeded["states"] if s["status"] == "running" and 0 < s["done"] < s["total"]]
    assert running and any(s.get("eta_s") for s in running), seeded["states"][-5:]

    # Its result, files and share page: the same bytes from either node.
    rid = seeded["result"]
    from_a, from_b = served(stack, "a", rid), served(stack, "b", rid)
    assert from_a == from_b
    assert stack.call("a", "GET", f"/api/results/{rid}").json["target"] == 2

    # A costly one submitted on A, cancelled from B with its cancel token.
    r = stack.explain("a", seeded["image"], steps=3000, delay=0.01, target=3)
    assert r.status == 202, r
    job = r.json["job"]
    stack.wait_job("b", job["id"], lambda s: s["status"] == "running" and s["done"] > 3, 30, "to run")
    refused = stack.call("b", "DELETE", f"/api/jobs/{job['id']}",
                         headers={"X-Cancel-Token": "not-" + job["cancel_token"]})
    assert refused.status == 403, refused
    asked = time.monotonic()
    r = stack.call("b", "DELETE", f"/api/jobs/{job['id']}", headers={"X-Cancel-Token": job["cancel_token"]})
    assert r.status == 200, r
    final = stack.wait_final("b", job["id"], timeout=10)
    took = time.monotonic() - asked
    assert final["status"] == "cancelled" and final["done"] < 3000, final
    assert took < 5, f"the cancel took {took:.1f} s"
    assert stack.job("a", job["id"])["status"] == "cancelled"
    print(f"cancel from web B: cancelled {took:.2f} s after the DELETE")


# --------------------------------------------------------------------------- faults


def test_a_web_node_killed_the_other_serves_the_same_jobs_and_results(restored, seeded):
    stack = restored
    rid = seeded["result"]
    before = served(stack, "b", rid)
    r = stack.explain("a", seeded["image"], steps=150, delay=0.01, target=4)
    assert r.status == 202, r
    job = r.json["job"]
    stack.webs["a"].kill()  # SIGKILL mid-job
    assert not stack.webs["a"].alive
    with pytest.raises(OSError):
        http(stack.bases["a"], "GET", "/healthz", timeout=2)
    # B follows A's job to its end and serves everything A served.
    final = stack.wait_final("b", job["id"], timeout=60)
    assert final["status"] == "done", final
    assert stack.job("b", seeded["job"]["id"])["status"] == "done"
    assert served(stack, "b", rid) == before
    assert served(stack, "b", final["result_id"])["json"]
    # A new work submitted on B meanwhile runs.
    r = stack.call("b", "POST", "/api/predict", body={"image": seeded["image"]})
    assert r.status == 200, r
    # A comes back (a new process) and serves the same.
    stack.restore()
    assert served(stack, "a", rid) == before
    assert served(stack, "a", final["result_id"]) == served(stack, "b", final["result_id"])


def _lose_a_worker_mid_job(stack, seeded, steps: int, kill) -> tuple[dict, dict, float]:
    """A job on web B killed by ``kill(name, pool_pid)`` after a few steps; its final state (on
    web A), its row and the seconds from the kill to its end."""
    r = stack.explain("b", seeded["image"], steps=steps, delay=0.02, target=0)  # ~4 s
    assert r.status == 202, r
    job_id = r.json["job"]["id"]
    stack.wait_job("a", job_id, lambda s: s["status"] == "running" and s["done"] >= 5, 30, "to run")
    name, pid = stack.holder(job_id)
    assert pid in stack.workers[name].children(), (name, pid, stack.workers[name].children())
    kill(name, pid)
    killed = time.monotonic()
    final = stack.wait_final("a", job_id, timeout=90)
    took = time.monotonic() - killed
    row = stack.row(job_id)
    if final["status"] == "failed":  # allowed: a clear error, never "running" forever
        assert final["error"]["code"] == "worker_lost" and "stopped" in final["error"]["message"], final
    else:
        assert final["status"] == "done" and final["result_id"], final
        assert row["tries"] == 2 and row["worker"].split("/")[1] != str(pid), row
        assert stack.call("a", "GET", f"/api/results/{final['result_id']}").status == 200
    return final, row, took


def test_a_worker_pool_process_killed_mid_job(restored, seeded):
    stack = restored
    lost = {}

    def kill_pool(name, pid):
        lost.update(name=name, pid=pid)
        os.kill(pid, signal.SIGKILL)

    final, row, took = _lose_a_worker_mid_job(stack, seeded, 201, kill_pool)
    print(f"pool process {lost['name']}/{lost['pid']} killed -9: the job ended {final['status']} {took:.1f} s "
          f"later, on {row['worker']}")
    assert final["status"] == "done"


def test_a_worker_main_process_killed_mid_job(restored, seeded):
    stack = restored
    lost = {}

    def kill_main(name, pid):
        lost.update(name=name, pid=pid)
        stack.workers[name].kill()  # SIGKILL to the main process alone; its pool process is orphaned

    final, row, took = _lose_a_worker_mid_job(stack, seeded, 202, kill_main)
    print(f"worker main process of {lost['name']} killed -9: the job ended {final['status']} {took:.1f} s later, "
          f"on {row['worker']}")
    assert final["status"] == "done"
    assert not row["worker"].startswith(lost["name"] + "@"), row
    # The orphaned pool process does not live on.
    wait_for(lambda: not Path(f"/proc/{lost['pid']}").exists() or
             Path(f"/proc/{lost['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX",
             15, f"the orphaned pool process {lost['pid']} to end")


def test_redis_restarted_jobs_recover_and_web_nodes_reconnect(restored, seeded):
    stack = restored
    jobs = [stack.explain("a" if n % 2 else "b", seeded["image"], steps=n, delay=0.02, target=1).json["job"]
            for n in (101, 102, 103)]  # two running (one per worker), one queued
    stack.wait_job("a", jobs[1]["id"], lambda s: s["status"] == "running", 30, "to run")
    before = [stack.job("a", j["id"])["status"] for j in jobs]
    assert "queued" in before and "running" in before, before
    stack.redis.restart()  # volatile: queues, unacknowledged messages, progress and holds are gone
    with stack.redis.client() as c:
        # Nothing survived; only a running job's progress may be written again already (its
        # worker reports every 0.1 s, and the first report after the restart makes the key anew).
        left = [k.decode() if isinstance(k, bytes) else k for k in c.keys()]
        assert [k for k in left if not k.startswith("insights:job:")] == [], left
    restarted = time.monotonic()
    for job in jobs:
        final = stack.wait_final("b", job["id"], timeout=90)
        assert final["status"] == "done" or (final["status"] == "failed" and final["error"]["message"]), final
    took = time.monotonic() - restarted
    # New work through either node: both reconnected by themselves.
    for web in ("a", "b"):
        answer = wait_for(lambda: (lambda r: r if r.status != 503 else None)(
            stack.call(web, "POST", "/api/predict", body={"image": seeded["image"], "top_k": 2})), 20,
            f"web {web} to admit work again")
        assert answer.status == 200, answer
    print(f"Redis restarted empty: the jobs {before} ended "
          f"{[stack.job('a', j['id'])['status'] for j in jobs]} within {took:.1f} s")
    assert all(stack.job("a", j["id"])["status"] == "done" for j in jobs)


def test_postgres_stopped_answers_503_with_retry_after_then_the_same_request_works(restored, seeded):
    stack = restored
    rid = seeded["result"]
    before = served(stack, "a", rid)
    path = f"/api/results/{rid}"
    image = png(color=(1, 99, 200))
    body, kind = multipart("image", "photo.png", image)
    stack.pg.stop()
    try:
        answers = {}
        for web in ("a", "b"):
            answers[f"result on {web}"] = stack.call(web, "GET", path, timeout=30)
            answers[f"share page on {web}"] = stack.call(web, "GET", f"/r/{rid}", token=None, timeout=30)
        answers["upload"] = stack.call("a", "POST", "/api/images", body=body, headers={"Content-Type": kind})
        answers["job state"] = stack.call("b", "GET", f"/api/jobs/{seeded['job']['id']}")
        answers["explanation"] = stack.explain("a", seeded["image"], steps=81, delay=0.005, target=0)
        for what, r in answers.items():
            assert r.status == 503 and int(r.headers["Retry-After"]) >= 1, (what, r)
            if r.headers["Content-Type"].startswith("application/json"):
                assert r.json["error"]["code"] == "store_unavailable", (what, r)  # one fault, one code
        assert stack.call("a", "GET", "/healthz").status == 200  # the node itself is alive
        print("PostgreSQL stopped: " + ", ".join(
            f"{what} {r.status} {r.json['error']['code'] if 'json' in r.headers['Content-Type'] else 'page'}"
            for what, r in answers.items()))
    finally:
        stack.pg.start()
    for web in ("a", "b"):  # the same requests, nothing restarted
        assert stack.call(web, "GET", path).body == before["json"]
        assert stack.job(web, seeded["job"]["id"])["status"] == "done"
    uploaded = stack.upload("a", image)  # nothing of the refused upload is in the way
    assert stack.call("b", "GET", f"/api/images/{uploaded}").status == 200
    assert served(stack, "b", rid) == before
    r = stack.explain("b", seeded["image"], steps=81, delay=0.005, target=0)
    assert r.status == 202, r
    assert stack.wait_final("a", r.json["job"]["id"], timeout=60)["status"] == "done"
    assert all(p.alive for p in list(stack.webs.values()) + list(stack.workers.values()))
