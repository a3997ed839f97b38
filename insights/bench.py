"""Times every registered method against its Captum counterpart (a developer tool).

    python -m insights.bench [--device cpu|cuda] [--model resnet18] [--methods occlusion ...]
                             [--repeat 5] [--stat min|median] [--threads N] [--fp64] [--memory]
                             [--together] [--no-twin] [--no-cuda-graphs] [--no-cuda-fused]
                             [--no-cpu-slices]

Same torchvision model (random weights), same 1×3×224×224 input, target 208 and the same
parameters for both sides. Each timed call runs once untimed first (warm-up), then ``--repeat``
times, the variants interleaved so that a noisy machine hurts them alike. The fastest run of each
is shown (``--stat min``, the default: on a shared machine other work only ever adds time, so the
fastest run is the best estimate of each side's own cost), or the median (``--stat median``).

The first table sets us against Captum: Captum with its default settings, Captum with a batching
option (``perturbations_per_eval=32`` / ``internal_batch_size=10``), ours, the speed-ups, the
largest difference from Captum relative to Captum's largest value, for bf16 rows the Pearson
correlation with our fp32 map, and with ``--fp64`` how far Captum's and our exact maps are from
the map of a float64 copy of the model.

The second sets us against the hardware: the work a method asks for (its forward and backward
passes per image, as the engine reports them, times the FLOPs of one pass counted by torch's
FlopCounterMode), the time that work would take at this machine's peak, and the rate we reached
as a share of that peak. The peak is measured in the same run, in each row's precision, as the
better of a large matrix product and a ResNet-sized 3×3 convolution.

Our calls may take every fast path (``EngineOptions``) unless a ``--no-…`` flag turns one off;
the header says which are allowed, and the fast paths our calls declined follow the tables,
each reason once with the rows it concerns.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from typing import Callable

import torch

from .bench_captum import PARAMS, RANDOM, TARGET, captum_calls, fp64_reference
from .engine import EngineOptions, attribute, attribute_many, methods, registry
from .engine.probe import default_layer


def timed(fn: Callable, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1000, out


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to ``b``'s largest value."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def bench_method(method: str, model, x: torch.Tensor, layer: str, repeat: int, device,
                 fp64: bool = False, stat: Callable = min,
                 options: EngineOptions | None = None) -> list[dict]:
    """One or two table rows (fp32, and bf16 when the method has a precision option), each with
    the passes our call made and what its fast paths did. With ``fp64``, also each exact map's
    distance from the float64 map. Our calls run with ``options``."""
    params = dict(PARAMS.get(method, {}))
    accepted = {p.name for p in registry.get(method).params}
    params = {k: v for k, v in params.items() if k in accepted}
    infos: dict[str, dict] = {"ours": {}, "bf16": {}}
    variants: dict[str, Callable] = {
        "ours": lambda: attribute(model, x, method, TARGET, info=infos["ours"], options=options,
                                  **params)}
    if "precision" in accepted:
        variants["bf16"] = lambda: attribute(model, x, method, TARGET, precision="bf16",
                                             info=infos["bf16"], options=options, **params)
    peers = captum_calls(method, model, x, layer) or {}
    for name, fn in peers.items():
        variants["captum_" + name] = fn

    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, torch.Tensor] = {}
    failed: dict[str, str] = {}
    for rep in range(repeat + 1):  # the first round is the warm-up
        for name, fn in variants.items():
            if name in failed:
                continue
            print(f"  {method}: {name} ({'warm-up' if rep == 0 else f'{rep}/{repeat}'})",
                  file=sys.stderr, flush=True)
            try:
                ms, out = timed(fn, device)
            except Exception as err:  # a Captum peer that cannot handle this model
                if not name.startswith("captum"):
                    raise
                failed[name] = f"{type(err).__name__}: {err}".splitlines()[0][:120]
                continue
            if rep:
                times[name].append(ms)
            outputs[name] = out.detach().float()

    def summary(name):
        return stat(times[name]) if times.get(name) else None

    captum = summary("captum_default")
    best = summary("captum_best") if "captum_best" in variants else captum
    ref = outputs.get("captum_default")
    truth = fp64_reference(method, model, x, layer) if fp64 and method not in RANDOM else None
    rows = []
    for ours in [v for v in ("ours", "bf16") if v in variants]:
        mine = outputs[ours]
        row = {"method": method + (" (bf16)" if ours == "bf16" else ""), "captum_ms": captum,
               "captum_best_ms": best, "ours_ms": summary(ours), "peer": bool(peers),
               "captum_error": failed.get("captum_default"),
               "precision": "bf16" if ours == "bf16" else "fp32", "cost": infos[ours].get("cost"),
               "fast_paths": infos[ours].get("fast_paths", {})}
        if ref is not None and method not in RANDOM and ref.shape == mine.shape:
            row["max_rel_diff"] = rel_diff(mine, ref)
        if truth is not None and ours == "ours":
            row["ours_vs_fp64"] = rel_diff(mine, truth)
            if ref is not None:
                row["captum_vs_fp64"] = rel_diff(ref, truth)
        if ours == "bf16":
            row["corr_fp32"] = pearson(mine, outputs["ours"])
        rows.append(row)
    return rows


TOGETHER = ["saliency", "input_x_gradient", "grad_cam", "guided_backprop", "guided_grad_cam"]


def bench_together(model, x: torch.Tensor, repeat: int, device, stat: Callable = min,
                   options: EngineOptions | None = None) -> dict:
    """The TOGETHER methods one by one against ``attribute_many``: passes per image and time."""
    def one_by_one():
        return [attribute(model, x, m, TARGET, options=options) for m in TOGETHER]

    info: dict = {}

    def together():
        return attribute_many(model, x, TOGETHER, TARGET, info=info, options=options)

    times: dict[str, list[float]] = {"separate": [], "shared": []}
    for rep in range(repeat + 1):
        for name, fn in (("separate", one_by_one), ("shared", together)):
            ms, _ = timed(fn, device)
            if rep:
                times[name].append(ms)
    return {"passes": info["passes"], "separate_ms": stat(times["separate"]),
            "shared_ms": stat(times["shared"])}


def memory_check(device: torch.device, options: EngineOptions | None = None) -> list[str]:
    """Runs two of the heaviest settings the engine accepts, IG with 512 steps on ResNet-50 and
    occlusion with stride 1, and reports the peak memory of this process (CPU: resident set; CUDA:
    allocated) against the memory budget the engine chunked them under."""
    import resource

    import torchvision

    from .engine.budget import default_budget

    def peak() -> float:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    lines = [f"memory budget per batch: {default_budget(device) / 2**30:.1f} GiB"]
    torch.manual_seed(0)
    r50 = torchvision.models.resnet50(weights=None).eval().to(device)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    start = time.perf_counter()
    attribute(r50, x, "integrated_gradients", TARGET, n_steps=512, options=options)
    lines.append(f"integrated_gradients n_steps=512, resnet50, 224: {time.perf_counter() - start:.1f} s, "
                 f"peak {peak():.2f} GiB")
    small = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(1)).to(device)
    start = time.perf_counter()
    attribute(r50, small, "occlusion", TARGET, sliding_window_shapes=(3, 16, 16), strides=(1, 1, 1),
              options=options)
    lines.append(f"occlusion window 3x16x16 stride 1 (81 x 81 = 6,561 passes), resnet50, 96: "
                 f"{time.perf_counter() - start:.1f} s, peak {peak():.2f} GiB")
    return lines


def pass_flops(model, x: torch.Tensor) -> dict[str, float]:
    """FLOPs of one forward pass of ``model`` on one image shaped like ``x``, and of one backward
    pass from a class score to the input (no weight gradients, as attribution needs), counted by
    torch's FlopCounterMode (convolutions and matrix products; elementwise work is not counted).
    Counted on a frozen copy, so the model itself is left as it was."""
    from torch.utils.flop_counter import FlopCounterMode

    frozen = copy.deepcopy(model).requires_grad_(False)
    one = x[:1].detach().clone().requires_grad_()
    with FlopCounterMode(display=False) as counter:
        score = frozen(one).sum()  # any score: the backward pass does the same work
        forward = counter.get_total_flops()
        score.backward()
    return {"forward": float(forward), "backward": float(counter.get_total_flops() - forward)}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def peak_flops(device: torch.device, precision: str, scale: float = 1.0) -> dict[str, float]:
    """FLOP/s this machine reaches now in ``precision`` on two dense kernels: a square matrix
    product and a 3×3, 64-channel convolution on 56×56 maps in channels-last layout (ResNet's
    first stage). Each runs once to warm up, then three times; the fastest run counts. fp32 runs
    without TF32, as the engine's fp32 does. ``scale`` shrinks the problems (tests)."""
    from .engine.precision import true_fp32

    dtype = DTYPES[precision]
    n = int((8192 if device.type == "cuda" else 2048) * scale)
    batch = max(1, int((256 if device.type == "cuda" else 32) * scale))
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).to(device, dtype)
    conv = conv.to(memory_format=torch.channels_last)
    maps = torch.randn(batch, 64, 56, 56, device=device, dtype=dtype)
    maps = maps.contiguous(memory_format=torch.channels_last)
    kernels = {"matmul": (lambda: a @ b, 2 * n ** 3),
               "conv": (lambda: conv(maps), 2 * batch * 56 * 56 * 64 * 64 * 9)}
    rates = {}
    with torch.inference_mode(), true_fp32(device):
        for name, (fn, flops) in kernels.items():
            fn()
            rates[name] = flops / (min(timed(fn, device)[0] for _ in range(3)) / 1000)
    return rates


def format_roofline(rows: list[dict], flops: dict[str, float], peaks: dict[str, dict]) -> list[str]:
    """Our rows against the hardware: the method's work (passes × FLOPs per pass, one image),
    the time it would take at the measured peak of the row's precision, our time, the rate we
    reached and its share of the peak. ``peaks`` maps a precision to its kernels' FLOP/s."""
    best = {p: max(rates.values()) for p, rates in peaks.items()}
    kernel = {p: max(rates, key=rates.get) for p, rates in peaks.items()}
    lines = ["against the hardware (peak measured in this run: "
             + ", ".join(f"{p} {rate / 1e9:,.0f} GFLOP/s ({kernel[p]})" for p, rate in best.items())
             + f"; one pass {flops['forward'] / 1e9:.2f} GFLOP forward, "
               f"{flops['backward'] / 1e9:.2f} backward to the input):"]
    head = ("method", "passes f+b", "GFLOP", "at peak ms", "ours ms", "GFLOP/s", "% of peak")
    table = [head]
    for r in rows:
        cost, ours = r.get("cost"), r["ours_ms"]
        if not cost or not ours or r["precision"] not in best:
            continue
        work = cost["forward"] * flops["forward"] + cost["backward"] * flops["backward"]
        rate = work / (ours / 1000)
        peak = best[r["precision"]]
        table.append((r["method"], f"{cost['forward']}+{cost['backward']}", f"{work / 1e9:,.1f}",
                      ms(work / peak * 1000), ms(ours), f"{rate / 1e9:,.0f}",
                      f"{100 * rate / peak:.0f}%"))
    return lines + ["  " + line for line in align(table)]


def format_options(options: EngineOptions) -> str:
    """Which fast paths the run allows, for the header."""
    allowed = dataclasses.asdict(options)
    return "fast paths " + ", ".join(f"{name} {'on' if on else 'off'}" for name, on in allowed.items())


def format_declined(rows: list[dict]) -> list[str]:
    """The fast paths our calls did not take and why, each reason once with the rows it
    concerns (the engine notes them in a call's ``info["fast_paths"]``)."""
    declined: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        for path, outcome in r.get("fast_paths", {}).items():
            if outcome.startswith("declined"):
                reason = outcome.partition(":")[2].strip() or outcome
                declined.setdefault((path, reason), []).append(r["method"])
    if not declined:
        return []
    return ["fast paths declined:"] + [f"  {path}: {reason} ({', '.join(names)})"
                                       for (path, reason), names in declined.items()]


def format_together(r: dict) -> str:
    sep, sh = r["passes"]["separate"], r["passes"]["shared"]
    return (f"together ({', '.join(TOGETHER)}): one by one {sep['forward']} forward + "
            f"{sep['backward']} backward passes, {r['separate_ms']:.0f} ms; shared {sh['forward']} + "
            f"{sh['backward']}, {r['shared_ms']:.0f} ms ({r['separate_ms'] / r['shared_ms']:.2f}x)")


def align(lines: list[tuple[str, ...]]) -> list[str]:
    """Columns padded to their widest cell (the first left-aligned, the rest right-aligned), with
    a rule under the header."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) if j == 0 else cell.rjust(w)
                             for j, (cell, w) in enumerate(zip(line, widths))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def ms(v: float | None) -> str:
    """Milliseconds as the tables print them: no decimals from 100 up, one below."""
    return "-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def format_table(rows: list[dict]) -> str:
    head = ("method", "captum ms", "captum best ms", "ours ms", "x default", "x best",
            "max|diff|/max", "corr fp32")
    if any("ours_vs_fp64" in r for r in rows):
        head += ("captum vs fp64", "ours vs fp64")
    lines = [head]
    for r in rows:
        if not r["peer"]:
            captum = best = "no peer"
        elif r["captum_error"]:
            captum = best = "captum fails"
        else:
            captum, best = ms(r["captum_ms"]), ms(r["captum_best_ms"])
        ours = r["ours_ms"]
        ratio = f"{r['captum_ms'] / ours:.2f}" if r["captum_ms"] and not r["captum_error"] else "-"
        ratio_best = f"{r['captum_best_ms'] / ours:.2f}" if r["captum_best_ms"] and not r["captum_error"] else "-"
        diff = f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else "-"
        corr = f"{r['corr_fp32']:.4f}" if "corr_fp32" in r else "-"
        line = (r["method"], captum, best, ms(ours), ratio, ratio_best, diff, corr)
        if len(head) > len(line):
            line += tuple(f"{r[k]:.1e}" if k in r else "-" for k in ("captum_vs_fp64", "ours_vs_fp64"))
        lines.append(line)
    return "\n".join(align(lines))


NOT_BY_DEFAULT = ("score_cam",)  # one forward per channel: insights.bench_cam times it


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m insights.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--model", default="resnet18", help="a torchvision model name (random weights)")
    parser.add_argument("--methods", nargs="*", default=None,
                        help="method ids (default: all but score_cam, whose one forward per channel takes "
                             "seconds: python -m insights.bench_cam times it against grad-cam)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per variant")
    parser.add_argument("--stat", default="min", choices=("min", "median"),
                        help="which of the timed runs to show: the fastest (default) or the median")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--memory", action="store_true",
                        help="also run IG with 512 steps on ResNet-50 and stride-1 occlusion, printing peak memory")
    parser.add_argument("--fp64", action="store_true",
                        help="also compare each exact map, ours and Captum's, with Captum's map of a "
                             "float64 copy of the model")
    parser.add_argument("--together", action="store_true",
                        help="also time methods asked for together (shared passes) against one by one")
    for option in dataclasses.fields(EngineOptions):
        flag = "--no-" + option.name.replace("_", "-")
        parser.add_argument(flag, dest=option.name, action="store_false",
                            help=f"run our calls without the {option.name} fast path "
                                 f"(EngineOptions({option.name}=False))")
    args = parser.parse_args(argv)
    options = EngineOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineOptions)})

    try:
        import captum.attr  # noqa: F401
    except ImportError:
        print("insights.bench compares against Captum, which is not installed: pip install captum",
              file=sys.stderr)
        return 2
    import torchvision

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    chosen = args.methods or [m for m in methods() if m not in NOT_BY_DEFAULT]
    unknown = [m for m in chosen if m not in registry]
    if unknown:
        print(f"unknown method(s): {', '.join(unknown)}; known: {', '.join(methods())}",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    stat = min if args.stat == "min" else statistics.median
    torch.manual_seed(0)
    try:
        model = torchvision.models.get_model(args.model, weights=None).eval().to(device)
    except ValueError as err:
        print(f"--model: {err}", file=sys.stderr)
        return 2
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
    layer = default_layer(model, x)
    print(f"model {args.model} (random weights) on {device}, input 1×3×224×224, target {TARGET}, "
          f"{torch.get_num_threads()} threads, {'fastest' if args.stat == 'min' else 'median'} of "
          f"{args.repeat}; Grad-CAM layer {layer}; {format_options(options)}", file=sys.stderr)
    rows = []
    for method in chosen:
        rows.extend(bench_method(method, model, x, layer, args.repeat, device, fp64=args.fp64, stat=stat,
                                 options=options))
    print(format_table(rows))
    print(flush=True)
    print("measuring the peak FLOP/s ...", file=sys.stderr, flush=True)
    peaks = {p: peak_flops(device, p) for p in sorted({r["precision"] for r in rows}, reverse=True)}
    for line in format_roofline(rows, pass_flops(model, x), peaks) + format_declined(rows):
        print(line)
    if args.memory:
        for line in memory_check(device, options):
            print(line, flush=True)
    if args.together:
        print(format_together(bench_together(model, x, args.repeat, device, stat, options)))
    for r in rows:
        if r["captum_error"]:
            print(f"{r['method']}: captum fails: {r['captum_error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
