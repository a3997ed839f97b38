"""The job backend on Celery and Redis (insights/distributed.py, insights/worker.py), through the
Flask test client, with a real Redis and real `celery -A insights.worker worker` processes: the
same answers as in-process (200, 202 with progress, events, cancel tokens, shared identical
requests, limits shared by web nodes), and the faults: a pool process or a worker's main
process killed -9 mid-job, a job that kills every worker running it, Redis restarted empty.

The workers share a store folder with the web apps of the test process and keep their jobs in
SQLite there (one test uses PostgreSQL). Test methods reach the workers through a models config
file (tests/tiny_models.py and one written here).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

import services
from appkit import TINY_CONFIG, SlowSteps, extra_methods, png, upload  # noqa: F401 - fixture
from insights import create_app
from insights.engine import registry
from services import postgres_service  # noqa: F401 - fixture

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FINAL = ("done", "failed", "cancelled")
VISIBILITY_S = 5  # the workers' BROKER_VISIBILITY_S: short, so a lost worker's message comes back soon

# Loaded by the workers as a second models config: the test methods of appkit, and one whose
# every run kills the process running it.
WORKER_METHODS = f"""
import os, signal, sys
sys.path.insert(0, {str(HERE)!r})
from appkit import FixedMap, SlowSteps
from insights.engine import registry


class Crash(SlowSteps):
    id = "crash_test"

    def run(self, ctx, p):
        os.kill(os.getpid(), signal.SIGKILL)


for method in (FixedMap(), SlowSteps(), Crash()):
    registry._methods.setdefault(method.id, method)
"""


class Crash(SlowSteps):
    """The web side's copy of the workers' crash_test (the web only checks its parameters)."""

    id = "crash_test"


class Cluster:
    """A Redis, a store folder and Celery workers by name, for the web apps of one test module."""

    def __init__(self, root: Path, database_url: str | None = None):
        self.root = root
        self.redis = services.redis_server(root / "redis")
        self.store = root / "store"
        self.store.mkdir(parents=True, exist_ok=True)
        methods = root / "worker_methods.py"
        methods.write_text(WORKER_METHODS)
        self.database_url = database_url
        self.env = {"INSIGHTS_BROKER_URL": self.redis.url, "INSIGHTS_STORE_PATH": str(self.store),
                    "INSIGHTS_BUILTIN_MODELS": "false",
                    "INSIGHTS_MODELS_CONFIG": json.dumps([TINY_CONFIG, str(methods)]),
                    "INSIGHTS_DEVICE": "cpu", "INSIGHTS_INSTANCE": str(root / "worker-instance"),
                    "INSIGHTS_BROKER_VISIBILITY_S": str(VISIBILITY_S), "OMP_NUM_THREADS": "1",
                    "PYTHONPATH": str(ROOT)}
        if database_url:
            self.env.update(INSIGHTS_DATABASE_URL=database_url, INSIGHTS_BLOB_DIR=str(self.store))
        self.workers: dict[str, services.Process] = {}

    def start(self, *names: str) -> None:
        """Starts workers (at once) and waits until each pool process has built its app."""
        for name in names:
            cmd = [sys.executable, "-m", "celery", "-A", "insights.worker", "worker", "--concurrency", "1",
                   "-n", f"{name}@%h", "-l", "info", "--without-gossip", "--without-mingle"]
            self.workers[name] = services.process(cmd, self.env, cwd=ROOT, name=f"celery-{name}")
        for name in names:
            self.workers[name].wait_ready("insights worker ready", timeout=120)

    def ensure(self, *names: str) -> None:
        """Starts those of ``names`` that are not running."""
        dead = [n for n in names if n not in self.workers or not self.workers[n].alive]
        for name in dead:
            if name in self.workers:
                self.workers[name].stop(timeout=1)
        if dead:
            self.start(*dead)

    def config(self, **more) -> dict:
        config = {"INSTANCE_PATH": str(self.root / f"web-{time.monotonic_ns()}"), "BROKER_URL": self.redis.url,
                  "STORE_PATH": str(self.store), "BUILTIN_MODELS": False, "MODELS_CONFIG": TINY_CONFIG,
                  "DEVICE": "cpu", "INLINE_MAX_PASSES": 5, "MAX_PASSES": 5000, "SSE_HEARTBEAT_S": 0.2,
                  "EVENT_STREAM_MAX_S": 30, "MAX_JOBS_PER_CLIENT": 8, "RATE_LIMIT_PER_MIN": 1000}
        if self.database_url:
            config.update(DATABASE_URL=self.database_url, BLOB_DIR=str(self.store))
        config.update(more)
        return config

    def worker_of(self, row: dict) -> tuple[str, int]:
        """The name and pool-process pid of the run holding a job (``node@host/pid/run``)."""
        node, pid, _run = row["worker"].split("/")
        return node.split("@")[0], int(pid)

    def close(self) -> None:
        for proc in self.workers.values():
            proc.stop(timeout=5)
        self.redis.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    services.require_services("redis")
    made = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        made.start("w1", "w2")
    except services.ServiceError as err:
        made.close()
        services.unavailable(f"a celery worker could not start: {err}")
    yield made
    made.close()


@pytest.fixture
def methods(monkeypatch, extra_methods):  # noqa: F811 - the appkit fixture
    monkeypatch.setitem(registry._methods, Crash.id, Crash())


@pytest.fixture
def web(cluster, methods):
    """A web app on the cluster (a fresh one per test; the cluster's Redis and workers persist)."""
    app = create_app(cluster.config())
    yield app
    app.extensions["insights"].jobs.shutdown()
    if os.environ.get("INSIGHTS_TEST_WORKER_LOGS"):  # what the workers did, for a failing test
        for name, proc in cluster.workers.items():
            print(f"--- {name} ---\n{proc.output(40)}")


def client_at(app, address: str):
    """A test client whose requests come from ``address`` (a client of its own for the limits)."""
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    return client


def wait_state(client, job_id: str, done, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get(f"/api/jobs/{job_id}").json
        if done(state):
            return state
        time.sleep(0.02)
    raise AssertionError(f"job {job_id}: {client.get(f'/api/jobs/{job_id}').json} after {timeout} s")


def wait_final(client, job_id: str, timeout: float = 30.0) -> dict:
    return wait_state(client, job_id, lambda s: s["status"] in FINAL, timeout)


def slow(client, image: str, steps: int, delay: float, target: int = 1, method: str = "slow_test"):
    return client.post("/api/explain", json={"image": image, "method": method, "target": target,
                                             "params": {"steps": steps, "delay": delay}})


def row_of(app, job_id: str) -> dict:
    return app.extensions["insights"].jobs.table.row(job_id)


# --------------------------------------------------------------------------- the answers


def test_predict_and_a_cheap_explanation_answer_200_from_a_worker_with_messages_of_ids(web, tmp_path, monkeypatch):
    from insights.distributed import TASK, CeleryBackend

    backend = web.extensions["insights"].jobs
    assert isinstance(backend, CeleryBackend)
    conf = backend.celery.conf
    assert (conf.task_serializer, conf.result_serializer, list(conf.accept_content)) == ("json", "json", ["json"])
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.broker_transport_options["visibility_timeout"] == 60  # the default BROKER_VISIBILITY_S
    sent = []
    real = backend.celery.send_task
    monkeypatch.setattr(backend.celery, "send_task",
                        lambda name, args, **kw: sent.append((name, json.dumps(args))) or real(name, args=args, **kw))
    client = web.test_client()
    image = upload(client, png()).json["id"]

    predicted = client.post("/api/predict", json={"image": image, "top_k": 3})
    assert predicted.status_code == 200, predicted.json
    # The same answer as the in-process default on the same picture.
    local = create_app({"INSTANCE_PATH": str(tmp_path / "local"), "BUILTIN_MODELS": False, "MODELS_CONFIG": TINY_CONFIG,
                        "DEVICE": "cpu"})
    try:
        lc = local.test_client()
        expected = lc.post("/api/predict", json={"image": upload(lc, png()).json["id"], "top_k": 3}).json
    finally:
        local.extensions["insights"].jobs.shutdown()
    assert [p["index"] for p in predicted.json["predictions"]] == [p["index"] for p in expected["predictions"]]
    assert [p["prob"] for p in predicted.json["predictions"]] == pytest.approx(
        [p["prob"] for p in expected["predictions"]])

    r = client.post("/api/explain", json={"image": image, "method": "fixed_map_test", "target": 2})
    assert r.status_code == 200 and r.json["status"] == "done", r.json
    rid = r.json["result"]["id"]
    assert r.json["result"]["target"] == 2
    assert client.get(f"/api/results/{rid}/map.png").status_code == 200

    # A message is one job id, in JSON; the request itself is the job's row in the database.
    assert [name for name, _ in sent] == [TASK, TASK]
    ids = [json.loads(args) for _, args in sent]
    assert all(len(a) == 1 and isinstance(a[0], str) and len(a[0]) == 32 for a in ids)
    row = row_of(web, ids[1][0])
    request = json.loads(row["request"])
    assert request["kind"] == "explain" and request["image"] == image and request["method"] == "fixed_map_test"
    assert request["target"] == 2 and request["result_id"] == rid and request["params"] == {"value": 1.0}
    assert (row["status"], row["tries"], row["key"]) == ("done", 1, rid)
    assert row["worker"].split("@")[0] in ("w1", "w2")
    assert json.loads(row_of(web, ids[0][0])["result"]) == predicted.json


def test_a_costly_explanation_answers_202_then_progress_with_an_eta_and_events_to_done(web):
    client = web.test_client()
    image = upload(client, png(color=(10, 200, 30))).json["id"]
    r = slow(client, image, steps=40, delay=0.03)
    assert r.status_code == 202, r.json
    job = r.json["job"]
    assert job["status"] == "queued" and job["total"] == 40 and job["cancel_token"]
    assert r.headers["Location"].endswith(f"/api/jobs/{job['id']}")

    running = wait_state(client, job["id"], lambda s: s["status"] == "running" and 2 < s["done"] < 40 or
                         s["status"] in FINAL)
    assert running["status"] == "running" and running["eta_s"] is not None and running["eta_s"] > 0

    stream = client.get(f"/api/jobs/{job['id']}/events")
    assert stream.mimetype == "text/event-stream"
    states = [json.loads(line[6:]) for chunk in stream.response
              for line in (chunk.decode() if isinstance(chunk, bytes) else chunk).splitlines()
              if line.startswith("data: ")]
    stream.close()
    assert states[-1]["status"] == "done" and states[-1]["done"] == 40 and states[-1]["result_id"]
    versions = [s["version"] for s in states]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert client.get(f"/api/results/{states[-1]['result_id']}").status_code == 200
    scraped = client.get("/metrics").get_data(as_text=True)  # /metrics reads the jobs of every node
    assert 'insights_jobs_finished_total{state="done"}' in scraped
    assert [line for line in scraped.splitlines() if line.startswith('insights_jobs{state="done"}')][0] != \
        'insights_jobs{state="done"} 0.0'


def test_a_cheap_request_not_done_within_inline_timeout_answers_202_and_finishes(cluster, methods):
    app = create_app(cluster.config(INLINE_TIMEOUT_S=0.3))
    try:
        client = app.test_client()
        image = upload(client, png(color=(150, 40, 40))).json["id"]
        start = time.monotonic()
        r = slow(client, image, steps=5, delay=0.2)  # 5 passes: inline, but 1 s of work
        assert r.status_code == 202 and time.monotonic() - start < 1.0, r.json
        assert wait_final(client, r.json["job"]["id"])["status"] == "done"
    finally:
        app.extensions["insights"].jobs.shutdown()


def test_a_running_job_is_cancelled_within_a_second_and_identical_requests_share_it(web):
    a, b = client_at(web, "10.1.0.1"), client_at(web, "10.1.0.2")
    image = upload(a, png(color=(90, 90, 200))).json["id"]
    first = slow(a, image, steps=2000, delay=0.01)
    second = slow(b, image, steps=2000, delay=0.01)  # identical: joins the job
    assert first.status_code == second.status_code == 202
    job_id = first.json["job"]["id"]
    assert second.json["job"]["id"] == job_id
    tokens = first.json["job"]["cancel_token"], second.json["job"]["cancel_token"]
    assert tokens[0] != tokens[1]
    wait_state(a, job_id, lambda s: s["status"] == "running" and s["done"] > 5)

    assert a.delete(f"/api/jobs/{job_id}", headers={"X-Cancel-Token": "not-a-token"}).status_code == 403
    r = a.delete(f"/api/jobs/{job_id}", headers={"X-Cancel-Token": tokens[0]})
    assert r.status_code == 200 and r.json["status"] == "running"  # b still holds it
    time.sleep(0.5)
    assert a.get(f"/api/jobs/{job_id}").json["status"] == "running"

    start = time.monotonic()
    r = b.delete(f"/api/jobs/{job_id}", headers={"X-Cancel-Token": tokens[1]})
    assert r.status_code == 200
    final = wait_final(b, job_id, timeout=5)
    took = time.monotonic() - start
    assert final["status"] == "cancelled" and final["done"] < 2000
    assert took < 1.5, f"the cancel took {took:.2f} s to reach the worker"
    # The worker is free again: a prediction answers.
    assert a.post("/api/predict", json={"image": image}).status_code == 200


def test_compatible_requests_queued_together_are_computed_in_one_batch(web):
    clients = [client_at(web, f"10.2.0.{i}") for i in range(6)]
    images = [upload(c, png(color=(20 * i, 100, 50))).json["id"] for i, c in enumerate(clients)]
    # Both workers busy for a while: the cheap requests queue up meanwhile.
    blockers = [slow(clients[0], images[0], steps=12, delay=0.05, target=t).json["job"]["id"] for t in (0, 1)]
    answers = [None] * 4

    def ask(i):
        answers[i] = clients[i + 1].post("/api/explain", json={"image": images[i + 1], "method": "fixed_map_test",
                                                               "target": 0, "params": {"value": 2.0}})
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(a is not None and a.status_code == 200 for a in answers), [a and a.json for a in answers]
    sizes = [a.json["result"]["batch_size"] for a in answers]
    assert max(sizes) > 1, f"batch sizes {sizes}: the queued requests were computed one by one"
    for job_id in blockers:
        assert wait_final(clients[0], job_id)["status"] == "done"


def test_admission_limits_are_kept_in_redis_for_every_web_node(tmp_path, methods):
    services.require_services("redis")
    redis = services.redis_server(tmp_path / "redis")  # no worker on it: the jobs stay queued
    store = tmp_path / "store"
    base = {"BROKER_URL": redis.url, "STORE_PATH": str(store), "BUILTIN_MODELS": False, "MODELS_CONFIG": TINY_CONFIG,
            "DEVICE": "cpu", "INLINE_MAX_PASSES": 5, "MAX_QUEUED_JOBS": 3, "MAX_JOBS_PER_CLIENT": 2,
            "RATE_LIMIT_PER_MIN": 12}
    node_a = create_app({**base, "INSTANCE_PATH": str(tmp_path / "a")})
    node_b = create_app({**base, "INSTANCE_PATH": str(tmp_path / "b")})
    try:
        xa, xb = client_at(node_a, "10.3.0.1"), client_at(node_b, "10.3.0.1")
        ya, za, zb = client_at(node_a, "10.3.0.2"), client_at(node_a, "10.3.0.3"), client_at(node_b, "10.3.0.3")
        image = upload(xa, png()).json["id"]
        j1 = slow(xa, image, 100, 0.01, target=0)
        j2 = slow(xb, image, 100, 0.01, target=1)
        assert (j1.status_code, j2.status_code) == (202, 202)
        r = slow(xa, image, 100, 0.01, target=2)  # the client's third, on either node
        assert r.status_code == 429 and r.json["error"]["code"] == "busy"
        assert "MAX_JOBS_PER_CLIENT" in r.json["error"]["message"]
        assert int(r.headers["Retry-After"]) >= 1
        y = slow(ya, image, 100, 0.01, target=3)
        assert y.status_code == 202
        r = slow(zb, image, 100, 0.01, target=4)  # the server's fourth
        assert r.status_code == 503 and "MAX_QUEUED_JOBS" in r.json["error"]["message"] and r.headers["Retry-After"]
        joined = slow(za, image, 100, 0.01, target=0)  # joining an active job adds none
        assert joined.status_code == 202 and joined.json["job"]["id"] == j1.json["job"]["id"]
        # y cancels its queued job on the other node: it ends at once, and a place is free for z.
        r = client_at(node_b, "10.3.0.2").delete(f"/api/jobs/{y.json['job']['id']}",
                                                  headers={"X-Cancel-Token": y.json["job"]["cancel_token"]})
        assert r.status_code == 200 and r.json["status"] == "cancelled"
        assert slow(zb, image, 100, 0.01, target=4).status_code == 202
        counts = node_a.extensions["insights"].jobs.admission.counts()
        assert counts["active"] == 3 and counts["refused"] == {"client_jobs": 1, "queue_full": 1}

        # Writes: 12 a minute per client, counted on both nodes together (x made 4 so far).
        w = client_at(node_b, "10.3.0.9"), client_at(node_a, "10.3.0.9")
        answers = [w[i % 2].post("/api/predict", json={}).status_code for i in range(13)]
        assert answers == [400] * 12 + [429]
    finally:
        for node in (node_a, node_b):
            node.extensions["insights"].jobs.shutdown()
        redis.close()


# --------------------------------------------------------------------------- faults


def test_a_pool_process_killed_mid_job_is_redelivered_and_the_job_finishes(web, cluster):
    client = web.test_client()
    image = upload(client, png(color=(200, 200, 10))).json["id"]
    job_id = slow(client, image, steps=40, delay=0.05).json["job"]["id"]
    wait_state(client, job_id, lambda s: s["status"] == "running" and s["done"] >= 3)
    name, pid = cluster.worker_of(row_of(web, job_id))
    assert pid in cluster.workers[name].children()
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    final = wait_final(client, job_id, timeout=40)
    took = time.monotonic() - killed
    assert final["status"] == "done" and final["result_id"], final
    row = row_of(web, job_id)
    assert row["tries"] == 2 and cluster.worker_of(row)[1] != pid
    print(f"pool process killed: the job finished elsewhere {took:.1f} s later")
    assert cluster.workers[name].alive  # its main process started a new pool process


def test_a_job_whose_worker_dies_every_time_fails_after_three_runs(web, cluster):
    from insights.distributed import MAX_TRIES

    client = web.test_client()
    image = upload(client, png(color=(1, 2, 3))).json["id"]
    r = slow(client, image, steps=10, delay=0.01, method="crash_test")
    assert r.status_code == 202
    final = wait_final(client, r.json["job"]["id"], timeout=60)
    assert final["status"] == "failed", final
    assert final["error"]["code"] == "worker_lost"
    assert f"stopped {MAX_TRIES} times" in final["error"]["message"]
    assert row_of(web, r.json["job"]["id"])["tries"] == MAX_TRIES
    assert all(p.alive for p in cluster.workers.values())


def test_a_worker_main_process_killed_mid_job_loses_nothing(web, cluster):
    cluster.ensure("w1", "w2")
    client = web.test_client()
    image = upload(client, png(color=(60, 10, 160))).json["id"]
    job_id = slow(client, image, steps=60, delay=0.05).json["job"]["id"]
    wait_state(client, job_id, lambda s: s["status"] == "running" and s["done"] >= 3)
    name, pid = cluster.worker_of(row_of(web, job_id))
    cluster.workers[name].kill()  # SIGKILL to the main process; its pool process dies with it
    killed = time.monotonic()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}") and \
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX":
        time.sleep(0.05)
    final = wait_final(client, job_id, timeout=60)
    took = time.monotonic() - killed
    assert final["status"] == "done", final
    row = row_of(web, job_id)
    assert row["tries"] == 2 and cluster.worker_of(row)[0] != name
    print(f"worker main process killed: the job finished on another worker {took:.1f} s later")


def test_the_janitor_requeues_a_running_job_whose_heartbeat_stopped_and_fails_one_run_too_often(web, monkeypatch):
    import insights.distributed as distributed
    from insights.tasks import ExplainTask

    client = web.test_client()
    service = web.extensions["insights"]
    backend = service.jobs
    record = service.image(upload(client, png(color=(7, 77, 177))).json["id"])
    params = registry.get("fixed_map_test").validate({}, service.input_shape("tiny"))

    def ghost(target: int, tries: int) -> str:
        """A job its run left running: a worker that died with its message (no redelivery)."""
        rid = service.store.result_id(record["id"], "tiny", "fixed_map_test", params, target)
        task = ExplainTask(service, "tiny", record, "fixed_map_test", params, target, rid,
                           {"signed": False, "output": "pixel", "cost": {"forward": 1}})
        job_id = f"{target:032x}"
        backend.table.insert({"id": job_id, "kind": "explain", "request": json.dumps(task.to_payload()), "key": rid,
                              "lane": "main", "urgent": False, "status": "running", "total": 1, "tries": tries,
                              "worker": f"ghost@nowhere/1/{target}", "beats": 7, "epoch": backend.epoch(),
                              "created": time.time(), "started": time.time()}, None)
        return job_id

    alive, doomed = ghost(3, tries=1), ghost(4, tries=distributed.MAX_TRIES)
    monkeypatch.setattr(distributed, "STALE_S", 0.0)
    counts = backend.sweep({})
    assert counts["requeued"] == 1 and counts["failed"] == 1, counts
    final = wait_final(client, alive)
    assert final["status"] == "done" and final["result_id"]
    assert row_of(web, alive)["tries"] == 2
    failed = client.get(f"/api/jobs/{doomed}").json
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"


def test_a_redis_restarted_empty_loses_no_job_and_everyone_reconnects(web, cluster):
    cluster.ensure("w1")
    client = web.test_client()
    image = upload(client, png(color=(5, 150, 150))).json["id"]
    jobs = [slow(client, image, steps=30, delay=0.04, target=t).json["job"] for t in range(3)]
    long = slow(client_at(web, "10.4.0.1"), image, steps=3000, delay=0.01, target=4).json["job"]
    wait_state(client, jobs[0]["id"], lambda s: s["status"] == "running")
    before = [client.get(f"/api/jobs/{j['id']}").json["status"] for j in jobs + [long]]
    assert "queued" in before, before

    with cluster.redis.client() as c:
        c.set("test:sentinel", 1)
    cluster.redis.restart()  # volatile: the queues, unacked messages, progress and holds are gone
    with cluster.redis.client() as c:
        # Emptied (a key written before is gone). Not dbsize() == 0: the workers and the web
        # node reconnect at once and write their keys again, racing such a check.
        assert c.get("test:sentinel") is None

    for job in jobs:
        assert wait_final(client, job["id"], timeout=60)["status"] == "done"
    # The submitter's cancel token still works (holds come back from the database).
    r = client_at(web, "10.4.0.1").delete(f"/api/jobs/{long['id']}", headers={"X-Cancel-Token": long["cancel_token"]})
    assert r.status_code == 200
    assert wait_final(client, long["id"], timeout=20)["status"] == "cancelled"
    # New work is admitted and run: web node and workers reconnected by themselves.
    assert client.post("/api/predict", json={"image": image, "top_k": 2}).status_code == 200
    fresh = slow(client, image, steps=8, delay=0.01, target=0)
    assert fresh.status_code in (200, 202)
    if fresh.status_code == 202:
        assert wait_final(client, fresh.json["job"]["id"])["status"] == "done"


def test_jobs_live_in_postgresql_when_database_url_is_set(tmp_path, methods, postgres_service):
    services.require_services("redis")
    pg = Cluster(tmp_path, database_url=postgres_service.create_database())
    try:
        pg.start("p1")
        app = create_app(pg.config())
        try:
            client = app.test_client()
            image = upload(client, png(color=(33, 66, 99))).json["id"]
            assert client.post("/api/predict", json={"image": image}).status_code == 200
            r = slow(client, image, steps=10, delay=0.01)
            assert r.status_code == 202
            assert wait_final(client, r.json["job"]["id"])["status"] == "done"
            backend = app.extensions["insights"].jobs
            assert backend.table.engine.dialect.name == "postgresql"
            assert backend.table.row(r.json["job"]["id"])["worker"].startswith("p1@")
        finally:
            app.extensions["insights"].jobs.shutdown()
    finally:
        pg.close()
