"""What the engine learns about a model from one probing pass: memory per sample, the number
of classes, its spatial layers and each layer's output shape."""
from __future__ import annotations

import weakref

import torch
from torch import nn

from .errors import ParamError
from .errors import shown
from .scope import HookScope, model_lock

_probe_cache: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()

# Without hooks the engine cannot add up a model's activations; it then assumes this many times
# the input's size per sample, on the safe side: summed leaf outputs at 224×224 are about 50 times
# the input for ResNet-18 and 213 times for ResNet-50 (measured by this probe with hooks).
OPAQUE_ACTIVATION_FACTOR = 200


def takes_hooks(model: nn.Module) -> bool:
    """Whether forward hooks can be put on the model's modules and see its layers: not on a
    TorchScript module, nor on a module that says so (``takes_hooks = False``, e.g. a wrapped
    ``torch.export`` program, whose layers are one flat graph)."""
    return not isinstance(model, torch.jit.ScriptModule) and getattr(model, "takes_hooks", True)


def probe(model: nn.Module, sample: torch.Tensor) -> dict:
    """One forward pass of a single sample with hooks on every module, cached per model and
    input shape. Returns ``activation_bytes`` (sum of leaf outputs, a memory estimate per sample),
    ``classes`` (the number of outputs), ``spatial`` (names of modules whose output is
    N×C×H×W with H, W > 1, in firing order) and ``shapes`` (each named module's output shape
    for one row, without the batch dimension, at its last call). :func:`insights.attribute`
    calls it before it locks the model, so methods always find it cached."""
    key = (tuple(sample.shape[1:]), sample.dtype, sample.device.type)
    per_model = _probe_cache.setdefault(model, {})
    if key in per_model:
        return per_model[key]
    if not takes_hooks(model):  # one plain pass: the class count, and an estimate of the memory
        with model_lock(model, exclusive=False), torch.inference_mode():
            logits = model(sample[:1])
        per_model[key] = {"activation_bytes": sample[:1].numel() * sample.element_size() * OPAQUE_ACTIVATION_FACTOR,
                          "spatial": [], "classes": int(logits.shape[-1]), "shapes": {}}
        return per_model[key]
    total = [0]
    spatial: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    names = {m: n for n, m in model.named_modules()}

    def record(module, _inputs, output):
        if isinstance(output, torch.Tensor):
            if names.get(module):
                shapes[names[module]] = tuple(output.shape[1:])
            if not any(True for _ in module.children()):
                total[0] += output.numel() * output.element_size()
            if output.dim() == 4 and output.shape[2] > 1 and output.shape[3] > 1 and names.get(module):
                spatial.append(names[module])

    # Hooks on a shared model: take it exclusively (callers must not hold its lock already).
    with model_lock(model, exclusive=True), HookScope(model) as scope, torch.inference_mode():
        for module in model.modules():
            scope.forward_hook(module, record)
        logits = model(sample[:1])
    result = {"activation_bytes": max(total[0], sample[:1].numel() * 4), "spatial": spatial,
              "classes": int(logits.shape[-1]), "shapes": shapes}
    per_model[key] = result
    return result


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (e.g. "layer4"), or a ParamError listing close names."""
    try:
        return model.get_submodule(name)
    except (AttributeError, TypeError):
        names = [n for n, _ in model.named_modules() if n]
        close = [n for n in names if name and (name in n or n in name)][:8] or names[-8:]
        raise ParamError("layer", f"no module named {shown(name)} in the model; e.g. {', '.join(close)}") from None


def default_layer(model: nn.Module, inputs: torch.Tensor) -> str:
    """The last module (in call order) whose output is spatial: where Grad-CAM looks by default."""
    if not takes_hooks(model):
        raise ParamError("layer", "the model's layers cannot be watched (a TorchScript module takes no hooks)")
    spatial = probe(model, inputs)["spatial"]
    if not spatial:
        raise ParamError("layer", "the model has no module with a spatial (N×C×H×W) output; name a layer")
    return spatial[-1]
