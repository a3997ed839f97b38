"""Coarse-to-fine order for window methods, and the partial maps it makes possible.

Occlusion scores one window position per forward pass; the map is only defined once every
position is scored. Scored in a coarse-to-fine order instead of row by row, the positions scored
so far already describe the whole image after a small share of the work: the first stage takes
every ``2^L``-th position along each axis (and the last one, which reaches the border), each
further stage halves that spacing, and the last stage takes the rest. The final map is computed
from the same differences as in row-by-row order, so only the order of the passes changes.

A partial map is made from the positions scored so far: where they cover a pixel, the mean of
their differences (as the final map does with all of them); where none covers it yet, the
difference of the nearest window of the last complete stage (a coarser grid of tiles), so the
first map, made when the first stage is complete, already has a value at every pixel.
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


def stage_positions(counts: Sequence[int], stage: int) -> list[torch.Tensor]:
    """Per axis, the positions scored once stage ``stage`` is complete (a product set)."""
    return [torch.nonzero(axis_levels(c) <= stage).flatten() for c in counts]


def window_centres(mask: torch.Tensor) -> torch.Tensor:
    """The centre of each window (K×size boolean mask along one axis), in elements."""
    index = torch.arange(mask.shape[1], dtype=torch.float32, device=mask.device)
    m = mask.float()
    return (m * index).sum(1) / m.sum(1)


def nearest_map(diffs: torch.Tensor, masks: Sequence[torch.Tensor], positions: Sequence[torch.Tensor]) -> torch.Tensor:
    """N×C×H×W: each element takes the difference of the window, among the product set
    ``positions`` (per-axis position indices, all scored), whose centre is nearest along each
    axis: tiles like the final map's, on the coarser grid scored so far."""
    picks = []
    for mask, chosen in zip(masks, positions):
        chosen = chosen.to(mask.device)
        centres = window_centres(mask)[chosen]
        index = torch.arange(mask.shape[1], dtype=torch.float32, device=mask.device)
        picks.append(chosen[(index.view(-1, 1) - centres.view(1, -1)).abs().argmin(1)])
    ic, ih, iw = picks
    return diffs[:, ic][:, :, ih][:, :, :, iw]


def partial_map(diffs: torch.Tensor, scored: torch.Tensor, masks: Sequence[torch.Tensor],
                coarse: torch.Tensor) -> torch.Tensor:
    """The map from the windows scored so far. ``diffs``: N×Kc×Kh×Kw differences (zero where not
    scored), ``scored``: Kc×Kh×Kw booleans, ``masks``: the per-axis window masks, ``coarse``: the
    :func:`nearest_map` of the last complete stage. Elements covered by scored windows get their
    mean difference (as the final map does with all windows); the others the coarse map's value."""
    e = scored.to(diffs.dtype)
    mc, mh, mw = (m.to(diffs.dtype) for m in masks)
    summed = torch.einsum("nabc,ai,bj,ck->nijk", diffs * e, mc, mh, mw)
    covered = torch.einsum("abc,ai,bj,ck->ijk", e, mc, mh, mw)
    return torch.where(covered > 0, summed / covered.clamp_min(1), coarse)
