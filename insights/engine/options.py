"""Switches for the engine's fast paths."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineOptions:
    """Which fast paths a call may take; all on by default. Each fast path computes the same map
    as the plain path beside it (the model itself, plain autograd) within rounding, and declines
    by itself where it does not apply: a call's ``info["fast_paths"]`` says which ran and why the
    others did not. Turn one off to compare against the plain path or to work around a fault.

    * ``twin``: the traced copy of the model with batch norms folded (``fast/twin.py``), and
      through it integrated gradients' stem split; off, every pass runs the model itself.
    * ``cuda_graphs``: replay recorded CUDA graphs for the twin's repeated batches (GPU).
    * ``cuda_fused``: score bf16 batches with cuDNN's fused convolution + bias + ReLU (GPU).
    * ``cpu_slices``: run the high-resolution layers of CPU scoring batches in cache-sized
      slices of the batch.
    """

    twin: bool = True
    cuda_graphs: bool = True
    cuda_fused: bool = True
    cpu_slices: bool = True
