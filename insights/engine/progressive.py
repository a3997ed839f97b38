"""Coarse-to-fine order for window methods, and the partial maps it makes possible.

Occlusion scores one window position per forward pass; the map is only defined once every
position is scored. Scored in a coarse-to-fine order instead of row by row, the positions scored
so far already describe the whole image after a small share of the work: the first stage takes
every ``2^L``-th position along each axis (and the last one, which reaches the border), each
further stage halves that spacing, and the last stage takes the rest. The final map is computed
from the same differences as in row-by-row order, so only the order of the passes changes.

A partial map is made from the positions scored so far: where they cover a pixel, the mean of
their differences (as the final map does with all of them); where none covers it yet, a mean of
the scored differences weighted by a Gaussian of the distance to each window's centre, so the
first map already has a value at every pixel.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

FIRST_STAGE_POINTS = 3  # the first stage takes at least this many positions along each long axis


def axis_levels(count: int) -> torch.Tensor:
    """The stage (0 = first) at which each of ``count`` positions along one axis is scored:
    stage s takes the multiples of ``2^(L - s)`` (and the last position), where ``2^L`` is the
    largest spacing that still leaves :data:`FIRST_STAGE_POINTS` positions in stage 0."""
    if count <= FIRST_STAGE_POINTS:
        return torch.zeros(count, dtype=torch.long)
    top = int(math.floor(math.log2((count - 1) / (FIRST_STAGE_POINTS - 1))))
    index = torch.arange(count)
    level = torch.empty(count, dtype=torch.long)
    for s in range(top + 1):  # fine spacings first: a coarser one overwrites them
        level[index % (2 ** s) == 0] = top - s
    level[-1] = 0
    return level


def coarse_to_fine(counts: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """The window indices (row-major over ``counts``, one count per axis) in coarse-to-fine
    order, and the number of windows in each stage. A window's stage is the latest of its axes'
    stages; within a stage, row-major order."""
    levels = [axis_levels(c) for c in counts]
    grid = levels[0].view(-1, 1, 1)
    grid = torch.maximum(grid, levels[1].view(1, -1, 1))
    grid = torch.maximum(grid, levels[2].view(1, 1, -1)).flatten()
    order = torch.sort(grid, stable=True).indices
    sizes = torch.bincount(grid).tolist()
    return order, [s for s in sizes if s]


def window_centres(mask: torch.Tensor) -> torch.Tensor:
    """The centre of each window (K×size boolean mask along one axis), in elements."""
    index = torch.arange(mask.shape[1], dtype=torch.float32, device=mask.device)
    m = mask.float()
    return (m * index).sum(1) / m.sum(1)


def falloff(mask: torch.Tensor, width: float) -> torch.Tensor:
    """K×size weights exp(-d² / 2 width²), d the distance of each element to window k's centre."""
    index = torch.arange(mask.shape[1], dtype=torch.float32, device=mask.device)
    d = index.view(1, -1) - window_centres(mask).view(-1, 1)
    return torch.exp(-d ** 2 / (2 * max(width, 1.0) ** 2))


def partial_map(diffs: torch.Tensor, scored: torch.Tensor, masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """The map from the windows scored so far. ``diffs``: N×Kc×Kh×Kw differences (any value
    where not scored), ``scored``: Kc×Kh×Kw booleans, ``masks``: the per-axis window masks.
    Covered elements get the mean difference of the scored windows covering them; the others a
    Gaussian-weighted mean (width: the spacing of the scored windows along each axis)."""
    e = scored.to(diffs.dtype)
    d = diffs * e
    mc, mh, mw = (m.to(diffs.dtype) for m in masks)
    summed = torch.einsum("nabc,ai,bj,ck->nijk", d, mc, mh, mw)
    covered = torch.einsum("abc,ai,bj,ck->ijk", e, mc, mh, mw)
    if bool((covered > 0).all()):
        return summed / covered
    seen = [max(1, int(scored.any(dim=tuple(j for j in range(3) if j != axis)).sum())) for axis in range(3)]
    widths = [m.shape[1] / n for m, n in zip(masks, seen)]  # the scored windows' spacing
    gc, gh, gw = (falloff(m, w).to(diffs.dtype) for m, w in zip(masks, widths))
    near = torch.einsum("nabc,ai,bj,ck->nijk", d, gc, gh, gw)
    weight = torch.einsum("abc,ai,bj,ck->ijk", e, gc, gh, gw)
    filled = near / weight.clamp_min(torch.finfo(diffs.dtype).tiny)
    return torch.where(covered > 0, summed / covered.clamp_min(1), filled)
