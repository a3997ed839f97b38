"""The attribution engine: a registry of methods and the ``attribute`` entry point (no Flask).

The rooms: ``errors``, ``params`` (Param, Cost), ``method`` (Method, MethodRegistry, Facts),
``scope`` (HookScope, model_lock), ``precision`` (fp32 or bf16), ``probe`` (what a model looks
like), ``budget`` and ``context`` (one call: chunks, progress, cancel), ``passes`` (tensor
helpers), ``seam`` (the one place that picks the fast paths in ``fast/`` or the plain reference
paths), ``options`` (EngineOptions: the fast-path switches), ``families/`` (the methods) and
``combined`` (several methods sharing passes).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import probe as _probe
from .context import Context
from .errors import Cancelled, InsightsError, ParamError, UnknownMethod, UnsupportedModel
from .method import Facts, MethodRegistry
from .options import EngineOptions
from .precision import arithmetic
from .scope import HookScope, model_lock

registry = MethodRegistry()

# Importing the family modules registers their methods, in the order the UI lists them.
from .families import gradient  # noqa: E402,F401
from .families import rules  # noqa: E402,F401
from .families import cam  # noqa: E402,F401
from .families import perturbation  # noqa: E402,F401
from .families import lrp  # noqa: E402,F401
from .families import surrogate  # noqa: E402,F401


def methods() -> list[str]:
    """The ids of all registered attribution methods."""
    return registry.ids()


def method_info(method: str, params: dict | None = None, shape: Sequence[int] = (3, 224, 224),
                model: nn.Module | None = None) -> dict:
    """Describes a method: id, label, description, family, output kind, whether its map is signed,
    the parameter schema, and the cost (forward and backward passes per image) for ``params``
    on an input of ``shape`` (C, H, W) and, when given, ``model`` (a cost may follow the size of
    one of its layers; without the model such a method states its smallest cost)."""
    return registry.get(method).info(params, shape, model)


def _targets(target: Any, n: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(target, dtype=torch.long).flatten().to(device)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ParamError("target", f"needs one class index or one per row ({n}); got {t.numel()}")
    return t.clone()


def _check_call(model: nn.Module, inputs: Any, target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The detached inputs and one target per row, or a ParamError naming what is wrong. Probes
    the model (cached) before any lock is taken."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        raise ParamError("inputs", "must be an N×C×H×W tensor")
    x = inputs.detach()
    if not x.is_floating_point():
        raise ParamError("inputs", "must be a floating point tensor")
    t = _targets(target, x.shape[0], x.device)
    classes = _probe.probe(model, x)["classes"]
    bad = t[(t < 0) | (t >= classes)]
    if bad.numel():
        raise ParamError("target", f"class index {int(bad[0])} is out of range 0..{classes - 1}")
    return x, t


def input_shape(inputs: Any) -> tuple[int, ...] | None:
    """(C, H, W) of an N×C×H×W tensor, for defaults that follow the input's size; else None."""
    return tuple(inputs.shape[1:]) if isinstance(inputs, torch.Tensor) and inputs.dim() == 4 else None


def check_supported(m, model: nn.Module) -> None:
    """Raises :class:`UnsupportedModel` when method ``m`` cannot run on ``model``."""
    reason = m.unsupported(_probe.takes_hooks(model))
    if reason:
        raise UnsupportedModel(m.id, reason)


def attribute(model: nn.Module, inputs: torch.Tensor, method: str, target: Any, *,
              progress: Callable[[int, int], Any] | None = None, cancel: Any = None,
              memory_budget: int | None = None, info: dict | None = None,
              options: EngineOptions | None = None,
              partial: Callable[[torch.Tensor, float, str], Any] | None = None, **params) -> torch.Tensor:
    """Attribution map of ``method`` for ``model`` at ``inputs`` (already normalised, N×C×H×W).

    ``target`` is a class index or one per row. Returns N×C×H×W for pixel methods and N×1×H×W
    for CAM methods, float32, on the inputs' device. ``progress(done, total)`` is called between
    batches; ``cancel`` (a ``threading.Event`` or a callable) is checked there and raises
    :class:`Cancelled`. ``memory_budget`` caps the bytes of activations per batch. ``info``, if
    given, is filled with details of the call (e.g. the layer Grad-CAM chose, the cost, and in
    ``info["fast_paths"]`` which fast paths ran and why others did not). ``options``
    (:class:`EngineOptions`, default all on) switches fast paths off. ``partial(map, fraction,
    kind)``, if given, is called by methods that can show their map before the end with a
    whole-image approximation (N×C×H×W), the share of the work done and its kind: occlusion and
    feature ablation on patches score their windows coarse to fine and publish what they have
    ("refining", at most every quarter second); integrated gradients and gradient SHAP with 20 or
    more steps (samples) first compute a preview with a tenth of them ("preview", its cost in
    ``info["preview"]``). The returned map is the same as without it."""
    m = registry.get(method)
    p = m.validate(params, input_shape(inputs))
    check_supported(m, model)
    x, t = _check_call(model, inputs, target)
    cost = m.cost(p, Facts(tuple(x.shape[1:]), model, x[:1]))
    ctx = Context(model=model, inputs=x, target=t, total=max(1, cost.forward * x.shape[0]),
                  progress=progress, cancel=cancel, memory_budget=memory_budget,
                  info=info if info is not None else {}, options=options or EngineOptions(),
                  partial=partial)
    # Every method runs in full fp32 (no TF32 on CUDA) unless the caller opted into bf16: with
    # TF32 convolutions, DeepLift's maps of a random ResNet-18 missed the score difference by
    # 2.5%, IG drifted 2e-4 from Captum's fp32 maps and occlusion up to 3e-2 (H200).
    with model_lock(model, exclusive=m.exclusive or model.training), \
            arithmetic(x.device, p.get("precision", "fp32")):
        ctx.check()
        if m.exclusive or model.training:
            with HookScope(model):  # eval mode for the call, restored afterwards
                out = m.run(ctx, p)
        else:
            out = m.run(ctx, p)
    ctx.info.setdefault("cost", cost.as_dict())
    return out.detach().float()


def logits(model: nn.Module, inputs: torch.Tensor, *, options: EngineOptions | None = None,
           info: dict | None = None) -> torch.Tensor:
    """The model's logits for a batch of inputs (N×C×H×W), as a plain forward pass would give
    them (within 1e-4): on the model's traced twin where it fits, in fp32, sharing the model with
    other readers. ``info["twin"]`` says "twin", or why the model itself ran."""
    from . import seam

    opts = options or EngineOptions()
    with model_lock(model, exclusive=False), arithmetic(inputs.device, "fp32"):
        out, how = seam.logits(model, inputs, opts.twin)
    if info is not None:
        info["twin"] = how
    return out.float()


from .combined import attribute_many  # noqa: E402
from .metrics import evaluate, list_metrics, metric_info  # noqa: E402

__all__ = ["attribute", "attribute_many", "logits", "methods", "method_info", "registry", "EngineOptions", "Cancelled",
           "InsightsError", "ParamError", "UnknownMethod", "UnsupportedModel"]
__all__ += ["evaluate", "list_metrics", "metric_info"]
