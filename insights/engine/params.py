"""Parameters and costs: how a method describes what it takes and what it will do."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .errors import ParamError, shown

PARAM_TYPES = ("int", "float", "bool", "choice", "int_list", "string", "tensor")


MAX_STRING = 200  # longest string parameter (a layer's dotted name)


@dataclass(frozen=True)
class Param:
    """One parameter of a method, described so that a form can be generated from it."""

    name: str
    type: str
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    length: int | None = None  # int_list: required number of items
    tensor_ok: bool = False  # float params that also accept a tensor from Python callers
    # The default for an input of shape (C, H, W), where it depends on it (occlusion's window);
    # ``default`` is then its value for 3×224×224.
    scaled: Callable[[tuple[int, ...]], Any] | None = None

    def __post_init__(self):
        assert self.type in PARAM_TYPES, self.type

    def default_for(self, shape: Sequence[int] | None) -> Any:
        """The default for inputs of ``shape`` (C, H, W); the plain default when unknown."""
        if self.scaled is None or shape is None:
            return self.default
        return self.scaled(tuple(shape))

    def schema(self, shape: Sequence[int] | None = None) -> dict:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "help": self.help}
        default = self.default_for(shape)
        out["default"] = list(default) if isinstance(default, tuple) else default
        for key in ("min", "max", "length"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.choices is not None:
            out["choices"] = list(self.choices)
        return out

    def coerce(self, value: Any) -> Any:
        """Returns the value converted to this parameter's type, or raises ParamError."""
        if value is None:
            if self.default is None:
                return None
            raise ParamError(self.name, "must not be null")
        if self.type == "tensor" or (self.tensor_ok and isinstance(value, torch.Tensor)):
            if not isinstance(value, torch.Tensor):
                raise ParamError(self.name, "must be a torch.Tensor")
            return value
        if self.type == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                return value.lower() in ("true", "1")
            raise ParamError(self.name, f"must be true or false, got {shown(value)}")
        if self.type == "string":
            if not isinstance(value, str):
                raise ParamError(self.name, f"must be a string, got {shown(value)}")
            if len(value) > MAX_STRING:
                raise ParamError(self.name, f"must be at most {MAX_STRING} characters, got {len(value)}")
            value = value.strip()
            if not value and self.default is None:
                return None  # an empty form field means "choose automatically"
            return value
        if self.type == "choice":
            if value not in self.choices:
                raise ParamError(self.name, f"must be one of {', '.join(self.choices)}; got {shown(value)}")
            return value
        if self.type == "int_list":
            if isinstance(value, str):
                value = [v for v in value.replace("x", ",").split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ParamError(self.name, f"must be a list of integers, got {shown(value)}")
            if self.length is not None and len(value) != self.length:
                raise ParamError(self.name, f"must have {self.length} items, got {len(value)}")
            return tuple(self._number(v, int) for v in value)
        return self._number(value, int if self.type == "int" else float)

    def _number(self, value: Any, kind: type) -> Any:
        if isinstance(value, bool):
            raise ParamError(self.name, f"must be a number, got {shown(value)}")
        try:
            if isinstance(value, str):
                value = value.strip()
            number = float(value)
        except OverflowError:  # an integer literal beyond any float: out of every range
            bound = self.max if value > 0 else self.min
            if bound is None:
                raise ParamError(self.name, f"is out of range, got {shown(value)}") from None
            side = "most" if value > 0 else "least"
            raise ParamError(self.name, f"must be at {side} {bound}, got {shown(value)}") from None
        except (TypeError, ValueError):
            raise ParamError(self.name, f"must be {'an integer' if kind is int else 'a number'}, "
                                        f"got {shown(value)}") from None
        if not math.isfinite(number):
            raise ParamError(self.name, f"must be finite, got {shown(value)}")
        if kind is int:
            if number != int(number):
                raise ParamError(self.name, f"must be an integer, got {shown(value)}")
            number = int(number)
        if self.min is not None and number < self.min:
            raise ParamError(self.name, f"must be at least {self.min}, got {number}")
        if self.max is not None and number > self.max:
            raise ParamError(self.name, f"must be at most {self.max}, got {number}")
        return number


@dataclass(frozen=True)
class Cost:
    """Number of per-sample forward and backward passes a call will make."""

    forward: int
    backward: int

    def as_dict(self) -> dict:
        return {"forward": self.forward, "backward": self.backward}


def validate(owner: str, params: Sequence[Param], given: dict, shape: Sequence[int] | None = None) -> dict:
    """The full parameter dict of ``owner`` (a method's or metric's id): ``given`` checked against
    ``params``, defaults filled in for inputs of ``shape`` (C, H, W) where a default depends on it;
    ParamError naming an unknown or bad parameter."""
    known = {p.name: p for p in params}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ParamError(unknown[0], f"is not a parameter of {owner}; known: {', '.join(known) or 'none'}")
    return {name: param.coerce(given[name]) if name in given else param.default_for(shape)
            for name, param in known.items()}
