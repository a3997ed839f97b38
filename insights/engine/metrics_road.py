"""ROAD (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy for Attribution
Methods"): remove the most (``road_morf``) or least (``road_lerf``) relevant pixels and fill them by
noisy linear imputation, so that what the model sees carries no trace of the removal's shape.

Each removed pixel becomes the weighted mean of its eight neighbours (1/6 for the four sides, 1/12
for the corners, only neighbours inside the image), with all removed pixels solved together: a
sparse, symmetric positive definite system (as long as one pixel is kept). We solve it in torch,
batched over every image of a chunk, by conjugate gradients preconditioned with one multigrid
V-cycle; about ten iterations reach a relative residual of 1e-6 whatever the removed pixels' shape
(plain conjugate gradients needed 500 for 90% of a 224×224 image). Then Gaussian noise (std
``noise``) is added to the filled pixels, seeded per row.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .context import Context
from .metrics import (CURVE_PARAMS, Metric, check_attribution, ranks, reference_count, registry,
                      target_scores, trapezoid, with_references)
from .params import Cost, Param

SIDE, CORNER = 1 / 6, 1 / 12  # the neighbours' weights (they sum to 1 inside the image)


def neighbour_sum(v: torch.Tensor) -> torch.Tensor:
    """For each pixel of ``v`` (…×H×W), the weighted sum of its eight neighbours; pixels beyond
    the border count as zero."""
    p = F.pad(v, (1, 1, 1, 1))
    sides = p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:]
    corners = p[..., :-2, :-2] + p[..., :-2, 2:] + p[..., 2:, :-2] + p[..., 2:, 2:]
    return SIDE * sides + CORNER * corners


class _Grid:
    """One level of the multigrid: the missing pixels (B×1×H×W, 1.0 where missing), the
    operator u ↦ m (D u − W (m u)) of the imputation system, and a coarser level where a pixel is
    missing when all its 2×2 children are (the same stencil, unscaled, fits a grid twice as
    coarse: the operator approximates h² times the Laplacian, and restriction sums 4 children)."""

    def __init__(self, missing: torch.Tensor):
        self.m = missing
        h, w = missing.shape[2:]
        self.weight = neighbour_sum(torch.ones(1, 1, h, w, dtype=missing.dtype, device=missing.device))
        self.inverse = missing / self.weight  # the Jacobi smoother's diagonal, zero where known
        self.coarse = None
        if min(h, w) > 4:
            padded = F.pad(missing, (0, w % 2, 0, h % 2), value=1.0)  # beyond the edge: no child
            self.coarse = _Grid((F.avg_pool2d(padded, 2) > 0.999).to(missing.dtype))

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        return self.m * (self.weight * u - neighbour_sum(self.m * u))

    def smooth(self, e: torch.Tensor, r: torch.Tensor, sweeps: int) -> torch.Tensor:
        for _ in range(sweeps):  # damped Jacobi
            e = e + 0.8 * self.inverse * (r - self.apply(e))
        return e

    def vcycle(self, r: torch.Tensor) -> torch.Tensor:
        """An approximate solution of apply(e) = r: symmetric (two sweeps before and after the
        coarse correction), so it can precondition conjugate gradients."""
        if self.coarse is None:
            return self.smooth(torch.zeros_like(r), r, 20)
        e = self.smooth(torch.zeros_like(r), r, 2)
        h, w = r.shape[2:]
        rest = F.pad(r - self.apply(e), (0, w % 2, 0, h % 2))
        correction = self.coarse.vcycle(4 * F.avg_pool2d(rest, 2))  # sum of the 4 children
        e = e + self.m * F.interpolate(correction, scale_factor=2, mode="nearest")[..., :h, :w]
        return self.smooth(e, r, 2)


def impute(x: torch.Tensor, missing: torch.Tensor, tol: float = 1e-6, max_iter: int = 100) -> torch.Tensor:
    """``x`` (B×C×H×W) with the pixels where ``missing`` (B×1×H×W, bool) is set replaced by the
    weighted mean of their neighbours, solved jointly (no noise): preconditioned conjugate
    gradients until each row's residual is below ``tol`` times its right-hand side. Every row
    must keep at least one pixel."""
    x = x.float()
    grid = _Grid(missing.float())
    b = grid.m * neighbour_sum(x * (1 - grid.m))
    v = torch.zeros_like(x)
    r = b.clone()
    z = grid.vcycle(r)
    p, rz = z, (r * z).sum((1, 2, 3))
    size = b.flatten(1).norm(dim=1).clamp_min(1e-30)
    for _ in range(max_iter):
        if (r.flatten(1).norm(dim=1) / size).max() < tol:
            break
        q = grid.apply(p)
        alpha = (rz / (p * q).sum((1, 2, 3)).clamp_min(1e-30)).view(-1, 1, 1, 1)
        v, r = v + alpha * p, r - alpha * q
        z = grid.vcycle(r)
        rz, previous = (r * z).sum((1, 2, 3)), rz
        p = z + (rz / previous.clamp_min(1e-30)).view(-1, 1, 1, 1) * p
    return torch.where(missing, v, x)


def _param(name: str) -> Param:
    return next(p for p in CURVE_PARAMS if p.name == name)


class RoadMetric(Metric):
    """A curve of the score against the fraction of pixels removed and imputed."""

    most_first: bool = True
    # What an imputed image costs in forward passes of the model, for the server's MAX_PASSES
    # check: solving the imputation took 62 ms per 224×224 image on 2 CPU cores, a ResNet-18
    # forward 23 ms, so each image counts as 4 passes.
    pass_weight: int = 4
    params = (
        Param("steps", "int", 10, "The curve's points: fractions 0, 1/steps, … (steps-1)/steps of "
              "the pixels removed (all of them would leave nothing to impute from).", min=2, max=256),
        Param("noise", "float", 0.01, "Standard deviation of the Gaussian noise added to the "
              "imputed pixels, in the normalised units the model sees.", min=0, max=10),
        _param("score"), _param("reference"), _param("reference_seeds"), _param("reference_grid"),
        Param("seed", "int", 0, "Seed of the imputation noise and first seed of the reference "
              "maps.", min=0, max=2 ** 31 - 1),
    )

    def cost(self, p: dict, shape: Sequence[int], method_cost: Cost | None = None) -> Cost:
        return Cost(1 + (p["steps"] - 1) * reference_count(p), 0)  # the clean image is shared

    def run(self, ctx: Context, attribution: torch.Tensor, p: dict) -> dict:
        x = ctx.inputs
        n, _, h, w = x.shape
        importance = with_references(check_attribution(attribution, x), p)
        if not self.most_first:
            importance = -importance  # least relevant first; ties still in row-major order
        place = ranks(importance.flatten(0, 1)).view(n, -1, h, w)
        maps, steps, pixels = place.shape[1], p["steps"], h * w
        counts = [round(k * pixels / steps) for k in range(steps)]
        scores = torch.empty(n, maps, steps, device=x.device)
        g = torch.Generator().manual_seed(p["seed"])

        def measure(batch: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return target_scores(ctx, batch, target, p["score"])

        with torch.no_grad():  # not inference mode: the twin seam.logits may build must serve autograd later
            for s in ctx.chunks(n, grad=False):  # fraction 0: the clean images, for every map
                scores[s, :, 0] = measure(x[s], ctx.target[s]).unsqueeze(1)
            inner = (steps - 1) * maps * n  # row r: step 1 + r // (maps n), map, image
            for s in ctx.chunks(inner, grad=False):
                rows = torch.arange(s.start, s.stop, device=x.device)
                step, rest = 1 + rows // (maps * n), rows % (maps * n)
                which, image = rest // n, rest % n
                limit = torch.tensor(counts, device=x.device)[step]
                missing = (place[image, which] < limit.view(-1, 1, 1)).unsqueeze(1)
                batch = impute(x[image], missing)
                if p["noise"] > 0:  # drawn row by row on the CPU: the same for every chunking
                    jitter = torch.stack([torch.randn(x.shape[1:], generator=g) for _ in range(len(rows))])
                    batch = torch.where(missing, batch + p["noise"] * jitter.to(x.device), batch)
                scores[image, which, step] = measure(batch.to(x.dtype), ctx.target[image])

        fractions = [c / pixels for c in counts]
        width = fractions[-1]
        curves = scores.tolist()
        areas = [[trapezoid(fractions, curve) / width for curve in per_image] for per_image in curves]
        answer = {"metric": self.id, "better": self.better, "params": dict(p),
                  "fractions": fractions, "scores": [c[0] for c in curves],
                  "areas": [a[0] for a in areas]}
        answer["area"] = sum(answer["areas"]) / n
        if maps > 1:
            ref = torch.tensor([a[1:] for a in areas], dtype=torch.float64)
            answer["reference"] = {
                "kind": p["reference"], "seeds": list(range(p["seed"], p["seed"] + maps - 1)),
                "grid": p["reference_grid"], "areas": ref.tolist(), "mean": ref.mean(1).tolist(),
                "std": ref.std(1, unbiased=False).tolist(), "scores": scores[:, 1:].mean(1).tolist()}
        return answer


@registry.register
class RoadMorf(RoadMetric):
    id = "road_morf"
    label = "ROAD, most relevant first"
    description = "Removes the most important pixels first, fills them from their neighbours " \
                  "(noisy linear imputation) and records the target's score; a faithful map " \
                  "makes it fall fast (a lower area, the curve's mean height, is better)."
    better = "lower"
    most_first = True


@registry.register
class RoadLerf(RoadMetric):
    id = "road_lerf"
    label = "ROAD, least relevant first"
    description = "Removes the least important pixels first, fills them from their neighbours " \
                  "(noisy linear imputation) and records the target's score; a faithful map " \
                  "keeps it high (a higher area, the curve's mean height, is better)."
    better = "higher"
    most_first = False
