"""The arithmetic a method's passes run in: true fp32 by default, bfloat16 on request."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from .params import Param

PRECISION_PARAM = Param("precision", "choice", "fp32", "fp32 is exact. bf16 runs about 2× faster "
                        "on a CPU with bf16 support and 2 to 5× on a GPU, with a close but not "
                        "identical map; it drifts most where the score barely moves (small "
                        "feature-ablation patches, IG on EfficientNet-Lite0).",
                        choices=("fp32", "bf16"))


def arithmetic(device: torch.device, precision: str):
    """The context a method's passes run in: bfloat16 autocast for ``precision="bf16"`` (the
    opt-in fast mode), else true fp32 (:func:`true_fp32`: no TF32 on CUDA)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return true_fp32(device)


_tf32_lock = threading.Lock()
_tf32_users = 0
_tf32_saved: tuple[bool, bool] | None = None


@contextmanager
def true_fp32(device: torch.device):
    """Turns CUDA's TF32 convolutions and matmuls off while any caller is inside: attribution
    maps (occlusion's differences of nearly equal scores, DeepLift's summation to the score
    difference) need full fp32, which TF32's 10-bit mantissa would swamp.
    Reference-counted, so overlapping calls from several threads restore the user's flags
    only when the last one leaves (calls in between merely run in full fp32)."""
    global _tf32_users, _tf32_saved
    if device.type != "cuda":
        yield
        return
    with _tf32_lock:
        if _tf32_users == 0:
            _tf32_saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        _tf32_users += 1
    try:
        yield
    finally:
        with _tf32_lock:
            _tf32_users -= 1
            if _tf32_users == 0 and _tf32_saved is not None:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = _tf32_saved
