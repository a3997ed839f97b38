"""Gradient methods: saliency, input × gradient, integrated gradients, gradient SHAP, and the
noise tunnel they share.

A :class:`GradientMethod` implements ``compute(ctx, x, target, p)`` for a batch; the noise
tunnel (SmoothGrad, SmoothGrad², VarGrad) is a set of parameters on every gradient method that
repeats ``x`` with Gaussian noise and aggregates the maps. A method that is already noisy
(gradient SHAP) sets ``noise_tunnel = False`` and gets no tunnel parameters.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
import torch

from .. import registry
from ..base import (PRECISION_PARAM, Context, Cost, Method, Param, ParamError, add_rows,
                   default_budget, expand_baseline, gradient)
from ..fast.graphs import replayed
from ..fast.twin import twin

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


class GradientMethod(Method):
    """A method that maps a batch to attributions with gradients; gains the noise tunnel."""

    family = "gradient"
    base_params: tuple[Param, ...] = ()
    passes_per_sample = 1  # forward (and backward) passes per image without noise
    noise_tunnel = True  # False: the method draws its own noise and has no nt_* parameters
    shared_pass: str | None = None  # the shared pass (see Method.shared_needs) it can use without noise

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

    def passes(self, p: dict, shape: Sequence[int]) -> int:
        return self.passes_per_sample

    def cost(self, p: dict, shape: Sequence[int]) -> Cost:
        nt = p.get("nt_type", "none")
        n = self.passes(p, shape) * (1 if nt == "none" else p["nt_samples"])
        return Cost(n, n)

    def shared_needs(self, ctx: Context, p: dict) -> set[str] | None:
        if self.shared_pass is None or p.get("nt_type", "none") != "none":
            return None
        return {self.shared_pass}

    def run(self, ctx: Context, p: dict) -> torch.Tensor:
        if p.get("nt_type", "none") == "none":
            return self.compute(ctx, ctx.inputs, ctx.target, p)
        return noise_tunnel(self, ctx, p)


def noise_tunnel(method: GradientMethod, ctx: Context, p: dict) -> torch.Tensor:
    """Runs ``method.compute`` on ``nt_samples`` noisy copies of each image and aggregates."""
    x, k = ctx.inputs, p["nt_samples"]
    gen = torch.Generator(device=x.device).manual_seed(p["seed"])
    noise = torch.randn((k,) + tuple(x.shape), generator=gen, device=x.device, dtype=x.dtype)
    noisy = (x.unsqueeze(0) + noise * p["stdevs"]).reshape((-1,) + tuple(x.shape[1:]))
    maps = method.compute(ctx, noisy, ctx.target.repeat(k), p)
    maps = maps.reshape((k, x.shape[0]) + tuple(maps.shape[1:]))
    if p["nt_type"] == "smoothgrad":
        return maps.mean(0)
    squares = (maps * maps).mean(0)
    if p["nt_type"] == "smoothgrad_sq":
        return squares
    return (squares - maps.mean(0) ** 2).clamp_min(0)  # vargrad; rounding can dip below 0


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
        raise ParamError("integration", f"must be one of {', '.join(INTEGRATION_RULES)}; got {rule!r}")
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

    def validate(self, given: dict) -> dict:
        p = super().validate(given)
        if p["integration"] != "gausslegendre" and p["n_steps"] < 2:
            raise ParamError("n_steps", f"must be at least 2 with {p['integration']}, got {p['n_steps']}")
        return p

    def passes(self, p, shape):
        return p["n_steps"]

    def compute(self, ctx, x, target, p):
        base = baseline_rows(p["baselines"], x, ctx.inputs.shape[0])
        sizes, alphas = integration_weights(p["integration"], p["n_steps"])
        alpha = torch.tensor(alphas, dtype=x.dtype, device=x.device)
        weight = torch.tensor(sizes, dtype=torch.float32, device=x.device).to(x.dtype)
        fast = twin(ctx.model, x)
        if fast is not None and fast.stem is not None and self._stem_fits(ctx, fast, x):
            return self._through_stem(ctx, fast, x, base, target, alpha, weight)
        net = fast.module if fast is not None else ctx.model
        rows = x.shape[0]
        diff = x - base
        total = torch.zeros_like(x)
        # Step-major rows (all images at alpha 0, then at alpha 1, ...), built chunk by chunk so
        # that only one chunk of scaled inputs is ever in memory.
        chunk = functools.partial(_weighted_gradient, net)
        for s in ctx.chunks(rows * len(sizes), grad=True):
            index = torch.arange(s.start, s.stop, device=x.device)
            step, row = index // rows, index % rows
            _accumulate(total, row, replayed(fast.graphs if fast is not None else None, "ig",
                                             chunk, base, diff, alpha[step], weight[step],
                                             target[row], row))
        return total * diff

    @staticmethod
    def _stem_fits(ctx: Context, fast, x: torch.Tensor) -> bool:
        """Whether three stem outputs per row (start, step, summed gradient) fit in a quarter
        of the memory budget."""
        shape = tuple(x.shape[1:])
        if shape not in fast.stem_sizes:
            with torch.no_grad():
                fast.stem_sizes[shape] = fast.stem(x[:1]).numel()
        per_row = fast.stem_sizes[shape] * x.element_size()
        return 3 * per_row * x.shape[0] <= (ctx.memory_budget or default_budget(ctx.device)) / 4

    @staticmethod
    def _through_stem(ctx, fast, x, base, target, alpha, weight) -> torch.Tensor:
        """The same integral, with the model's affine first layer (the stem) taken out of the
        loop: stem(base + a (x - base)) = stem(base) + a (stem(x) - stem(base)), so the stem
        runs twice instead of once per step; and its gradient is the same at every point, so
        the weighted gradients at its output are summed first and carried back through it once.
        The stem runs in fp32 in both precisions, which keeps the early max-pool's choices
        exact in bf16 mode."""
        rows = x.shape[0]
        cl = torch.channels_last
        with torch.autocast(x.device.type, enabled=False), torch.no_grad():
            start = fast.stem(base.contiguous(memory_format=cl))
            step = fast.stem(x.contiguous(memory_format=cl)) - start
        total = torch.zeros_like(start)
        chunk = functools.partial(_weighted_gradient, fast.rest)
        for s in ctx.chunks(rows * alpha.numel(), grad=True):
            index = torch.arange(s.start, s.stop, device=x.device)
            k, row = index // rows, index % rows
            _accumulate(total, row, replayed(fast.graphs, "ig-stem", chunk, start, step,
                                             alpha[k], weight[k], target[row], row))
        with torch.autocast(x.device.type, enabled=False), torch.enable_grad():
            at = x.detach().contiguous(memory_format=cl).requires_grad_(True)
            (through,) = torch.autograd.grad(fast.stem(at), at, total)
        return through * (x - base)


def _weighted_gradient(net, start: torch.Tensor, span: torch.Tensor, a: torch.Tensor,
                       w: torch.Tensor, target: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """w[i] × the gradient of ``net``'s target logit at start[row[i]] + a[i] span[row[i]], for
    the rows i of one batch of path points. On a GPU the rows are then summed per image (the
    result is images × ...) inside the same CUDA graph; on the CPU they are returned as they
    are and :func:`_accumulate` adds them up (one add per row is fastest there)."""
    view = (-1,) + (1,) * (start.dim() - 1)
    if start.shape[0] == 1:  # broadcast rather than gather copies of the one image's tensors
        point = torch.addcmul(start, a.view(view), span)
    else:
        point = torch.addcmul(start[row], a.view(view), span[row])
    grad = gradient(net, point.contiguous(memory_format=torch.channels_last), target)
    grad.mul_(w.view(view))
    if grad.device.type == "cpu":
        return grad
    if start.shape[0] == 1:
        return grad.sum(0, keepdim=True)
    return torch.zeros_like(start).index_add_(0, row, grad)


def _accumulate(total: torch.Tensor, row: torch.Tensor, part: torch.Tensor) -> None:
    """Adds a batch's part from :func:`_weighted_gradient` into the per-image total."""
    if total.device.type != "cpu":
        total += part
    else:
        add_rows(total, row, part)


@registry.register
class GradientShap(GradientMethod):
    id = "gradient_shap"
    label = "Gradient SHAP"
    description = "Averages input-minus-baseline times gradient at random points between the " \
                  "photo and randomly chosen baselines, optionally with noise on the photo: an " \
                  "estimate of SHAP values. One backward pass per sample."
    noise_tunnel = False
    base_params = (
        Param("n_samples", "int", 20, "Random samples per image.", min=1, max=1000),
        Param("stdevs", "float", 0.0, "Standard deviation of the Gaussian noise added to the "
              "image for each sample, in normalised input units.", min=0.0, max=10.0),
        Param("baselines", "float", 0.0, "The baseline distribution: a number (one constant "
              "image) or, from Python, a K×C×H×W tensor of K baselines drawn at random.",
              min=-1e3, max=1e3, tensor_ok=True),
        Param("seed", "int", 0, "Random seed: the same seed gives the same map.", min=0, max=2**31 - 1),
    )

    def passes(self, p, shape):
        return p["n_samples"]

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
