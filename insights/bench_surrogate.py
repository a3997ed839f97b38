"""Times Kernel SHAP, LIME and Shapley value sampling against Captum's (a developer tool; Captum
is a development dependency, imported only when this runs).

    python -m insights.bench_surrogate [--device cpu|cuda] [--model resnet18] [--side 224]
                                       [--methods kernel_shap ...] [--n-segments 50]
                                       [--n-samples 200] [--permutations 4] [--repeat 1]
                                       [--threads N]

Same torchvision model (random weights), same input (scikit-image's cat, side×side), target 208, zero baseline
and the same SLIC feature mask (ours, made once and given to both sides). Kernel SHAP and LIME
score ``--n-samples`` coalitions, Shapley value sampling walks ``--permutations`` orders. Captum
runs 32 perturbations per forward pass (our CPU batch cap; on a GPU ours are larger) with its
defaults otherwise (LIME: its Lasso and input-space cosine kernel, so its values differ from
ours by design). Each call runs once untimed, then ``--repeat`` times, the two sides interleaved;
the fastest is shown with the ratio (Captum's time over ours: above 1, ours is faster) and the
Pearson correlation of the two maps' per-feature values (both estimate the same Shapley values
for Kernel SHAP and sampling).
"""
from __future__ import annotations

import sys
from typing import Callable

import numpy as np
import torch

from .bench_cam import fastest
from .bench_captum import TARGET, bench_device, bench_parser, random_model
from .engine import attribute
from .engine.superpixels import feature_masks

METHODS = ("kernel_shap", "lime", "shapley_sampling")
PER_EVAL = 32


def oracle_call(method: str, model, x: torch.Tensor, mask: torch.Tensor, n_samples: int,
                permutations: int) -> Callable[[], torch.Tensor]:
    """Captum's call for ``method`` with the same mask, target and zero baseline."""
    from captum.attr import KernelShap, Lime, ShapleyValueSampling

    if method == "shapley_sampling":
        return lambda: ShapleyValueSampling(model).attribute(
            x, target=TARGET, baselines=0.0, feature_mask=mask, n_samples=permutations,
            perturbations_per_eval=PER_EVAL)
    cls = KernelShap if method == "kernel_shap" else Lime
    return lambda: cls(model).attribute(x, target=TARGET, baselines=0.0, feature_mask=mask,
                                        n_samples=n_samples, perturbations_per_eval=PER_EVAL)


def feature_correlation(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor) -> float:
    """Pearson correlation of the per-feature values of two maps (one element per feature)."""
    flat = mask[0, 0].flatten()
    first = [int((flat == k).nonzero()[0]) for k in range(int(mask.max()) + 1)]
    a = ours[0, 0].flatten()[first].cpu().double().numpy()
    b = theirs.detach()[0, 0].flatten()[first].cpu().double().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.corrcoef(a, b)[0, 1])


def cat_photo(side: int) -> torch.Tensor:
    """scikit-image's cat photo resized to side×side, ImageNet-normalised (SLIC needs edges)."""
    from skimage import data

    img = torch.tensor(data.chelsea()).permute(2, 0, 1).float().unsqueeze(0) / 255
    img = torch.nn.functional.interpolate(img, size=(side, side), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (img - mean) / std


def bench(model, x: torch.Tensor, methods, n_segments: int, n_samples: int, permutations: int,
          repeat: int, device: torch.device) -> list[dict]:
    seg = {"segmentation": "slic", "n_segments": n_segments, "compactness": 10.0, "slic_sigma": 1.0}
    mask = feature_masks(x, seg)
    rows = []
    for method in methods:
        count = {"n_samples": permutations if method == "shapley_sampling" else n_samples}
        ours = lambda m=method, c=count: attribute(model, x, m, TARGET, feature_mask=mask, **c)
        best, outs = fastest({"captum": oracle_call(method, model, x, mask, n_samples, permutations),
                              "ours": ours}, repeat, device)
        rows.append({"method": method, "features": int(mask.max()) + 1, "samples": count["n_samples"],
                     "theirs_ms": best["captum"], "ours_ms": best["ours"],
                     "corr": feature_correlation(outs["ours"], outs["captum"], mask)})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [("method", "features", "samples", "captum ms", "ours ms", "ratio", "corr")]
    for r in rows:
        lines.append((r["method"], str(r["features"]), str(r["samples"]), f"{r['theirs_ms']:,.1f}",
                      f"{r['ours_ms']:,.1f}", f"{r['theirs_ms'] / r['ours_ms']:.2f}", f"{r['corr']:.4f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(line, widths))) for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("bench_surrogate", __doc__, repeat=1)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--n-segments", type=int, default=50, help="SLIC superpixels asked for")
    parser.add_argument("--n-samples", type=int, default=200, help="coalitions (kernel_shap, lime)")
    parser.add_argument("--permutations", type=int, default=4, help="orders (shapley_sampling)")
    args = parser.parse_args(argv)
    device = bench_device(args, "bench_surrogate", "captum", "Captum")
    if device is None:
        return 2
    model = random_model(args.model, device)
    x = cat_photo(args.side).to(device)
    print(f"{args.model}, random weights, 1×3×{args.side}×{args.side}, target {TARGET}, SLIC "
          f"n_segments {args.n_segments}, {args.device}, {torch.get_num_threads()} threads, "
          f"fastest of {args.repeat}")
    print(format_rows(bench(model, x, args.methods, args.n_segments, args.n_samples,
                            args.permutations, args.repeat, device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
