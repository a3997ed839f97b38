"""The real server: ``python app.py`` in a subprocess, driven over HTTP, restarted, and read again."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest
import skimage.data
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATS = {281, 282, 283, 284, 285}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python app.py`` on a free loopback port with its own instance folder."""

    def __init__(self, instance: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "INSIGHTS_INLINE_MAX_PASSES": "8", "INSIGHTS_MEMORY_BUDGET": "1",
               "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "app.py", "--port", str(self.port), "--instance", instance,
                                      "--device", "cpu"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.banner, self.early = "", []
        for _ in range(50):  # the address is printed once the socket listens (warnings may come first)
            line = self.proc.stdout.readline()
            if not line or line.startswith("Insights is serving"):
                self.banner = line
                break
            self.early.append(line)
        # Keep reading the server's output so a full pipe never blocks it.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {''.join(self.early)}")
            try:
                self.get("/api")
                return
            except OSError:
                time.sleep(0.2)
        raise AssertionError("server did not answer within 120 s")

    def request(self, path: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None):
        req = urllib.request.Request(self.base + path, data=data, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def get(self, path: str):
        return self.request(path)

    def json(self, path: str, payload: dict | None = None):
        data = None if payload is None else json.dumps(payload).encode()
        status, _h, body = self.request(path, data, {"Content-Type": "application/json"} if data else {})
        return status, json.loads(body)

    def events(self, job_id: str) -> list[dict]:
        """Every state the job's event stream sends, until its final one."""
        states = []
        with urllib.request.urlopen(f"{self.base}/api/jobs/{job_id}/events", timeout=120) as r:
            for raw in r:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    states.append(json.loads(line[6:]))
        return states

    def upload(self, data: bytes, name: str):
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        status, _h, answer = self.request("/api/images", body,
                                          {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return status, json.loads(answer)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def instance(tmp_path):
    return str(tmp_path / "instance")


def test_serve_explain_restart_and_read_back(instance):
    server = Server(instance)
    try:
        assert server.banner.startswith(f"Insights is serving on http://127.0.0.1:{server.port}/")
        buf = io.BytesIO()
        Image.fromarray(skimage.data.chelsea()).save(buf, format="PNG")
        status, image = server.upload(buf.getvalue(), "chelsea.png")
        assert status == 201 and (image["width"], image["height"]) == (451, 300)

        status, answer = server.json("/api/predict", {"image": image["id"], "top_k": 3})
        assert status == 200 and answer["model"] == "efficientnet_lite0"
        assert CATS & {p["index"] for p in answer["predictions"]}
        cat = answer["predictions"][0]["index"]

        status, inline = server.json("/api/explain", {"image": image["id"], "method": "saliency", "target": cat})
        assert status == 200 and inline["status"] == "done" and inline["result"]["target"] == cat

        # 10 × 10 window positions and the clean pass, one per batch (INSIGHTS_MEMORY_BUDGET=1):
        # followed through the event stream, which sends every change it sees, not a poll's sample.
        occlusion = {"image": image["id"], "method": "occlusion", "target": cat,
                     "params": {"sliding_window_shapes": [3, 45, 45], "strides": [3, 22, 22]}}
        status, queued = server.json("/api/explain", occlusion)
        assert status == 202 and queued["status"] == "queued", queued
        states = server.events(queued["job"]["id"])
        state, seen = states[-1], [s["done"] for s in states]
        assert state["status"] == "done", state
        assert state["total"] == 101 and seen == sorted(seen)
        assert len({d for d in seen if 0 < d < 101}) >= 2, seen  # progress seen growing, not one jump

        rid = state["result_id"]
        _s, meta = server.json(f"/api/results/{rid}")
        assert meta["method"] == "occlusion" and meta["signed"] is True
        _s, headers, map_png = server.get(f"/api/results/{rid}/map.png")
        assert headers["Content-Type"] == "image/png" and "no-cache" in headers["Cache-Control"]
        _s, _h, saliency_png = server.get(inline["result"]["links"]["map"])
    finally:
        server.stop()

    again = Server(instance)
    try:
        _s, meta2 = again.json(f"/api/results/{rid}")
        assert meta2 == meta
        assert again.get(f"/api/results/{rid}/map.png")[2] == map_png
        assert again.get(inline["result"]["links"]["map"])[2] == saliency_png
        status, cached = again.json("/api/explain", occlusion)
        assert status == 200 and cached["cached"] is True and cached["result"]["id"] == rid
        _s, models = again.json("/api/models")
        assert [m["loaded"] for m in models["models"] if m["name"] == "efficientnet_lite0"] == [False]
    finally:
        again.stop()


def test_cli_refuses_torchscript_without_labels():
    out = subprocess.run([sys.executable, "app.py", "--torchscript", "x.pt"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "--torchscript and --labels go together" in out.stderr
