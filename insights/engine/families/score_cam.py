"""Score-CAM (Wang et al. 2020): each channel of a layer weighed by how much the class score
rises when the input is seen through that channel alone.

One forward pass reads the layer's activation; then, for each channel, the activation is
upsampled to the input (bilinear, corners aligned), scaled to [0, 1] per image and channel, and
multiplied into the input; the target logits of these masked inputs, softmaxed over the
channels, weigh the activation's channels. No gradient: one forward pass per channel, batched
under the memory budget through the context's scorer (which may run the model's fast twin).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import registry
from ..context import Context
from ..method import Facts
from ..params import Cost
from .cam import CamMethod, layer_activations, resolve_layer, spatial, upsampled


def channel_masks(act: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """B×h×w activation planes → B×1×H×W masks: upsampled with aligned corners, then scaled to
    [0, 1] each (a constant plane gives zeros)."""
    up = F.interpolate(act.unsqueeze(1), size=size, mode="bilinear", align_corners=True)
    flat = up.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    return (up - low.view(-1, 1, 1, 1)) / (high - low + 1e-8).view(-1, 1, 1, 1)


@registry.register
class ScoreCam(CamMethod):
    id = "score_cam"
    label = "Score-CAM"
    description = "Weighs each channel of a late layer by the class score of the input masked " \
                  "with that channel's (upsampled) activation. No gradients, but one forward " \
                  "pass per channel of the layer (512 for a ResNet-18's layer4)."
    def cost(self, p: dict, facts: Facts) -> Cost:
        """One pass to read the layer plus one per channel; without the model, the least."""
        shape = facts.layer_shape(p["layer"])
        return Cost(1 + (shape[0] if shape else 1), 0)

    def run(self, ctx: Context, p: dict) -> torch.Tensor:
        name, module = resolve_layer(ctx, p["layer"])
        act = spatial(layer_activations(ctx, {name: module})[name], name)
        x, target = ctx.inputs, ctx.target
        n, channels = act.shape[:2]
        scores = torch.empty(n * channels, device=x.device)  # row r: image r // C, channel r % C
        with ctx.scorer() as score:
            for s in ctx.chunks(n * channels, grad=False):
                rows = torch.arange(s.start, s.stop, device=x.device)
                image, channel = rows // channels, rows % channels
                masks = channel_masks(act[image, channel], tuple(x.shape[2:]))
                scores[s] = score(x[image] * masks.to(x.dtype), target[image])
        weights = torch.softmax(scores.view(n, channels), dim=1).to(act.dtype)
        cam = (weights.view(n, channels, 1, 1) * act).sum(dim=1, keepdim=True)
        return upsampled(ctx, cam, p["relu_attributions"])
