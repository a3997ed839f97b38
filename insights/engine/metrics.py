"""Faithfulness metrics: how well an attribution map predicts what the model does when the
pixels it ranks highest are removed (deletion) or revealed first (insertion).

Each metric describes itself like a method (a schema of :class:`Param`, a cost in forward passes)
and sits in a :class:`MetricRegistry`; :func:`evaluate` runs one. Deletion and insertion rank the
pixels by the attribution summed over channels (ties: the earlier pixel in row-major order first),
then score ``steps + 1`` images per map, from nothing removed (or revealed) to everything, with
removed pixels taken from a baseline image (a strong Gaussian blur of the input, its per-channel
mean, or zero). All images of one call run as batches under the memory budget, in fp32, sharing
the model with other readers; progress and cancel work as in :func:`insights.attribute`.

A score means little on its own, so by default the answer also carries the same score of a few
seeded smooth random maps (uniform values on a coarse grid, upsampled bilinearly): a per-pixel
random map scatters its removals, which the model never saw in training, and scores a deletion
area that flatters it (0.21 against Grad-CAM's 0.39 on EfficientNet-Lite0 in issue 16).

The other metrics live in their own modules and register here: ROAD in ``metrics_road``,
infidelity and max-sensitivity in ``metrics_sensitivity`` (the latter re-runs the explanation
through :func:`rerun`), the sanity and box checks in ``checks``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import seam
from .context import Context
from .errors import ParamError, shown
from .method import Facts, Registry
from .options import EngineOptions
from .params import Cost, Param
from .params import validate as validate_params
from .precision import true_fp32
from .scope import HookScope, model_lock


class Metric:
    """A metric: subclasses set the class attributes and implement ``run``."""

    id: str = ""
    label: str = ""
    description: str = ""
    better: str = "lower"  # which way a better map moves the score: lower | higher
    params: tuple[Param, ...] = ()
    # True for metrics that re-run the explanation (``method=`` and ``method_params=`` in
    # evaluate, in ``p["method"]`` and ``p["method_params"]`` for run). Such a metric runs
    # without the model lock and takes it only around its own passes (:func:`model_access`),
    # since the method it re-runs takes the lock itself (exclusively, if it installs hooks).
    needs_method: bool = False
    pass_weight: int = 1  # forward passes an image of the metric counts as, beside the model's (ROAD's imputation)

    def validate(self, given: dict, shape: Sequence[int] | None = None) -> dict:
        """The full parameter dict (defaults filled in for inputs of ``shape``), or ParamError."""
        return validate_params(self.id, self.params, given, shape)

    def cost(self, p: dict, shape: Sequence[int], method_cost: Cost | None = None) -> Cost:
        """Forward and backward passes per image; ``method_cost`` is the re-run method's cost
        per image (for metrics that need a method; None when it is not known)."""
        return Cost(1, 0)

    def info(self, given: dict | None = None, shape: Sequence[int] = (3, 224, 224),
             method_cost: Cost | None = None) -> dict:
        p = self.validate(given or {}, shape)
        return {"id": self.id, "label": self.label, "description": self.description,
                "better": self.better, "needs_method": self.needs_method,
                "params": [param.schema(shape) for param in self.params],
                "cost": self.cost(p, shape, method_cost).as_dict()}

    def run(self, ctx: Context, attribution: torch.Tensor, p: dict) -> dict:
        raise NotImplementedError


class MetricRegistry(Registry):
    """The faithfulness metrics by id."""

    kind = "metric"

    def unknown(self, name) -> Exception:
        return ParamError("metric", f"unknown metric {shown(name)}; known metrics: {', '.join(self.ids())}")


registry = MetricRegistry()


# --------------------------------------------------------------------------- helpers


def blur_sigma(shape: Sequence[int]) -> float:
    """The default blur: sigma of a twentieth of the shorter side (11.2 pixels at 224×224), so
    that objects lose their shape and texture but keep their colour."""
    return round(min(shape[1], shape[2]) / 20, 2)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``x`` (N×C×H×W) blurred by a Gaussian of ``sigma`` pixels, separable, truncated at three
    sigma, with the border pixels repeated outwards (a constant image stays constant)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    c = x.shape[1]
    out = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def baseline_image(x: torch.Tensor, kind: str, sigma: float) -> torch.Tensor:
    """What replaces removed pixels: the blurred input, its per-channel mean, or zero."""
    if kind == "blur":
        return gaussian_blur(x, sigma)
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).clone()
    return torch.zeros_like(x)


def smooth_random_maps(count: int, grid: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """``count``×H×W maps: uniform random values on a ``grid``×``grid`` grid (map k drawn from
    seed ``seed + k``), upsampled bilinearly to ``size``. Deterministic on every device."""
    cells = torch.stack([torch.rand(grid, grid, generator=torch.Generator().manual_seed(seed + k))
                         for k in range(count)])
    return F.interpolate(cells.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]


def ranks(importance: torch.Tensor) -> torch.Tensor:
    """For M×H×W importances, each pixel's place (0 = most important) in its map's order;
    equal importances keep row-major order (a stable sort)."""
    flat = importance.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    place = torch.empty_like(order)
    place.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return place.view_as(importance)


def trapezoid(fractions: Sequence[float], scores: Sequence[float]) -> float:
    """Area under the curve by the trapezoid rule."""
    return float(sum((b - a) * (u + v) / 2 for a, b, u, v in
                     zip(fractions, fractions[1:], scores, scores[1:])))


def target_scores(ctx: Context, batch: torch.Tensor, target: torch.Tensor, score: str) -> torch.Tensor:
    """Each row's target logit (``score="logit"``) or softmax probability, in fp32, on the
    model's twin where it fits. The caller is under ``no_grad`` (not inference mode: a twin built
    here must serve autograd later)."""
    out = seam.logits(ctx.model, batch, ctx.options.twin)[0].float()
    if score == "probability":
        out = out.softmax(-1)
    return out.gather(1, target.view(-1, 1)).view(-1)


def reference_count(p: dict) -> int:
    """The maps a curve metric scores per image: the given one, and unless ``reference`` is
    none, ``reference_seeds`` smooth random ones."""
    return 1 + (p["reference_seeds"] if p["reference"] != "none" else 0)


def with_references(importance: torch.Tensor, p: dict) -> torch.Tensor:
    """N×H×W importances → N×M×H×W: each image's map followed by the smooth random reference
    maps (the same for every image) when the parameters ask for them."""
    n, h, w = importance.shape
    importance = importance.unsqueeze(1)
    if reference_count(p) == 1:
        return importance
    noise = smooth_random_maps(p["reference_seeds"], p["reference_grid"], (h, w), p["seed"])
    return torch.cat([importance, noise.to(importance.device).expand(n, -1, -1, -1)], 1)


def check_attribution(attribution: Any, x: torch.Tensor) -> torch.Tensor:
    """Per-pixel importance (N×H×W, float32): the attribution summed over its channels."""
    if not isinstance(attribution, torch.Tensor) or attribution.dim() != 4:
        raise ParamError("attribution", "must be an N×K×H×W tensor (a map from insights.attribute)")
    n, _, h, w = x.shape
    if attribution.shape[0] != n or tuple(attribution.shape[2:]) != (h, w):
        raise ParamError("attribution", f"shape {tuple(attribution.shape)} does not fit the inputs "
                         f"{tuple(x.shape)}: needs {n} rows of {h}×{w}")
    importance = attribution.detach().to(x.device, torch.float32).sum(1)
    if not torch.isfinite(importance).all():
        raise ParamError("attribution", "contains NaN or infinite values")
    return importance


@contextmanager
def model_access(model: nn.Module):
    """The model for a metric's own passes: shared with other readers, in eval mode (a model in
    training mode is switched for the duration, under the exclusive lock, and restored)."""
    with model_lock(model, exclusive=model.training):
        if model.training:
            with HookScope(model):
                yield model
        else:
            yield model


def rerun(ctx: Context, p: dict, inputs: torch.Tensor, model: nn.Module | None = None,
          target: torch.Tensor | None = None) -> torch.Tensor:
    """The map of ``p["method"]`` with ``p["method_params"]`` at ``inputs`` (rows × C×H×W) for
    ``model`` (default: the metric's own, or e.g. a randomised copy) and ``target`` (default: the
    metric's targets, repeated when ``inputs`` holds several rows per image, row ``r`` belonging
    to image ``r % N``). The call's passes count towards ``ctx``'s progress (the method's cost
    per row, scaled to what the method reports), ``ctx``'s cancel stops it, and it runs under
    ``ctx``'s memory budget and options. Call it without holding the model lock."""
    from . import attribute
    from . import registry as methods

    model = ctx.model if model is None else model
    rows, n = inputs.shape[0], ctx.inputs.shape[0]
    if target is None:
        if rows % n:
            raise ValueError(f"rerun: {rows} rows are not a whole number of copies of {n} images")
        target = ctx.target.repeat(rows // n)
    shape = tuple(inputs.shape[1:])
    share = methods.get(p["method"]).cost(p["method_params"], Facts(shape, model, inputs[:1])).forward * rows
    start = ctx.done

    def forward(done: int, total: int) -> None:
        ctx.advance(max(0, start + share * done // max(total, 1) - ctx.done))

    out = attribute(model, inputs, p["method"], target, progress=forward, cancel=ctx.cancel,
                    memory_budget=ctx.memory_budget, options=ctx.options, **p["method_params"])
    ctx.advance(max(0, start + share - ctx.done))  # a method may report fewer units than its cost
    return out


def check_method(metric: Metric, method: Any, method_params: Any,
                 shape: Sequence[int] | None) -> tuple[str, dict] | None:
    """For a metric that re-runs a method: the method's id and its full parameter dict for
    inputs of ``shape``, or ParamError naming ``method`` or the bad parameter. None for a metric
    that does not (which then refuses a method)."""
    from . import registry as methods

    if not metric.needs_method:
        if method is not None:
            raise ParamError("method", f"{metric.id} does not re-run a method")
        if method_params:
            raise ParamError("method_params", f"{metric.id} does not re-run a method")
        return None
    if method is None:
        raise ParamError("method", f"{metric.id} re-runs the explanation: name its method, one of "
                                   f"{', '.join(methods.ids())}")
    if not isinstance(method, str) or method not in methods:
        raise ParamError("method", f"unknown method {shown(method)}; known methods: {', '.join(methods.ids())}")
    if method_params is None:
        method_params = {}
    if not isinstance(method_params, dict):
        raise ParamError("method_params", f"must be a dict of {method}'s parameters, got {shown(method_params)}")
    return method, methods.get(method).validate(method_params, shape)


# --------------------------------------------------------------------------- deletion / insertion


CURVE_PARAMS = (
    Param("steps", "int", 16, "Number of steps from nothing to all pixels removed (or revealed); "
          "one forward pass per step and map.", min=1, max=256),
    Param("baseline", "choice", "blur", "What removed pixels become: a strong Gaussian blur of the "
          "image (see sigma), the image's per-channel mean, or zero (in normalised units, the "
          "dataset mean).", choices=("blur", "mean", "zero")),
    Param("sigma", "float", 11.2, "Blur baseline: the Gaussian's sigma in pixels (by default a "
          "twentieth of the shorter side).", min=0.1, max=1000, scaled=blur_sigma),
    Param("score", "choice", "probability", "What is measured: the target's softmax probability, "
          "or its logit.", choices=("probability", "logit")),
    Param("reference", "choice", "smooth_random", "Also score smooth random maps on the same "
          "image, so the area can be compared with chance; none skips them.",
          choices=("smooth_random", "none")),
    Param("reference_seeds", "int", 5, "Number of smooth random maps (seeds seed, seed+1, ...).",
          min=1, max=32),
    Param("reference_grid", "int", 7, "Side of the random grid the reference maps are upsampled "
          "from (7 matches a ResNet's Grad-CAM).", min=1, max=256),
    Param("seed", "int", 0, "First seed of the reference maps.", min=0, max=2 ** 31 - 1),
)


class CurveMetric(Metric):
    """Deletion and insertion: a curve of the score against the fraction of pixels changed."""

    params = CURVE_PARAMS
    insert: bool = False

    def cost(self, p: dict, shape: Sequence[int], method_cost: Cost | None = None) -> Cost:
        # The clean image and the full baseline are shared by all maps of an image.
        return Cost(2 + (p["steps"] - 1) * reference_count(p), 0)

    def run(self, ctx: Context, attribution: torch.Tensor, p: dict) -> dict:
        x = ctx.inputs
        n, _, h, w = x.shape
        importance = with_references(check_attribution(attribution, x), p)
        place = ranks(importance.flatten(0, 1)).view(n, -1, h, w)  # n × maps × H × W
        maps, steps, pixels = place.shape[1], p["steps"], h * w
        counts = [round(k * pixels / steps) for k in range(steps + 1)]
        base = baseline_image(x, p["baseline"], p["sigma"])
        scores = torch.empty(n, maps, steps + 1, device=x.device)

        def measure(batch: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return target_scores(ctx, batch, target, p["score"])

        with torch.no_grad():  # not inference mode: the twin seam.logits may build must serve autograd later
            for s in ctx.chunks(2 * n, grad=False):  # the clean images and the full baselines
                rows = torch.arange(s.start, s.stop, device=x.device)
                image, empty = rows % n, rows // n == 1
                batch = torch.where(empty.view(-1, 1, 1, 1), base[image], x[image])
                got = measure(batch, ctx.target[image])
                start = empty if self.insert else ~empty  # the rows at fraction 0
                scores[image[start], :, 0] = got[start].unsqueeze(1)
                scores[image[~start], :, steps] = got[~start].unsqueeze(1)
            inner = (steps - 1) * maps * n  # row r: step 1 + r // (maps n), map, image
            for s in ctx.chunks(inner, grad=False):
                rows = torch.arange(s.start, s.stop, device=x.device)
                step, rest = 1 + rows // (maps * n), rows % (maps * n)
                which, image = rest // n, rest % n
                limit = torch.tensor(counts, device=x.device)[step]
                changed = (place[image, which] < limit.view(-1, 1, 1)).unsqueeze(1)
                if self.insert:
                    batch = torch.where(changed, x[image], base[image])
                else:
                    batch = torch.where(changed, base[image], x[image])
                scores[image, which, step] = measure(batch, ctx.target[image])

        fractions = [c / pixels for c in counts]
        curves = scores.tolist()
        areas = [[trapezoid(fractions, curve) for curve in per_image] for per_image in curves]
        answer = {"metric": self.id, "better": self.better, "params": dict(p),
                  "fractions": fractions, "scores": [c[0] for c in curves],
                  "areas": [a[0] for a in areas]}
        answer["area"] = sum(answer["areas"]) / n
        if maps > 1:
            ref = torch.tensor([a[1:] for a in areas], dtype=torch.float64)  # n × seeds
            answer["reference"] = {
                "kind": p["reference"], "seeds": list(range(p["seed"], p["seed"] + maps - 1)),
                "grid": p["reference_grid"], "areas": ref.tolist(),
                "mean": ref.mean(1).tolist(),
                "std": (ref.std(1, unbiased=False)).tolist(),
                "scores": scores[:, 1:].mean(1).tolist()}
        return answer


@registry.register
class Deletion(CurveMetric):
    id = "deletion"
    label = "Deletion"
    description = "Removes the most important pixels first and records the target's score; " \
                  "a faithful map makes it fall fast (a lower area is better)."
    better = "lower"
    insert = False


@registry.register
class Insertion(CurveMetric):
    id = "insertion"
    label = "Insertion"
    description = "Reveals the most important pixels first, starting from the baseline image, " \
                  "and records the target's score; a faithful map makes it rise fast (a higher " \
                  "area is better)."
    better = "higher"
    insert = True


# --------------------------------------------------------------------------- entry points


def list_metrics() -> list[str]:
    """The ids of all registered faithfulness metrics."""
    return registry.ids()


def metric_info(metric: str, params: dict | None = None, shape: Sequence[int] = (3, 224, 224),
                method: str | None = None, method_params: dict | None = None,
                model: nn.Module | None = None) -> dict:
    """Describes a metric: id, label, description, which way is better, whether it re-runs a
    method (``needs_method``), the parameter schema and the cost (forward and backward passes per
    image) for ``params`` on an input of ``shape`` (C, H, W); for a metric that re-runs a method,
    with that ``method``'s cost for ``method_params`` (and ``model``, see :func:`method_info`)."""
    from . import method_info

    m = registry.get(metric)
    checked = check_method(m, method, method_params, shape) if method is not None else None
    method_cost = None
    if checked is not None:
        c = method_info(checked[0], method_params or {}, shape, model)["cost"]
        method_cost = Cost(c["forward"], c["backward"])
    return m.info(params, shape, method_cost)


def evaluate(model: nn.Module, inputs: torch.Tensor, attribution: torch.Tensor, target: Any,
             metric: str, *, method: str | None = None, method_params: dict | None = None,
             progress: Callable[[int, int], Any] | None = None, cancel: Any = None,
             memory_budget: int | None = None, options: EngineOptions | None = None, **params) -> dict:
    """Scores ``attribution`` (N×K×H×W, e.g. from :func:`insights.attribute`) for ``model`` at
    ``inputs`` (normalised, N×C×H×W) and ``target`` with ``metric`` (see :func:`list_metrics`).

    Deletion and insertion answer ``fractions`` (of pixels changed, 0 to 1), ``scores`` (one
    curve per image), ``areas`` (trapezoid under each curve) and their mean ``area``, ``better``
    ("lower" or "higher"), the ``params`` used, and unless ``reference="none"``, ``reference``:
    the areas of smooth random maps on the same images, their mean and spread; ROAD answers the
    same way. Infidelity and max-sensitivity answer ``values`` (one per image) and their mean
    ``value``. Metrics that
    re-run the explanation (``needs_method`` in :func:`metric_info`, e.g. ``sensitivity_max``)
    take the ``method`` id that made ``attribution`` and its ``method_params``. ``progress``,
    ``cancel`` and ``memory_budget`` work as in :func:`insights.attribute`."""
    from . import _check_call, check_supported, input_shape  # (the engine imports this module)
    from . import registry as methods

    m = registry.get(metric)
    shape = input_shape(inputs)
    p = m.validate(params, shape)
    checked = check_method(m, method, method_params, shape)
    if checked is not None:
        check_supported(methods.get(checked[0]), model)
        p["method"], p["method_params"] = checked
    x, t = _check_call(model, inputs, target)
    check_attribution(attribution, x)
    method_cost = None
    if checked is not None:
        method_cost = methods.get(checked[0]).cost(checked[1], Facts(tuple(x.shape[1:]), model, x[:1]))
    cost = m.cost(p, tuple(x.shape[1:]), method_cost)
    ctx = Context(model=model, inputs=x, target=t, total=max(1, cost.forward * x.shape[0]),
                  progress=progress, cancel=cancel, memory_budget=memory_budget,
                  options=options or EngineOptions())
    with true_fp32(x.device):
        ctx.check()
        if m.needs_method:  # the method takes the lock itself; the metric around its own passes
            return m.run(ctx, attribution, p)
        with model_access(model):
            return m.run(ctx, attribution, p)


# The other metrics register themselves into ``registry`` when imported, in the order listed.
from . import metrics_road  # noqa: E402,F401
from . import metrics_sensitivity  # noqa: E402,F401
from . import checks  # noqa: E402,F401
