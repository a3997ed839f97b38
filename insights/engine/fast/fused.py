"""A fused bf16 copy of a twin, for scoring batches on a GPU (occlusion, feature ablation).

A GPU spends much of a bf16 ResNet batch on passes over activations that are not
convolutions: the bias that a folded batch norm leaves on each convolution, the ReLU, the
residual add. cuDNN can do them inside the convolution: ``cudnn_convolution_relu`` computes
relu(conv(x) + bias) and ``cudnn_convolution_add_relu`` relu(conv(x) + bias + z) in one call.
Measured on an H200 for one ResNet-18 layer1 convolution at batch 221 in bf16: convolution,
bias and ReLU 0.31 ms, fused 0.14 ms; with the residual add 0.38 ms, fused 0.16 ms.

:func:`fused_copy` rewrites a twin's graph:

* conv → relu                   becomes ConvReLU
* conv → add(·, z) → relu       becomes ConvAddReLU(x, z)
* conv → max-pool → relu        becomes ConvReLU → max-pool (the twin's pool-before-ReLU
  order undone: the ReLU is free inside the convolution, and a pool commutes with it)

for plain ``nn.Conv2d`` modules whose output has no other reader, where nothing between the
convolution and the ReLU works in place (the fused call runs where the ReLU was). Weights are stored once in
the fused dtype. These cuDNN calls have no gradients, and no TF32 switch, so the copy serves
only scoring under bf16 autocast on CUDA; off the GPU its modules compute the same function
with ordinary operations (which is how the CPU tests check the rewrite).
"""
from __future__ import annotations

import copy
import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from .twin import _is_relu

_ADDS = (operator.add, operator.iadd, torch.add)
_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv,
                       operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior,
                       operator.ixor, operator.ilshift, operator.irshift, operator.imatmul,
                       operator.setitem}


class ConvReLU(nn.Module):
    """relu(conv(x)) in one cuDNN call on a GPU."""

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype):
        super().__init__()
        weight = conv.weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias.detach().to(weight.device, dtype))
        self.stride, self.padding = list(conv.stride), list(conv.padding)
        self.dilation, self.groups = list(conv.dilation), conv.groups

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.weight.dtype).contiguous(memory_format=torch.channels_last)

    def _plain(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self._input(x), self.weight, self.bias, self.stride, self.padding,
                        self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return torch.cudnn_convolution_relu(self._input(x), self.weight, self.bias, self.stride,
                                                self.padding, self.dilation, self.groups)
        return F.relu(self._plain(x))


class ConvAddReLU(ConvReLU):
    """relu(conv(x) + z) in one cuDNN call on a GPU."""

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and z.dtype == self.weight.dtype:
            return torch.cudnn_convolution_add_relu(
                self._input(x), self.weight, z.contiguous(memory_format=torch.channels_last),
                1.0, self.bias, self.stride, self.padding, self.dilation, self.groups)
        # A z in another dtype (an fp32 tensor that autocast left alone) is added as the
        # original graph adds it: in the promoted dtype.
        return F.relu(self._plain(x) + z)


def _plain_conv(node, modules: dict) -> nn.Conv2d | None:
    """The node's module when the node is a plain Conv2d call read by one node only."""
    if not (isinstance(node, fx.Node) and node.op == "call_module" and len(node.users) == 1
            and len(node.args) == 1 and not node.kwargs):
        return None
    conv = modules.get(node.target)
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    return conv


def _in_place(node: fx.Node, modules: dict) -> bool:
    """Whether the node may change one of its inputs in place."""
    if node.op == "call_module":
        return getattr(modules.get(node.target), "inplace", False) is True
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        return (node.target in _IN_PLACE_OPERATORS or node.kwargs.get("inplace") is True
                or getattr(node.target, "__name__", "").endswith("_"))
    return False


def _quiet(first: fx.Node, last: fx.Node, modules: dict) -> bool:
    """Whether no node strictly between ``first`` and ``last`` (in graph order) works in
    place: the fused call runs at ``last``'s position, reading the convolution's input (and
    the residual) later than the convolution did."""
    node = first.next
    while node is not last:
        if _in_place(node, modules):
            return False
        node = node.next
    return True


def fused_copy(module: fx.GraphModule, dtype: torch.dtype = torch.bfloat16) -> tuple[fx.GraphModule, int]:
    """A copy of the twin's graph with the patterns in the module docstring fused, and how
    many convolutions were fused."""
    gm = copy.deepcopy(module)
    modules = dict(gm.named_modules())
    count = 0

    def install(conv_node: fx.Node, cls: type, args: tuple, before: fx.Node) -> fx.Node:
        nonlocal count
        name = f"fused_{count}"
        gm.add_submodule(name, cls(modules[conv_node.target], dtype))
        count += 1
        with gm.graph.inserting_before(before):
            return gm.graph.call_module(name, args)

    for relu in list(gm.graph.nodes):
        if not _is_relu(relu, modules) or relu.kwargs or not isinstance(relu.args[0], fx.Node):
            continue
        source = relu.args[0]
        if _plain_conv(source, modules) is not None and _quiet(source, relu, modules):
            new = install(source, ConvReLU, source.args, relu)
            relu.replace_all_uses_with(new)
            gm.graph.erase_node(relu)
            gm.graph.erase_node(source)
        elif (source.op == "call_function" and source.target in _ADDS and len(source.args) == 2
              and not source.kwargs and len(source.users) == 1):
            convs = [a for a in source.args if _plain_conv(a, modules) is not None]
            if not convs:
                continue
            conv = convs[0]
            other = source.args[1] if source.args[0] is conv else source.args[0]
            if not isinstance(other, fx.Node) or other is conv or not _quiet(conv, relu, modules):
                continue
            new = install(conv, ConvAddReLU, (conv.args[0], other), relu)
            relu.replace_all_uses_with(new)
            for node in (relu, source, conv):
                gm.graph.erase_node(node)
        elif (source.op == "call_module" and type(modules.get(source.target)) is nn.MaxPool2d
              and len(source.users) == 1 and _plain_conv(source.args[0], modules) is not None
              and _quiet(source.args[0], source, modules) and _quiet(source, relu, modules)):
            conv = source.args[0]
            new = install(conv, ConvReLU, conv.args, source)
            source.args = (new,)
            relu.replace_all_uses_with(source)
            gm.graph.erase_node(relu)
            gm.graph.erase_node(conv)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm, count


log = logging.getLogger("insights.engine")


def fused_for(fast, sample: torch.Tensor) -> nn.Module | None:
    """The twin's fused bf16 copy for scoring ``sample``'s batches (the engine's seam asks for
    it on a GPU under bf16 autocast only), or None when the graph has nothing to fuse or the
    copy's logits for ``sample`` stray from the twin's bf16 logits by more than bf16 rounding
    explains (the reason in ``fast.reasons["cuda_fused"]``). Built once per twin."""
    if fast.fused is None:
        built = _checked(fast, sample[:1])
        if isinstance(built, str):
            fast.reasons["cuda_fused"] = built
        fast.fused = built if isinstance(built, nn.Module) else False
    return fast.fused or None


def _checked(fast, sample: torch.Tensor) -> nn.Module | str:
    try:
        module, count = fused_copy(fast.module)
        if not count:
            return "no convolution followed by a ReLU to fuse"
        x = sample.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            got, want = module(x).float(), fast.module(x).float()
    except Exception as err:  # a graph the rewrite or cuDNN cannot take keeps the plain twin
        log.debug("no fused copy", exc_info=True)
        return f"the rewrite failed ({type(err).__name__}: {err})"
    if got.shape == want.shape and bool((got - want).abs().max() <= 0.05 * want.abs().max()):
        return module
    return "the fused copy's logits stray from the twin's"
