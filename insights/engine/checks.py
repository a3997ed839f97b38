"""Two checks of a map beyond faithfulness: does it point at the object the user boxed
(``pointing``), and does it depend on what the model learned at all (``sanity_check``)?

``pointing`` is the energy-based pointing game of Wang et al. (Score-CAM, 2020): the share of the
map's positive attribution that falls inside a box drawn around the object, beside whether the
map's peak does, and the box's share of the image (what a map spread evenly would score).

``sanity_check`` is Adebayo et al.'s model-parameter randomisation test ("Sanity Checks for
Saliency Maps", 2018), cascading: the method runs again on a copy of the model whose blocks are
re-initialised one after another from the output down, and each map is compared with the
original by Spearman's rank correlation. A method whose map barely changes once the top blocks
hold random weights shows the image (edges, textures) rather than the model, and is flagged.

Which blocks: the model's top-level children that hold parameters, in reverse registration
order (a torchvision ResNet: fc, layer4, layer3, layer2, layer1, conv1 + bn1). A normalisation
layer joins the layer registered just before it (conv1 + bn1 is one block). A model with fewer
than :data:`MIN_BLOCKS` such blocks has its widest block (the one with the most blocks among its
own children; a wrapper holding a single block is looked through) split into its children until
it has enough: VGG-16 and MobileNet (``features``, ``classifier``) become classifier,
features.28, features.26, ...; EfficientNet-Lite0 (``_fc``, ``_conv_head`` + ``_bn1``,
``_blocks``, ``_conv_stem`` + ``_bn0``) becomes _fc, _conv_head + _bn1, _blocks.15, _blocks.14,
...; a ViT's encoder becomes its layers. Parameters held by the root or by a block that was
split (a ViT's class token and position embedding) are never randomised, and a block that does
not run in eval mode (Inception's auxiliary head) makes a stage that changes nothing.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from .context import Context
from .errors import ParamError, UnsupportedModel
from .metrics import Metric, check_attribution, registry
from .params import Cost, Param

MIN_BLOCKS = 5  # split the widest block until the model has at least this many


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


# --------------------------------------------------------------------------- pointing


def box_mask(box: Sequence[int], size: tuple[int, int], device=None) -> torch.Tensor:
    """An H×W bool mask, True inside ``box`` = (x0, y0, x1, y1), end exclusive."""
    x0, y0, x1, y1 = box
    mask = torch.zeros(size, dtype=torch.bool, device=device)
    mask[y0:y1, x0:x1] = True
    return mask


@registry.register
class Pointing(Metric):
    id = "pointing"
    label = "Pointing"
    description = "The share of the map's positive attribution inside a box drawn around the " \
                  "object (energy-based pointing game), whether the map's peak falls inside it, " \
                  "and the box's share of the image, which a map spread evenly would score."
    better = "higher"
    params = (
        Param("box", "int_list", None, "The object's box in the model input's pixels: x0, y0, "
              "x1, y1 (x1 and y1 exclusive).", length=4),
    )

    def validate(self, given: dict, shape: Sequence[int] | None = None) -> dict:
        p = super().validate(given, shape)
        if p["box"] is None:
            raise ParamError("box", "is required: x0, y0, x1, y1 in the input's pixels")
        x0, y0, x1, y1 = p["box"]
        if not (x0 < x1 and y0 < y1):
            raise ParamError("box", f"is empty: needs x0 < x1 and y0 < y1, got {list(p['box'])}")
        if shape is not None and not (0 <= x0 and 0 <= y0 and x1 <= shape[2] and y1 <= shape[1]):
            raise ParamError("box", f"{list(p['box'])} is not inside the {shape[2]}×{shape[1]} input")
        if shape is None and min(x0, y0) < 0:
            raise ParamError("box", f"{list(p['box'])} has a negative corner")
        return p

    def info(self, given: dict | None = None, shape: Sequence[int] = (3, 224, 224),
             method_cost: Cost | None = None) -> dict:
        # The box has no default; describe the metric with the whole image in its place.
        given = dict(given or {})
        given.setdefault("box", (0, 0, shape[2], shape[1]))
        return super().info(given, shape, method_cost)

    def cost(self, p: dict, shape: Sequence[int], method_cost: Cost | None = None) -> Cost:
        return Cost(0, 0)

    def run(self, ctx: Context, attribution: torch.Tensor, p: dict) -> dict:
        importance = check_attribution(attribution, ctx.inputs).double()  # N×H×W
        n, h, w = importance.shape
        inside = box_mask(p["box"], (h, w), importance.device)
        positive = importance.clamp(min=0)
        total = positive.sum((1, 2))
        within = (positive * inside).sum((1, 2))
        # No positive attribution at all: nothing points anywhere, so nothing is inside.
        energy = torch.where(total > 0, within / total.clamp(min=1e-300), torch.zeros_like(total))
        peak = importance.flatten(1).argmax(1)  # the first maximum in row-major order
        hit = inside.flatten()[peak]
        chance = inside.sum().item() / (h * w)
        ctx.advance(ctx.total)
        return {"metric": self.id, "better": self.better, "params": {"box": list(p["box"])},
                "energies": energy.tolist(), "hits": hit.tolist(),
                "energy": energy.mean().item(), "hit": hit.double().mean().item(),
                "chance": chance}


# --------------------------------------------------------------------------- sanity check


def _holds_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _units(module: nn.Module, prefix: str) -> list[list[tuple[str, nn.Module]]]:
    """The children of ``module`` that hold parameters, in registration order, as blocks: lists
    of (name, module), a normalisation layer joined to the block before it."""
    units: list[list[tuple[str, nn.Module]]] = []
    for name, child in module.named_children():
        if not _holds_parameters(child):
            continue
        if isinstance(child, _NORMS) and units:
            units[-1].append((prefix + name, child))
        else:
            units.append([(prefix + name, child)])
    return units


def _parts(name: str, module: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """The blocks ``module`` splits into, looking through wrappers with a single block
    (a ViT's ``encoder`` holds ``layers`` and a final norm: its parts are the layers)."""
    parts = _units(module, name + ".")
    while len(parts) == 1:
        inner = _units(parts[0][0][1], parts[0][0][0] + ".")
        if len(inner) < 2:
            break
        inner[-1].extend(parts[0][1:])
        parts = inner
    return parts


def blocks_of(model: nn.Module) -> list[list[str]]:
    """The model's blocks from the output down, each a list of module names (see the module
    docstring for the rule)."""
    units = _units(model, "")
    while len(units) < MIN_BLOCKS:
        parts = [_parts(*unit[0]) for unit in units]
        widths = [len(p) for p in parts]
        if not widths or max(widths) < 2:
            break
        # The widest block, the later one on a tie (nearer the output).
        at = max(range(len(units)), key=lambda k: (widths[k], k))
        parts[at][-1].extend(units[at][1:])  # a norm after the split block follows its last part
        units[at:at + 1] = parts[at]
    return [[name for name, _ in unit] for unit in reversed(units)]


def reinitialise(modules: Sequence[nn.Module], seed: int) -> None:
    """Gives ``modules`` (one block) freshly initialised weights, the same for the same seed on
    any device: each submodule's own ``reset_parameters`` (which also resets a batch norm's
    running statistics, so the block is as newly built) runs on a CPU copy under ``seed``, with
    the global random state left as it was. A parameter whose module has no
    ``reset_parameters`` is drawn from a normal distribution with its trained mean and spread."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for block in modules:
            fresh = copy.deepcopy(block).to("cpu")
            for module in fresh.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
                    continue
                for param in module.parameters(recurse=False):
                    spread = param.float().std().nan_to_num() if param.numel() > 1 else 0.0
                    param.copy_(torch.randn(param.shape) * spread + param.float().mean())
            block.load_state_dict(fresh.state_dict())


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """The 1-based ranks of a vector (as float64), tied values sharing the average of their ranks.
    The values are sorted in their own dtype (float32 maps sort twice as fast as float64)."""
    ordered, order = torch.sort(values, stable=True)
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    mean_rank = last - (counts.double() - 1) / 2
    ranks = torch.empty(values.numel(), dtype=torch.float64, device=values.device)
    ranks[order] = mean_rank[group]
    return ranks


def _centred_ranks(values: torch.Tensor) -> torch.Tensor:
    ranks = average_ranks(values.flatten().nan_to_num())
    return ranks - ranks.mean()


def _correlation(da: torch.Tensor, db: torch.Tensor) -> float:
    na, nb = da.norm(), db.norm()
    if na == 0 or nb == 0:  # a constant map: see spearman
        return 1.0 if na == nb else 0.0
    return float((da @ db) / (na * nb))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two maps (flattened): the Pearson correlation of their
    average ranks, as ``scipy.stats.spearmanr``. Where a map is constant the correlation is
    undefined; it is then 1 when both are (they order the pixels alike: not at all), else 0."""
    return _correlation(_centred_ranks(a), _centred_ranks(b))


SANITY_PARAMS = (
    Param("blocks", "int", 4, "How many blocks to randomise, one more per stage, from the output "
          "down (one re-run of the method per stage).", min=1, max=32),
    Param("flag_after", "int", 2, "The stage that decides the flag: the map with this many "
          "blocks randomised.", min=1, max=32),
    Param("threshold", "float", 0.5, "Flag the method when the rank correlation with the "
          "original map at stage flag_after stays above this.", min=-1, max=1),
    Param("seed", "int", 0, "Seed of the random weights (the same seed, the same weights).",
          min=0, max=2 ** 31 - 1),
)


@registry.register
class SanityCheck(Metric):
    """Adebayo et al.'s cascading model-parameter randomisation on a deep copy of the model.

    Stage k re-initialises block k (see :func:`blocks_of`) on top of blocks 1..k-1, from seed
    ``seed × 64 + k`` (:func:`reinitialise`: the blocks' own initialisers, batch-norm running
    statistics included, so a block is as if never trained) and re-runs the method through
    :func:`~insights.engine.metrics.rerun`. Each map is compared with ``attribution`` (the
    original, which should be the method's map with the same parameters) by the Spearman rank
    correlation of the absolute values of the channel-summed maps, as Adebayo et al. did: a
    signed method whose sign flips where the random model disagrees still shows the same
    structure, and that is what the test looks for.

    Defaults: ``flag_after`` = 2, because with only the output layer random a map can still
    agree with the original through the untouched features (Grad-CAM on EfficientNet-Lite0
    keeps 0.77 with ``_fc`` random, then falls to -0.09 with the head convolution random too);
    ``threshold`` = 0.5, halfway between no relation and the same ranking: on Lite0 and the cat
    photo, Grad-CAM, saliency and integrated gradients are at or below 0.35 by stage 2 while
    guided backprop stays at 0.99. The answer: ``stages`` (per stage, the names randomised so
    far and the Spearman correlation per image), ``maps`` (N×S×1×H×W, float32 on the CPU:
    each stage's channel-summed map), ``flagged`` (per image), ``threshold`` and ``flag_after``
    (clamped to the stages the model has)."""

    id = "sanity_check"
    label = "Sanity check"
    description = "Re-runs the method with the model's blocks randomised from the output down " \
                  "and compares each map with the original (Spearman rank correlation); a map " \
                  "that barely changes shows the image, not the model, and is flagged."
    better = "lower"
    needs_method = True
    params = SANITY_PARAMS

    def validate(self, given: dict, shape: Sequence[int] | None = None) -> dict:
        p = super().validate(given, shape)
        if "flag_after" not in given:  # the default follows a shorter cascade
            p["flag_after"] = min(p["flag_after"], p["blocks"])
        if p["flag_after"] > p["blocks"]:
            raise ParamError("flag_after", f"must be at most blocks ({p['blocks']}), got {p['flag_after']}")
        return p

    def cost(self, p: dict, shape: Sequence[int], method_cost: Cost | None = None) -> Cost:
        # Without the method known, each re-run counts as one pass each way (saliency's cost).
        mc = method_cost or Cost(1, 1)
        return Cost(p["blocks"] * mc.forward, p["blocks"] * mc.backward)

    def run(self, ctx: Context, attribution: torch.Tensor, p: dict) -> dict:
        from .metrics import rerun
        from .probe import takes_hooks
        from .scope import model_lock

        x = ctx.inputs
        n, _, h, w = x.shape
        original = check_attribution(attribution, x).abs().cpu()
        if not takes_hooks(ctx.model):
            raise UnsupportedModel(self.id, "the sanity check re-initialises the model's blocks one "
                                   "by one, which a TorchScript module or an exported program does "
                                   "not expose; register the model as an nn.Module to check it")
        blocks = blocks_of(ctx.model)[:p["blocks"]]
        if not blocks:
            raise UnsupportedModel(self.id, "the model has no submodule with parameters to randomise")
        with model_lock(ctx.model, exclusive=False):
            randomised = copy.deepcopy(ctx.model).eval()  # the user's model is never touched
        maps = torch.empty(n, len(blocks), 1, h, w)
        # The copy runs with the caller's fast paths: its traced twin is rebuilt at each stage
        # (the weights changed) and still makes integrated gradients 3× faster on the CPU; the
        # twin cache holds models weakly, so the twins go with the copy.
        for k, names in enumerate(blocks):
            reinitialise([randomised.get_submodule(name) for name in names], p["seed"] * 64 + k)
            maps[:, k, 0] = rerun(ctx, p, x, model=randomised).sum(1).float().cpu()
        if ctx.done < ctx.total:  # a model with fewer blocks than asked ends early
            ctx.advance(ctx.total - ctx.done)
        first = [_centred_ranks(original[i]) for i in range(n)]  # ranked once for all stages
        rho = [[_correlation(first[i], _centred_ranks(maps[i, k, 0].abs())) for i in range(n)]
               for k in range(len(blocks))]
        decides = min(p["flag_after"], len(blocks))
        stages, so_far = [], []
        for k, names in enumerate(blocks):
            so_far = so_far + names
            stages.append({"blocks": so_far, "spearman": rho[k]})
        return {"metric": self.id, "better": self.better, "params": dict(p), "stages": stages,
                "maps": maps, "flagged": [r > p["threshold"] for r in rho[decides - 1]],
                "threshold": p["threshold"], "flag_after": decides}
