"""Gradient methods: saliency, input × gradient, integrated gradients, gradient SHAP, and the
noise tunnel they share.

A :class:`GradientMethod` implements ``compute(ctx, x, target, p)`` for a batch; the noise
tunnel (SmoothGrad, SmoothGrad², VarGrad) is a set of parameters on every gradient method that
repeats ``x`` with Gaussian noise and aggregates the maps. A method that is already noisy
(gradient SHAP) sets ``noise_tunnel = False`` and gets no tunnel parameters.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Iterator

import numpy as np
import torch

from .. import registry, seam
from ..context import Context
from ..params import Cost, Param
from ..errors import ParamError
from ..passes import add_rows, expand_baseline, gradient
from ..precision import PRECISION_PARAM
from ..method import Facts, Method
from ..errors import shown

NT_TYPES = ("none", "smoothgrad", "smoothgrad_sq", "vargrad")

NOISE_PARAMS = (
    Param("nt_type", "choice", "none", "Noise tunnel: average the map over noisy copies of the "
          "image (smoothgrad), average its square (smoothgrad_sq) or take its variance (vargrad).",
          choices=NT_TYPES),
    Param("nt_samples", "int", 10, "Noisy copies for the noise tunnel.", min=1, max=500),
    Param("stdevs", "float", 0.3, "Standard deviation of the noise, in normalised input units.",
          min=0.0, max=10.0),
    Param("seed", "int", 0, "Random seed: the same seed gives the same map.", min=0, max=2**31 - 1),
)


PREVIEW_FROM = 20  # path methods with at least this many steps (samples) show a preview first


class GradientMethod(Method):
    """A method that maps a batch to attributions with gradients; gains the noise tunnel."""

    family = "gradient"
    base_params: tuple[Param, ...] = ()
    passes_per_sample = 1  # forward (and backward) passes per image without noise
    noise_tunnel = True  # False: the method draws its own noise and has no nt_* parameters
    shared_pass: str | None = None  # the shared pass (see Method.shared_needs) it can use without noise
    # Completeness: "exact" when the map sums to f(x) - f(baseline) (up to quadrature), "expected"
    # when it does only on average over the method's random draws; None: no such property.
    completeness: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.params = tuple(cls.base_params) + (NOISE_PARAMS if cls.noise_tunnel else ())

    def compute(self, ctx: Context, x: torch.Tensor, target: torch.Tensor, p: dict) -> torch.Tensor:
        raise NotImplementedError

    def base_signed(self, p: dict) -> bool:
        return True

    def signed(self, p: dict) -> bool:
        return p.get("nt_type", "none") in ("none", "smoothgrad") and self.base_signed(p)

    def batchable(self, p: dict) -> bool:
        # The noise is drawn for the whole batch from one seeded generator: another image in
        # the batch would change this one's noise. Methods without a tunnel draw their own.
        return self.noise_tunnel and p.get("nt_type", "none") == "none"

    def passes(self, p: dict) -> int:
        return self.passes_per_sample

    def cost(self, p: dict, facts: Facts) -> Cost:
        nt = p.get("nt_type", "none")
        n = self.passes(p) * (1 if nt == "none" else p["nt_samples"])
        return Cost(n, n)

    def shared_needs(self, ctx: Context, p: dict) -> set[str] | None:
        if self.shared_pass is None or p.get("nt_type", "none") != "none":
            return None
        return {self.shared_pass}

    def completeness_baseline(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        """The baseline rows the map's sum is measured against (see :func:`record_completeness`)."""
        return baseline_rows(p["baselines"], x, x.shape[0])

    def preview(self, p: dict) -> dict | None:
        """Cheaper parameters for a first look at the map while the requested one is computed
        (a tenth of the steps or samples), or None when the method has no such knob or is cheap."""
        return None

    def run(self, ctx: Context, p: dict) -> torch.Tensor:
        if p.get("nt_type", "none") == "none":
            cheap = self.preview(p) if ctx.partial is not None else None
            if cheap is not None:
                # The preview's passes count in the call's progress and in info["preview"].
                extra, full = self.passes(cheap) * ctx.inputs.shape[0], self.passes(p) * ctx.inputs.shape[0]
                ctx.total += extra
                ctx.info["preview"] = {"params": {k: cheap[k] for k in cheap if cheap[k] != p[k]},
                                       "passes": self.passes(cheap), "share": round(extra / (extra + full), 4)}
                ctx.publish(self.compute(ctx, ctx.inputs, ctx.target, cheap), kind="preview")
            out = self.compute(ctx, ctx.inputs, ctx.target, p)
            if self.completeness:
                record_completeness(ctx, out, self.completeness_baseline(ctx.inputs, p), self.completeness)
            return out
        # With a noise tunnel the map aggregates maps of noisy copies: there is no single score
        # difference it should sum to, so no delta is recorded.
        return noise_tunnel(self, ctx, p)


COMPLETENESS_FLOOR = 1e-6  # score differences below this count as this, so a delta stays finite


def record_completeness(ctx: Context, maps: torch.Tensor, base: torch.Tensor, kind: str) -> None:
    """Records how far each row's map is from summing to f(x) - f(baseline), f the target logit:
    ``info["deltas"]`` per row, |sum - (f(x) - f(base))| / |f(x) - f(base)|, ``info["delta"]``
    their largest, and ``info["delta_kind"]`` ("exact", or "expected" when the sum matches only
    on average). Two forward passes without autograd, in budget-sized chunks."""
    x, t = ctx.inputs, ctx.target
    size = ctx.chunk_size(grad=False, factor=2.0)
    diffs = []
    with seam.plain_scorer(ctx) as score:
        for start in range(0, x.shape[0], size):
            s = slice(start, min(x.shape[0], start + size))
            both = score(torch.cat([x[s], base[s]]), t[s].repeat(2)).double()
            diffs.append(both[: s.stop - s.start] - both[s.stop - s.start:])
    diff = torch.cat(diffs)
    sums = maps.detach().flatten(1).double().sum(1).to(diff.device)
    deltas = ((sums - diff).abs() / diff.abs().clamp_min(COMPLETENESS_FLOOR)).tolist()
    ctx.info["deltas"] = deltas
    ctx.info["delta"] = max(deltas)
    ctx.info["delta_kind"] = kind


def noise_tunnel(method: GradientMethod, ctx: Context, p: dict) -> torch.Tensor:
    """Runs ``method.compute`` on ``nt_samples`` noisy copies of each image and aggregates.

    The copies run a chunk at a time (as many as one gradient batch holds under the memory
    budget) and only running sums are kept, so memory does not grow with ``nt_samples``. The
    noise is drawn in groups of copies that do not depend on the chunks: the same seed gives the
    same map whatever the budget, and on the CPU the same noise as one draw of all the copies."""
    x, k = ctx.inputs, p["nt_samples"]
    n, shape = x.shape[0], tuple(x.shape)
    gen = torch.Generator(device=x.device).manual_seed(p["seed"])
    per_chunk = max(1, ctx.chunk_size(grad=True) // n)  # copies per chunk
    total = squares = None
    for chunk in noise_chunks(noise_draws(k, x.numel()), per_chunk):
        start, stop = chunk[0][0], chunk[-1][1]
        ctx.check()
        noise = torch.cat([torch.randn((b - a,) + shape, generator=gen, device=x.device, dtype=x.dtype)
                           for a, b in chunk])
        noisy = (x.unsqueeze(0) + noise * p["stdevs"]).reshape((-1,) + shape[1:])
        del noise
        maps = method.compute(ctx, noisy, ctx.target.repeat(stop - start), p)
        maps = maps.reshape((stop - start, n) + tuple(maps.shape[1:]))
        dtype = maps.dtype
        part = maps.sum(0, dtype=torch.float64)
        total = part if total is None else total + part
        if p["nt_type"] != "smoothgrad":
            part = (maps * maps).sum(0, dtype=torch.float64)
            squares = part if squares is None else squares + part
        del noisy, maps
    mean = total / k
    if p["nt_type"] == "smoothgrad":
        return mean.to(dtype)
    if p["nt_type"] == "smoothgrad_sq":
        return (squares / k).to(dtype)
    return (squares / k - mean ** 2).clamp_min(0).to(dtype)  # vargrad; rounding can dip below 0


def noise_draws(k: int, numel: int) -> list[tuple[int, int]]:
    """The noise tunnel's draws: ranges of copies ``[a, b)`` each drawn with one ``randn``.
    Each but the last holds a multiple of 16 numbers: the CPU generator makes normal numbers
    16 at a time, so these draws one after another give exactly the numbers of one draw of
    all ``k`` copies (the last draw holds at least 16 numbers, or all of them)."""
    group = 16 // math.gcd(16, numel)  # copies per draw
    bounds = list(range(0, k, group)) + [k]
    if len(bounds) > 2 and (bounds[-1] - bounds[-2]) * numel < 16:
        del bounds[-2]  # a short tail is drawn with the group before it
    return list(zip(bounds[:-1], bounds[1:]))


def noise_chunks(draws: list[tuple[int, int]], per_chunk: int) -> Iterator[list[tuple[int, int]]]:
    """Consecutive draws grouped into chunks of at most ``per_chunk`` copies (at least one draw)."""
    chunk: list[tuple[int, int]] = []
    for a, b in draws:
        if chunk and b - chunk[0][0] > per_chunk:
            yield chunk
            chunk = []
        chunk.append((a, b))
    if chunk:
        yield chunk


@registry.register
class Saliency(GradientMethod):
    id = "saliency"
    label = "Saliency"
    description = "The gradient of the class score with respect to each pixel: which pixels, " \
                  "changed slightly, move the score most. One backward pass."
    base_params = (
        Param("abs", "bool", True, "Take the absolute value of the gradient."),
    )
    shared_pass = "grad"

    def base_signed(self, p: dict) -> bool:
        return not p["abs"]

    def compute(self, ctx, x, target, p):
        grad = ctx.gradient(x, target)
        return grad.abs() if p["abs"] else grad

    def from_passes(self, ctx, p, passes):
        return passes["grad"].abs() if p["abs"] else passes["grad"]


@registry.register
class InputXGradient(GradientMethod):
    id = "input_x_gradient"
    label = "Input × Gradient"
    description = "The gradient multiplied by the input: a first-order estimate of each pixel's " \
                  "contribution relative to an all-zero input. One backward pass."
    shared_pass = "grad"

    def compute(self, ctx, x, target, p):
        return ctx.gradient(x, target) * x

    def from_passes(self, ctx, p, passes):
        return passes["grad"] * ctx.inputs


def baseline_rows(value: Any, x: torch.Tensor, n_inputs: int) -> torch.Tensor:
    """The ``baselines`` parameter as a tensor shaped like ``x``. A tensor with one row per
    original input is tiled when ``x`` holds several copies of the inputs (the noise tunnel
    stacks its copies input-batch after input-batch)."""
    if (isinstance(value, torch.Tensor) and value.dim() == x.dim() and value.shape[0] == n_inputs
            and n_inputs > 1 and x.shape[0] != n_inputs and x.shape[0] % n_inputs == 0):
        value = value.repeat((x.shape[0] // n_inputs,) + (1,) * (x.dim() - 1))
    return expand_baseline(value, x, "baselines")


BASELINES = Param("baselines", "float", 0.0, "The reference input the attribution is measured "
                  "from, in normalised units (0 is the dataset's mean colour). Python callers may "
                  "pass a tensor broadcastable to the inputs.", min=-1e3, max=1e3, tensor_ok=True)

INTEGRATION_RULES = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
                     "gausslegendre")


def integration_weights(rule: str, n: int) -> tuple[list[float], list[float]]:
    """Step sizes and points (alphas in [0, 1]) of an ``n``-point quadrature of a path integral;
    the same numbers Captum's integrated gradients use for each rule."""
    sizes, alphas = _quadrature(rule, n)
    return list(sizes), list(alphas)


@functools.lru_cache(maxsize=64)
def _quadrature(rule: str, n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """integration_weights, remembered: Gauss-Legendre nodes cost 0.6 ms to compute, a tenth of
    a whole IG call on a GPU."""
    if rule == "gausslegendre":
        points, weights = np.polynomial.legendre.leggauss(n)  # on [-1, 1], weights sum to 2
        return tuple((0.5 * weights).tolist()), tuple((0.5 * (points + 1.0)).tolist())
    if rule not in INTEGRATION_RULES:
        raise ParamError("integration", f"must be one of {', '.join(INTEGRATION_RULES)}; got {shown(rule)}")
    if n < 2:
        raise ParamError("n_steps", f"must be at least 2 with {rule}, got {n}")
    sizes = [1.0 / n] * n
    kind = rule.split("_", 1)[1]
    if kind == "trapezoid":
        sizes[0] /= 2
        sizes[-1] /= 2
        alphas = torch.linspace(0, 1, n)
    elif kind == "left":
        alphas = torch.linspace(0, 1 - 1 / n, n)
    elif kind == "middle":
        alphas = torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n)
    else:
        alphas = torch.linspace(1 / n, 1, n)
    return tuple(sizes), tuple(alphas.tolist())


@registry.register
class IntegratedGradients(GradientMethod):
    id = "integrated_gradients"
    completeness = "exact"
    label = "Integrated Gradients"
    description = "Adds up the gradient along a straight path from a baseline image (by default " \
                  "the average colour) to the photo, and multiplies by the difference. The map " \
                  "sums to how much the class score changes between the two. One backward pass " \
                  "per step."
    base_params = (
        Param("n_steps", "int", 50, "Points on the path from the baseline to the image; more is "
              "more accurate and slower.", min=1, max=1024),
        Param("integration", "choice", "gausslegendre", "How the path integral is approximated "
              "(Riemann sums need at least 2 steps).", choices=INTEGRATION_RULES),
        BASELINES,
        PRECISION_PARAM,
    )

    def validate(self, given: dict, shape=None) -> dict:
        p = super().validate(given, shape)
        if p["integration"] != "gausslegendre" and p["n_steps"] < 2:
            raise ParamError("n_steps", f"must be at least 2 with {p['integration']}, got {p['n_steps']}")
        return p

    def passes(self, p):
        return p["n_steps"]

    def preview(self, p):
        if p["n_steps"] < PREVIEW_FROM or p.get("nt_type", "none") != "none":
            return None  # cheap already, or a noise tunnel (its copies are the cost)
        return {**p, "n_steps": max(4, p["n_steps"] // 10)}

    def compute(self, ctx, x, target, p):
        # IG(x) = (x - base) × ∫₀¹ ∇f(base + α (x - base)) dα, by the chosen quadrature.
        base = baseline_rows(p["baselines"], x, ctx.inputs.shape[0])
        sizes, alphas = integration_weights(p["integration"], p["n_steps"])
        return ctx.path_gradients(base, x, alphas, sizes, target) * (x - base)


@registry.register
class GradientShap(GradientMethod):
    id = "gradient_shap"
    label = "Gradient SHAP"
    description = "Averages input-minus-baseline times gradient at random points between the " \
                  "photo and randomly chosen baselines, optionally with noise on the photo: an " \
                  "estimate of SHAP values. One backward pass per sample."
    noise_tunnel = False
    completeness = "expected"  # only the average over the draws sums to f(x) - f(mean baseline)
    base_params = (
        Param("n_samples", "int", 20, "Random samples per image.", min=1, max=1000),
        Param("stdevs", "float", 0.0, "Standard deviation of the Gaussian noise added to the "
              "image for each sample, in normalised input units.", min=0.0, max=10.0),
        Param("baselines", "float", 0.0, "The baseline distribution: a number (one constant "
              "image) or, from Python, a K×C×H×W tensor of K baselines drawn at random.",
              min=-1e3, max=1e3, tensor_ok=True),
        Param("seed", "int", 0, "Random seed: the same seed gives the same map.", min=0, max=2**31 - 1),
    )

    def passes(self, p):
        return p["n_samples"]

    def preview(self, p):
        return {**p, "n_samples": max(2, p["n_samples"] // 10)} if p["n_samples"] >= PREVIEW_FROM else None

    def _distribution(self, value: Any, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            return torch.full((1,) + tuple(x.shape[1:]), float(value), dtype=x.dtype, device=x.device)
        dist = value.to(x.device, x.dtype)
        if dist.dim() == x.dim() - 1:
            dist = dist.unsqueeze(0)
        if dist.dim() != x.dim() or dist.shape[0] < 1 or tuple(dist.shape[1:]) != tuple(x.shape[1:]):
            raise ParamError("baselines", f"must be K×{'×'.join(map(str, x.shape[1:]))}, "
                                          f"got {tuple(value.shape)}")
        return dist

    def completeness_baseline(self, x, p):
        return self._distribution(p["baselines"], x).mean(0, keepdim=True).expand_as(x)

    def compute(self, ctx, x, target, p):
        dist = self._distribution(p["baselines"], x)
        n, k = x.shape[0], p["n_samples"]
        gen = torch.Generator(device=x.device).manual_seed(p["seed"])
        # Input-major rows: image i's samples are rows i*k .. i*k+k-1. Every draw is made up
        # front or per row, so the map does not depend on how the rows are chunked.
        choice = torch.randint(dist.shape[0], (n * k,), generator=gen, device=x.device)
        alpha = torch.rand((n * k,), generator=gen, device=x.device, dtype=x.dtype)
        view = (-1,) + (1,) * (x.dim() - 1)
        total = torch.zeros_like(x)
        for s in ctx.chunks(n * k, grad=True):
            row = torch.arange(s.start, s.stop, device=x.device)
            image = row // k
            noisy = x[image]
            if p["stdevs"] > 0:
                noise = torch.stack([torch.randn(x.shape[1:], generator=gen, device=x.device,
                                                 dtype=x.dtype) for _ in range(len(row))])
                noisy = noisy + noise * p["stdevs"]
            base = dist[choice[s]]
            a = alpha[s].view(view)
            grad = gradient(ctx.model, a * noisy + (1 - a) * base, target[image])
            add_rows(total, image, grad * (noisy - base))
        return total / k
