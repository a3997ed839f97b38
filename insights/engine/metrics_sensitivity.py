"""Captum's two metrics of an explanation (Yeh et al. 2019, "On the (In)fidelity and Sensitivity
of Explanations"), registered into the metrics' registry: infidelity (does the map predict how the
score moves under small random perturbations of the input?) and max-sensitivity (how far does
the map itself move when the input is nudged within a small ball?).

The same numbers as ``captum.metrics.infidelity`` and ``sensitivity_max`` given the same
perturbations (and, for max-sensitivity, the same explanation): ours are seeded and drawn on the
CPU in a fixed order (:func:`gaussian_noise`, :func:`ball_noise`), so a test can hand Captum the
very tensors we used.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .context import Context
from .errors import ParamError
from .metrics import Metric, registry, rerun, target_scores
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


def gaussian_noise(shape: Sequence[int], std: float, seed: int) -> Iterator[torch.Tensor]:
    """Endless Gaussian perturbations of ``shape`` with standard deviation ``std``, drawn on the
    CPU from ``seed`` in order (as :func:`ball_noise`)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(tuple(shape), generator=g) * std


@registry.register
class Infidelity(Metric):
    id = "infidelity"
    label = "Infidelity"
    description = "Perturbs the input with small random noise and compares how much the score " \
                  "moves with what the map predicts (the map times the noise, summed); the mean " \
                  "squared difference is lower for a faithful map."
    better = "lower"
    params = (
        Param("n_perturb_samples", "int", 10, "Number of random perturbations; one forward "
              "pass each.", min=1, max=10000),
        Param("noise", "float", 0.003, "Standard deviation of the Gaussian perturbation, in the "
              "normalised units the model sees (the value of Captum's example).", min=0, max=100),
        Param("normalize", "bool", True, "Scale the map by the factor that fits the score changes "
              "best before comparing (Captum's normalize), so that maps of different scales "
              "(a CAM, a gradient) can be compared; off, the map's own scale counts."),
        Param("score", "choice", "logit", "What is measured: the target's logit (what Captum's "
              "infidelity sees when given the model), or its softmax probability.",
              choices=("logit", "probability")),
        SEED,
    )

    def cost(self, p: dict, shape: Sequence[int], method_cost: Cost | None = None) -> Cost:
        return Cost(1 + p["n_perturb_samples"], 0)  # the clean image, then one per perturbation

    def run(self, ctx: Context, attribution: torch.Tensor, p: dict) -> dict:
        x = ctx.inputs
        n, c = x.shape[:2]
        k = p["n_perturb_samples"]
        a = attribution.detach().to(x.device, torch.float32)
        if a.shape[1] not in (1, c):
            raise ParamError("attribution", f"has {a.shape[1]} channels; infidelity needs one per "
                             f"input channel ({c}) or one for all")

        def measure(batch: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return target_scores(ctx, batch, target, p["score"])

        # Sums over the perturbations I, per image: (a·I)², a·I Δf, Δf², (a·I − Δf)², where
        # Δf = f(x) − f(x − I) (Captum's convention: the perturbation is subtracted).
        sums = torch.zeros(4, n, dtype=torch.float64)
        noise = gaussian_noise(x.shape, p["noise"], p["seed"])
        with torch.no_grad():  # not inference mode: the twin seam.logits may build must serve autograd later
            clean = torch.empty(n, device=x.device)
            for s in ctx.chunks(n, grad=False):
                clean[s] = measure(x[s], ctx.target[s])
            drawn: dict[int, torch.Tensor] = {}  # perturbation j (all images), while in use
            for s in ctx.chunks(k * n, grad=False):  # row j n + i: perturbation j of image i
                rows = torch.arange(s.start, s.stop)
                j, i = rows // n, rows % n
                for first in [key for key in drawn if key < int(j[0])]:
                    del drawn[first]
                while len(drawn) == 0 or max(drawn) < int(j[-1]):
                    drawn[max(drawn, default=-1) + 1] = next(noise)
                deltas = torch.stack([drawn[int(a)][int(b)] for a, b in zip(j, i)]).to(x.device)
                image = i.to(x.device)
                moved = clean[image] - measure(x[image] - deltas, ctx.target[image])
                scale = a[image] if a.shape[1] == c else a[image].expand(-1, c, -1, -1)
                predicted = (scale * deltas).flatten(1).sum(1)
                terms = torch.stack([predicted ** 2, predicted * moved, moved ** 2, (predicted - moved) ** 2])
                sums.index_add_(1, i, terms.double().cpu())
        answer = {"metric": self.id, "better": self.better, "params": dict(p)}
        if p["normalize"]:
            beta = sums[1] / torch.where(sums[0] == 0, torch.ones_like(sums[0]), sums[0])
            values = (beta ** 2 * sums[0] - 2 * beta * sums[1] + sums[2]) / k
            answer["beta"] = beta.tolist()
        else:
            values = sums[3] / k
        answer.update(values=values.tolist(), value=float(values.mean()))
        return answer


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
