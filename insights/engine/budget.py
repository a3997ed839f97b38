"""How many samples a batch may hold: the memory budget and the batch caps."""
from __future__ import annotations

import torch

DEFAULT_BUDGET_CPU = 2 << 30  # bytes of activations one chunk may hold
MAX_CHUNK_CPU = 32
MAX_CHUNK_CPU_GRAD = 10  # forward + backward batches beyond ~10 images ran slower per image on CPU
MAX_CHUNK_CUDA = 256


def default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return DEFAULT_BUDGET_CPU
