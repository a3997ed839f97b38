"""Tensor helpers the methods share: the input gradient of the target logits, per-row
accumulation, and baselines shaped like the inputs."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .errors import ParamError


def gradient(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             target: torch.Tensor) -> torch.Tensor:
    """The gradient of each row's target logit with respect to that row of ``x``.

    Uses ``torch.autograd.grad`` so that no ``.grad`` of the model's parameters is touched
    (two threads may share the model)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        logits = model(leaf)
        chosen = logits.gather(1, target.view(-1, 1).to(logits.device)).sum()
        (grad,) = torch.autograd.grad(chosen, leaf)
    return grad


def add_rows(total: torch.Tensor, row: torch.Tensor, values: torch.Tensor) -> None:
    """total[row[i]] += values[i] for every i. On the CPU one add per row: index_add_ (and a
    sum over the batch of a channels-last tensor) ran 10-20x slower than that there."""
    if total.device.type != "cpu":
        total.index_add_(0, row, values)
        return
    for i, r in enumerate(row.tolist()):
        total[r] += values[i]


def expand_baseline(value: Any, inputs: torch.Tensor, name: str = "baselines") -> torch.Tensor:
    """A number or a tensor broadcastable to ``inputs`` → a tensor shaped like ``inputs``."""
    if isinstance(value, torch.Tensor):
        try:
            return value.to(inputs.device, inputs.dtype).expand_as(inputs).clone()
        except RuntimeError:
            raise ParamError(name, f"shape {tuple(value.shape)} does not broadcast to {tuple(inputs.shape)}") from None
    return torch.full_like(inputs, float(value))
