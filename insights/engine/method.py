"""Methods and their registry: each method describes itself (parameters, cost, whether its map is
signed) and implements :meth:`Method.run` on the :class:`~insights.engine.context.Context`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from .errors import ParamError, UnknownMethod
from .params import Cost, Param
from .params import validate as validate_params
from .probe import default_layer, probe

if TYPE_CHECKING:
    from .context import Context


@dataclass(frozen=True, eq=False)
class Facts:
    """What a method's cost may depend on: the input shape (C, H, W) and, when the model is
    known, the output shape of its layers (read from the model's cached probe on demand)."""

    shape: tuple[int, ...]
    model: nn.Module | None = None
    sample: torch.Tensor | None = None  # one input row, to probe the model with

    def layer_shape(self, name: str | None = None) -> tuple[int, ...] | None:
        """The output shape of one row at layer ``name`` (default: the last spatial layer, where
        Grad-CAM looks), e.g. (512, 7, 7); None when only the input shape is known, or when the
        model has no such layer (the call itself then reports the error)."""
        if self.model is None or self.sample is None:
            return None
        try:
            name = name or default_layer(self.model, self.sample)
        except ParamError:
            return None
        return probe(self.model, self.sample)["shapes"].get(name)


class Method:
    """A family member: subclasses set the class attributes and implement ``run``."""

    id: str = ""
    label: str = ""
    description: str = ""
    family: str = ""  # gradient | perturbation | cam
    output: str = "pixel"  # pixel (N×C×H×W) | cam (N×1×H×W)
    params: tuple[Param, ...] = ()
    exclusive: bool = False  # True when the method installs hooks or changes module state

    def signed(self, p: dict) -> bool:
        return True

    def unsupported(self, hooks: bool) -> str | None:
        """Why the method cannot run on a model that does (``hooks``) or does not take forward
        hooks on its modules (a TorchScript module), or None when it can."""
        if self.exclusive and not hooks:
            return (f"{self.label} needs forward hooks on the model's modules, which a TorchScript "
                    "module or an exported program does not take; register the model as an "
                    "nn.Module in a models config (python app.py --config my_models.py) to use it")
        return None

    def batchable(self, p: dict) -> bool:
        """Whether each row's map is the same whether the row runs alone or in a batch with other
        images (False for methods that draw noise for the whole batch at once)."""
        return True

    def cost(self, p: dict, facts: Facts) -> Cost:
        """Forward and backward passes per image for ``p`` on the model and inputs of ``facts``."""
        return Cost(1, 1)

    def run(self, ctx: "Context", p: dict) -> torch.Tensor:
        raise NotImplementedError

    def shared_needs(self, ctx: "Context", p: dict) -> set[str] | None:
        """The passes this call can take from passes shared with other methods asked for at the
        same time (:func:`insights.attribute_many`): ``"grad"`` (the plain input gradient),
        ``"guided"`` (the guided-backprop gradient), ``"layer:<name>"`` (a layer's activation and
        gradient, from the same pass as "grad"). None: the method runs on its own."""
        return None

    def from_passes(self, ctx: "Context", p: dict, passes: dict) -> torch.Tensor:
        """The map, built from the shared passes named by :meth:`shared_needs`."""
        raise NotImplementedError

    # -- description -------------------------------------------------------------

    def validate(self, given: dict, shape: Sequence[int] | None = None) -> dict:
        """Returns a full parameter dict (defaults filled in, for inputs of ``shape`` (C, H, W)
        where a default depends on it), or raises ParamError."""
        return validate_params(self.id, self.params, given, shape)

    def info(self, given: dict | None = None, shape: Sequence[int] = (3, 224, 224),
             model: nn.Module | None = None) -> dict:
        """The self-description; the cost is for ``shape`` (C, H, W) and, when given, ``model``
        (whose layers a cost may depend on)."""
        p = self.validate(given or {}, shape)
        facts = Facts(tuple(shape))
        if model is not None:
            weight = next(model.parameters(), None)
            device = weight.device if weight is not None else torch.device("cpu")
            facts = Facts(tuple(shape), model, torch.zeros((1,) + tuple(shape), device=device))
        return {
            "id": self.id,
            "label": self.label,
            "description": self.description,
            "family": self.family,
            "output": self.output,
            "signed": self.signed(p),
            "params": [param.schema(shape) for param in self.params],
            "cost": self.cost(p, facts).as_dict(),
        }


class Registry:
    """Maps ids to one instance of each registered class (methods, metrics); an object so tests
    can build their own. A subclass says how an unknown id is refused (:meth:`unknown`)."""

    kind = "entry"  # what the error of a second registration calls an entry

    def __init__(self):
        self._entries: dict = {}

    def register(self, cls: type) -> type:
        if not cls.id or cls.id in self._entries:
            raise ValueError(f"{self.kind} id {cls.id!r} is empty or already registered")
        self._entries[cls.id] = cls()
        return cls

    def ids(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str):
        entry = self._entries.get(name) if isinstance(name, str) else None
        if entry is None:
            raise self.unknown(name)
        return entry

    def unknown(self, name) -> Exception:
        raise NotImplementedError


class MethodRegistry(Registry):
    """The attribution methods by id."""

    kind = "method"

    def __init__(self):
        super().__init__()
        self._methods: dict[str, Method] = self._entries  # the same dict (tests add methods to it)

    def unknown(self, name) -> Exception:
        return UnknownMethod(str(name), self.ids())

    def __contains__(self, name: str) -> bool:
        return name in self._methods
