"""Methods that explain the score through groups of pixels switched on and off: Kernel SHAP,
LIME and Shapley value sampling, over superpixels (``superpixels.py``) or square patches.

Each image is cut into K features. A coalition z in {0, 1}^K keeps the features it has and sets
the others to the baseline; f(z) is the target logit of that input. The methods differ only in
which coalitions they score and how they turn the scores into one value per feature:

* ``kernel_shap`` draws coalitions from the Shapley kernel and fits f(z) ≈ f(∅) + z·φ by least
  squares under the constraint that the values add up to f(x) - f(baseline); asked for at least
  every coalition of a small mask, it scores them all and its answer is the exact Shapley values;
* ``lime`` draws coalitions uniformly, weighs each by an exponential kernel of its cosine
  distance to the whole image, and fits a ridge regression;
* ``shapley_sampling`` walks random orders of the features, adding one at a time, and averages
  each feature's marginal contribution (each order's contributions add up to f(x) - f(baseline)).

Coalitions are drawn per image from a generator seeded with ``seed``, so an image gets the same
map alone or in a batch, and the same map on every call. Scores come from the context's scorer
in budget-sized batches; the map gives every element of a feature the feature's value.
"""
from __future__ import annotations

import math

import torch

from .. import registry
from ..context import Context
from ..method import Facts
from ..params import Cost, Param
from ..passes import expand_baseline
from ..precision import PRECISION_PARAM
from ..superpixels import feature_count, feature_masks, segment_params
from .perturbation import BASELINES_PARAM, PerturbationMethod

SEED_PARAM = Param("seed", "int", 0, "Seed of the random coalitions: the same seed gives the "
                   "same map.", min=0, max=2**31 - 1)
MAX_ENUMERATED = 20  # features up to which kernel_shap may score every coalition (2^20 rows)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coalition_scores(ctx: Context, masks: torch.Tensor, coalitions: list[torch.Tensor],
                     baselines) -> list[torch.Tensor]:
    """f(z) for every coalition z (row) of ``coalitions[i]`` (M_i×K_i bool) of image i: the
    target logit of image i with the features outside z set to the baseline. One progress unit
    per row."""
    x, target = ctx.inputs, ctx.target
    widest = max(z.shape[1] for z in coalitions)
    rows = torch.cat([torch.nn.functional.pad(z, (0, widest - z.shape[1])) for z in coalitions])
    image = torch.cat([torch.full((len(z),), i, dtype=torch.long) for i, z in enumerate(coalitions)])
    rows, image = rows.to(x.device), image.to(x.device)
    base = expand_baseline(baselines, x)
    flat = masks.flatten(1)  # N × (c·H·W) feature ids
    shape = (-1,) + tuple(masks.shape[1:])
    scores = torch.empty(len(rows), device=x.device)
    with ctx.scorer() as score:
        for s in ctx.chunks(len(rows), grad=False):
            i = image[s]
            kept = rows[s].gather(1, flat[i]).view(shape)
            scores[s] = score(torch.where(kept, x[i], base[i]), target[i])
    return list(scores.double().cpu().split([len(z) for z in coalitions]))


def painted(values: list[torch.Tensor], masks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The map: each element of image i gets values[i] at its feature, over all channels."""
    out = torch.stack([v.to(x.device, torch.float32)[m] for v, m in zip(values, masks)])
    return out.expand_as(x).contiguous()


class SurrogateMethod(PerturbationMethod):
    """Shared parameters and the frame of a call: masks, coalitions, scores, values, map."""

    def run(self, ctx: Context, p: dict) -> torch.Tensor:
        masks = feature_masks(ctx.inputs, p)
        counts = [int(m.max()) + 1 for m in masks]
        ctx.info["features"] = counts
        coalitions = [self.coalitions(k, p) for k in counts]
        # The cost counted n_segments features per image; SLIC finds about as many: the
        # progress total becomes the passes actually made.
        planned = self.cost(p, Facts(tuple(ctx.inputs.shape[1:]))).forward * len(counts)
        ctx.total += sum(len(z) for z, _ in coalitions) - planned
        scores = coalition_scores(ctx, masks, [z for z, _ in coalitions], p["baselines"])
        values = [self.values(z, f, extra, p) for (z, extra), f in zip(coalitions, scores)]
        return painted(values, masks, ctx.inputs)

    def coalitions(self, k: int, p: dict) -> tuple[torch.Tensor, object]:
        """The rows to score for an image of ``k`` features, and what :meth:`values` needs."""
        raise NotImplementedError

    def values(self, z: torch.Tensor, f: torch.Tensor, extra, p: dict) -> torch.Tensor:
        """One value per feature from the coalitions ``z`` and their scores ``f`` (float64)."""
        raise NotImplementedError


# --------------------------------------------------------------------------- Kernel SHAP


def shapley_kernel(k: int, size: torch.Tensor) -> torch.Tensor:
    """The Shapley kernel weight of a coalition of ``size`` of ``k`` features (0 < size < k)."""
    size = size.double()
    choose = torch.lgamma(torch.tensor(k + 1.0, dtype=torch.float64)) - torch.lgamma(size + 1) \
        - torch.lgamma(k - size + 1)
    return (k - 1) / (torch.exp(choose) * size * (k - size))


def all_coalitions(k: int) -> torch.Tensor:
    """Every coalition of ``k`` features but the empty and the full one, (2^k - 2)×k bool."""
    codes = torch.arange(1, 2**k - 1)
    return (codes.unsqueeze(1) >> torch.arange(k)) & 1 == 1


def kernel_draws(k: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` coalitions drawn from the Shapley kernel (a size with probability proportional
    to its total weight, then that many features at random), in pairs with their complements
    (the kernel is symmetric), count×k bool."""
    sizes = torch.arange(1, k)
    size_weight = (k - 1) / (sizes * (k - sizes)).double()
    half = (count + 1) // 2
    drawn = sizes[torch.multinomial(size_weight, half, replacement=True, generator=gen)]
    order = torch.rand(half, k, generator=gen).argsort(dim=1)
    z = torch.zeros(half, k, dtype=torch.bool)
    z.scatter_(1, order, torch.arange(k).expand(half, k) < drawn.unsqueeze(1))
    return torch.cat([z, ~z])[:count] if count > half else z


def constrained_fit(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, total: float) -> torch.Tensor:
    """φ minimising Σ w_i (y_i - z_i·φ)² subject to Σφ = total (the last feature eliminated:
    φ_K = total - Σ_{j<K} φ_j); the least-norm solution where the rows do not fix φ."""
    if z.shape[1] == 1:  # one feature takes the whole difference
        return torch.tensor([total], dtype=torch.float64)
    z = z.double()
    a = z[:, :-1] - z[:, -1:]
    b = y - z[:, -1] * total
    root = w.sqrt().unsqueeze(1)
    head = torch.linalg.lstsq(a * root, b.unsqueeze(1) * root, driver="gelsd").solution.squeeze(1)
    return torch.cat([head, (total - head.sum()).view(1)])


def kernel_shap_rows(k: int, n_samples: int) -> int:
    """Coalitions Kernel SHAP scores besides the empty and the full one."""
    every = 2**k - 2 if k <= MAX_ENUMERATED else math.inf
    return int(min(every, n_samples))


@registry.register
class KernelShap(SurrogateMethod):
    id = "kernel_shap"
    label = "Kernel SHAP"
    description = "Shapley values of superpixels (or patches), estimated by a weighted linear " \
                  "fit to the scores of random coalitions; the values add up to f(x) - " \
                  "f(baseline). With enough samples for every coalition of a small mask, exact."
    params = (
        Param("n_samples", "int", 200, "Coalitions to score. At least 2^K - 2 for K features "
              "scores every coalition: the exact Shapley values.", min=1, max=100_000),
        SEED_PARAM,
        BASELINES_PARAM,
        *segment_params("slic"),
        PRECISION_PARAM,
    )

    def cost(self, p: dict, facts: Facts) -> Cost:
        return Cost(2 + kernel_shap_rows(feature_count(p, facts.shape), p["n_samples"]), 0)

    def coalitions(self, k: int, p: dict):
        ends = torch.stack([torch.ones(k, dtype=torch.bool), torch.zeros(k, dtype=torch.bool)])
        count = kernel_shap_rows(k, p["n_samples"])
        if count == 2**k - 2:  # every coalition, each with its kernel weight
            z = all_coalitions(k)
            weights = shapley_kernel(k, z.sum(1))
        else:  # drawn from the kernel: equal weights
            z = kernel_draws(k, count, _generator(p["seed"]))
            weights = torch.ones(count, dtype=torch.float64)
        return torch.cat([ends, z]), weights

    def values(self, z, f, weights, p):
        full, empty = float(f[0]), float(f[1])
        return constrained_fit(z[2:], f[2:] - empty, weights, full - empty)


# --------------------------------------------------------------------------- LIME


def cosine_distance_to_all(z: torch.Tensor) -> torch.Tensor:
    """1 - cos(z, 1) for binary rows z: 1 - sqrt(|z| / K); 1 for the empty coalition."""
    return 1 - (z.double().sum(1) / z.shape[1]).sqrt()


def _ridge(zc: torch.Tensor, yc: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    root = w.sqrt().unsqueeze(1)
    a, b = zc * root, yc * root.squeeze(1)
    if alpha > 0:  # ridge as least squares on rows stacked with sqrt(alpha)·I
        k = zc.shape[1]
        a = torch.cat([a, math.sqrt(alpha) * torch.eye(k, dtype=torch.float64)])
        b = torch.cat([b, torch.zeros(k, dtype=torch.float64)])
    return torch.linalg.lstsq(a, b.unsqueeze(1), driver="gelsd").solution.squeeze(1)


@registry.register
class Lime(SurrogateMethod):
    id = "lime"
    label = "LIME"
    description = "Fits a weighted linear model to the scores of random coalitions of " \
                  "superpixels (or patches), nearby coalitions weighing more; each feature's " \
                  "coefficient is its value. One forward pass per sample."
    params = (
        Param("n_samples", "int", 200, "Random coalitions to score (each feature kept with "
              "probability 1/2).", min=1, max=100_000),
        Param("kernel_width", "float", 1.0, "Width of the exponential kernel exp(-d²/width²) "
              "on the cosine distance d between a coalition and the whole image.",
              min=0.01, max=100.0),
        Param("alpha", "float", 1.0, "Ridge penalty of the linear fit (0: plain weighted "
              "least squares).", min=0.0, max=1e6),
        SEED_PARAM,
        BASELINES_PARAM,
        *segment_params("slic"),
        PRECISION_PARAM,
    )

    def cost(self, p: dict, facts: Facts) -> Cost:
        return Cost(p["n_samples"], 0)

    def coalitions(self, k: int, p: dict):
        z = torch.rand(p["n_samples"], k, generator=_generator(p["seed"])) < 0.5
        d = cosine_distance_to_all(z)
        return z, torch.exp(-d**2 / p["kernel_width"]**2)

    def values(self, z, f, weights, p):
        return weighted_ridge(z, f, weights, p["alpha"])


def weighted_ridge(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """β of the fit y ≈ c + z·β minimising Σ w (y - c - z·β)² + alpha |β|² (the intercept c
    unpenalised, as in scikit-learn's Ridge with sample weights)."""
    z = z.double()
    mean_z = (w.unsqueeze(1) * z).sum(0) / w.sum()
    mean_y = (w * y).sum() / w.sum()
    return _ridge(z - mean_z, y - mean_y, w, alpha)


# --------------------------------------------------------------------------- Shapley sampling


@registry.register
class ShapleySampling(SurrogateMethod):
    id = "shapley_sampling"
    label = "Shapley value sampling"
    description = "Shapley values of superpixels (or patches) averaged over random orders: " \
                  "features are added one at a time and each gets the score it adds. " \
                  "About K forward passes per order, for K features."
    params = (
        Param("n_samples", "int", 4, "Random orders of the features to walk (each costs one "
              "forward pass per feature but the last).", min=1, max=10_000),
        SEED_PARAM,
        BASELINES_PARAM,
        *segment_params("slic"),
        PRECISION_PARAM,
    )

    def cost(self, p: dict, facts: Facts) -> Cost:
        return Cost(2 + p["n_samples"] * (feature_count(p, facts.shape) - 1), 0)

    def coalitions(self, k: int, p: dict):
        gen = _generator(p["seed"])
        orders = torch.stack([torch.randperm(k, generator=gen) for _ in range(p["n_samples"])])
        # Row 1 + j·(k-1) + s: the first s+1 features of order j (s < k-1); the full set is
        # row 0 and the empty set row 1, scored once for all orders.
        rank = orders.argsort(dim=1)  # rank[j, f]: position of feature f in order j
        steps = torch.arange(k - 1).view(1, -1, 1)
        prefixes = (rank.unsqueeze(1) <= steps).reshape(-1, k)
        ends = torch.stack([torch.ones(k, dtype=torch.bool), torch.zeros(k, dtype=torch.bool)])
        return torch.cat([ends, prefixes]), orders

    def values(self, z, f, orders, p):
        n, k = orders.shape
        walk = torch.cat([f[1].expand(n, 1), f[2:].view(n, k - 1), f[0].expand(n, 1)], dim=1)
        gains = walk.diff(dim=1)  # gains[j, s]: what the (s+1)-th feature of order j adds
        out = torch.zeros(k, dtype=torch.float64)
        out.index_add_(0, orders.flatten(), gains.flatten())
        return out / n
