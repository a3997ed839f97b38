"""Load and flood runs against a real server on loopback, for a hosted instance's figures.

    python -m insights.bench_load [--clients 50] [--seconds 60] [--model efficientnet_lite0]
                                  [--flood 300] [--config FILE.py] [--no-builtin]

Starts ``python app.py`` on a free loopback port with a temporary instance folder and one access
token per client (so per-client limits apply to each), then:

1. **Load**: ``--clients`` threads for ``--seconds``, each on its own keep-alive connection, mixing
   cheap reads (the dashboard, models, methods, a share page), one-pass predictions, cheap
   explanations of random classes (each a new stored result) and costly explanations (queued jobs,
   which the client then cancels with its cancel token). Prints the count of each answer, p50/p99
   latency per kind, failures (anything but 2xx, 429 and 503, or no answer), and the server's RSS
   growth per 1000 requests after a warm-up.
2. **Flood** (``--flood N``): one client submits N costly explanations as fast as it can while
   another keeps reading and predicting; prints how many were accepted and shed, and the other
   client's latencies.

Every process it starts is stopped by its PID at the end.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- the server process


class ServerProcess:
    """``python app.py`` on a free loopback port; ``stop`` and ``kill`` act on its PID."""

    def __init__(self, instance: str, tokens: list[str] | None = None, env: dict | None = None,
                 args: list[str] | None = None, threads: int = 8):
        self.instance = instance
        environ = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if tokens:
            environ["INSIGHTS_TOKENS"] = ",".join(tokens)
        cmd = [sys.executable, os.path.join(ROOT, "app.py"), "--port", "0", "--instance", instance,
               "--device", "cpu", "--threads", str(threads), *(args or [])]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.output: list[str] = []
        self.port = self._wait_for_banner()
        threading.Thread(target=self._drain, daemon=True).start()  # a full pipe would block it

    def _wait_for_banner(self, timeout: float = 180.0) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            if line.startswith("Insights is serving on http://"):
                return int(line.split("http://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        self.kill()
        raise RuntimeError("the server did not start:\n" + "".join(self.output[-30:]))

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            del self.output[:-200]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        """Resident memory of the server process in bytes (Linux /proc)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def kill(self) -> None:
        """SIGKILL: no clean-up runs (the crash test's fault)."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


class Client:
    """One keep-alive connection with a token; every call returns (status, headers, body)."""

    def __init__(self, port: int, token: str | None = None, timeout: float = 60.0):
        self.port, self.token, self.timeout = port, token, timeout
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            self.conn.request(method, path, body=body, headers=headers)
            resp = self.conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()  # a fresh connection for the next call
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            raise
        if resp.getheader("Connection", "").lower() == "close":
            self.conn.close()
        return resp.status, dict(resp.getheaders()), data

    def json(self, method: str, path: str, payload: dict | None = None, headers: dict | None = None):
        body = None if payload is None else json.dumps(payload).encode()
        status, head, data = self.call(method, path, body, {"Content-Type": "application/json", **(headers or {})})
        try:
            return status, head, json.loads(data) if data else None
        except ValueError:
            return status, head, None

    def upload(self, png: bytes):
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
        status, head, data = self.call("POST", "/api/images", body,
                                       {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return status, head, json.loads(data) if data else None

    def close(self) -> None:
        self.conn.close()


def noise_png(seed: int, size: int = 96) -> bytes:
    """A distinct small picture per seed."""
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="PNG")
    return out.getvalue()


def tokens_for(count: int) -> list[str]:
    return [secrets.token_urlsafe(24) for _ in range(count)]


# --------------------------------------------------------------------------- the load run


OK_STATUSES = {200, 201, 202, 304}
SHED = {429, 503}


class Tally:
    """Answers by kind and status, latencies by kind, and the failures (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.status: Counter = Counter()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.failures: list[str] = []
        self.requests = 0

    def add(self, kind: str, status: int | None, seconds: float, note: str = "") -> None:
        with self.lock:
            self.requests += 1
            self.status[(kind, status)] += 1
            if status in OK_STATUSES:
                self.latency[kind].append(seconds)
            elif status not in SHED:
                self.failures.append(f"{kind}: {status} {note[:160]}")

    def summary(self) -> dict:
        def pct(values, q):
            return round(float(np.percentile(values, q)), 3) if values else None

        with self.lock:
            kinds = sorted({k for k, _ in self.status})
            return {
                "requests": self.requests,
                "failures": len(self.failures),
                "failure_examples": self.failures[:5],
                "shed_429": sum(n for (k, s), n in self.status.items() if s == 429),
                "shed_503": sum(n for (k, s), n in self.status.items() if s == 503),
                "by_kind": {k: {"count": sum(n for (kk, _s), n in self.status.items() if kk == k),
                                "statuses": {str(s): n for (kk, s), n in sorted(self.status.items(),
                                                                                   key=lambda i: str(i[0][1]))
                                             if kk == k},
                                "p50_s": pct(self.latency[k], 50), "p99_s": pct(self.latency[k], 99)}
                            for k in kinds},
            }


def timed(tally: Tally, kind: str, fn):
    start = time.perf_counter()
    try:
        status, head, answer = fn()
    except Exception as exc:  # no answer at all: a failure
        tally.add(kind, None, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
        return None, None
    note = json.dumps(answer)[:160] if isinstance(answer, (dict, list)) else repr(answer)[:160]
    tally.add(kind, status, time.perf_counter() - start, note)
    return status, answer


def client_loop(port: int, token: str, seed: int, model: str, num_classes: int, costly: dict,
                stop_at: float, tally: Tally) -> None:
    rng = random.Random(seed)
    c = Client(port, token)
    status, answer = timed(tally, "upload", lambda: c.upload(noise_png(seed)))
    image = answer.get("id") if status == 201 and isinstance(answer, dict) else None
    share: str | None = None
    while time.time() < stop_at:
        roll = rng.random()
        if roll < 0.4 or image is None:
            path = rng.choice(["/", "/api/models", "/api/methods"] + ([f"/r/{share}"] if share else []))
            kind = "share" if path.startswith("/r/") else "read"
            timed(tally, kind, lambda: c.call("GET", path))
            if image is None and rng.random() < 0.2:
                status, answer = timed(tally, "upload", lambda: c.upload(noise_png(seed + 1000)))
                image = answer.get("id") if status == 201 and isinstance(answer, dict) else None
        elif roll < 0.65:
            timed(tally, "predict", lambda: c.json("POST", "/api/predict", {"model": model, "image": image}))
        elif roll < 0.9:
            payload = {"model": model, "image": image, "method": "saliency", "target": rng.randrange(num_classes)}
            status, answer = timed(tally, "explain", lambda: c.json("POST", "/api/explain", payload))
            if status == 200 and isinstance(answer, dict) and answer.get("result"):
                share = answer["result"]["id"]
        else:
            payload = {"model": model, "image": image, "target": rng.randrange(num_classes), **costly}
            status, answer = timed(tally, "job", lambda: c.json("POST", "/api/explain", payload))
            if status == 202 and isinstance(answer, dict):
                job = answer["job"]
                headers = {"X-Cancel-Token": job.get("cancel_token", "")}
                timed(tally, "cancel", lambda: c.json("DELETE", f"/api/jobs/{job['id']}", None, headers))
    c.close()


def load(server: ServerProcess, tokens: list[str], seconds: float, model: str, num_classes: int,
         costly: dict, warmup: float) -> dict:
    """``len(tokens)`` clients for ``seconds``; RSS measured after ``warmup`` seconds and at the end."""
    tally = Tally()
    stop_at = time.time() + seconds
    threads = [threading.Thread(target=client_loop, args=(server.port, t, i, model, num_classes, costly, stop_at,
                                                          tally), daemon=True) for i, t in enumerate(tokens)]
    for t in threads:
        t.start()
    time.sleep(min(warmup, seconds))
    with tally.lock:
        warm_requests = tally.requests
    warm_rss = server.rss()
    peak = warm_rss
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        peak = max(peak, server.rss())
    for t in threads:
        t.join()
    end_rss = server.rss()
    out = tally.summary()
    after = max(1, out["requests"] - warm_requests)
    out.update({"clients": len(tokens), "seconds": seconds, "warmup_s": warmup,
                "rss_after_warmup_mb": round(warm_rss / 2 ** 20, 1), "rss_end_mb": round(end_rss / 2 ** 20, 1),
                "rss_peak_mb": round(peak / 2 ** 20, 1),
                "rss_growth_mb_per_1000": round((end_rss - warm_rss) / 2 ** 20 / after * 1000, 2)})
    return out


def flood(server: ServerProcess, tokens: list[str], count: int, model: str, num_classes: int,
          costly: dict, hold: float = 10.0) -> dict:
    """One client (tokens[0]) submits ``count`` costly jobs as fast as it can; another (tokens[1])
    keeps reading and predicting meanwhile at a person's pace (well inside its own rate limit).
    The bystander goes on for ``hold`` seconds after the flood, while the jobs it got in run.
    Counts accepted and shed submissions and the other client's answers."""
    attacker, other = Client(server.port, tokens[0]), Client(server.port, tokens[1])
    _s, answer = timed(Tally(), "upload", lambda: attacker.upload(noise_png(7)))
    image_a = answer["id"]
    _s, answer = timed(Tally(), "upload", lambda: other.upload(noise_png(8)))
    image_b = answer["id"]
    flood_tally, other_tally = Tally(), Tally()
    done = threading.Event()

    def bystander():
        while not done.is_set():
            timed(other_tally, "read", lambda: other.call("GET", "/api/models"))
            timed(other_tally, "predict", lambda: other.json("POST", "/api/predict", {"model": model, "image": image_b}))
            done.wait(0.6)  # about 100 predictions a minute

    t = threading.Thread(target=bystander, daemon=True)
    t.start()
    jobs = []
    for i in range(count):
        payload = {"model": model, "image": image_a, "target": i % num_classes, **costly,
                   "params": {**costly.get("params", {})}}
        status, answer = timed(flood_tally, "flood", lambda: attacker.json("POST", "/api/explain", payload))
        if status == 202 and isinstance(answer, dict):
            jobs.append(answer["job"])
    ended = 0  # jobs that ended during the flood: each let one more of the client's jobs in
    for job_id in {j["id"] for j in jobs}:
        _s, _h, state = attacker.json("GET", f"/api/jobs/{job_id}")
        ended += isinstance(state, dict) and state.get("status") in ("done", "failed", "cancelled")
    done.wait(hold)  # the accepted jobs run meanwhile
    done.set()
    t.join()
    for job in jobs:  # leave the server idle again
        attacker.json("DELETE", f"/api/jobs/{job['id']}", None, {"X-Cancel-Token": job.get("cancel_token", "")})
    attacker.close()
    other.close()
    f, o = flood_tally.summary(), other_tally.summary()
    statuses = Counter()
    for (_k, s), n in flood_tally.status.items():
        statuses[str(s)] += n
    # Identical requests join the active job (202, the same id): "jobs" counts the distinct ones.
    return {"submitted": count, "accepted": len(jobs), "jobs": len({j["id"] for j in jobs}), "ended": ended,
            "statuses": dict(statuses), "flood_failures": f["failures"],
            "other_requests": o["requests"], "other_failures": o["failures"], "other_shed": o["shed_429"] + o["shed_503"],
            "other": o["by_kind"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=None, help="seconds before RSS is first read (default 1/4)")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--classes", type=int, default=1000, help="targets are drawn from 0..classes-1")
    p.add_argument("--flood", type=int, default=300, help="costly jobs one client submits (0: no flood run)")
    p.add_argument("--config", help="a models config file (e.g. tests/tiny_models.py)")
    p.add_argument("--no-builtin", action="store_true", help="serve only the --config models")
    p.add_argument("--costly", default='{"method": "occlusion"}', help="JSON of a queued explanation's fields")
    args = p.parse_args(argv)
    env = {}
    if args.config:
        env["INSIGHTS_MODELS_CONFIG"] = json.dumps([os.path.abspath(args.config)])
    if args.no_builtin:
        env["INSIGHTS_BUILTIN_MODELS"] = "false"
    costly = json.loads(args.costly)
    tokens = tokens_for(args.clients + 2)  # the flood's two clients start with no jobs of their own
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="insights-load-") as tmp:
        server = ServerProcess(os.path.join(tmp, "instance"), tokens=tokens, env=env)
        try:
            out["load"] = load(server, tokens[: args.clients], args.seconds, args.model, args.classes, costly,
                               args.warmup if args.warmup is not None else args.seconds / 4)
            if args.flood:
                out["flood"] = flood(server, tokens[args.clients:], args.flood, args.model, args.classes, costly)
        finally:
            server.stop()
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
