"""Times our LRP against Captum's (a developer tool; Captum is a development dependency,
imported only when this runs).

    python -m insights.bench_lrp [--device cpu|cuda] [--side 224] [--batches 1 8]
                                 [--repeat 3] [--threads N]

VGG-16 without batch norm (random weights, seeded), N×3×side×side inputs, target 208, under
Captum's default rules (epsilon 1e-9 on every layer) and under the gamma rule (0.25 on every
convolution and linear layer): each call runs once untimed (warm-up), then ``--repeat`` times,
the two sides interleaved; the fastest run of each is shown with the ratio (Captum's time over
ours: above 1, ours is faster) and the largest difference of the maps relative to Captum's
largest value. Captum's LRP refuses ResNets (a ReLU module used twice per block), so their rows
time ours alone, for reference.
"""
from __future__ import annotations

import copy
import sys
from typing import Callable

import torch
from torch import nn

from .bench_cam import fastest
from .bench_captum import TARGET, bench_device, bench_parser
from .engine import attribute

RULES = ("epsilon", "gamma")


def captum_call(model: nn.Module, x: torch.Tensor, rule: str) -> Callable[[], torch.Tensor]:
    """Captum's LRP on its own copy of ``model`` with the rules ``rule`` names. Captum deletes
    the rules it was given after each call, so they are set again before every call."""
    from captum.attr import LRP
    from captum.attr._utils.lrp_rules import GammaRule

    twin = copy.deepcopy(model)
    lrp = LRP(twin)

    def call() -> torch.Tensor:
        if rule == "gamma":
            for module in twin.modules():
                if type(module) in (nn.Conv2d, nn.Linear):
                    module.rule = GammaRule()
        return lrp.attribute(x.clone().requires_grad_(True), target=TARGET).detach()
    return call


def rel_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def bench(side: int, batches, repeat: int, device: torch.device) -> list[dict]:
    import torchvision

    rows = []
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).eval().to(device)
    for n in batches:
        x = torch.randn(n, 3, side, side, device=device)
        for rule in RULES:
            ours = lambda r=rule: attribute(vgg, x, "lrp", TARGET, rule=r)
            best, outs = fastest({"captum": captum_call(vgg, x, rule), "ours": ours}, repeat, device)
            rows.append({"model": "vgg16", "batch": n, "rule": rule, "theirs_ms": best["captum"],
                         "ours_ms": best["ours"], "error": rel_error(outs["ours"], outs["captum"])})
    for name in ("resnet18", "resnet50"):
        model = getattr(torchvision.models, name)(weights=None).eval().to(device)
        for n in batches:
            x = torch.randn(n, 3, side, side, device=device)
            best, _ = fastest({"ours": lambda: attribute(model, x, "lrp", TARGET)}, repeat, device)
            rows.append({"model": name, "batch": n, "rule": "epsilon", "theirs_ms": None,
                         "ours_ms": best["ours"], "error": None})
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [("model", "batch", "rule", "captum ms", "ours ms", "ratio", "rel error")]
    for r in rows:
        theirs = r["theirs_ms"]
        lines.append((r["model"], str(r["batch"]), r["rule"],
                      "-" if theirs is None else f"{theirs:,.1f}", f"{r['ours_ms']:,.1f}",
                      "-" if theirs is None else f"{theirs / r['ours_ms']:.2f}",
                      "-" if r["error"] is None else f"{r['error']:.1e}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i in (0, 2) else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(line, widths))) for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("bench_lrp", __doc__, model=False)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    args = parser.parse_args(argv)
    device = bench_device(args, "bench_lrp", "captum", "Captum")
    if device is None:
        return 2
    print(f"random weights, N×3×{args.side}×{args.side}, target {TARGET}, {args.device}, "
          f"{torch.get_num_threads()} threads, fastest of {args.repeat}")
    print(format_rows(bench(args.side, args.batches, args.repeat, device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
