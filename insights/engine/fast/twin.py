"""A faster twin of a model, for passes that need no hooks (perturbation scores, integrated
gradients).

The twin is a traced copy (torch.fx) with every batch norm that follows a convolution folded into
that convolution's weights, each ReLU → max-pool pair run as max-pool → ReLU, in channels-last
layout. In eval mode a batch norm is an affine map, and a window's maximum commutes with a ReLU,
so the twin computes the same function with the same gradients; only the rounding of the last
bits differs, as it does between any two memory layouts.

When the input feeds a single convolution and nothing else (the stem of almost every CNN), the
twin is also split into ``stem`` and ``rest``: ``model(x) == rest(stem(x))``. The stem is linear
(plus a bias), which lets integrated gradients evaluate it twice instead of once per step and
back-propagate through it once for the whole path (see ``seam.through_stem``).

``find_twin(model, sample)`` returns, instead of a twin, the reason why the model itself must run
whenever the shortcut might not be the same model: with any module in training mode, with hooks
registered, for TorchScript modules, for non-fp32 inputs or weights, when tracing fails, or when
the twin's logits for ``sample`` do not match the model's (``twin()``: the twin or None). Twins
are cached per model and rebuilt when a weight, a module or a module's plain attribute changes.
"""
from __future__ import annotations

import copy
import logging
import threading
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..precision import true_fp32
from .graphs import GraphCache

_BN = (nn.BatchNorm2d,)


@dataclass
class Twin:
    module: nn.Module  # the folded, channels-last copy: module(x) ≈ model(x)
    stem: nn.Conv2d | None = None  # the first layer, when the input feeds only it
    rest: nn.Module | None = None  # rest(stem(x)) ≈ model(x)
    graphs: GraphCache = field(default_factory=GraphCache)  # CUDA graphs of its batches
    stem_sizes: dict = field(default_factory=dict)  # input C×H×W → elements of one stem output
    fused: object = None  # the fused bf16 copy for GPU scoring (fused.py); False: none
    sliced: object = None  # the copy that scores CPU batches in slices (slices.py); False: none
    reasons: dict = field(default_factory=dict)  # "stem", "cuda_fused", "cpu_slices": why none


log = logging.getLogger("insights.engine")


_cache: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Twin | str]]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def twin(model: nn.Module, sample: torch.Tensor) -> Twin | None:
    """The model's twin, or None where the model itself must run (see the module docstring)."""
    found = find_twin(model, sample)
    return found if isinstance(found, Twin) else None


def find_twin(model: nn.Module, sample: torch.Tensor) -> Twin | str:
    """The model's twin, or why the model itself must run (see the module docstring).
    ``sample`` (one input row or more) checks a newly built twin against the model."""
    if isinstance(model, torch.jit.ScriptModule):
        return "a TorchScript module"
    if getattr(model, "takes_hooks", True) is False:
        return "an opaque module (an exported program)"
    if sample.dtype != torch.float32:
        return f"{sample.dtype} inputs"
    named = list(model.named_modules())  # one walk of the module tree for all the checks
    if any(m.training for _, m in named):
        return "a module is in training mode"
    if _has_hooks([m for _, m in named]):
        return "the model has hooks"
    key = _state_key(model, named)
    if key is None:
        return "weights that are not all float32"
    with _lock:
        hit = _cache.get(model)
        if hit is not None and hit[0] == key:
            return hit[1]
        # Built and checked in exact fp32 whatever the caller's precision: the comparison
        # with the model's logits is at 1e-4.
        with torch.autocast(sample.device.type, enabled=False), true_fp32(sample.device):
            built = _build(model, sample[:1])
        _cache[model] = (key, built)
        return built


def _has_hooks(modules: list[nn.Module]) -> bool:
    from torch.nn.modules import module as base

    if (base._global_forward_hooks or base._global_forward_pre_hooks
            or base._global_backward_hooks or base._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
               or m._backward_pre_hooks for m in modules)


_PLAIN = frozenset((bool, int, str, type(None)))
_PLAIN_KINDS = (bool, int, float, str, type(None))


def _plain_value(v: object) -> object:
    """A module attribute as it goes into the cache key: plain values (numbers, strings, flags,
    tuples of them, subclasses such as an IntEnum, numpy scalars or torch.Size included) as
    themselves or their repr (a float's repr, so that a NaN equals itself); anything else
    (tensors, modules, callables) as None."""
    if type(v) in _PLAIN:  # the common case, checked first
        return v
    if isinstance(v, _PLAIN_KINDS) or (isinstance(v, tuple) and all(
            isinstance(e, _PLAIN_KINDS) for e in v)):
        return repr(v)
    return None


def _state_key(model: nn.Module, named: list[tuple[str, nn.Module]]) -> tuple | None:
    """What the twin was copied from: each module's name, type and plain attributes (a stride,
    an eps, a flag) and each weight's storage, version and checksums. The checksums catch
    edits made through ``.data``, which leave the version alone; a swapped module changes the names and
    types. None for weights that are not all fp32."""
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors):
        return None
    layout = tuple((name, type(m), tuple(
        (k, _plain_value(v)) for k, v in m.__dict__.items() if k[0] != "_")) for name, m in named)
    storage = tuple((t.data_ptr(), t._version, t.device.type) for t in tensors)
    floats = [t.detach() for t in tensors if t.is_floating_point()]
    return layout, storage, checksums(floats, fused=all(t.is_cuda for t in floats))


def checksums(tensors: list[torch.Tensor], fused: bool) -> bytes:
    """Per-tensor numbers that change when a tensor's values do (NaN-safe to compare as bytes).
    Plain: each tensor's sum, one small reduction per tensor (2 ms on a ResNet-18 on the CPU).
    Fused (on a GPU, where 100-300 separate launches cost 3-10 ms): each tensor's L1 and L2
    norms, and the L1 norm of the tensor plus 0.25, which also moves when signs flip; a few
    launches for all tensors together. Neither form sees values permuted within a tensor."""
    if not tensors:
        return b""
    with torch.no_grad():
        if fused:
            parts = (torch._foreach_norm(tensors, 1) + torch._foreach_norm(tensors, 2)
                     + torch._foreach_norm(torch._foreach_add(tensors, 0.25), 1))
        else:
            parts = [t.sum() for t in tensors]
        return torch.stack(parts).cpu().numpy().tobytes()


def _build(model: nn.Module, sample: torch.Tensor) -> Twin | str:
    """A new twin, checked against the model's logits for ``sample``, or why there is none."""
    try:
        copied = copy.deepcopy(model)
        traced = fx.GraphModule(copied, _ConvLeafTracer().trace(copied))
        _fold_batch_norms(traced)
        _pool_before_relu(traced)
        traced = traced.to(memory_format=torch.channels_last)
        for param in traced.parameters():
            # bf16 autocast keeps one cast copy of a weight per call only if it requires grad
            # (folded biases did not); no pass takes gradients of weights.
            param.requires_grad_(True)
        built = Twin(traced)
        split = _split_stem(traced)
        with torch.no_grad():
            want = model(sample)
            if not _close(built.module(sample), want):
                return "the traced copy's logits differ from the model's"
        why = split if isinstance(split, str) else _stem_fails(*split, sample, want)
        if why:
            built.reasons["stem"] = why
        else:
            built.stem, built.rest = split
        return built
    except Exception as err:  # any model tracing cannot follow runs as it is
        log.debug("no twin for %s", type(model).__name__, exc_info=True)
        return f"tracing failed ({type(err).__name__}: {err})"


def _stem_fails(stem: nn.Module, rest: nn.Module, sample: torch.Tensor, want: torch.Tensor) -> str | None:
    """Why the stem cannot be split off, or None when it is affine and rest() takes its output
    as a leaf that gradients are taken at (an in-place operation on it, hidden behind a
    pass-through module, would fail)."""
    if not _affine(stem, sample):
        return "the first layer is not affine"
    try:
        with torch.enable_grad():
            leaf = stem(sample).detach().requires_grad_(True)
            got = rest(leaf)
            torch.autograd.grad(got.sum(), leaf)
    except RuntimeError as err:
        return f"the rest cannot take gradients at the stem's output ({err})"
    return None if _close(got.detach(), want) else "rest(stem(x)) differs from the model"


class _ConvLeafTracer(fx.Tracer):
    """Keeps every Conv2d, subclasses included (e.g. "same"-padding variants), as one module
    call, so that batch norms after them can be folded."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, qualname)


def _affine(stem: nn.Module, sample: torch.Tensor) -> bool:
    """Whether stem(a + t(b - a)) == stem(a) + t(stem(b) - stem(a)) on random a, b."""
    gen = torch.Generator(device=sample.device).manual_seed(0)
    a, b = (torch.randn(sample.shape, generator=gen, device=sample.device) for _ in range(2))
    with torch.no_grad():
        fa, fb, mid = stem(a), stem(b), stem(a + 0.3 * (b - a))
    return _close(mid, fa + 0.3 * (fb - fa))


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    scale = want.abs().max().clamp_min(1e-12)
    return got.shape == want.shape and bool(((got - want).abs().max() / scale) < 1e-4)


def _fold_batch_norms(traced: fx.GraphModule) -> None:
    """Replaces conv → batch norm (where the batch norm is the convolution's only user and
    tracks running statistics) by one convolution with the batch norm folded in. The folded
    convolution keeps the original's class, so a subclass keeps its own padding."""
    modules = dict(traced.named_modules())
    for node in list(traced.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN):
            continue
        source = node.args[0] if node.args else None
        if not (isinstance(source, fx.Node) and source.op == "call_module"
                and isinstance(modules.get(source.target), nn.Conv2d) and len(source.users) == 1):
            continue
        bn, conv = modules[node.target], modules[source.target]
        if bn.running_mean is None or bn.running_var is None:
            continue
        folded = fuse_conv_bn_eval(conv, bn)
        parent, _, name = source.target.rpartition(".")
        setattr(traced.get_submodule(parent) if parent else traced, name, folded)
        modules[source.target] = folded
        node.replace_all_uses_with(source)
        traced.graph.erase_node(node)
    traced.graph.lint()
    traced.delete_all_unused_submodules()
    traced.recompile()


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    return node.op == "call_function" and node.target in (torch.relu, F.relu) and len(node.args) == 1


def _pool_before_relu(traced: fx.GraphModule) -> None:
    """Rewrites relu → max-pool as max-pool → relu (where the pool is the relu's only user).
    The maximum of a window commutes with any non-decreasing function, so the values are the
    same, and so are the gradients (the pool routes to the same element, or the ReLU stops it
    either way); the ReLU then runs on the pooled, 4x smaller tensor (ResNet's stem)."""
    modules = dict(traced.named_modules())
    for pool in list(traced.graph.nodes):
        if not (pool.op == "call_module" and type(modules.get(pool.target)) is nn.MaxPool2d
                and not modules[pool.target].return_indices and len(pool.args) == 1):
            continue
        relu = pool.args[0]
        if not (isinstance(relu, fx.Node) and _is_relu(relu, modules) and len(relu.users) == 1
                and not relu.kwargs):
            continue
        source = relu.args[0]
        if not (isinstance(source, fx.Node) and len(source.users) == 1):
            continue  # an in-place ReLU would also change what the input's other users see
        pool.replace_all_uses_with(relu)
        pool.args = (source,)
        relu.args = (pool,)
        relu.prepend(pool)  # keep the graph in topological order: pool, then relu
    traced.graph.lint()
    traced.recompile()


def _batch_size_of(node: fx.Node, x: fx.Node) -> bool:
    return node.op == "call_method" and node.target == "size" and (
        node.args == (x, 0) or (node.args == (x,) and node.kwargs == {"dim": 0}))


def _split_stem(traced: fx.GraphModule) -> tuple[nn.Conv2d, nn.Module] | str:
    """(stem, rest) when the graph's one input feeds exactly one Conv2d (the caller checks
    that it is affine), else why not. Operations that would modify the stem's output in
    place (an in-place ReLU) get an out-of-place copy in ``rest``: the output is a leaf that
    gradients are taken at."""
    inputs = [n for n in traced.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return "the model takes more than one input"
    # Besides the stem, the input may only be asked its batch size (x.size(0)), which the
    # stem's output shares.
    users = [u for u in inputs[0].users if not _batch_size_of(u, inputs[0])]
    if len(users) != 1:
        return "the input feeds more than one operation"
    (first,) = users
    stem = traced.get_submodule(first.target) if first.op == "call_module" else None
    if not isinstance(stem, nn.Conv2d) or first.args != (inputs[0],) or first.kwargs:
        return "the input does not feed a Conv2d module"
    graph = fx.Graph()
    stem_out = graph.placeholder("stem_out")
    mapping: dict[fx.Node, fx.Node] = {inputs[0]: stem_out, first: stem_out}
    for node in traced.graph.nodes:
        if node not in mapping:
            mapping[node] = graph.node_copy(node, lambda n: mapping[n])
    rest = fx.GraphModule(traced, graph)
    for user in list(stem_out.users):
        if user.op == "call_module":
            module = rest.get_submodule(user.target)
            if getattr(module, "inplace", False):
                safe = copy.copy(module)
                safe.inplace = False
                user.target = "stem_out_" + str(user.target).replace(".", "_")
                rest.add_submodule(user.target, safe)
        elif user.op == "call_function" and user.kwargs.get("inplace"):
            user.kwargs = {**user.kwargs, "inplace": False}
        elif user.op == "call_method" and str(user.target).endswith("_"):
            return "the stem's output is changed in place"
    rest.recompile()
    return stem, rest
