"""Dataset figures: a folder of N images (torchvision's FakeData, saved as JPEG files in an
ImageFolder of 10 ImageNet classes), served by the app with the offline EfficientNet-Lite0.

    python -m insights.bench_datasets [--items 1000] [--size 256] [--model efficientnet_lite0]

Measured through the app's own path (``create_app`` with ``DATASETS``, Flask's test client):

* first page: from the first ``GET /api/datasets/<name>/items`` to its answer plus the page's
  48 thumbnails, with nothing scored yet (what a user sees first);
* full predictions: from that request until every item is scored (the background chunk jobs);
* a second start on the same instance: until the first page answers with every item scored
  (the predictions are read back from the index, nothing is computed).

The reference is a plain PyTorch loop over the same files: decode with PIL, the same preprocessing,
batches of 32 through the same model. The ratio says what the app's bookkeeping (jobs, the index,
the per-item cache) costs over the bare computation.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import torch

def make_folder(root: str, n: int, size: int) -> None:
    """``n`` FakeData pictures as JPEG files, ten class folders."""
    import torchvision

    from insights.models import imagenet_labels

    classes = imagenet_labels()[:10]
    fake = torchvision.datasets.FakeData(size=n, image_size=(3, size, size), num_classes=10, random_offset=7)
    for i in range(n):
        img, label = fake[i]
        folder = os.path.join(root, classes[int(label)])
        os.makedirs(folder, exist_ok=True)
        img.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def plain_loop(root: str, model_name: str) -> float:
    """Seconds for a bare PyTorch pass over every file (the reference)."""
    from insights import create_app
    from insights.datasets import _images_below
    from PIL import Image

    app = create_app({"INSTANCE_PATH": tempfile.mkdtemp(prefix="bench-plain-"), "DEVICE": "cpu"})
    svc = app.extensions["insights"]
    spec, model = svc.models.spec(model_name), svc.models.get(model_name)
    files = _images_below(root)
    start = time.perf_counter()
    with torch.inference_mode():
        for k in range(0, len(files), 32):
            x = torch.cat([spec.prepare(Image.open(f).convert("RGB"))[0] for f in files[k:k + 32]])
            model(x).softmax(-1)
    took = time.perf_counter() - start
    svc.jobs.shutdown()
    return took


def serve(root: str, instance: str, model_name: str, timeout: float) -> dict:
    from insights import create_app

    app = create_app({"INSTANCE_PATH": instance, "DEVICE": "cpu", "DATASETS": [f"bench={root}"],
                      "DEFAULT_MODEL": model_name})
    client = app.test_client()
    svc = app.extensions["insights"]
    svc.models.get(model_name)  # loaded before the clock starts, as on a warm server
    start = time.perf_counter()
    page = client.get("/api/datasets/bench/items?per_page=48").json
    for item in page["items"]:
        assert client.get(item["thumb"]).status_code == 200
    first_page = time.perf_counter() - start
    scored_at_first = page["predictions"][model_name]["done"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = client.get(f"/api/datasets/bench/predictions?model={model_name}").json
        if state["status"] in ("done", "failed"):
            break
        time.sleep(0.05)
    full = time.perf_counter() - start
    summary = client.get("/api/datasets/bench/summary").json["models"][model_name]
    svc.dataset_work.shutdown()
    svc.jobs.shutdown()
    return {"first_page_s": first_page, "full_s": full, "state": state, "scored_at_first": scored_at_first,
            "scored": summary["scored"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--size", type=int, default=256, help="side of the FakeData pictures (pixels)")
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = tempfile.mkdtemp(prefix="bench-datasets-")
    try:
        root = os.path.join(work, "data")
        t = time.perf_counter()
        make_folder(root, args.items, args.size)
        print(f"made {args.items} FakeData JPEGs ({args.size}×{args.size}) in {time.perf_counter() - t:.1f} s")
        instance = os.path.join(work, "instance")
        first = serve(root, instance, args.model, args.timeout)
        again = serve(root, instance, args.model, args.timeout)
        reference = plain_loop(root, args.model)
        out = {"items": args.items, "model": args.model, "first_page_s": round(first["first_page_s"], 3),
               "full_predictions_s": round(first["full_s"], 2), "restart_first_page_s": round(again["first_page_s"], 3),
               "restart_scored_at_first_page": again["scored_at_first"], "plain_loop_s": round(reference, 2),
               "overhead_ratio": round(first["full_s"] / reference, 2), "scored": first["scored"]}
        print(f"first page (48 items and thumbnails), nothing scored yet: {out['first_page_s']:.3f} s")
        print(f"full predictions, {args.items} items: {out['full_predictions_s']:.2f} s "
              f"({args.items / first['full_s']:.0f} items/s; {first['state']['status']})")
        print(f"plain PyTorch loop over the same files: {out['plain_loop_s']:.2f} s "
              f"→ the app takes {out['overhead_ratio']:.2f}× the bare computation")
        print(f"second start, same instance: first page {out['restart_first_page_s']:.3f} s with "
              f"{again['scored_at_first']}/{args.items} already scored (read back from the index)")
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
