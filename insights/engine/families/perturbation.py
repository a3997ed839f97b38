"""Perturbation methods: occlusion and feature ablation.

Both replace part of the image by a baseline and measure how much the target score drops:
``f(x) - f(x with the part replaced)``. They need no gradients, only forward passes, which run
in batches under the memory budget, under ``torch.inference_mode``, in channels-last layout
(faster convolutions on CPU and GPU), optionally in bfloat16 (``precision="bf16"``: about twice
as fast on CPUs with bf16 support and on GPUs, close to but not exactly the fp32 map).

The maths match Captum's ``Occlusion`` and ``FeatureAblation``: windows that run past the border
are clipped, and an element covered by several windows gets the mean of their differences.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

from .. import registry
from ..base import (PRECISION_PARAM, Context, Cost, Method, Param, ParamError, add_rows,
                   expand_baseline)
from ..fast import graphs
from ..fast.fused import fused_for
from ..fast.slices import sliced_for
from ..fast.twin import twin

BASELINES_PARAM = Param("baselines", "float", 0.0, "Value that replaces the occluded pixels, in "
                        "normalised input units (0 is the dataset mean). Python callers may pass "
                        "a tensor broadcastable to the input.", tensor_ok=True)


@contextmanager
def scoring(model: nn.Module, sample: torch.Tensor):
    """Yields ``score(x, target)``: the target logit of each row of a batch, in fp32, computed
    without autograd, in channels-last layout and by the model's twin (batch norms folded into
    the convolutions) where it has one; on a GPU the twin's batches are replayed CUDA graphs
    (``graphs.py``), and bf16 batches run its fused copy (``fused.py``); on the CPU its
    high-resolution layers run in cache-sized slices of each batch (``slices.py``). The arithmetic (true
    fp32, or bf16 autocast for ``precision="bf16"``) is the one :func:`insights.attribute` set
    for the whole call, so weights are cast to bf16 once for all batches."""
    fast = twin(model, sample)
    net = fast.module if fast is not None else model
    name = "score"
    fused = fused_for(fast, sample) if fast is not None else None
    if fused is not None:
        net, name = fused, "score-fused"
    sliced = sliced_for(fast, sample) if fast is not None else None
    if sliced is not None:
        net = sliced

    def logits_at(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = net(x)
        # Differences of scores are taken in fp32 in both modes.
        return logits.gather(1, target.view(-1, 1).to(logits.device)).squeeze(1).float()

    def score(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return graphs.replayed(fast.graphs if fast is not None else None, name, logits_at, x,
                        target.to(x.device))

    # No autograd either way; but in bf16, autocast keeps its bf16 copies of the weights for
    # the whole call only outside inference mode (inside it, every batch cast them again).
    bf16 = torch.is_autocast_enabled(sample.device.type)
    with torch.no_grad() if bf16 else torch.inference_mode():
        yield score


class PerturbationMethod(Method):
    family = "perturbation"

    def signed(self, p: dict) -> bool:
        return True


# --------------------------------------------------------------------------- occlusion


def window_masks(size: int, window: int, stride: int, device: torch.device) -> torch.Tensor:
    """K×size boolean masks of the window positions along one axis: starts at 0, stride, ...,
    as many as needed to reach the end (ceil((size - window) / stride) + 1), the last one
    clipped at the border."""
    count = math.ceil((size - window) / stride) + 1
    starts = torch.arange(count, device=device).unsqueeze(1) * stride
    index = torch.arange(size, device=device).unsqueeze(0)
    return (index >= starts) & (index < starts + window)


def check_windows(windows: Sequence[int], strides: Sequence[int], shape: Sequence[int]) -> None:
    """Raises ParamError unless each window fits the input and strides leave no gaps."""
    for axis, (w, s, d) in enumerate(zip(windows, strides, shape)):
        if w > d:
            raise ParamError("sliding_window_shapes", f"window {tuple(windows)} is larger than the "
                             f"input {tuple(shape)} along axis {axis}")
        if s > w and w < d:
            raise ParamError("strides", f"stride {s} is larger than the window {w} along axis "
                             f"{axis}: some pixels would never be occluded")


def positions(windows: Sequence[int], strides: Sequence[int], shape: Sequence[int]) -> int:
    check_windows(windows, strides, shape)
    return math.prod(math.ceil((d - w) / s) + 1 for w, s, d in zip(windows, strides, shape))


def _paste_windows(x: torch.Tensor, base: torch.Tensor, sample: torch.Tensor, index, windows,
                   strides) -> torch.Tensor:
    """Row i: image sample[i] with window (kc[i], kh[i], kw[i]) set to the baseline. A copy of
    the images and one small slice copy per row: on the CPU 6x faster than a masked select over
    the whole batch (1.6 against 9.8 ms for 32 ResNet inputs)."""
    cl = torch.channels_last
    batch = (x.expand((len(sample),) + tuple(x.shape[1:])) if x.shape[0] == 1
             else x[sample]).contiguous(memory_format=cl)
    for i, (s, *k) in enumerate(zip(sample.tolist(), *(t.tolist() for t in index))):
        area = tuple(slice(j * step, j * step + w) for j, step, w in zip(k, strides, windows))
        batch[(i,) + area] = base[(s,) + area]
    return batch


def _masked_batch(x: torch.Tensor, base: torch.Tensor, sample: torch.Tensor, masks, index,
                  every_channel: bool) -> torch.Tensor:
    """The same batch as :func:`_paste_windows`, built by one masked select from the per-axis
    window masks, in channels-last order (N, H, W, C in memory)."""
    kc, kh, kw = index
    shape = (len(sample),) + tuple(x.shape[1:])
    hidden = (masks[1][kh][:, :, None] & masks[2][kw][:, None, :]).unsqueeze(3)  # B×H×W×1
    if not every_channel:
        hidden = hidden & masks[0][kc][:, None, None, :]
    hidden = hidden.expand(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
    if x.shape[0] == 1:  # one image: broadcast it instead of gathering copies
        return torch.where(hidden, base.expand(shape), x.expand(shape))
    return torch.where(hidden, base[sample], x[sample])


def occlude(ctx: Context, windows: Sequence[int], strides: Sequence[int], baselines) -> torch.Tensor:
    """Mean over the windows covering each element of f(x) - f(x with the window set to the
    baseline), at the target class. One forward pass per window position plus the clean one."""
    x, target = ctx.inputs, ctx.target
    n = x.shape[0]
    check_windows(windows, strides, x.shape[1:])
    masks = [window_masks(d, w, s, x.device) for d, w, s in zip(x.shape[1:], windows, strides)]
    counts = [m.shape[0] for m in masks]
    total = math.prod(counts)
    # Batches are built in channels-last order (N, H, W, C in memory), the layout the model
    # runs in, so that no batch is copied again to change layout.
    cl = torch.channels_last
    base = expand_baseline(baselines, x).contiguous(memory_format=cl)
    x = x.contiguous(memory_format=cl)
    diffs = torch.empty(total * n, device=x.device)  # row r: window r // n, sample r % n
    every_channel = bool(masks[0].all())  # windows through all channels (the usual case)
    # Replayed CUDA graphs are recorded per batch shape: a shorter last batch is padded with
    # copies of its last row (whose scores are dropped) to the first batch's size.
    pad = graphs.active(x.device)
    size = None
    with scoring(ctx.model, x) as score:
        clean = score(x, target)
        ctx.advance(n)
        for s in ctx.chunks(total * n, grad=False):
            rows = torch.arange(s.start, s.stop, device=x.device)
            size = size or len(rows)
            if pad and len(rows) < size:
                rows = torch.cat([rows, rows[-1:].expand(size - len(rows))])
            window, sample = rows // n, rows % n
            kc, rest = window // (counts[1] * counts[2]), window % (counts[1] * counts[2])
            kh, kw = rest // counts[2], rest % counts[2]
            if x.device.type == "cpu":
                batch = _paste_windows(x, base, sample, (kc, kh, kw), windows, strides)
            else:  # one kernel for the whole batch (row-by-row copies would be launch-bound)
                batch = _masked_batch(x, base, sample, masks, (kc, kh, kw), every_channel)
            diffs[s] = (clean[sample] - score(batch, target[sample]))[: s.stop - s.start]

    # The map is separable: sum over windows of diff × (mask_c ⊗ mask_h ⊗ mask_w), divided by
    # the number of windows covering each element, itself an outer product of per-axis counts.
    d = diffs.view(total, n).t().reshape(n, *counts)
    mc, mh, mw = (m.to(d.dtype) for m in masks)
    summed = torch.einsum("nabc,ai,bj,ck->nijk", d, mc, mh, mw)
    covered = torch.einsum("i,j,k->ijk", mc.sum(0), mh.sum(0), mw.sum(0))
    return summed / covered


@registry.register
class Occlusion(PerturbationMethod):
    id = "occlusion"
    label = "Occlusion"
    description = "Slides a grey window over the image and records how much the class score " \
                  "drops at each position. Model-agnostic; one forward pass per position."
    params = (
        Param("sliding_window_shapes", "int_list", (3, 32, 32), "Window size as channels, "
              "height, width.", min=1, length=3),
        Param("strides", "int_list", (3, 16, 16), "Step between windows as channels, height, "
              "width; at most the window size.", min=1, length=3),
        BASELINES_PARAM,
        PRECISION_PARAM,
    )

    def cost(self, p: dict, shape: Sequence[int]) -> Cost:
        return Cost(positions(p["sliding_window_shapes"], p["strides"], shape) + 1, 0)

    def run(self, ctx: Context, p: dict) -> torch.Tensor:
        return occlude(ctx, p["sliding_window_shapes"], p["strides"], p["baselines"])


# --------------------------------------------------------------------------- feature ablation


def expand_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The feature mask as an integer tensor shaped like ``x`` (or ParamError)."""
    if mask.is_floating_point() or mask.is_complex() or mask.dtype == torch.bool:
        raise ParamError("feature_mask", f"must be an integer tensor, got {mask.dtype}")
    try:
        return mask.to(x.device, torch.long).expand_as(x)
    except RuntimeError:
        raise ParamError("feature_mask", f"shape {tuple(mask.shape)} does not broadcast to "
                         f"{tuple(x.shape)}") from None


def ablate_features(ctx: Context, mask: torch.Tensor, baselines) -> torch.Tensor:
    """For each element: f(x) - f(x with every element of its feature set to the baseline)."""
    x, target = ctx.inputs, ctx.target
    n = x.shape[0]
    mask = expand_mask(mask, x)
    ids = torch.unique(mask)
    base = expand_baseline(baselines, x)
    out = torch.zeros_like(x, dtype=torch.float32)
    with scoring(ctx.model, x) as score:
        clean = score(x, target)
        ctx.advance(n)
        for s in ctx.chunks(ids.numel() * n, grad=False):
            rows = torch.arange(s.start, s.stop, device=x.device)
            feature, sample = ids[rows // n], rows % n
            hidden = mask[sample] == feature.view(-1, 1, 1, 1)
            batch = torch.where(hidden, base[sample], x[sample])
            diff = clean[sample] - score(batch, target[sample])
            add_rows(out, sample, diff.view(-1, 1, 1, 1) * hidden)
    return out


@registry.register
class FeatureAblation(PerturbationMethod):
    id = "feature_ablation"
    label = "Feature ablation"
    description = "Replaces each square patch (or each feature of a given mask) by the baseline " \
                  "and records the score drop for all its pixels. One forward pass per patch."
    params = (
        Param("patch_size", "int", 16, "Side of the square patches (shared by all channels).",
              min=1, max=4096),
        Param("feature_mask", "tensor", None, "Python only: an integer tensor broadcastable to "
              "the input; elements with the same value form one feature. Replaces the patch grid."),
        BASELINES_PARAM,
        PRECISION_PARAM,
    )

    def cost(self, p: dict, shape: Sequence[int]) -> Cost:
        if p["feature_mask"] is not None:
            return Cost(int(torch.unique(p["feature_mask"]).numel()) + 1, 0)
        return Cost(math.prod(math.ceil(d / p["patch_size"]) for d in shape[1:]) + 1, 0)

    def run(self, ctx: Context, p: dict) -> torch.Tensor:
        if p["feature_mask"] is not None:
            return ablate_features(ctx, p["feature_mask"], p["baselines"])
        # A grid of non-overlapping patches through all channels is occlusion with the window
        # equal to its stride; clipped border patches are the grid's partial cells.
        c, h, w = ctx.inputs.shape[1:]
        size = p["patch_size"]
        window = (c, min(size, h), min(size, w))
        return occlude(ctx, window, window, p["baselines"])
