"""Several methods on one image and class, sharing the passes they have in common.

Saliency and input × gradient both need the plain input gradient; Grad-CAM needs a layer's
activation and gradient, which the same backward pass yields; guided backpropagation and the
guided half of Guided Grad-CAM need one guided pass; Eigen-CAM needs only a layer's activation
(``"act:<name>"``), which that pass yields too, else one forward pass without a backward. Each
method says what it can take from such shared passes (:meth:`Method.shared_needs`) and builds its map from them
(:meth:`Method.from_passes`); methods that cannot share run on their own as usual.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from . import registry
from .context import Context
from .errors import ParamError
from .method import Facts
from .options import EngineOptions
from .params import Cost
from .precision import arithmetic, true_fp32
from .probe import get_layer
from .scope import HookScope, model_lock
from .families.cam import layer_activations, layer_passes
from .families.rules import guided_gradient


def _requests(requests: Sequence[Any]) -> list[tuple[str, dict]]:
    out = []
    for item in requests:
        method, params = (item, {}) if isinstance(item, str) else (item[0], dict(item[1] or {}))
        out.append((method, params))
    if not out:
        raise ParamError("methods", "name at least one method")
    return out


def attribute_many(model: nn.Module, inputs: torch.Tensor, requests: Sequence[Any], target: Any, *,
                   progress: Callable[[int, int], Any] | None = None, cancel: Any = None,
                   memory_budget: int | None = None, info: dict | None = None,
                   options: EngineOptions | None = None) -> list[torch.Tensor]:
    """The maps of several methods for the same inputs and targets, in the order asked.

    ``requests`` holds method ids or ``(method, params)`` pairs. Passes that several methods
    need are made once. ``info["passes"]`` tells the forward and backward passes per image made
    (``shared``) against those the methods would make one by one (``separate``), and
    ``info["methods"]`` holds each method's own details (e.g. the Grad-CAM layer, the fast paths).
    ``options`` as for :func:`insights.attribute`."""
    from . import _check_call, check_supported, input_shape  # the same checks as attribute()

    methods = [(registry.get(method), params) for method, params in _requests(requests)]
    checked = [(m, m.validate(params, input_shape(inputs))) for m, params in methods]
    for m, _p in checked:
        check_supported(m, model)
    x, t = _check_call(model, inputs, target)
    facts = Facts(tuple(x.shape[1:]), model, x[:1])
    n = x.shape[0]
    separate = [m.cost(p, facts) for m, p in checked]
    infos: list[dict] = [{} for _ in checked]
    ctx = Context(model=model, inputs=x, target=t, total=1, progress=progress, cancel=cancel,
                  memory_budget=memory_budget, info={}, options=options or EngineOptions())

    with model_lock(model, exclusive=True), HookScope(model), true_fp32(x.device):
        ctx.check()
        needs = []
        for (m, p), details in zip(checked, infos):
            ctx.info = details
            needs.append(m.shared_needs(ctx, p))
        wanted = set().union(*[need for need in needs if need])
        layers = sorted(k[len("layer:"):] for k in wanted if k.startswith("layer:"))
        acts = sorted(k[len("act:"):] for k in wanted if k.startswith("act:"))
        plain = bool(layers) or "grad" in wanted
        forward_only = bool(acts) and not plain  # activations alone: no backward pass
        alone = [cost for cost, need in zip(separate, needs) if need is None]
        shared = Cost(int(plain or forward_only) + int("guided" in wanted) + sum(c.forward for c in alone),
                      int(plain) + int("guided" in wanted) + sum(c.backward for c in alone))
        ctx.total = max(1, shared.forward * n)

        passes: dict[str, Any] = {}
        if plain:
            hooked = {name: get_layer(model, name) for name in sorted(set(layers) | set(acts))}
            passes.update(layer_passes(ctx, hooked, input_grad="grad" in wanted))
            passes.update({"act:" + name: passes["layer:" + name][0] for name in acts})
        elif forward_only:
            found = layer_activations(ctx, {name: get_layer(model, name) for name in acts})
            passes.update({"act:" + name: act for name, act in found.items()})
        if "guided" in wanted:
            passes["guided"] = guided_gradient(ctx, x, t, "guided")

        maps = []
        for (m, p), need, details in zip(checked, needs, infos):
            ctx.info = details
            if need is not None:
                out = m.from_passes(ctx, p, passes)
            else:
                with arithmetic(x.device, p.get("precision", "fp32")):
                    out = m.run(ctx, p)
            maps.append(out.detach().float())
            details.setdefault("shared", need is not None)
    if info is not None:
        info["passes"] = {"shared": shared.as_dict(),
                          "separate": Cost(sum(c.forward for c in separate),
                                           sum(c.backward for c in separate)).as_dict()}
        info["methods"] = infos
    return maps
