"""Methods that change the backward rule of some modules: DeepLift (rescale rule), guided
backpropagation and deconvolution.

Each installs forward hooks (in a :class:`HookScope`) that wrap a module's output in a small
autograd Function holding that call's own input and output. Because the state lives in the
graph and not on the module, a module called several times in one forward pass (torchvision's
ResNet re-uses one ReLU per block) gets a correct rule for every call. Activations applied as
functions (``F.relu`` inside ``forward``) are not modules and keep their plain gradient.

The maths are Captum's (DeepLift's rescale and maxpool rules, GuidedBackprop, Deconvolution), and
the maps are the same wherever Captum 0.9 handles the model. Where it does not, these rules still
sum to the score difference: a module called more than once (Captum raises), a nonlinearity
whose output goes straight into another hooked one such as ReLU → MaxPool2d (Captum's tensor
hooks read the gradient before the next rule rewrites it), and overlapping pooling windows
(Captum's max_unpool keeps only one of the values routed to a position; we add them).
DeepLift, like Captum's, assumes every hooked module sees the batch [inputs; baselines] with
the batch as its first dimension.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..context import Context
from ..errors import ParamError
from ..passes import gradient
from ..scope import HookScope
from .gradient import BASELINES, GradientMethod, baseline_rows
from ..errors import shown

EPS = 1e-10  # below this input difference, a module keeps its own gradient (as in Captum)

# Elementwise nonlinearities that get the rescale rule: multiplier = Δoutput / Δinput.
RESCALE_MODULES = (nn.ReLU, nn.ReLU6, nn.ELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.SiLU, nn.GELU,
                   nn.Hardtanh, nn.Hardswish, nn.Softplus)

# Non-elementwise modules the rescale rule does not cover: DeepLift runs through them with their
# plain gradient, so its map may not sum to the score difference (its delta says by how much).
UNCOVERED_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LocalResponseNorm,
                     nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.GLU)


def uncovered_modules(model: nn.Module) -> list[str]:
    """The class names of ``model``'s modules that DeepLift's rules do not cover, sorted."""
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, UNCOVERED_MODULES)})


# Modules treated as ReLU gates by guided backpropagation and deconvolution. ReLU6 gates like a
# ReLU that also closes above 6, so mobile networks (EfficientNet-Lite) get guided maps too.
GATE_MODULES = (nn.ReLU, nn.ReLU6)


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = t.shape[0] // 2
    if t.shape[0] != 2 * n:
        raise RuntimeError("deeplift: a hooked module saw an odd batch; the model must keep the "
                           "batch dimension of its input")
    return t[:n], t[n:]


def _both(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t])


# --------------------------------------------------------------------------- DeepLift rules


class _Rescale(torch.autograd.Function):
    """Output of one call of an elementwise module on the batch [inputs; baselines].

    Backward: grad·Δy/Δx where |Δx| ≥ eps; elsewhere the gradient is handed to the module's own
    output (``y`` keeps its graph), so autograd applies the module's local derivative there."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        x_in, x_ref = _halves(x)
        y_in, y_ref = _halves(y)
        dx, dy = _both(x_in - x_ref), _both(y_in - y_ref)
        small = dx.abs() < EPS
        zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
        return torch.where(small, zero, grad * dy / dx), torch.where(small, grad, zero)


class _MaxPoolRescale(torch.autograd.Function):
    """Output of one call of a MaxPool2d on the batch [inputs; baselines].

    Captum's maxpool rule: with m = max(y, y_ref), the change y - y_ref is split into
    (m - y_ref), routed to the input's arg-max, and (y - m), routed to the baseline's arg-max;
    the sum per input position, divided by Δx, is the multiplier. Routing accumulates with
    scatter_add, so overlapping windows (stride < kernel) keep the sum of the changes."""

    @staticmethod
    def forward(ctx, x, y, pool):
        ctx.save_for_backward(x, y)
        ctx.pool = pool
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        k = ctx.pool
        with torch.no_grad():
            _, index = F.max_pool2d(x, k.kernel_size, k.stride, k.padding, k.dilation, k.ceil_mode,
                                    return_indices=True)
            y_in, y_ref = _halves(y)
            top = torch.maximum(y_in, y_ref)
            delta_out = torch.cat([top - y_ref, y_in - top])
            flat = index.flatten(2)

            def route(values: torch.Tensor) -> torch.Tensor:
                out = torch.zeros(x.shape[:2] + (x.shape[2] * x.shape[3],), dtype=grad.dtype,
                                  device=grad.device)
                return out.scatter_add_(2, flat, values.flatten(2)).view_as(x)

            own = route(grad)  # the pool's plain gradient
            moved = route(grad * delta_out)
            moved_in, moved_ref = _halves(moved)
            x_in, x_ref = _halves(x)
            dx = _both(x_in - x_ref)
            result = torch.where(dx.abs() < EPS, own, _both(moved_in + moved_ref) / dx)
        return result, None, None


def _rescale_hook(module, inputs, output):
    x = inputs[0]
    if isinstance(module, nn.MaxPool2d):
        if x.dim() != 4 or module.return_indices:
            raise RuntimeError("deeplift: MaxPool2d is supported on N×C×H×W inputs without "
                               "return_indices")
        return _MaxPoolRescale.apply(x, output.detach(), module)
    return _Rescale.apply(x, output)


def install_rescale(scope: HookScope, model: nn.Module) -> None:
    """Hooks every supported nonlinearity of ``model`` with the DeepLift rescale rule."""
    scope.disable_inplace()
    for module in model.modules():
        if isinstance(module, RESCALE_MODULES + (nn.MaxPool2d,)):
            scope.forward_hook(module, _rescale_hook)


@registry.register
class DeepLift(GradientMethod):
    id = "deeplift"
    label = "DeepLIFT"
    description = "Compares the photo with a baseline image and shares the change of the class " \
                  "score among the pixels, layer by layer (the rescale rule). The map sums to the " \
                  "score difference. One pass over the photo and the baseline together."
    exclusive = True
    completeness = "exact"  # where its rules cover every non-linearity (not LayerNorm, attention, gates)
    passes_per_sample = 2  # the image and its baseline run as one batch
    base_params = (BASELINES,)

    def run(self, ctx, p):
        out = super().run(ctx, p)
        if "delta" in ctx.info:  # what its delta may come from (info["uncovered"], docs/api.md)
            ctx.info["uncovered"] = uncovered_modules(ctx.model)
        return out

    def compute(self, ctx, x, target, p):
        base = baseline_rows(p["baselines"], x, ctx.inputs.shape[0])
        out = torch.empty_like(x)
        size = ctx.chunk_size(grad=True, factor=2.0)
        with HookScope(ctx.model) as scope:
            install_rescale(scope, ctx.model)
            for start in range(0, x.shape[0], size):
                s = slice(start, min(x.shape[0], start + size))
                ctx.check()
                grad = gradient(ctx.model, torch.cat([x[s], base[s]]), target[s].repeat(2))
                out[s] = (x[s] - base[s]) * grad[: s.stop - s.start]
                ctx.advance(2 * (s.stop - s.start))
        return out


# --------------------------------------------------------------------------- ReLU gates


class _Gate(torch.autograd.Function):
    """Output of one call of a ReLU-like module with a modified backward: guided
    backpropagation keeps the positive part of the module's own gradient, deconvolution the
    positive part of the incoming gradient (ignoring where the unit was off)."""

    @staticmethod
    def forward(ctx, x, y, low, high, guided):
        ctx.guided = guided
        if guided:
            ctx.save_for_backward((x > low) & (x < high))
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        if ctx.guided:
            (open_,) = ctx.saved_tensors
            grad = torch.where(open_, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
        return F.relu(grad), None, None, None, None


def _gate_hook(guided: bool) -> Callable:
    def hook(module, inputs, output):
        high = 6.0 if isinstance(module, nn.ReLU6) else float("inf")
        return _Gate.apply(inputs[0], output.detach(), 0.0, high, guided)
    return hook


GATE_RULES = ("guided", "deconv")


def guided_gradient(ctx: Context, x: torch.Tensor, target: torch.Tensor,
                    rule: str = "guided") -> torch.Tensor:
    """The gradient of each row's target logit with the ReLU gates of ``ctx.model`` replaced by
    guided backpropagation (``rule="guided"``) or deconvolution (``"deconv"``). Installs and
    removes its own hooks; the caller's method must be ``exclusive``. Counts one progress unit
    per row of ``x`` (via :meth:`Context.gradient`)."""
    if rule not in GATE_RULES:
        raise ParamError("rule", f"must be one of {', '.join(GATE_RULES)}; got {shown(rule)}")
    with HookScope(ctx.model) as scope:
        scope.disable_inplace()
        hook = _gate_hook(rule == "guided")
        for module in ctx.model.modules():
            if isinstance(module, GATE_MODULES):
                scope.forward_hook(module, hook)
        return ctx.gradient(x, target)


@registry.register
class GuidedBackprop(GradientMethod):
    id = "guided_backprop"
    label = "Guided Backpropagation"
    description = "The gradient, but at every ReLU only positive signals pass back, and only " \
                  "where the unit was active: sharp, edge-like maps of what the network responds " \
                  "to. One backward pass."
    exclusive = True
    shared_pass = "guided"

    def compute(self, ctx, x, target, p):
        return guided_gradient(ctx, x, target, "guided")

    def from_passes(self, ctx, p, passes):
        return passes["guided"]


@registry.register
class Deconvolution(GradientMethod):
    id = "deconvolution"
    label = "Deconvolution"
    description = "Runs the network backwards letting only positive signals through each ReLU, " \
                  "whatever the unit did on the photo: the patterns the class score looks for. " \
                  "One backward pass."
    exclusive = True

    def compute(self, ctx, x, target, p):
        return guided_gradient(ctx, x, target, "deconv")
