"""Times the CAM variants against the `grad-cam` package (a developer tool; grad-cam is a
development dependency, imported only when this runs).

    python -m insights.bench_cam [--device cpu|cuda] [--model resnet18] [--side 224]
                                 [--methods grad_cam_plus_plus ...] [--repeat 3] [--threads N]

Same torchvision model (random weights), same 1×3×side×side input, target 208 and the model's
default CAM layer (layer4 for a ResNet) on both sides. Each call runs once untimed (warm-up), then
``--repeat`` times, the two sides interleaved; the fastest run of each is shown, with the ratio
(grad-cam's time over ours: above 1, ours is faster) and the Pearson correlation of the maps
after grad-cam's post-processing (ReLU at the layer, per-image min-max scaling, resize; Eigen-CAM
up to sign). Ours run with ``relu_attributions=True``, as grad-cam always rectifies. A last row
times the gradient variants and Eigen-CAM asked for together (:func:`attribute_many`, one shared
forward and backward pass) against the same grad-cam calls one after another.
"""
from __future__ import annotations

import sys
import time
from typing import Callable

import numpy as np
import torch

from .bench_captum import TARGET, bench_device, bench_parser, random_model
from .engine import attribute, attribute_many
from .engine.probe import default_layer

METHODS = ("grad_cam_plus_plus", "xgrad_cam", "layer_cam", "eigen_cam", "score_cam")
TOGETHER = ("grad_cam", "grad_cam_plus_plus", "xgrad_cam", "layer_cam", "eigen_cam")
ORACLE_CLASSES = {"grad_cam": "GradCAM", "grad_cam_plus_plus": "GradCAMPlusPlus",
                  "xgrad_cam": "XGradCAM", "layer_cam": "LayerCAM", "eigen_cam": "EigenCAM",
                  "score_cam": "ScoreCAM"}


def oracle_call(method: str, model, module, x: torch.Tensor) -> Callable[[], np.ndarray]:
    """grad-cam's call for ``method`` at ``module``, target TARGET for every row."""
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam = getattr(pytorch_grad_cam, ORACLE_CLASSES[method])(model, [module])
    if method == "score_cam":
        cam.batch_size = 32  # grad-cam's default is 16; ours may use up to 32 on the CPU
    targets = [ClassifierOutputTarget(TARGET)] * x.shape[0]
    return lambda: cam(x, targets)


def post_processed(ours: torch.Tensor) -> np.ndarray:
    """grad-cam's post-processing on our N×1×H×W map (the resize is to the same size)."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    cam = np.maximum(ours[:, 0].cpu().numpy(), 0)
    return scale_cam_image(scale_cam_image(cam, (cam.shape[2], cam.shape[1])))


def correlation(ours: torch.Tensor, theirs: np.ndarray, signless: bool) -> float:
    """The smallest per-image Pearson correlation; ``signless``: of ours or its negation."""
    def worst(m: torch.Tensor) -> float:
        with np.errstate(invalid="ignore", divide="ignore"):  # a flat map correlates as nan
            return min(float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
                       for a, b in zip(post_processed(m), theirs))
    return float(np.nanmax([worst(ours), worst(-ours)])) if signless else worst(ours)


def fastest(calls: dict[str, Callable], repeat: int, device: torch.device) -> tuple[dict, dict]:
    """Each call warmed up once, then timed ``repeat`` times interleaved: (min ms, last output)."""
    outs = {name: fn() for name, fn in calls.items()}
    best = {name: float("inf") for name in calls}
    for _ in range(repeat):
        for name, fn in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            outs[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - start) * 1000)
    return best, outs


def bench(model, x: torch.Tensor, methods, repeat: int, device: torch.device) -> list[dict]:
    layer = default_layer(model, x)
    module = model.get_submodule(layer)
    rows = []
    for method in methods:
        ours = lambda m=method: attribute(model, x, m, TARGET, layer=layer, relu_attributions=True)
        best, outs = fastest({"grad-cam": oracle_call(method, model, module, x), "ours": ours},
                             repeat, device)
        rows.append({"method": method, "theirs_ms": best["grad-cam"], "ours_ms": best["ours"],
                     "corr": correlation(outs["ours"], outs["grad-cam"], method == "eigen_cam")})
    calls = [oracle_call(m, model, module, x) for m in TOGETHER]
    asked = [(m, {"layer": layer, "relu_attributions": True}) for m in TOGETHER]
    best, _ = fastest({"grad-cam": lambda: [c() for c in calls],
                       "ours": lambda: attribute_many(model, x, asked, TARGET)}, repeat, device)
    rows.append({"method": "together: " + ", ".join(TOGETHER), "theirs_ms": best["grad-cam"],
                 "ours_ms": best["ours"], "corr": None})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [("method", "grad-cam ms", "ours ms", "ratio", "corr")]
    for r in rows:
        lines.append((r["method"], f"{r['theirs_ms']:,.1f}", f"{r['ours_ms']:,.1f}",
                      f"{r['theirs_ms'] / r['ours_ms']:.2f}",
                      "-" if r["corr"] is None else f"{r['corr']:.6f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(line, widths))) for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("bench_cam", __doc__)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    args = parser.parse_args(argv)
    device = bench_device(args, "bench_cam", "pytorch_grad_cam", "the grad-cam package")
    if device is None:
        return 2
    model = random_model(args.model, device)
    x = torch.randn(1, 3, args.side, args.side, device=device)
    print(f"{args.model}, random weights, 1×3×{args.side}×{args.side}, target {TARGET}, layer "
          f"{default_layer(model, x)}, {args.device}, {torch.get_num_threads()} threads, "
          f"fastest of {args.repeat}")
    print(format_rows(bench(model, x, args.methods, args.repeat, device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
