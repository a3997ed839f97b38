"""Times infidelity and max-sensitivity against Captum's (a developer tool; Captum is a
development dependency, imported only when this runs).

    python -m insights.bench_metrics [--device cpu|cuda] [--model resnet18] [--side 224]
                                     [--samples 10] [--repeat 3] [--threads N]

Same torchvision model (random weights), same 1×3×side×side input, target 208, the same
``--samples`` perturbations on both sides (ours, seeded, handed to Captum through its
``perturb_func``) and the same explanation (saliency, or integrated gradients with 8 steps, where
our maps equal Captum's). Infidelity scores the saliency map with Gaussian noise of std 0.003 and
Captum's normalisation; max-sensitivity perturbs within Captum's default radius 0.02. Each call
runs once untimed (warm-up), then ``--repeat`` times, the two sides interleaved; the fastest run
of each is shown, with the ratio (Captum's time over ours: above 1, ours is faster) and the
largest relative difference of the two scores.
"""
from __future__ import annotations

import itertools
import sys

import torch

from .bench_cam import fastest
from .bench_captum import TARGET, bench_device, bench_parser, random_model
from .engine import attribute, evaluate
from .engine.metrics_sensitivity import ball_noise, gaussian_noise

IG = {"n_steps": 8, "integration": "gausslegendre"}


def stacked(noise, x: torch.Tensor, k: int) -> torch.Tensor:
    """The first k perturbations of ``noise`` in Captum's row order (image-major: row i k + j)."""
    return torch.stack(list(itertools.islice(noise, k))).transpose(0, 1).flatten(0, 1).to(x.device)


def captum_explainer(method: str, model):
    """Captum's saliency or IG as an explanation function for ``sensitivity_max``."""
    from captum.attr import IntegratedGradients, Saliency

    def explain(inputs, target):
        one = isinstance(inputs, tuple)  # Captum hands the clean inputs as a 1-tuple
        x = inputs[0] if one else inputs
        if method == "saliency":
            out = Saliency(model).attribute(x.detach().clone().requires_grad_(True), target=target)
        else:
            out = IntegratedGradients(model).attribute(x, target=target, n_steps=IG["n_steps"],
                                                       method=IG["integration"])
        return (out,) if one else out
    return explain


def bench(model, x: torch.Tensor, k: int, repeat: int, device: torch.device) -> list[dict]:
    from captum.metrics import infidelity, sensitivity_max

    target = torch.full((x.shape[0],), TARGET, device=device)
    rows = []
    sal = attribute(model, x, "saliency", TARGET)
    deltas = stacked(gaussian_noise(x.shape, 0.003, 0), x, k)
    calls = {"captum": lambda: infidelity(model, lambda e: (deltas, e - deltas), x, sal, target=target,
                                          n_perturb_samples=k, normalize=True),
             "ours": lambda: evaluate(model, x, sal, TARGET, "infidelity", n_perturb_samples=k,
                                      noise=0.003, normalize=True, score="logit", seed=0)}
    best, outs = fastest(calls, repeat, device)
    rows.append(row("infidelity (saliency map)", best, outs))
    for method, params in (("saliency", {}), ("integrated_gradients", IG)):
        a = attribute(model, x, method, TARGET, **params)
        balls = stacked(ball_noise(x.shape, 0.02, 0), x, k)
        calls = {"captum": lambda m=method, b=balls: sensitivity_max(
                     captum_explainer(m, model), x, perturb_func=lambda e: e + b, n_perturb_samples=k,
                     target=target),
                 "ours": lambda m=method, a=a, p=params: evaluate(
                     model, x, a, TARGET, "sensitivity_max", method=m, method_params=p,
                     n_perturb_samples=k, perturb_radius=0.02, seed=0)}
        best, outs = fastest(calls, repeat, device)
        rows.append(row(f"sensitivity_max ({method})", best, outs))
    return rows


def row(name: str, best: dict, outs: dict) -> dict:
    theirs = outs["captum"].detach().double().cpu().flatten()
    ours = torch.tensor(outs["ours"]["values"], dtype=torch.float64)
    diff = float(((ours - theirs).abs() / theirs.abs().clamp_min(1e-30)).max())
    return {"metric": name, "theirs_ms": best["captum"], "ours_ms": best["ours"], "rel_diff": diff}


def format_rows(rows: list[dict]) -> str:
    lines = [("metric", "Captum ms", "ours ms", "ratio", "rel. diff")]
    for r in rows:
        lines.append((r["metric"], f"{r['theirs_ms']:,.1f}", f"{r['ours_ms']:,.1f}",
                      f"{r['theirs_ms'] / r['ours_ms']:.2f}", f"{r['rel_diff']:.1e}"))
    widths = [max(len(line[i]) for line in lines) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(line, widths))) for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("bench_metrics", __doc__)
    parser.add_argument("--samples", type=int, default=10, help="perturbations per metric")
    args = parser.parse_args(argv)
    device = bench_device(args, "bench_metrics", "captum", "Captum")
    if device is None:
        return 2
    model = random_model(args.model, device)
    x = torch.randn(1, 3, args.side, args.side, device=device)
    print(f"{args.model}, random weights, 1×3×{args.side}×{args.side}, target {TARGET}, "
          f"{args.samples} perturbations, {args.device}, {torch.get_num_threads()} threads, "
          f"fastest of {args.repeat}")
    print(format_rows(bench(model, x, args.samples, args.repeat, device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
