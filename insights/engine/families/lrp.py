"""Layer-wise relevance propagation (Bach et al. 2015) with the epsilon and gamma rules.

Relevance is carried through the network as activation × gradient: at every tensor x of the
forward pass, its relevance is R(x) = x · g(x), g the gradient autograd hands back. Each layer
with a rule (convolution, linear, batch norm, pooling) gets a forward hook that keeps its output
y exactly but makes its backward send g · y / (z + ε·sign z) into z, the layer's output under
its rule (the layer itself for epsilon; weights w + γ·max(w, 0) for gamma), so that the
relevance at the layer's input is the rule's share of R(y) = y · g. What lies between such
layers needs no hook:

* ReLU and LeakyReLU pass relevance unchanged through their own gradient (x · f'(x) = f(x));
  Tanh and Hardtanh (ReLU6) get a backward that does the same.
* A residual addition (``out += identity`` in torchvision's blocks) or a concatenation hands
  every branch the same g, so each branch gets relevance x_i · g: the sum's relevance split in
  proportion to each branch's contribution, with nothing to patch.
* A batch norm that takes a convolution's output is folded into it (eval mode: per-channel
  scale and shift), and the rule applies to the folded convolution.

With the epsilon rule everywhere (the default, as Captum assigns it), the maps equal Captum's
``LRP``; Captum has no batch-norm folding nor residual rule. The gamma rule keeps Captum's form
(bias unchanged): with non-negative inputs (after a ReLU) z' ≥ y and the scale stays in (0, 1],
but a layer fed signed values (a residual sum without a ReLU, as in EfficientNet-Lite's
blocks) can have z' near zero where y is not, and its relevances blow up. Leaves LRP has no rule for are
refused by name (:func:`check_layers`); parameter-free modules from outside torch (a user's
identity wrapper) run with their plain gradient and are named in ``info["lrp"]``. Operations
applied as functions inside ``forward`` (``F.gelu``, ``torch.sigmoid``) are not seen and keep
their plain gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .. import registry
from ..errors import UnsupportedModel
from ..params import Param
from ..passes import gradient
from ..scope import HookScope
from .gradient import GradientMethod

RULES = ("epsilon", "gamma", "composite")
WEIGHTED = (nn.Conv2d, nn.Linear)
POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
PASS_THROUGH = (nn.Tanh, nn.Hardtanh)  # relevance passes unchanged (nn.ReLU6 is a Hardtanh)
# Modules whose plain gradient already keeps the relevance x · g as it is.
KEEP_RELEVANCE = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten,
                  nn.ZeroPad2d)
SUPPORTED = WEIGHTED + (nn.BatchNorm2d,) + POOLS + PASS_THROUGH + KEEP_RELEVANCE


def _refuse(name: str, module: nn.Module, why: str = "") -> UnsupportedModel:
    where = f"layer {name!r}" if name else "the model itself"
    return UnsupportedModel("lrp", f"LRP has no rule for {where} ({type(module).__name__}){why}; "
                                   "it handles Conv2d, Linear, BatchNorm2d, pooling, ReLU-like "
                                   "activations, Tanh, dropout, flatten and identity layers")


def check_layers(model: nn.Module) -> list[str]:
    """The class names of the modules that will run with their plain gradient (sorted):
    parameter-free leaves from outside torch. Raises :class:`UnsupportedModel` naming the first
    module LRP has no rule for: any other torch module, or any module with weights of its own."""
    plain = set()
    for name, module in model.named_modules():
        if isinstance(module, SUPPORTED):
            if isinstance(module, nn.BatchNorm2d) and module.running_mean is None:
                raise _refuse(name, module, " without running statistics")
            continue
        if next(module.parameters(recurse=False), None) is not None:
            raise _refuse(name, module)
        if next(module.children(), None) is not None:
            continue  # a container: its children are checked
        if type(module).__module__.startswith("torch."):
            raise _refuse(name, module)
        plain.add(type(module).__name__)
    return sorted(plain)


def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor | None,
                    bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the convolution ``(weight, bias)`` followed by ``bn`` in eval mode,
    as one convolution: bn(conv(a)) = conv'(a)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0)
    folded_bias = shift if bias is None else bias * scale + shift
    return weight * scale.view(-1, *([1] * (weight.dim() - 1))), folded_bias


class _Relevance(torch.autograd.Function):
    """Returns the layer's output ``y``; backward sends grad · y / (z + eps·sign z) into ``z``
    (the layer's output under its rule, with its graph to the layer's input)."""

    @staticmethod
    def forward(ctx, y, z, eps):
        den = torch.where(z >= 0, z + eps, z - eps)  # sign 0 → +1, as in Captum
        # With epsilon 0 a zero output has no share to pass on: 0/0 and y/0 count as 0.
        ctx.save_for_backward(torch.nan_to_num_(y / den, nan=0.0, posinf=0.0, neginf=0.0))
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return None, grad * scale, None


class _PassThrough(torch.autograd.Function):
    """An activation's output ``y`` of input ``x`` whose backward keeps relevance unchanged:
    x · grad_in = y · grad_out."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(torch.where(x == 0, torch.zeros_like(y), y / x))
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None


class Propagation:
    """The hooks of one LRP call: which layers take the gamma rule (``rule``), the epsilon of
    every rule, and the convolution outputs a following batch norm may fold into."""

    def __init__(self, rule: str, epsilon: float, gamma: float):
        self.rule, self.eps, self.gamma = rule, epsilon, gamma
        self.produced: dict[int, tuple] = {}  # id(hooked conv output) -> (it, conv, input, raw output)
        self.weights: dict[tuple[int, int], tuple] = {}  # (id(layer), id(its bn) or 0) -> gamma's weights
        self.folded: set[int] = set()  # ids of the batch norms folded so far
        self.rerunning = False  # hooks stand aside while a layer is recomputed under its rule

    def install(self, scope: HookScope, model: nn.Module) -> None:
        scope.disable_inplace()  # hooks read a layer's input after the layer ran
        for module in model.modules():
            if isinstance(module, WEIGHTED):
                scope.forward_hook(module, self._weighted)
            elif isinstance(module, nn.BatchNorm2d):
                scope.forward_hook(module, self._batch_norm)
            elif isinstance(module, POOLS):
                scope.forward_hook(module, self._pool)
            elif isinstance(module, PASS_THROUGH):
                scope.forward_hook(module, self._pass_through)

    def uses_gamma(self, module: nn.Module) -> bool:
        return self.rule == "gamma" or (self.rule == "composite" and isinstance(module, nn.Conv2d))

    def _rerun(self, module: nn.Module, a: torch.Tensor, bn: nn.BatchNorm2d | None = None) -> torch.Tensor:
        """``module``'s own forward on ``a`` under the gamma rule (weights w + gamma·max(w, 0),
        bias unchanged, as Captum's), with ``bn`` folded into it first when given."""
        key = (id(module), id(bn) if bn is not None else 0)
        if key not in self.weights:  # once per call, not per batch; no gradient to the weights
            with torch.no_grad():
                weight, bias = module.weight, module.bias
                if bn is not None:
                    weight, bias = fold_batch_norm(weight, bias, bn)
                self.weights[key] = (torch.add(weight, weight.clamp(min=0), alpha=self.gamma), bias)
        weight, bias = self.weights[key]
        params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        self.rerunning = True
        try:
            return functional_call(module, params, (a,))
        finally:
            self.rerunning = False

    def _weighted(self, module, inputs, y):
        if self.rerunning:
            return None
        a = inputs[0]
        z = self._rerun(module, a) if self.uses_gamma(module) else y
        out = _Relevance.apply(y.detach(), z, self.eps)
        if isinstance(module, nn.Conv2d):
            self.produced[id(out)] = (out, module, a, y)
        return out

    def _batch_norm(self, bn, inputs, y):
        if self.rerunning:
            return None
        entry = self.produced.pop(id(inputs[0]), None)
        if entry is None or entry[0] is not inputs[0]:
            return _Relevance.apply(y.detach(), y, self.eps)  # on its own: the epsilon rule
        _, conv, a, raw = entry  # the rule goes around the convolution's own, to its input
        self.folded.add(id(bn))
        if self.uses_gamma(conv):
            z = self._rerun(conv, a, bn)
        else:  # bn applied to the raw convolution output is the folded convolution
            z = F.batch_norm(raw, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return _Relevance.apply(y.detach(), z, self.eps)

    def _pool(self, module, inputs, y):
        if self.rerunning:
            return None
        return _Relevance.apply(y.detach(), y, self.eps)

    def _pass_through(self, module, inputs, y):
        if self.rerunning:
            return None
        return _PassThrough.apply(inputs[0], y.detach())


@registry.register
class LRP(GradientMethod):
    id = "lrp"
    label = "LRP"
    description = "Layer-wise relevance propagation: hands the class score back layer by layer, " \
                  "each neuron passing its share to the inputs that fed it (epsilon or gamma " \
                  "rule); the map roughly sums to the score. One backward pass."
    exclusive = True
    base_params = (
        Param("rule", "choice", "epsilon", "epsilon: every layer shares relevance in proportion "
              "to its contributions (Captum's default); gamma: convolutions and linear layers "
              "favour positive contributions by gamma; composite: gamma on convolutions, "
              "epsilon on linear layers. Gamma assumes non-negative layer inputs (ReLU "
              "networks such as VGG and ResNet); where blocks end without a ReLU "
              "(EfficientNet-Lite) its relevances blow up: use epsilon there.", choices=RULES),
        Param("epsilon", "float", 1e-9, "Added to each layer's output (with its sign) before "
              "dividing: larger values absorb weak, noisy contributions.", min=0.0, max=1e3),
        Param("gamma", "float", 0.25, "How much the gamma rule favours positive weights "
              "(weights w + gamma·max(w, 0)).", min=0.0, max=100.0),
    )

    def compute(self, ctx, x, target, p):
        plain = check_layers(ctx.model)
        prop = Propagation(p["rule"], p["epsilon"], p["gamma"])
        out = torch.empty_like(x)
        with HookScope(ctx.model) as scope:
            prop.install(scope, ctx.model)
            # Each rule layer keeps a scale and a copy of its output beside autograd's own.
            for s in ctx.chunks(x.shape[0], grad=True, factor=1.5):
                try:
                    out[s] = x[s] * gradient(ctx.model, x[s], target[s])
                finally:
                    prop.produced.clear()
        ctx.info["lrp"] = {"rule": p["rule"], "folded_batch_norms": len(prop.folded),
                           "plain_gradient": plain}
        return out
