"""Class activation maps: Grad-CAM, its gradient-weighted variants and Guided Grad-CAM.

Grad-CAM weighs the channels of one spatial layer by the mean gradient of the class score over
that layer's positions, sums them and upsamples the result to the input size. The maths follow
Captum's ``LayerGradCam`` followed by ``LayerAttribution.interpolate`` (bilinear), and its
``GuidedGradCam`` (guided backpropagation times the rectified, nearest-upsampled map).

Grad-CAM++, XGrad-CAM and LayerCAM differ from Grad-CAM only in how the layer's activation and
gradient become a map (:meth:`LayerGradientCam.layer_map`); all of them take one forward and one
backward pass, which :func:`insights.attribute_many` shares between them. Eigen-CAM and
Score-CAM need no gradient and live in ``eigen_cam.py`` and ``score_cam.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..context import Context
from ..errors import ParamError
from ..params import Cost, Param
from ..probe import default_layer, get_layer
from ..method import Facts, Method
from ..scope import HookScope
from .rules import guided_gradient

LAYER_PARAM = Param("layer", "string", None, "Name of the spatial layer to explain, as in "
                    "model.named_modules() (e.g. layer4). Empty: the last layer whose output is "
                    "N×C×H×W.")
RELU_PARAM = Param("relu_attributions", "bool", False, "Keep only the positive part of the map "
                   "(the original Grad-CAM); off shows negative evidence too.")


def resolve_layer(ctx: Context, name: str | None) -> tuple[str, nn.Module]:
    """The layer a CAM method looks at, recorded in ``ctx.info["layer"]``."""
    name = name or default_layer(ctx.model, ctx.inputs)
    module = get_layer(ctx.model, name)
    ctx.info["layer"] = name
    return name, module


def _keeper(seen: dict[str, torch.Tensor], name: str):
    """A forward hook that keeps the output of layer ``name`` in ``seen`` (its last call)."""
    def keep(_module, _inputs, output):
        if not isinstance(output, torch.Tensor):
            raise ParamError("layer", f"{name!r} returns {type(output).__name__}, not a tensor")
        seen[name] = output
        # The rest of the network gets a copy, so in-place ops after the layer
        # (ReLU(inplace)) cannot overwrite the activation we keep.
        return output.clone()
    return keep


def _check_seen(layers: dict[str, nn.Module], seen: dict[str, torch.Tensor]) -> None:
    missing = [name for name in layers if name not in seen]
    if missing:
        raise ParamError("layer", f"{missing[0]!r} is not called in the model's forward pass")


def activations_and_gradients(model: nn.Module, layers: dict[str, nn.Module], x: torch.Tensor,
                              target: torch.Tensor, input_grad: bool = False
                              ) -> tuple[torch.Tensor | None, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """One forward and one backward pass of ``model(x)``: the output of each named layer at its
    last call with the gradient of each row's target logit with respect to it, and (when
    ``input_grad``) the gradient with respect to ``x`` too. The caller holds the model
    exclusively."""
    seen: dict[str, torch.Tensor] = {}
    with HookScope(model) as scope, torch.enable_grad():
        for name, module in layers.items():
            scope.forward_hook(module, _keeper(seen, name))
        leaf = x.detach().requires_grad_(True)  # so the activations have a graph even when frozen
        logits = model(leaf)
        _check_seen(layers, seen)
        names = list(layers)
        wrt = [seen.pop(name) for name in names] + ([leaf] if input_grad else [])
        chosen = logits.gather(1, target.view(-1, 1).to(logits.device)).sum()
        grads = torch.autograd.grad(chosen, wrt)
    pairs = {name: (act.detach(), grad) for name, act, grad in zip(names, wrt, grads)}
    return (grads[-1] if input_grad else None), pairs


def layer_activations(ctx: Context, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The output of each named layer for every row of ``ctx.inputs`` (its last call), from
    forward passes without autograd in budget-sized chunks (one progress unit per row)."""
    out: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    for s in ctx.chunks(ctx.inputs.shape[0], grad=False):
        seen: dict[str, torch.Tensor] = {}
        with HookScope(ctx.model) as scope, torch.no_grad():
            for name, module in layers.items():
                scope.forward_hook(module, _keeper(seen, name))
            ctx.model(ctx.inputs[s])
            _check_seen(layers, seen)
        for name in layers:
            out[name].append(seen[name])
    return {name: torch.cat(parts) for name, parts in out.items()}


def spatial(act: torch.Tensor, name: str) -> torch.Tensor:
    """``act`` if it is N×C×H×W, else a ParamError naming the layer."""
    if act.dim() != 4:
        raise ParamError("layer", f"a CAM method needs a spatial N×C×H×W output; {name!r} gives "
                                  f"{'×'.join(str(d) for d in act.shape)}")
    return act


def upsampled(ctx: Context, cam: torch.Tensor, relu: bool) -> torch.Tensor:
    """A layer-sized map (N×1×h×w), rectified when ``relu``, bilinearly resized to the input."""
    cam = F.relu(cam) if relu else cam
    return F.interpolate(cam, size=tuple(ctx.inputs.shape[2:]), mode="bilinear")


def cam_from(act: torch.Tensor, grad: torch.Tensor, name: str, relu: bool) -> torch.Tensor:
    """Grad-CAM at the layer's resolution (N×1×h×w) from its activation and gradient."""
    if act.dim() != 4:
        raise ParamError("layer", f"Grad-CAM needs a spatial N×C×H×W output; {name!r} gives "
                                  f"{'×'.join(str(d) for d in act.shape)}")
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = (weights * act).sum(dim=1, keepdim=True)
    return F.relu(cam) if relu else cam


def layer_passes(ctx: Context, layers: dict[str, nn.Module], input_grad: bool = False) -> dict:
    """One forward and backward pass over ``ctx.inputs`` in budget-sized chunks: ``{"layer:<name>":
    (activation, gradient)}`` for each layer, and ``"grad"`` (the input gradient) when asked."""
    grads, acts = [], {name: ([], []) for name in layers}
    for s in ctx.chunks(ctx.inputs.shape[0], grad=True):
        g, pairs = activations_and_gradients(ctx.model, layers, ctx.inputs[s], ctx.target[s], input_grad)
        grads.append(g)
        for name, (act, grad) in pairs.items():
            acts[name][0].append(act)
            acts[name][1].append(grad)
    passes: dict = {"layer:" + name: (torch.cat(a), torch.cat(g)) for name, (a, g) in acts.items()}
    if input_grad:
        passes["grad"] = torch.cat(grads)
    return passes


class CamMethod(Method):
    """What every CAM method of this family shares: a map at one layer (``layer``), upsampled to
    the input, signed unless ``relu_attributions``; the layer is read with hooks, so the method
    takes the model exclusively."""

    family = "cam"
    output = "cam"
    exclusive = True
    params = (LAYER_PARAM, RELU_PARAM)

    def signed(self, p: dict) -> bool:
        return not p["relu_attributions"]


class LayerGradientCam(CamMethod):
    """A CAM built from one layer's activation A and the gradient G of the class score with
    respect to it (both N×C×h×w, from one forward and one backward pass); subclasses state only
    :meth:`layer_map`. The map is upsampled bilinearly to the input, as Grad-CAM's is."""

    def layer_map(self, act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The N×1×h×w map at the layer's resolution."""
        raise NotImplementedError

    def cost(self, p: dict, facts: Facts) -> Cost:
        return Cost(1, 1)

    def run(self, ctx: Context, p: dict) -> torch.Tensor:
        name, module = resolve_layer(ctx, p["layer"])
        return self.from_passes(ctx, p, layer_passes(ctx, {name: module}))

    def shared_needs(self, ctx, p):
        return {"layer:" + resolve_layer(ctx, p["layer"])[0]}

    def from_passes(self, ctx, p, passes):
        name = resolve_layer(ctx, p["layer"])[0]
        act, grad = passes["layer:" + name]
        return upsampled(ctx, self.layer_map(spatial(act, name), grad), p["relu_attributions"])


def position_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over a layer's positions, kept as N×C×1×1."""
    return t.sum(dim=(2, 3), keepdim=True)


@registry.register
class GradCam(LayerGradientCam):
    id = "grad_cam"
    label = "Grad-CAM"
    description = "Weighs the channels of a late convolutional layer by how much the class score " \
                  "depends on them and upsamples the sum: a coarse map of where the evidence " \
                  "lies. One backward pass."
    def from_passes(self, ctx, p, passes):
        name = resolve_layer(ctx, p["layer"])[0]
        cam = cam_from(*passes["layer:" + name], name, p["relu_attributions"])
        return F.interpolate(cam, size=tuple(ctx.inputs.shape[2:]), mode="bilinear")


@registry.register
class GuidedGradCam(Method):
    id = "guided_grad_cam"
    label = "Guided Grad-CAM"
    description = "Guided backpropagation masked by the positive Grad-CAM map: fine detail, but " \
                  "only where the class evidence lies. Two backward passes."
    family = "cam"
    output = "pixel"
    exclusive = True
    params = (
        LAYER_PARAM,
        Param("interpolate_mode", "choice", "nearest", "How the layer-sized Grad-CAM map is "
              "upsampled to the input before it multiplies guided backpropagation.",
              choices=("nearest", "bilinear", "area")),
    )

    def cost(self, p: dict, facts: Facts) -> Cost:
        return Cost(2, 2)

    def run(self, ctx: Context, p: dict) -> torch.Tensor:
        name, module = resolve_layer(ctx, p["layer"])
        passes = layer_passes(ctx, {name: module})
        passes["guided"] = guided_gradient(ctx, ctx.inputs, ctx.target, "guided")
        return self.from_passes(ctx, p, passes)

    def shared_needs(self, ctx, p):
        return {"layer:" + resolve_layer(ctx, p["layer"])[0], "guided"}

    def from_passes(self, ctx, p, passes):
        name = resolve_layer(ctx, p["layer"])[0]
        cam = cam_from(*passes["layer:" + name], name, relu=True)
        cam = F.interpolate(cam, size=tuple(ctx.inputs.shape[2:]), mode=p["interpolate_mode"])
        return passes["guided"] * cam


@registry.register
class GradCamPlusPlus(LayerGradientCam):
    id = "grad_cam_plus_plus"
    label = "Grad-CAM++"
    description = "Grad-CAM with each channel weighed by its positive gradients, each scaled by " \
                  "a factor from the second- and third-order terms of the class score, so that " \
                  "several instances of a class all light up. One backward pass."

    def layer_map(self, act, grad):
        # Chattopadhay et al. 2018, eq. 19, with exp(score)'s higher derivatives written as
        # powers of the gradient; the factor is zero where the gradient is.
        g2 = grad * grad
        denominator = 2 * g2 + position_sum(act) * g2 * grad + 1e-6
        alpha = torch.where(grad != 0, g2 / denominator, torch.zeros_like(grad))
        weights = position_sum(alpha * F.relu(grad))
        return (weights * act).sum(dim=1, keepdim=True)


@registry.register
class XGradCam(LayerGradientCam):
    id = "xgrad_cam"
    label = "XGrad-CAM"
    description = "Grad-CAM with each channel weighed by its gradient averaged over the " \
                  "positions in proportion to the channel's own activation there (Fu et al. " \
                  "2020, chosen to satisfy sensitivity and conservation). One backward pass."

    def layer_map(self, act, grad):
        weights = position_sum(grad * act) / (position_sum(act) + 1e-7)
        return (weights * act).sum(dim=1, keepdim=True)


@registry.register
class LayerCam(LayerGradientCam):
    id = "layer_cam"
    label = "LayerCAM"
    description = "Weighs every position of every channel by its own positive gradient rather " \
                  "than one weight per channel, so it keeps finer detail and works at early " \
                  "layers too (Jiang et al. 2021). One backward pass."

    def layer_map(self, act, grad):
        return (F.relu(grad) * act).sum(dim=1, keepdim=True)


# The gradient-free CAMs register after these (the order the UI lists them in).
from . import eigen_cam, score_cam  # noqa: E402,F401
