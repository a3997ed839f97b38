"""Gradient methods: saliency and input × gradient, and the noise tunnel they all share.

A :class:`GradientMethod` implements ``compute(ctx, x, target, p)`` for a batch; the noise
tunnel (SmoothGrad, SmoothGrad², VarGrad) is a set of parameters on every gradient method that
repeats ``x`` with Gaussian noise and aggregates the maps.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import registry
from .base import Context, Cost, Method, Param

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

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.params = tuple(cls.base_params) + NOISE_PARAMS

    def compute(self, ctx: Context, x: torch.Tensor, target: torch.Tensor, p: dict) -> torch.Tensor:
        raise NotImplementedError

    def base_signed(self, p: dict) -> bool:
        return True

    def signed(self, p: dict) -> bool:
        return p["nt_type"] in ("none", "smoothgrad") and self.base_signed(p)

    def passes(self, p: dict, shape: Sequence[int]) -> int:
        return self.passes_per_sample

    def cost(self, p: dict, shape: Sequence[int]) -> Cost:
        n = self.passes(p, shape) * (1 if p["nt_type"] == "none" else p["nt_samples"])
        return Cost(n, n)

    def run(self, ctx: Context, p: dict) -> torch.Tensor:
        if p["nt_type"] == "none":
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
    return squares - maps.mean(0) ** 2  # vargrad


@registry.register
class Saliency(GradientMethod):
    id = "saliency"
    label = "Saliency"
    description = "The gradient of the class score with respect to each pixel: which pixels, " \
                  "changed slightly, move the score most. One backward pass."
    base_params = (
        Param("abs", "bool", True, "Take the absolute value of the gradient."),
    )

    def base_signed(self, p: dict) -> bool:
        return not p["abs"]

    def compute(self, ctx, x, target, p):
        grad = ctx.gradient(x, target)
        return grad.abs() if p["abs"] else grad


@registry.register
class InputXGradient(GradientMethod):
    id = "input_x_gradient"
    label = "Input × Gradient"
    description = "The gradient multiplied by the input: a first-order estimate of each pixel's " \
                  "contribution relative to an all-zero input. One backward pass."

    def compute(self, ctx, x, target, p):
        return ctx.gradient(x, target) * x
