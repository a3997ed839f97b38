"""Time to the first map: how soon a slow method shows a whole-image map, against its final time
and Captum's (a developer tool; Captum is a development dependency, imported only when this runs).

    python -m insights.bench_progressive [--repeat 3] [--threads N]

Cases: the dashboard's default occlusion on EfficientNet-Lite0 (window 3×32×32, strides 3×16×16)
and the scikit-image cat; Captum's tutorial occlusion (ResNet-18 with random weights here, window
3×45×45, strides 3×9×9, target 208); integrated gradients with 50 steps on EfficientNet-Lite0.
For each: Captum's time for the same map, ours without partial maps, ours with them (the time to
the first partial map, then to the final one), the first map's Pearson correlation with the final
one (channel-summed), and whether the final maps with and without partial maps are equal. Each
call runs once untimed, then ``--repeat`` times; the fastest run is shown.
"""
from __future__ import annotations

import argparse
import time

import torch

from .bench_captum import TARGET
from .engine import attribute


def lite0_cat() -> tuple[torch.nn.Module, torch.Tensor, int]:
    """EfficientNet-Lite0, the cat photo as the dashboard preprocesses it, and its top class."""
    from .examples import lite0_photo

    model, x = lite0_photo("chelsea")
    with torch.inference_mode():
        target = int(model(x).argmax())
    return model, x, target


def cases() -> list[dict]:
    import torchvision

    model, x, target = lite0_cat()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        resnet = torchvision.models.resnet18().eval()
        tutorial_x = torch.randn(1, 3, 224, 224)
    occlusion = {"sliding_window_shapes": (3, 32, 32), "strides": (3, 16, 16)}
    tutorial = {"sliding_window_shapes": (3, 45, 45), "strides": (3, 9, 9)}
    return [
        {"name": "occlusion, Lite0, 32/16 (page default)", "model": model, "x": x, "target": target,
         "method": "occlusion", "params": occlusion},
        {"name": "occlusion, ResNet-18, 45/9 (tutorial)", "model": resnet, "x": tutorial_x, "target": TARGET,
         "method": "occlusion", "params": tutorial},
        {"name": "integrated gradients, Lite0, 50 steps", "model": model, "x": x, "target": target,
         "method": "integrated_gradients", "params": {"n_steps": 50}},
    ]


def captum_call(case: dict):
    """Captum's call for the same map."""
    from captum.attr import IntegratedGradients, Occlusion

    model, x, target, p = case["model"], case["x"], case["target"], case["params"]
    if case["method"] == "occlusion":
        occ = Occlusion(model)
        return lambda: occ.attribute(x, sliding_window_shapes=p["sliding_window_shapes"], strides=p["strides"],
                                     target=target, baselines=0.0)
    ig = IntegratedGradients(model)
    return lambda: ig.attribute(x, target=target, n_steps=p["n_steps"], method="gausslegendre")


def timed(fn, repeat: int) -> tuple[float, object]:
    fn()
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def progressive_run(case: dict) -> dict:
    """One call with partial maps: seconds to the first and to the final map, the maps."""
    seen: list = []
    start = time.perf_counter()

    def take(m, fraction, kind):
        seen.append((time.perf_counter() - start, m.clone(), fraction, kind))

    final = attribute(case["model"], case["x"], case["method"], case["target"], partial=take, **case["params"])
    return {"final_s": time.perf_counter() - start, "first_s": seen[0][0] if seen else None,
            "first": seen[0][1] if seen else None, "fraction": seen[0][2] if seen else None,
            "kind": seen[0][3] if seen else None, "count": len(seen), "map": final}


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.sum(1).flatten(), b.sum(1).flatten()]))[0, 1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'case':42} {'Captum':>8} {'ours':>8} {'ratio':>6} {'first map':>10} {'(work)':>7} "
          f"{'final':>8} {'corr':>6} {'equal':>6}")
    for case in cases():
        theirs, _ = timed(captum_call(case), args.repeat)
        plain_s, plain = timed(lambda: attribute(case["model"], case["x"], case["method"], case["target"],
                                                 **case["params"]), args.repeat)
        runs = [progressive_run(case) for _ in range(args.repeat + 1)][1:]
        best = min(runs, key=lambda r: r["final_s"])
        first_s = min(r["first_s"] for r in runs)
        equal = bool(torch.equal(best["map"], plain))
        print(f"{case['name']:42} {theirs:8.2f} {plain_s:8.2f} {theirs / plain_s:5.2f}x {first_s:9.2f}s "
              f"{best['fraction']:6.1%} {best['final_s']:7.2f}s {correlation(best['first'], best['map']):6.3f} "
              f"{str(equal):>6}")


if __name__ == "__main__":
    main()
