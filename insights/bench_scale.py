"""Figures of the scale-out mode (issue 14; README, "Scale out"): what the broker costs, what a second
worker brings, and how long a job lost with its worker takes to finish elsewhere.

    python -m insights.bench_scale [--requests 100] [--burst 48] [--clients 8] [--model NAME]

Starts its own Redis and PostgreSQL on free loopback ports in a temporary folder (with the helpers
of tests/services.py: Debian's redis-server and postgresql, and the scale-out packages, are needed),
then web nodes (``python app.py``) and Celery workers (``celery -A insights.worker worker
--concurrency 1``) as the integration suite runs them, and measures:

1. **Latency**: ``--requests`` predictions and saliency maps, one at a time, each of a new picture,
   against the embedded default (``python app.py``: in-process worker, SQLite, local files), the
   in-process worker on the shared store (PostgreSQL and a blob folder, no broker: what the store
   alone adds) and through the broker (a web node, one worker, Redis, PostgreSQL, a blob folder);
   p50 and p99 of each and what the scale-out mode adds.
2. **Throughput**: ``--burst`` saliency requests from ``--clients`` threads at once (each a new
   picture): the embedded server, then 1 and 2 workers.
3. **A worker lost mid-job**: with both workers warm (each has run an occlusion), an occlusion job
   (default parameters) run once undisturbed, then with its worker's pool process killed -9 a
   second in, then with a worker's main process killed -9: the seconds from the kill to the job
   being done, and where.

Every process runs with OMP_NUM_THREADS=1 (one core each, as one worker per device would have a
device of its own); on a machine of 2 cores shared with other work the figures are noisy and two
workers cannot double anything. Every process it starts is stopped by its PID at the end.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time

import numpy as np

from .bench_load import Client, noise_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "tests", "tiny_models.py")


def load_services():
    """tests/services.py (real Redis and PostgreSQL, processes stopped by PID), loaded by path."""
    path = os.path.join(ROOT, "tests", "services.py")
    spec = importlib.util.spec_from_file_location("insights_bench_services", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


class Bench:
    """The services and processes of one run, and what they need to start more."""

    def __init__(self, services, root: str, model: str | None):
        self.services, self.root = services, root
        self.redis = services.redis_server(os.path.join(root, "redis"))
        self.pg = services.postgres_server(root)
        self.database_url = self.pg.create_database("bench")
        self.blobs = os.path.join(root, "blobs")
        os.makedirs(self.blobs)
        base = {k: v for k, v in os.environ.items() if not k.startswith("INSIGHTS_")}
        base.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "INSIGHTS_DEVICE": "cpu",
                     # One client (127.0.0.1) sends everything here: no per-client or rate limits.
                     "INSIGHTS_MAX_JOBS_PER_CLIENT": "0", "INSIGHTS_RATE_LIMIT_PER_MIN": "0",
                     "INSIGHTS_MAX_QUEUED_JOBS": "1000", "INSIGHTS_MAX_INLINE_WAITS": "32",
                     "INSIGHTS_INLINE_TIMEOUT_S": "120"})
        if model == "tiny":
            base.update({"INSIGHTS_MODELS_CONFIG": TINY_CONFIG, "INSIGHTS_BUILTIN_MODELS": "false"})
        self.embedded_env = dict(base)
        self.store_env = {**base, "INSIGHTS_DATABASE_URL": self.database_url, "INSIGHTS_BLOB_DIR": self.blobs}
        self.scaled_env = {**self.store_env, "INSIGHTS_BROKER_URL": self.redis.url,
                           "INSIGHTS_INSTANCE": os.path.join(root, "worker")}
        self.procs: list = []
        self.workers: dict[str, object] = {}

    def web(self, name: str, mode: str):
        """``python app.py`` on a free loopback port (mode: embedded, store or scaled); answers
        (process, port)."""
        cmd = [sys.executable, "app.py", "--host", "127.0.0.1", "--port", "0", "--threads", "40",
               "--instance", os.path.join(self.root, name)]
        env = {"embedded": self.embedded_env, "store": self.store_env, "scaled": self.scaled_env}[mode]
        proc = self.services.process(cmd, env, cwd=ROOT,
                                     ready="Insights is serving on", timeout=180, inherit_env=False, name=name,
                                     log=os.path.join(self.root, f"{name}.log"))
        self.procs.append(proc)
        banner = [line for line in proc.output().splitlines() if line.startswith("Insights is serving on")][-1]
        return proc, int(banner.split("http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])

    def worker(self, name: str, wait: bool = True):
        cmd = [sys.executable, "-m", "celery", "-A", "insights.worker", "worker", "--concurrency", "1", "-l", "info",
               "--without-gossip", "--without-mingle", "-n", f"{name}@%h"]
        proc = self.services.process(cmd, self.scaled_env, cwd=ROOT, inherit_env=False, name=name,
                                     log=os.path.join(self.root, f"{name}.log"))
        self.procs.append(proc)
        self.workers[name] = proc
        if wait:
            self.ready(name, 1)
        return proc

    def ready(self, name: str, times: int, timeout: float = 180) -> None:
        """Waits until the worker's pool process has built its app ``times`` times in all."""
        proc = self.workers[name]
        proc.wait_ready(lambda: proc.output().count("insights worker ready") >= times, timeout=timeout)

    def row(self, job_id: str) -> dict:
        with self.pg.connect("bench") as db:
            found = db.execute("SELECT status, worker, tries FROM jobs WHERE id = %s", (job_id,)).fetchone()
        return dict(zip(("status", "worker", "tries"), found)) if found else {}

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop(timeout=10)
        self.redis.close()
        self.pg.close()


# --------------------------------------------------------------------------- the measurements


class Pictures:
    """A new picture for every request (so that no answer comes from the store)."""

    def __init__(self, size: int):
        self.size, self.next, self.lock = size, 0, threading.Lock()

    def take(self, client: Client) -> str:
        with self.lock:
            self.next += 1
            seed = self.next
        status, _h, body = client.upload(noise_png(seed, self.size))
        if status != 201:
            raise RuntimeError(f"upload answered {status}: {body}")
        return body["id"]


def timed(client: Client, path: str, payload: dict) -> float:
    start = time.perf_counter()
    status, _h, body = client.json("POST", path, payload)
    took = time.perf_counter() - start
    if status != 200:
        raise RuntimeError(f"{path} answered {status}: {body}")
    return took


def latency(port: int, pictures: Pictures, model: str, target: int, n: int) -> dict:
    """p50/p99 of ``n`` predictions and ``n`` saliency maps, one at a time, each of a new picture
    (uploads untimed), after a few of each to warm up."""
    client = Client(port, timeout=180)
    try:
        images = [pictures.take(client) for _ in range(n + 3)]
        out = {}
        for kind, path in (("predict", "/api/predict"), ("saliency", "/api/explain")):
            times = []
            for i, image in enumerate(images):
                payload = ({"image": image, "model": model, "top_k": 5} if kind == "predict" else
                           {"image": image, "model": model, "method": "saliency", "target": target})
                took = timed(client, path, payload)
                if i >= 3:
                    times.append(took)
            out[kind] = {"p50": pct(times, 50), "p99": pct(times, 99), "n": len(times)}
        return out
    finally:
        client.close()


def throughput(port: int, pictures: Pictures, model: str, target: int, burst: int, clients: int) -> dict:
    """``burst`` saliency requests of new pictures from ``clients`` threads at once: requests a
    second, and the mean batch the workers made."""
    setup = Client(port, timeout=180)
    images = [pictures.take(setup) for _ in range(burst)]
    setup.close()
    batches, errors, lock = [], [], threading.Lock()

    def run(mine: list[str]):
        client = Client(port, timeout=300)
        try:
            for image in mine:
                status, _h, body = client.json("POST", "/api/explain", {"image": image, "model": model,
                                                                         "method": "saliency", "target": target})
                with lock:
                    if status == 200:
                        batches.append(int(body["result"].get("batch_size") or 1))
                    else:
                        errors.append(f"{status} {body}")
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(images[i::clients],)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    took = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} of {burst} requests failed, e.g. {errors[0]}")
    return {"per_s": burst / took, "seconds": took, "mean_batch": statistics.mean(batches)}


def occlusion_job(client: Client, image: str, model: str, target: int, params: dict | None = None) -> str:
    status, _h, body = client.json("POST", "/api/explain", {"image": image, "model": model, "method": "occlusion",
                                                             "target": target, "params": params or {}})
    if status != 202:
        raise RuntimeError(f"the occlusion job answered {status} (not a job): {body}")
    return body["job"]["id"]


def wait_state(client: Client, job_id: str, done, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _h, state = client.json("GET", f"/api/jobs/{job_id}")
        if status == 200 and done(state):
            return state
        time.sleep(0.02)
    raise RuntimeError(f"job {job_id} did not get there within {timeout:.0f} s")


def lost_worker(bench: Bench, port: int, pictures: Pictures, model: str, targets: list[int]) -> dict:
    """Seconds of an undisturbed occlusion job, and from a kill -9 (pool process; main process) to
    the job done on the other worker."""
    client = Client(port, timeout=60)
    image = pictures.take(client)
    out = {}
    # Both workers warm first (a worker's first occlusion on a model builds its twin): two jobs of
    # different windows at once, which cannot batch, so each worker takes one.
    warm = [occlusion_job(client, image, model, targets[0], {"sliding_window_shapes": [3, side, side],
                                                            "strides": [3, side, side]}) for side in (16, 20)]
    for job in warm:
        wait_state(client, job, lambda s: s["status"] in ("done", "failed", "cancelled"), 600)
    job = occlusion_job(client, image, model, targets[0])
    wait_state(client, job, lambda s: s["status"] == "running", 60)
    started = time.monotonic()
    final = wait_state(client, job, lambda s: s["status"] in ("done", "failed", "cancelled"), 600)
    out["clean"] = time.monotonic() - started
    if final["status"] != "done":
        raise RuntimeError(f"the undisturbed job ended {final}")
    for what, target in (("pool", targets[1]), ("main", targets[2])):
        job = occlusion_job(client, image, model, target)
        wait_state(client, job, lambda s: s["status"] == "running", 60)
        time.sleep(1.0)
        run = bench.row(job)["worker"]
        name, pid = run.split("/")[:2]
        name, pid = name.split("@")[0], int(pid)
        builds = bench.workers[name].output().count("insights worker ready")
        if what == "pool":
            os.kill(pid, signal.SIGKILL)
        else:
            bench.workers[name].kill()
        killed = time.monotonic()
        while time.monotonic() - killed < 600:  # until another run holds it (or it ended)
            row = bench.row(job)
            if row["worker"] != run or row["status"] != "running":
                out[what + "_taken"] = time.monotonic() - killed
                break
            time.sleep(0.05)
        final = wait_state(client, job, lambda s: s["status"] in ("done", "failed", "cancelled"), 600)
        out[what] = time.monotonic() - killed
        out[what + "_status"] = final["status"]
        row = bench.row(job)
        out[what + "_tries"] = row["tries"]
        out[what + "_where"] = "the same worker" if row["worker"].split("@")[0] == name else "the other worker"
        if what == "pool":  # its main process forks a new pool process: wait for it before the next
            bench.ready(name, builds + 1)
    client.close()
    return out


# --------------------------------------------------------------------------- the run


def pick_model(bench: Bench, wanted: str | None) -> tuple[str, int, int]:
    """(model, target, picture size): EfficientNet-Lite0 when its weights are here, else tiny."""
    if wanted == "tiny":
        return "tiny", 1, 48
    proc, port = bench.web("probe", "embedded")
    try:
        client = Client(port, timeout=60)
        _s, _h, body = client.json("GET", "/api/models")
        client.close()
    finally:
        proc.stop()
    available = {m["name"] for m in body["models"] if m.get("available")}
    name = wanted or "efficientnet_lite0"
    if name in available:
        return name, 281, 256
    print(f"{name} is not available here ({sorted(available)}); using the tiny test model", flush=True)
    for env in (bench.embedded_env, bench.store_env, bench.scaled_env):
        env.update(INSIGHTS_MODELS_CONFIG=TINY_CONFIG, INSIGHTS_BUILTIN_MODELS="false")
    return "tiny", 1, 48


def report(figures: dict, args, model: str) -> str:
    lat_e, lat_p, lat_s = figures["embedded"], figures["store"], figures["broker"]
    thr = figures["throughput"]
    lost = figures.get("lost")
    lines = [
        f"Scale-out figures: model {model}, {os.cpu_count()} CPU cores (shared), OMP_NUM_THREADS=1 per process, "
        f"{args.requests} requests one at a time, bursts of {args.burst} from {args.clients} clients",
        "",
        "| p50 / p99 | embedded default (in-process, SQLite) | in-process, PostgreSQL store | "
        "through the broker (web node, worker, Redis, PostgreSQL) | added to the default | of which the broker |",
        "|---|---|---|---|---|---|",
    ]
    for kind in ("predict", "saliency"):
        e, p, s = lat_e[kind], lat_p[kind], lat_s[kind]
        lines.append(f"| {kind} | {ms(e['p50'])} / {ms(e['p99'])} | {ms(p['p50'])} / {ms(p['p99'])} | "
                     f"{ms(s['p50'])} / {ms(s['p99'])} | {ms(s['p50'] - e['p50'])} / {ms(s['p99'] - e['p99'])} | "
                     f"{ms(s['p50'] - p['p50'])} / {ms(s['p99'] - p['p99'])} |")
    lines += ["", "| throughput (saliency) | requests/s | mean batch |", "|---|---|---|"]
    for label, key in (("embedded", "embedded"), ("1 worker", "workers_1"), ("2 workers", "workers_2")):
        lines.append(f"| {label} | {thr[key]['per_s']:.1f} | {thr[key]['mean_batch']:.1f} |")
    if lost:
        lines += ["", "| occlusion job (default parameters) | seconds |", "|---|---|",
                  f"| undisturbed run | {lost['clean']:.1f} |",
                  f"| pool process killed -9 → the job {lost['pool_status']} | {lost['pool']:.1f} "
                  f"(taken over after {lost.get('pool_taken', float('nan')):.1f}, on {lost['pool_where']}, "
                  f"run {lost['pool_tries']} times) |",
                  f"| worker main process killed -9 → the job {lost['main_status']} | {lost['main']:.1f} "
                  f"(taken over after {lost.get('main_taken', float('nan')):.1f}, on {lost['main_where']}, "
                  f"run {lost['main_tries']} times) |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100, help="timed requests of each kind (default 100)")
    p.add_argument("--burst", type=int, default=48, help="saliency requests of a throughput burst (default 48)")
    p.add_argument("--clients", type=int, default=8, help="threads sending a burst (default 8)")
    p.add_argument("--model", default=None, help="a model name, or tiny (default efficientnet_lite0 if here)")
    p.add_argument("--no-kill", action="store_true", help="skip the lost-worker runs")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)

    services = load_services()
    missing = [what for what, ok in (("redis-server", services.find_redis_server()),
                                     ("PostgreSQL (Debian package postgresql)", services.find_postgres_bin()))
               if not ok]
    if missing:
        raise SystemExit(f"bench_scale needs {' and '.join(missing)}")
    root = tempfile.mkdtemp(prefix="insights-bench-scale-")
    os.chmod(root, 0o755)  # PostgreSQL runs as another user when this runs as root
    bench = Bench(services, root, args.model)
    figures: dict = {}
    try:
        model, target, size = pick_model(bench, args.model)
        pictures = Pictures(size)
        print(f"model {model}; embedded server ...", flush=True)
        proc, port = bench.web("embedded", "embedded")
        figures["embedded"] = latency(port, pictures, model, target, args.requests)
        figures["throughput"] = {"embedded": throughput(port, pictures, model, target, args.burst, args.clients)}
        proc.stop()
        print("in-process worker on PostgreSQL and a blob folder ...", flush=True)
        proc, port = bench.web("store", "store")
        figures["store"] = latency(port, pictures, model, target, args.requests)
        proc.stop()

        print("through the broker: a web node and one worker ...", flush=True)
        bench.worker("w1", wait=False)
        _web, port = bench.web("web", "scaled")
        bench.ready("w1", 1)
        figures["broker"] = latency(port, pictures, model, target, args.requests)
        figures["throughput"]["workers_1"] = throughput(port, pictures, model, target, args.burst, args.clients)
        print("two workers ...", flush=True)
        bench.worker("w2")
        figures["throughput"]["workers_2"] = throughput(port, pictures, model, target, args.burst, args.clients)
        if args.no_kill or model == "tiny":  # a tiny model's jobs end before a kill reaches them
            print("the lost-worker runs are skipped" + (" (tiny model)" if model == "tiny" else ""), flush=True)
        else:
            print("a worker lost mid-job ...", flush=True)
            figures["lost"] = lost_worker(bench, port, pictures, model, [282, 283, 284])
    finally:
        bench.close()
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(report(figures, args, model))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model, **figures}, f, indent=2)
    return figures


if __name__ == "__main__":
    main()
