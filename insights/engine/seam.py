"""The seam between the methods and the speed machinery in ``fast/``.

Methods ask the context for two kinds of passes: the scores of batches of perturbed inputs
(:func:`scorer`: occlusion, feature ablation) and input gradients summed along straight paths
(:func:`path_gradients`: integrated gradients). Each has a plain reference implementation, the
model itself under inference mode or plain autograd (:func:`plain_scorer`,
:func:`plain_path_gradients`), and the fast paths are chosen here and nowhere else:

* ``twin``: the model's traced copy with batch norms folded (``fast/twin.py``);
* ``stem``: integrated gradients with the twin's affine first layer taken out of the loop;
* ``cuda_graphs``: the twin's batches replayed as recorded CUDA graphs (``fast/graphs.py``);
* ``cuda_fused``: bf16 GPU scoring with fused convolution + bias + ReLU (``fast/fused.py``);
* ``cpu_slices``: CPU scoring with the early layers run in cache-sized slices (``fast/slices.py``).

Each is allowed by :class:`~insights.engine.options.EngineOptions` and declines by itself where
it might not compute the same function; ``info["fast_paths"]`` of the call says, for each, "used"
or "declined: <why>" (and the ``insights.engine`` logger says so at debug level).
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
from torch import nn

from .fast import graphs
from .fast.fused import fused_for
from .fast.slices import sliced_for
from .fast.twin import Twin, find_twin
from .budget import default_budget
from .passes import add_rows, gradient

if TYPE_CHECKING:
    from .context import Context

CL = torch.channels_last
Score = Callable[..., torch.Tensor]  # score(x, target, pad=True)


# --------------------------------------------------------------------------- choices


def twin_for(ctx: Context) -> Twin | None:
    """The model's twin for this call, or None (the reason noted)."""
    found = find_twin(ctx.model, ctx.inputs) if ctx.options.twin else "off (EngineOptions.twin)"
    if isinstance(found, Twin):
        ctx.note("twin", "used")
        return found
    ctx.note("twin", "declined: " + found)
    return None


def _graph_cache(ctx: Context, fast: Twin | None) -> graphs.GraphCache | None:
    """The twin's CUDA graphs when batches may be replayed, else None (the reason noted)."""
    why = ("off (EngineOptions.cuda_graphs)" if not ctx.options.cuda_graphs
           else "no twin" if fast is None else graphs.unavailable(ctx.device))
    if why:
        ctx.note("cuda_graphs", "declined: " + why)
        return None
    return fast.graphs


def _replayed(ctx: Context, cache: graphs.GraphCache | None, name: str, fn: Callable) -> Callable:
    """``fn``, run as replays of recorded CUDA graphs when ``cache`` is given."""
    if cache is None:
        return fn
    note = functools.partial(ctx.note, "cuda_graphs")
    return lambda *inputs: graphs.replayed(cache, name, fn, *inputs, note=note)


def _copy_for(ctx: Context, fast: Twin, path: str, misfit: str | None, build: Callable) -> nn.Module | None:
    """The twin's copy for fast path ``path`` (an :class:`EngineOptions` field), made by
    ``build(fast, sample)`` once per twin; or None, noting why: the options turn it off, the call
    does not fit it (``misfit``), or it could not be built."""
    if not getattr(ctx.options, path):
        why = f"off (EngineOptions.{path})"
    elif misfit:
        why = misfit
    else:
        module = build(fast, ctx.inputs)
        if module is not None:
            ctx.note(path, "used")
            return module
        why = fast.reasons.get(path, "not built")
    ctx.note(path, "declined: " + why)
    return None


def _stem_fits(ctx: Context, fast: Twin, x: torch.Tensor) -> bool:
    """Whether the twin has a stem and three stem outputs per row (start, step, summed
    gradient) fit in a quarter of the memory budget (the reason noted when not)."""
    if fast.stem is None:
        ctx.note("stem", "declined: " + fast.reasons.get("stem", "no stem"))
        return False
    shape = tuple(x.shape[1:])
    if shape not in fast.stem_sizes:
        with torch.no_grad():
            fast.stem_sizes[shape] = fast.stem(x[:1]).numel()
    per_row = fast.stem_sizes[shape] * x.element_size()
    if 3 * per_row * x.shape[0] > (ctx.memory_budget or default_budget(ctx.device)) / 4:
        ctx.note("stem", "declined: the stem's outputs would take over a quarter of the memory budget")
        return False
    ctx.note("stem", "used")
    return True


# --------------------------------------------------------------------------- scores


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """Batches run in channels-last layout: faster convolutions on CPU and GPU."""
    return x.contiguous(memory_format=CL) if x.dim() == 4 else x


def _scores_of(net: Callable) -> Score:
    def logits_at(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = net(x)
        # Differences of scores are taken in fp32 in both modes.
        return logits.gather(1, target.view(-1, 1).to(logits.device)).squeeze(1).float()
    return logits_at


@contextmanager
def _no_autograd(device: torch.device) -> Iterator[None]:
    # No autograd either way; but in bf16, autocast keeps its bf16 copies of the weights for
    # the whole call only outside inference mode (inside it, every batch cast them again).
    with torch.no_grad() if torch.is_autocast_enabled(device.type) else torch.inference_mode():
        yield


def logits(model: nn.Module, x: torch.Tensor, twin_allowed: bool = True) -> tuple[torch.Tensor, str]:
    """A batch's logits with no hooks and no autograd: on the model's twin where it fits (about
    twice as fast on the CPU), else the model itself; and "twin" or why the model ran."""
    found = find_twin(model, x[:1]) if twin_allowed else "off (EngineOptions.twin)"
    with torch.inference_mode():
        if isinstance(found, Twin):
            return found.module(_channels_last(x)), "twin"
        return model(x), found


@contextmanager
def plain_scorer(ctx: Context) -> Iterator[Score]:
    """The reference for :func:`scorer`: the model itself on each batch."""
    logits_at = _scores_of(ctx.model)
    with _no_autograd(ctx.device):
        yield lambda x, target, pad=True: logits_at(_channels_last(x), target.to(x.device))


@contextmanager
def scorer(ctx: Context) -> Iterator[Score]:
    """Yields ``score(x, target, pad=True)``: the target logit of each row of a batch, in fp32,
    without autograd, in channels-last layout; by the twin where the model has one, its batches
    replayed as CUDA graphs on a GPU (shorter batches padded to the widest padded batch so far,
    one recording per shape; ``pad=False`` for a batch of another kind, such as the clean pass), its fused bf16 copy for bf16 on a GPU, its sliced copy on the CPU. The arithmetic
    (true fp32, or bf16 autocast) is the one :func:`insights.attribute` set for the whole call,
    so weights are cast to bf16 once for all batches."""
    fast = twin_for(ctx)
    if fast is None:
        _graph_cache(ctx, None)
        ctx.note("cuda_fused", "declined: no twin")
        ctx.note("cpu_slices", "declined: no twin")
        with plain_scorer(ctx) as score:
            yield score
        return
    bf16 = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
    fused = _copy_for(ctx, fast, "cuda_fused", None if ctx.device.type == "cuda" and bf16
                      else "only for bf16 on a GPU", fused_for)
    sliced = _copy_for(ctx, fast, "cpu_slices", None if ctx.device.type == "cpu"
                       else "only on the CPU", sliced_for)
    cache = _graph_cache(ctx, fast)
    net = sliced if sliced is not None else fused if fused is not None else fast.module
    run = _replayed(ctx, cache, "score-fused" if fused is not None else "score", _scores_of(net))
    widest = 0  # the widest padded batch so far: the budget's chunk, not the clean pass

    def score(x: torch.Tensor, target: torch.Tensor, pad: bool = True) -> torch.Tensor:
        nonlocal widest
        rows, target = x.shape[0], target.to(x.device)
        if pad and cache is not None and rows < widest:  # copies of the last row, scores dropped
            x = torch.cat([x, x[-1:].expand((widest - rows,) + tuple(x.shape[1:]))])
            target = torch.cat([target, target[-1:].expand(widest - rows)])
        if pad:
            widest = max(widest, rows)
        return run(_channels_last(x), target)[:rows]

    with _no_autograd(ctx.device):
        yield score


# --------------------------------------------------------------------------- path gradients


def _weighted_gradient(net: Callable, start: torch.Tensor, span: torch.Tensor, a: torch.Tensor,
                       w: torch.Tensor, target: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """w[i] × the gradient of ``net``'s target logit at start[row[i]] + a[i] span[row[i]], for
    the rows i of one batch of path points. On a GPU the rows are then summed per image (the
    result is images × ...) inside the same CUDA graph; on the CPU they are returned as they
    are and :func:`_summed` adds them up (one add per row is fastest there)."""
    view = (-1,) + (1,) * (start.dim() - 1)
    if start.shape[0] == 1:  # broadcast rather than gather copies of the one image's tensors
        point = torch.addcmul(start, a.view(view), span)
    else:
        point = torch.addcmul(start[row], a.view(view), span[row])
    grad = gradient(net, point.contiguous(memory_format=CL), target)
    grad.mul_(w.view(view))
    if grad.device.type == "cpu":
        return grad
    if start.shape[0] == 1:
        return grad.sum(0, keepdim=True)
    return torch.zeros_like(start).index_add_(0, row, grad)


def _summed(ctx: Context, net: Callable, cache: graphs.GraphCache | None, name: str,
            start: torch.Tensor, span: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor,
            target: torch.Tensor) -> torch.Tensor:
    """Sum over k of weight[k] × the gradient of ``net`` at start + alpha[k] span, per row.
    Step-major rows (all images at alpha 0, then at alpha 1, ...), built chunk by chunk so that
    only one chunk of path points is ever in memory."""
    rows = start.shape[0]
    total = torch.zeros_like(start)
    part = _replayed(ctx, cache, name, functools.partial(_weighted_gradient, net))
    for s in ctx.chunks(rows * alpha.numel(), grad=True):
        index = torch.arange(s.start, s.stop, device=start.device)
        k, row = index // rows, index % rows
        got = part(start, span, alpha[k], weight[k], target[row], row)
        if total.device.type != "cpu":
            total += got
        else:
            add_rows(total, row, got)
    return total


def _steps(end: torch.Tensor, alphas: Sequence[float], weights: Sequence[float]):
    alpha = torch.tensor(alphas, dtype=end.dtype, device=end.device)
    weight = torch.tensor(weights, dtype=torch.float32, device=end.device).to(end.dtype)
    return alpha, weight


def plain_path_gradients(ctx: Context, start: torch.Tensor, end: torch.Tensor,
                         alphas: Sequence[float], weights: Sequence[float],
                         target: torch.Tensor) -> torch.Tensor:
    """The reference for :func:`path_gradients`: the model itself under plain autograd."""
    return _summed(ctx, ctx.model, None, "ig", start, end - start, *_steps(end, alphas, weights), target)


def path_gradients(ctx: Context, start: torch.Tensor, end: torch.Tensor, alphas: Sequence[float],
                   weights: Sequence[float], target: torch.Tensor) -> torch.Tensor:
    """For each row i, the sum over k of weights[k] × the gradient of the target logit at
    start[i] + alphas[k] (end[i] - start[i]): through the twin's stem split where it fits,
    else by the twin (replayed as CUDA graphs on a GPU), else by the model itself."""
    fast = twin_for(ctx)
    if fast is None:
        ctx.note("stem", "declined: no twin")
        _graph_cache(ctx, None)
        return plain_path_gradients(ctx, start, end, alphas, weights, target)
    alpha, weight = _steps(end, alphas, weights)
    cache = _graph_cache(ctx, fast)
    if _stem_fits(ctx, fast, end):
        return through_stem(ctx, fast, cache, start, end, alpha, weight, target)
    return _summed(ctx, fast.module, cache, "ig", start, end - start, alpha, weight, target)


def through_stem(ctx: Context, fast: Twin, cache: graphs.GraphCache | None, start: torch.Tensor,
                 end: torch.Tensor, alpha: torch.Tensor, weight: torch.Tensor,
                 target: torch.Tensor) -> torch.Tensor:
    """The same sum, with the twin's affine first layer (the stem) taken out of the loop:
    stem(start + a (end - start)) = stem(start) + a (stem(end) - stem(start)), so the stem runs
    twice instead of once per point; and its gradient is the same at every point, so the
    weighted gradients at its output are summed first and carried back through it once. The
    stem runs in fp32 in both precisions, which keeps the early max-pool's choices exact in
    bf16 mode."""
    kind = end.device.type
    with torch.autocast(kind, enabled=False), torch.no_grad():
        first = fast.stem(start.contiguous(memory_format=CL))
        step = fast.stem(end.contiguous(memory_format=CL)) - first
    total = _summed(ctx, fast.rest, cache, "ig-stem", first, step, alpha, weight, target)
    with torch.autocast(kind, enabled=False), torch.enable_grad():
        at = end.detach().contiguous(memory_format=CL).requires_grad_(True)
        (through,) = torch.autograd.grad(fast.stem(at), at, total)
    return through
