"""Eigen-CAM (Muhammad and Yeasin 2020): the first principal component of a layer's activations.

Each image's activation (C channels at h×w positions) is read as h×w samples of C features,
centred per channel; the map is each position's coordinate along the direction of largest
variance. No gradient and no target: the map shows what the layer responds to most, whatever
the class. A principal direction has no sign of its own; we orient it so that the map correlates
positively with the channel mean of the (uncentred) activation, i.e. where the layer fires more
the map is higher.
"""
from __future__ import annotations

import torch

from .. import registry
from ..context import Context
from ..method import Facts
from ..params import Cost
from .cam import CamMethod, layer_activations, resolve_layer, spatial, upsampled


def principal_projection(act: torch.Tensor) -> torch.Tensor:
    """N×C×h×w activations → N×1×h×w: the positions' coordinates along the first principal
    direction of the channels, oriented as the module docstring says. Computed in float64 so
    that nearly equal leading singular values do not flip the direction on rounding."""
    n, c, h, w = act.shape
    samples = act.reshape(n, c, h * w).transpose(1, 2).double()  # N × positions × channels
    centred = samples - samples.mean(dim=1, keepdim=True)
    _u, _s, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = centred @ vh[:, 0, :].unsqueeze(-1)  # N × positions × 1
    sign = torch.sign((projection.squeeze(-1) * samples.mean(dim=2)).sum(dim=1))
    projection = projection * torch.where(sign == 0, torch.ones_like(sign), sign).view(n, 1, 1)
    return projection.view(n, 1, h, w).to(act.dtype)


@registry.register
class EigenCam(CamMethod):
    id = "eigen_cam"
    label = "Eigen-CAM"
    description = "The first principal component of a late layer's activations: where the " \
                  "layer's strongest pattern lies, with no gradient. The same map for every " \
                  "class. One forward pass."
    def cost(self, p: dict, facts: Facts) -> Cost:
        return Cost(1, 0)

    def run(self, ctx: Context, p: dict) -> torch.Tensor:
        name, module = resolve_layer(ctx, p["layer"])
        return self._map(ctx, p, layer_activations(ctx, {name: module})[name], name)

    def shared_needs(self, ctx, p):
        return {"act:" + resolve_layer(ctx, p["layer"])[0]}  # the activation only

    def from_passes(self, ctx, p, passes):
        name = resolve_layer(ctx, p["layer"])[0]
        return self._map(ctx, p, passes["act:" + name], name)

    def _map(self, ctx: Context, p: dict, act: torch.Tensor, name: str) -> torch.Tensor:
        return upsampled(ctx, principal_projection(spatial(act, name)), p["relu_attributions"])
