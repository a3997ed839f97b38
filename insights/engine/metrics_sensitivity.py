"""Robustness metrics in Captum's sense: max-sensitivity (how far the map moves when the input is
nudged within a small ball), registered into the metrics' registry.

The same numbers as ``captum.metrics.sensitivity_max`` given the same perturbations and the same
explanation: our perturbations are seeded (:func:`ball_noise`), so a test can hand Captum the
very tensors we used.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .context import Context
from .errors import ParamError
from .metrics import Metric, registry, rerun
from .params import Cost, Param

SEED = Param("seed", "int", 0, "Seed of the random perturbations (the same seed gives the same "
             "score).", min=0, max=2 ** 31 - 1)


def ball_noise(shape: Sequence[int], radius: float, seed: int) -> Iterator[torch.Tensor]:
    """Endless perturbations of ``shape``, uniform in [-radius, radius] per element (the L∞ ball
    Captum's default perturbation samples), drawn on the CPU from ``seed`` in order, so that every
    device and every chunking sees the same ones."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield (torch.rand(tuple(shape), generator=g) * 2 - 1) * radius


@registry.register
class SensitivityMax(Metric):
    id = "sensitivity_max"
    label = "Max-sensitivity"
    description = "Re-runs the method at inputs nudged at random within a small ball and reports " \
                  "the largest change of the map relative to its size; a robust map barely " \
                  "moves (lower is better)."
    better = "lower"
    needs_method = True
    params = (
        Param("n_perturb_samples", "int", 10, "Number of nudged inputs; the method runs once "
              "on each.", min=1, max=1000),
        Param("perturb_radius", "float", 0.02, "Largest change of each input value, in the "
              "normalised units the model sees (Captum's default 0.02).", min=0, max=100),
        SEED,
    )

    def cost(self, p: dict, shape: Sequence[int], method_cost: Cost | None = None) -> Cost:
        # Without the method known, each re-run counts as one pass each way (saliency's cost).
        mc = method_cost or Cost(1, 1)
        k = p["n_perturb_samples"]
        return Cost(k * mc.forward, k * mc.backward)

    def run(self, ctx: Context, attribution: torch.Tensor, p: dict) -> dict:
        x = ctx.inputs
        n, k = x.shape[0], p["n_perturb_samples"]
        expl = attribution.detach().to(x.device, torch.float32).flatten(1)
        size = expl.norm(dim=1)
        size = torch.where(size == 0, torch.ones_like(size), size)  # as Captum: a zero map divides by 1
        noise = ball_noise(x.shape, p["perturb_radius"], p["seed"])
        ratios = torch.empty(n, k, dtype=torch.float64)
        group = max(1, ctx.chunk_size(grad=True) // n)  # samples per re-run, a batch of rows
        for j0 in range(0, k, group):
            j1 = min(k, j0 + group)
            deltas = torch.stack([next(noise) for _ in range(j0, j1)]).to(x.device)
            maps = rerun(ctx, p, (x.unsqueeze(0) + deltas).flatten(0, 1))  # row j n + i: image i
            if maps[0].numel() != expl.shape[1]:
                raise ParamError("attribution", f"shape {tuple(attribution.shape)} is not the shape "
                                 f"of {p['method']}'s maps {tuple(maps.shape[1:])}")
            moved = (maps.float().reshape(j1 - j0, n, -1) - expl.unsqueeze(0)).norm(dim=2) / size
            ratios[:, j0:j1] = moved.T.double().cpu()
        values = ratios.max(1).values
        return {"metric": self.id, "better": self.better, "params": dict(p),
                "values": values.tolist(), "value": float(values.mean()), "samples": ratios.tolist()}
