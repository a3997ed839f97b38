"""Captum's counterpart of each of our methods, called with the same settings: the peers that
``insights.bench`` times ours against and compares maps with."""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Callable

import torch

TARGET = 208  # the class every call explains
# Captum's own occlusion example, and the common IG setting.
PARAMS = {
    "occlusion": {"sliding_window_shapes": (3, 45, 45), "strides": (3, 9, 9), "baselines": 0.0},
    "feature_ablation": {"patch_size": 16, "baselines": 0.0},
    "integrated_gradients": {"n_steps": 50},
    "gradient_shap": {"n_samples": 20, "stdevs": 0.0, "baselines": 0.0},
}
# Captum's batching options for its "best" column.
BEST_PER_EVAL = 32  # perturbations_per_eval (occlusion, feature ablation)
BEST_INTERNAL_BATCH = 10  # internal_batch_size (integrated gradients)
RANDOM = {"gradient_shap"}  # sampled: maps differ from Captum's by design


def captum_calls(method: str, model, x: torch.Tensor, layer: str) -> dict[str, Callable] | None:
    """Captum's default and best-batched calls equivalent to our ``method``, or None."""
    import captum.attr as ca

    t = TARGET
    p = PARAMS.get(method, {})
    module = model.get_submodule(layer)
    if method == "saliency":
        return {"default": lambda: ca.Saliency(model).attribute(x, target=t, abs=True)}
    if method == "input_x_gradient":
        return {"default": lambda: ca.InputXGradient(model).attribute(x, target=t)}
    if method == "integrated_gradients":
        ig = ca.IntegratedGradients(model)
        return {"default": lambda: ig.attribute(x, target=t, n_steps=p["n_steps"]),
                "best": lambda: ig.attribute(x, target=t, n_steps=p["n_steps"],
                                             internal_batch_size=BEST_INTERNAL_BATCH)}
    if method == "gradient_shap":
        base = torch.zeros_like(x)
        return {"default": lambda: ca.GradientShap(model).attribute(
            x, baselines=base, target=t, n_samples=p["n_samples"], stdevs=p["stdevs"])}
    if method == "deeplift":
        return {"default": lambda: ca.DeepLift(model).attribute(x, target=t)}
    if method == "guided_backprop":
        return {"default": lambda: ca.GuidedBackprop(model).attribute(x, target=t)}
    if method == "deconvolution":
        return {"default": lambda: ca.Deconvolution(model).attribute(x, target=t)}
    if method == "grad_cam":
        def grad_cam():
            cam = ca.LayerGradCam(model, module).attribute(x, target=t)
            return ca.LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear")
        return {"default": grad_cam}
    if method == "guided_grad_cam":
        return {"default": lambda: ca.GuidedGradCam(model, module).attribute(x, target=t)}
    if method == "occlusion":
        occ = ca.Occlusion(model)
        kw = dict(target=t, sliding_window_shapes=p["sliding_window_shapes"], strides=p["strides"],
                  baselines=p["baselines"])
        return {"default": lambda: occ.attribute(x, **kw),
                "best": lambda: occ.attribute(x, perturbations_per_eval=BEST_PER_EVAL, **kw)}
    if method == "feature_ablation":
        size = p["patch_size"]
        rows = torch.arange(x.shape[2], device=x.device) // size
        cols = torch.arange(x.shape[3], device=x.device) // size
        mask = (rows.view(-1, 1) * int(cols.max() + 1) + cols.view(1, -1)).view(1, 1, *x.shape[2:])
        fa = ca.FeatureAblation(model)
        kw = dict(target=t, feature_mask=mask, baselines=p["baselines"])
        return {"default": lambda: fa.attribute(x, **kw),
                "best": lambda: fa.attribute(x, perturbations_per_eval=BEST_PER_EVAL, **kw)}
    return None


def fp64_reference(method: str, model, x: torch.Tensor, layer: str) -> torch.Tensor | None:
    """Captum's map for a float64 copy of the model and input: the "true" map that fp32 maps
    are rounded versions of (None where Captum has no peer or fails)."""
    calls = captum_calls(method, copy.deepcopy(model).double(), x.double(), layer) or {}
    call = calls.get("best") or calls.get("default")
    try:
        return call().detach() if call else None
    except Exception:
        return None


# --------------------------------------------------------------------------- the benchmarks' command lines


def bench_parser(prog: str, doc: str, *, model: bool = True, repeat: int = 3) -> argparse.ArgumentParser:
    """The options every oracle benchmark takes: --device, --side, --repeat, --threads, and
    (``model``) --model, a torchvision architecture with random weights."""
    parser = argparse.ArgumentParser(prog=f"python -m insights.{prog}", description=doc.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    if model:
        parser.add_argument("--model", default="resnet18", help="a torchvision model name (random weights)")
    parser.add_argument("--side", type=int, default=224, help="input height and width")
    parser.add_argument("--repeat", type=int, default=repeat, help="timed runs per side")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser


def bench_device(args: argparse.Namespace, prog: str, oracle: str, package: str) -> torch.device | None:
    """The device a benchmark runs on, its CPU threads set; None (the reason printed) when the
    oracle (a development dependency) is not installed."""
    try:
        __import__(oracle)
    except ImportError:
        print(f"{prog} needs {package}: pip install -r requirements-dev.txt", file=sys.stderr)
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def random_model(name: str, device: torch.device) -> torch.nn.Module:
    """A torchvision architecture with random weights (seed 0), in eval mode, on ``device``."""
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval().to(device)
