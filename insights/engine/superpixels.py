"""Feature masks for the methods that perturb groups of pixels: SLIC superpixels or a grid of
square patches, or a mask the Python caller gives.

The engine only sees the model input, already normalised, and does not know how to undo that
normalisation. SLIC therefore runs on the input itself, scaled to [0, 1] per image (one minimum
and one maximum over all its channels, so the channels keep their relative scale), channel-last.
For the usual per-channel normalisation this is close to an affine map of the RGB picture, and
for three channels scikit-image's SLIC converts that to Lab as it would the picture.
Segmentation is deterministic: the same image and parameters give the same mask.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .errors import ParamError
from .params import Param


def _part(side: int, parts: int) -> int:
    """A default patch side: ``side / parts`` rounded, at least one pixel (16 of 224 for 14)."""
    return max(1, round(side / parts))


SEGMENTATION_PARAM = Param("segmentation", "choice", "slic", "How pixels are grouped into "
                           "features: slic superpixels (regions of similar colour) or a grid of "
                           "square patches.", choices=("slic", "grid"))
PATCH_SIZE_PARAM = Param("patch_size", "int", 16, "Side of the square patches of the grid "
                         "segmentation (shared by all channels; by default a fourteenth of the "
                         "shorter side).", min=1, max=4096,
                         scaled=lambda s: _part(min(s[1], s[2]), 14))
SEGMENT_PARAMS = (
    SEGMENTATION_PARAM,
    Param("n_segments", "int", 50, "slic: about how many superpixels to cut each image into "
          "(the count found may differ a little).", min=2, max=1024),
    Param("compactness", "float", 10.0, "slic: balance of colour against position; higher "
          "gives squarer superpixels, lower follows edges more closely.", min=0.01, max=1000.0),
    Param("slic_sigma", "float", 1.0, "slic: width of the Gaussian blur applied before "
          "segmenting, in pixels (0: none).", min=0.0, max=50.0),
    PATCH_SIZE_PARAM,
    Param("feature_mask", "tensor", None, "Python only: an integer tensor broadcastable to the "
          "input; elements with the same value form one feature. Replaces the segmentation."),
)


def segment_params(default: str = "slic") -> tuple[Param, ...]:
    """The segmentation parameters, with ``default`` as the segmentation chosen when none is."""
    return tuple(dataclasses.replace(p, default=default) if p is SEGMENTATION_PARAM else p
                 for p in SEGMENT_PARAMS)


def consecutive(mask: torch.Tensor) -> torch.Tensor:
    """Each image's ids renumbered 0..K-1 in the order of their values (N×... → same shape)."""
    out = torch.empty_like(mask)
    for i, m in enumerate(mask):
        out[i] = torch.unique(m, return_inverse=True)[1].view_as(m)
    return out


def given_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A caller's integer mask, broadcast to N×c×H×W (c 1 or C) and renumbered per image."""
    if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex() \
            or mask.dtype == torch.bool:
        raise ParamError("feature_mask", f"must be an integer tensor, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)}")
    mask = mask.to(x.device, torch.long)
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    channels = 1 if mask.dim() == 4 and mask.shape[1] == 1 else x.shape[1]
    try:
        mask = mask.expand(x.shape[0], channels, *x.shape[2:])
    except RuntimeError:
        raise ParamError("feature_mask", f"shape {tuple(mask.shape)} does not broadcast to "
                         f"{tuple(x.shape)}") from None
    return consecutive(mask.contiguous())


def grid_mask(x: torch.Tensor, size: int) -> torch.Tensor:
    """N×1×H×W ids of square patches of side ``size`` in row-major order (the border ones
    clipped), the same for every image."""
    h, w = x.shape[2:]
    rows = torch.arange(h, device=x.device) // size
    cols = torch.arange(w, device=x.device) // size
    ids = rows.view(-1, 1) * (-(-w // size)) + cols.view(1, -1)
    return ids.expand(x.shape[0], 1, h, w).clone()


def scaled_image(image: torch.Tensor) -> np.ndarray:
    """One C×H×W input → H×W×C float64 in [0, 1] (one min and max over all channels)."""
    a = image.detach().to("cpu", torch.float64)
    low, high = a.min(), a.max()
    a = (a - low) / (high - low) if high > low else torch.zeros_like(a)
    return a.permute(1, 2, 0).numpy()


def slic_mask(x: torch.Tensor, n_segments: int, compactness: float, sigma: float) -> torch.Tensor:
    """N×1×H×W SLIC superpixel ids, 0..K-1 per image (scikit-image's slic on each scaled image)."""
    from skimage.segmentation import slic  # imported on use: the gradient methods never need it

    out = torch.empty((x.shape[0], 1) + tuple(x.shape[2:]), dtype=torch.long)
    for i, image in enumerate(x):
        labels = slic(scaled_image(image), n_segments=n_segments, compactness=compactness,
                      sigma=sigma, start_label=0, channel_axis=-1)
        out[i, 0] = torch.from_numpy(np.unique(labels, return_inverse=True)[1].reshape(labels.shape))
    return out.to(x.device)


def feature_masks(x: torch.Tensor, p: dict) -> torch.Tensor:
    """The feature ids of each image of ``x`` (N×C×H×W) for parameters ``p``: a LongTensor
    N×1×H×W (N×C×H×W for a caller's mask that differs across channels) with ids 0..K-1 per
    image, consecutive."""
    if p.get("feature_mask") is not None:
        return given_mask(p["feature_mask"], x)
    if p["segmentation"] == "grid":
        return grid_mask(x, p["patch_size"])
    return slic_mask(x, p["n_segments"], p["compactness"], p["slic_sigma"])


def feature_count(p: dict, shape: tuple[int, ...]) -> int:
    """The number of features per image for ``p`` on inputs of ``shape`` (C, H, W): exact for a
    grid or a given mask (its largest image), ``n_segments`` for SLIC (its count is near that)."""
    if p.get("feature_mask") is not None:
        mask = p["feature_mask"]
        if mask.dim() >= 4 and mask.shape[0] > 1:
            return max(int(torch.unique(m).numel()) for m in mask)
        return int(torch.unique(mask).numel())
    if p["segmentation"] == "grid":
        size = p["patch_size"]
        return (-(-shape[1] // size)) * (-(-shape[2] // size))
    return p["n_segments"]
