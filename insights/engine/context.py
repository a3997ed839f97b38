"""The context of one attribute() call: the model, inputs and targets, progress and
cancellation, chunking under a memory budget, and the seam to the fast paths."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from . import seam
from .budget import MAX_CHUNK_CPU, MAX_CHUNK_CPU_GRAD, MAX_CHUNK_CUDA, default_budget
from .errors import Cancelled
from .options import EngineOptions
from .passes import gradient
from .probe import probe

log = logging.getLogger("insights.engine")


@dataclass
class Context:
    """Everything one attribute() call needs; methods use its helpers rather than the model.

    Passes that the speed machinery can take over go through :meth:`scorer` and
    :meth:`path_gradients` (see ``seam.py``); :meth:`note` records which fast paths ran."""

    model: nn.Module
    inputs: torch.Tensor  # N×C×H×W, detached
    target: torch.Tensor  # N, long
    total: int = 1  # progress units (per-sample passes) for the whole call
    progress: Callable[[int, int], Any] | None = None
    cancel: Any = None  # threading.Event, or a callable returning bool
    memory_budget: int | None = None
    info: dict = field(default_factory=dict)
    options: EngineOptions = EngineOptions()
    done: int = 0
    # partial(map, fraction, kind): called with a whole-image approximation of the map (N×C×H×W),
    # the share of the work done and what it is ("refining": occlusion's windows scored so far;
    # "preview": a path method's map with a tenth of its steps), by methods that can make one.
    partial: Callable[[torch.Tensor, float, str], Any] | None = None
    partial_every_s: float = 0.25  # at most one partial map per this many seconds, after the first
    _last_partial: float | None = None

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    # -- progress and cancellation ---------------------------------------------------

    def cancelled(self) -> bool:
        c = self.cancel
        if c is None:
            return False
        return bool(c.is_set() if hasattr(c, "is_set") else c())

    def check(self) -> None:
        if self.cancelled():
            raise Cancelled("attribution cancelled")

    def advance(self, units: int) -> None:
        """Counts finished work, reports it, and raises Cancelled if the caller asked to stop."""
        self.done = min(self.total, self.done + units)
        if self.progress is not None:
            self.progress(self.done, self.total)
        self.check()

    # -- partial maps ---------------------------------------------------------------------

    def wants_partial(self) -> bool:
        """Whether a partial map would be taken now (asked for, and the last one old enough)."""
        if self.partial is None:
            return False
        return self._last_partial is None or time.monotonic() - self._last_partial >= self.partial_every_s

    def publish(self, approximation: torch.Tensor, pending: int = 0, kind: str = "refining") -> None:
        """Hands a whole-image approximation of the map to the caller's ``partial``, with the
        share of the work done (counting ``pending`` units done but not yet reported)."""
        if self.partial is not None:
            self._last_partial = time.monotonic()
            fraction = min(1.0, (self.done + pending) / max(1, self.total))
            self.partial(approximation.detach().float(), fraction, kind)

    # -- chunking -----------------------------------------------------------------------

    def chunk_size(self, grad: bool, factor: float = 1.0) -> int:
        """How many samples one batch may hold under the memory budget."""
        per_sample = probe(self.model, self.inputs)["activation_bytes"] * (3.0 if grad else 1.0) * factor
        budget = self.memory_budget or default_budget(self.device)
        if self.device.type == "cuda":
            cap = MAX_CHUNK_CUDA
        else:
            cap = MAX_CHUNK_CPU_GRAD if grad else MAX_CHUNK_CPU
        return max(1, min(cap, int(budget // max(per_sample, 1))))

    def chunks(self, count: int, grad: bool, factor: float = 1.0) -> Iterator[slice]:
        """Yields slices covering range(count) in budget-sized chunks; after each chunk is
        consumed, reports its size as progress and checks for cancellation."""
        size = self.chunk_size(grad, factor)
        size = math.ceil(count / math.ceil(count / size)) if count else size  # even chunks
        for start in range(0, count, size):
            stop = min(count, start + size)
            self.check()
            yield slice(start, stop)
            self.advance(stop - start)

    # -- model calls ----------------------------------------------------------------------

    def gradient(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """d output[i, target[i]] / d x[i] for every row of x, in chunks under the budget.
        Progress is counted by the caller (one unit per row here via ``chunks``)."""
        out = torch.empty_like(x)
        for s in self.chunks(x.shape[0], grad=True):
            out[s] = gradient(self.model, x[s], target[s])
        return out

    # -- the seam to the fast paths (seam.py) ---------------------------------------------

    def scorer(self):
        """Context manager yielding ``score(x, target)``: the target logit of each row of a
        batch of (perturbed) inputs, in fp32, without autograd."""
        return seam.scorer(self)

    def path_gradients(self, start: torch.Tensor, end: torch.Tensor, alphas: Sequence[float],
                       weights: Sequence[float], target: torch.Tensor) -> torch.Tensor:
        """For each row i: sum over k of weights[k] × the gradient of the target logit at
        start[i] + alphas[k] (end[i] - start[i]); one progress unit per row and point."""
        return seam.path_gradients(self, start, end, alphas, weights, target)

    def note(self, path: str, status: str) -> None:
        """Records that fast path ``path`` ran ("used") or why it did not ("declined: ...") in
        ``info["fast_paths"]``, and logs a decline at debug level. Within one call the first
        decline stays: a path used for some batches and declined for others reads declined."""
        paths = self.info.setdefault("fast_paths", {})
        before = paths.get(path)
        if before == status or before not in (None, "used"):  # a decline, once noted, stays
            return
        paths[path] = status
        if status != "used":
            log.debug("fast path %s %s", path, status)
