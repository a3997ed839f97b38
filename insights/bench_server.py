"""Server throughput benchmark: one client at a time against several concurrent clients.

    python -m insights.bench_server [--device cpu|cuda] [--clients 8] [--requests 48]
                                    [--model efficientnet_lite0] [--method saliency]

Starts the real app (waitress, loopback port, a temporary instance folder), uploads a few photos,
then asks for explanations on distinct (image, class) pairs, so no answer comes from the store:
first from one client, one request after another; then from ``--clients`` clients at once, which
the compute worker's dynamic batcher serves in shared batches. Prints throughput and p50/p99
latency of both runs and their ratio.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import statistics
import tempfile
import threading
import time
import uuid

import numpy as np
from PIL import Image


def photos(count: int) -> list[bytes]:
    """``count`` distinct PNGs: crops of scikit-image's photos (or noise when it is missing)."""
    try:
        from skimage import data
        sources = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    except ImportError:
        sources = [np.random.default_rng(i).integers(0, 255, (300, 300, 3), np.uint8) for i in range(4)]
    out = []
    for i in range(count):
        src = sources[i % len(sources)]
        shift = 4 * (i // len(sources))
        img = Image.fromarray(np.ascontiguousarray(src[shift:, shift:]))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class Client:
    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> dict:
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"{method} {path}: {resp.status} {data[:200]!r}")
        return json.loads(data)

    def upload(self, png: bytes) -> str:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
        return self.call("POST", "/api/images", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})["id"]

    def explain(self, payload: dict) -> dict:
        return self.call("POST", "/api/explain", json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def close(self) -> None:
        self.conn.close()


def run_clients(port: int, requests: list[dict], clients: int) -> tuple[float, list[float], list[int]]:
    """Sends ``requests`` from ``clients`` threads; returns wall time, latencies and batch sizes."""
    latencies: list[float] = []
    batches: list[int] = []
    lock = threading.Lock()
    queue = list(requests)
    errors: list[BaseException] = []

    def worker():
        client = Client(port)
        try:
            while True:
                with lock:
                    if not queue:
                        return
                    payload = queue.pop(0)
                start = time.perf_counter()
                try:
                    answer = client.explain(payload)
                except BaseException as err:  # reported after the run
                    errors.append(err)
                    return
                took = time.perf_counter() - start
                with lock:
                    latencies.append(took)
                    batches.append(answer["result"].get("batch_size", 1))
        finally:
            client.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start, latencies, batches


def describe(name: str, wall: float, latencies: list[float], batches: list[int]) -> dict:
    lat = sorted(latencies)
    p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
    row = {"run": name, "requests": len(lat), "throughput_rps": len(lat) / wall,
           "p50_ms": statistics.median(lat) * 1000, "p99_ms": p99 * 1000, "mean_batch": statistics.mean(batches)}
    print(f"{name:<22} {row['requests']:>4} req  {row['throughput_rps']:7.2f} req/s  "
          f"p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms  mean batch {row['mean_batch']:.1f}", flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=48, help="requests per run")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--method", default="saliency")
    args = parser.parse_args(argv)

    from waitress.server import create_server

    from . import create_app

    instance = tempfile.mkdtemp(prefix="insights-bench-")
    # One trusted client measuring throughput: its concurrent requests are all answered inline,
    # not shed by the per-client limits or answered 202 past MAX_INLINE_WAITS.
    app = create_app({"INSTANCE_PATH": instance, "DEVICE": args.device, "MAX_JOBS_PER_CLIENT": None,
                      "RATE_LIMIT_PER_MIN": None, "MAX_INLINE_WAITS": None})
    # poll, not select: a process with more than 1024 descriptors open (a long test run) would
    # otherwise see the server's loop die on its first select().
    server = create_server(app, host="127.0.0.1", port=0, threads=max(8, args.clients * 2),
                           asyncore_use_poll=True)
    port = server.socket.getsockname()[1]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = Client(port)
    try:
        ids = [client.upload(p) for p in photos(8)]
        # Warm the model (load, first passes) outside the timed runs.
        client.explain({"model": args.model, "image": ids[0], "method": args.method, "target": 999})
        pairs = [(image, target) for target in range(1, 1000) for image in ids]

        def batch_of(offset: int) -> list[dict]:
            return [{"model": args.model, "image": image, "method": args.method, "target": target}
                    for image, target in pairs[offset:offset + args.requests]]

        print(f"device {args.device}, model {args.model}, method {args.method}, {args.requests} requests per run",
              flush=True)
        one = describe("1 client", *run_clients(port, batch_of(0), 1))
        many = describe(f"{args.clients} concurrent clients", *run_clients(port, batch_of(args.requests), args.clients))
        ratio = many["throughput_rps"] / one["throughput_rps"]
        print(f"throughput ratio ({args.clients} clients / 1 client): {ratio:.2f}x", flush=True)
        return {"one": one, "many": many, "ratio": ratio}
    finally:
        client.close()
        stop(server)
        thread.join(timeout=30)
        server.task_dispatcher.shutdown()  # its request threads
        app.extensions["insights"].jobs.shutdown()


def stop(server) -> None:
    """Ends a waitress server running in another thread: its connections and listening socket
    are closed from inside its own loop (closing them from outside left the loop polling a
    closed descriptor), and the loop returns once nothing is left to poll."""

    def close_all() -> None:
        for channel in list(server._map.values()):
            channel.close()

    server.trigger.pull_trigger(close_all)


if __name__ == "__main__":
    main()
