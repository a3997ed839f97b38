"""Shared primitives of the attribution engine.

Every method is a small subclass of :class:`Method` that describes itself (parameters, cost,
whether its map is signed) and implements :meth:`Method.run` on top of the helpers here:

* :class:`Context`   – the model, inputs and targets of one call, progress and cancellation,
  chunking under a memory budget, and the gradient helper.
* :class:`HookScope` – registers hooks and temporary module changes, and always undoes them.
* :func:`model_lock` – a per-model reader/writer lock: methods that change how the model
  computes (hooks) run alone; plain gradient methods may share the model.

Nothing in this package imports Flask.
"""
from __future__ import annotations

import math
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn


# --------------------------------------------------------------------------- errors


class InsightsError(ValueError):
    """Base class of the errors a caller can fix (bad method, parameter, target or layer)."""

    field: str | None = None


class UnknownMethod(InsightsError):
    def __init__(self, name: str, known: Sequence[str]):
        super().__init__(f"unknown method {name!r}; known methods: {', '.join(known)}")
        self.name = name
        self.field = "method"


class ParamError(InsightsError):
    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


class Cancelled(Exception):
    """Raised inside :func:`insights.attribute` when the caller's cancel signal is set."""


# --------------------------------------------------------------------------- parameters

PARAM_TYPES = ("int", "float", "bool", "choice", "int_list", "string", "tensor")


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

    def __post_init__(self):
        assert self.type in PARAM_TYPES, self.type

    def schema(self) -> dict:
        out: dict[str, Any] = {"name": self.name, "type": self.type, "help": self.help}
        out["default"] = list(self.default) if isinstance(self.default, tuple) else self.default
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
            raise ParamError(self.name, f"must be true or false, got {value!r}")
        if self.type == "string":
            if not isinstance(value, str):
                raise ParamError(self.name, f"must be a string, got {value!r}")
            value = value.strip()
            if not value and self.default is None:
                return None  # an empty form field means "choose automatically"
            return value
        if self.type == "choice":
            if value not in self.choices:
                raise ParamError(self.name, f"must be one of {', '.join(self.choices)}; got {value!r}")
            return value
        if self.type == "int_list":
            if isinstance(value, str):
                value = [v for v in value.replace("x", ",").split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ParamError(self.name, f"must be a list of integers, got {value!r}")
            items = tuple(self._number(v, int) for v in value)
            if self.length is not None and len(items) != self.length:
                raise ParamError(self.name, f"must have {self.length} items, got {len(items)}")
            return items
        return self._number(value, int if self.type == "int" else float)

    def _number(self, value: Any, kind: type) -> Any:
        if isinstance(value, bool):
            raise ParamError(self.name, f"must be a number, got {value!r}")
        try:
            if isinstance(value, str):
                value = value.strip()
            number = float(value)
        except (TypeError, ValueError):
            raise ParamError(self.name, f"must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        if not math.isfinite(number):
            raise ParamError(self.name, f"must be finite, got {value!r}")
        if kind is int:
            if number != int(number):
                raise ParamError(self.name, f"must be an integer, got {value!r}")
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

    @property
    def passes(self) -> int:
        return self.forward + self.backward

    def as_dict(self) -> dict:
        return {"forward": self.forward, "backward": self.backward}


# --------------------------------------------------------------------------- methods


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

    def batchable(self, p: dict) -> bool:
        """Whether each row's map is the same whether the row runs alone or in a batch with other
        images (False for methods that draw noise for the whole batch at once)."""
        return True

    def cost(self, p: dict, shape: Sequence[int]) -> Cost:
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

    def validate(self, given: dict) -> dict:
        """Returns a full parameter dict (defaults filled in), or raises ParamError."""
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ParamError(unknown[0], f"is not a parameter of {self.id}; known: {', '.join(known) or 'none'}")
        return {name: param.coerce(given[name]) if name in given else param.default for name, param in known.items()}

    def info(self, given: dict | None = None, shape: Sequence[int] = (3, 224, 224)) -> dict:
        p = self.validate(given or {})
        return {
            "id": self.id,
            "label": self.label,
            "description": self.description,
            "family": self.family,
            "output": self.output,
            "signed": self.signed(p),
            "params": [param.schema() for param in self.params],
            "cost": self.cost(p, shape).as_dict(),
        }


class MethodRegistry:
    """Maps method ids to Method instances; an object so tests can build their own."""

    def __init__(self):
        self._methods: dict[str, Method] = {}

    def register(self, cls: type[Method]) -> type[Method]:
        if not cls.id or cls.id in self._methods:
            raise ValueError(f"method id {cls.id!r} is empty or already registered")
        self._methods[cls.id] = cls()
        return cls

    def ids(self) -> list[str]:
        return list(self._methods)

    def get(self, name: str) -> Method:
        try:
            return self._methods[name]
        except (KeyError, TypeError):
            raise UnknownMethod(str(name), self.ids()) from None

    def __contains__(self, name: str) -> bool:
        return name in self._methods


# --------------------------------------------------------------------------- model lock


class _RWLock:
    """Many readers or one writer; writers do not starve."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


_locks: "weakref.WeakKeyDictionary[nn.Module, _RWLock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(model: nn.Module, exclusive: bool):
    """Context manager: shared access for methods that leave the model as it is, exclusive for
    methods that install hooks or change module flags (so a concurrent call never sees them)."""
    with _locks_guard:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = _RWLock()
    return lock.write() if exclusive else lock.read()


# --------------------------------------------------------------------------- hook scope


class HookScope:
    """Registers hooks and temporary attribute changes on a model and undoes all of them on exit,
    also when the method raises. Puts the model in eval mode for the duration.

    >>> with HookScope(model) as scope:
    ...     scope.forward_hook(module, fn)
    ...     scope.set_attr(relu, "inplace", False)
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: list[Any] = []
        self._saved: list[tuple[Any, str, Any]] = []
        self._modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> "HookScope":
        self._modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self

    def __exit__(self, *exc) -> None:
        errors = []
        for handle in reversed(self._handles):
            try:
                handle.remove()
            except Exception as err:  # keep undoing the rest, then re-raise
                errors.append(err)
        for obj, name, value in reversed(self._saved):
            setattr(obj, name, value)
        for module, mode in self._modes:
            module.training = mode
        self._handles.clear()
        self._saved.clear()
        if errors and exc[0] is None:
            raise errors[0]

    def forward_hook(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def forward_pre_hook(self, module: nn.Module, fn: Callable) -> None:
        self._handles.append(module.register_forward_pre_hook(fn))

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """Sets ``obj.name = value`` until the scope ends (e.g. ``inplace`` or ``requires_grad``)."""
        self._saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def disable_inplace(self) -> None:
        """Turns off ``inplace`` on every module that has it: hooks need the input intact."""
        for module in self.model.modules():
            if getattr(module, "inplace", False) is True:
                self.set_attr(module, "inplace", False)


# --------------------------------------------------------------------------- CUDA precision

PRECISION_PARAM = Param("precision", "choice", "fp32", "fp32 is exact. bf16 runs about 2× faster "
                        "on a CPU with bf16 support and 2 to 5× on a GPU, with a close but not "
                        "identical map; it drifts most where the score barely moves (small "
                        "feature-ablation patches, IG on EfficientNet-Lite0).",
                        choices=("fp32", "bf16"))


def arithmetic(device: torch.device, precision: str):
    """The context a method's passes run in: bfloat16 autocast for ``precision="bf16"`` (the
    opt-in fast mode), else true fp32 (:func:`true_fp32`: no TF32 on CUDA)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return true_fp32(device)


_tf32_lock = threading.Lock()
_tf32_users = 0
_tf32_saved: tuple[bool, bool] | None = None


@contextmanager
def true_fp32(device: torch.device):
    """Turns CUDA's TF32 convolutions and matmuls off while any caller is inside: attribution
    maps (occlusion's differences of nearly equal scores, DeepLift's summation to the score
    difference) need full fp32, which TF32's 10-bit mantissa would swamp.
    Reference-counted, so overlapping calls from several threads restore the user's flags
    only when the last one leaves (calls in between merely run in full fp32)."""
    global _tf32_users, _tf32_saved
    if device.type != "cuda":
        yield
        return
    with _tf32_lock:
        if _tf32_users == 0:
            _tf32_saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        _tf32_users += 1
    try:
        yield
    finally:
        with _tf32_lock:
            _tf32_users -= 1
            if _tf32_users == 0 and _tf32_saved is not None:
                torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = _tf32_saved


# --------------------------------------------------------------------------- model probing

_probe_cache: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def probe(model: nn.Module, sample: torch.Tensor) -> dict:
    """One forward pass of a single sample with hooks on every module, cached per model and
    input shape. Returns ``activation_bytes`` (sum of leaf outputs, a memory estimate per sample),
    ``classes`` (the number of outputs) and ``spatial`` (names of modules whose output is
    N×C×H×W with H, W > 1, in firing order). :func:`insights.attribute` calls it before it
    locks the model, so methods always find it cached."""
    key = (tuple(sample.shape[1:]), sample.dtype, sample.device.type)
    per_model = _probe_cache.setdefault(model, {})
    if key in per_model:
        return per_model[key]
    total = [0]
    spatial: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def record(module, _inputs, output):
        if isinstance(output, torch.Tensor):
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
              "classes": int(logits.shape[-1])}
    per_model[key] = result
    return result


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (e.g. "layer4"), or a ParamError listing close names."""
    try:
        return model.get_submodule(name)
    except (AttributeError, TypeError):
        names = [n for n, _ in model.named_modules() if n]
        close = [n for n in names if name and (name in n or n in name)][:8] or names[-8:]
        raise ParamError("layer", f"no module named {name!r} in the model; e.g. {', '.join(close)}") from None


def default_layer(model: nn.Module, inputs: torch.Tensor) -> str:
    """The last module (in call order) whose output is spatial: where Grad-CAM looks by default."""
    spatial = probe(model, inputs)["spatial"]
    if not spatial:
        raise ParamError("layer", "the model has no module with a spatial (N×C×H×W) output; name a layer")
    return spatial[-1]


# --------------------------------------------------------------------------- call context

DEFAULT_BUDGET_CPU = 2 << 30  # bytes of activations one chunk may hold
MAX_CHUNK_CPU = 32
MAX_CHUNK_CPU_GRAD = 10  # forward + backward batches beyond ~10 images ran slower per image on CPU
MAX_CHUNK_CUDA = 256


def default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return DEFAULT_BUDGET_CPU


@dataclass
class Context:
    """Everything one attribute() call needs; methods use its helpers rather than the model."""

    model: nn.Module
    inputs: torch.Tensor  # N×C×H×W, detached
    target: torch.Tensor  # N, long
    total: int = 1  # progress units (per-sample passes) for the whole call
    progress: Callable[[int, int], Any] | None = None
    cancel: Any = None  # threading.Event, or a callable returning bool
    memory_budget: int | None = None
    info: dict = field(default_factory=dict)
    done: int = 0

    @property
    def device(self) -> torch.device:
        return self.inputs.device

    # -- progress and cancellation ---------------------------------------------------

    def cancelled(self) -> bool:
        c = self.cancel
        if c is None:
            return False
        return bool(c.is_set() if hasattr(c, "is_set") else c())

    def check(self) -> None:
        if self.cancelled():
            raise Cancelled("attribution cancelled")

    def advance(self, units: int) -> None:
        """Counts finished work, reports it, and raises Cancelled if the caller asked to stop."""
        self.done = min(self.total, self.done + units)
        if self.progress is not None:
            self.progress(self.done, self.total)
        self.check()

    # -- chunking -----------------------------------------------------------------------

    def chunk_size(self, grad: bool, factor: float = 1.0) -> int:
        """How many samples one batch may hold under the memory budget."""
        per_sample = probe(self.model, self.inputs)["activation_bytes"] * (3.0 if grad else 1.0) * factor
        budget = self.memory_budget or default_budget(self.device)
        if self.device.type == "cuda":
            cap = MAX_CHUNK_CUDA
        else:
            cap = MAX_CHUNK_CPU_GRAD if grad else MAX_CHUNK_CPU
        return max(1, min(cap, int(budget // max(per_sample, 1))))

    def chunks(self, count: int, grad: bool, factor: float = 1.0) -> Iterator[slice]:
        """Yields slices covering range(count) in budget-sized chunks; after each chunk is
        consumed, reports its size as progress and checks for cancellation."""
        size = self.chunk_size(grad, factor)
        size = math.ceil(count / math.ceil(count / size)) if count else size  # even chunks
        for start in range(0, count, size):
            stop = min(count, start + size)
            self.check()
            yield slice(start, stop)
            self.advance(stop - start)

    # -- model calls ----------------------------------------------------------------------

    def gradient(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """d output[i, target[i]] / d x[i] for every row of x, in chunks under the budget.
        Progress is counted by the caller (one unit per row here via ``chunks``)."""
        out = torch.empty_like(x)
        for s in self.chunks(x.shape[0], grad=True):
            out[s] = gradient(self.model, x[s], target[s])
        return out


def gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
             forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The gradient of each row's target logit with respect to that row of ``x``.

    Uses ``torch.autograd.grad`` so that no ``.grad`` of the model's parameters is touched
    (two threads may share the model)."""
    with torch.enable_grad():
        leaf = x.detach().requires_grad_(True)
        logits = (forward or model)(leaf)
        chosen = logits.gather(1, target.view(-1, 1).to(logits.device)).sum()
        (grad,) = torch.autograd.grad(chosen, leaf)
    return grad


def add_rows(total: torch.Tensor, row: torch.Tensor, values: torch.Tensor) -> None:
    """total[row[i]] += values[i] for every i. On the CPU one add per row: index_add_ (and a
    sum over the batch of a channels-last tensor) ran 10-20x slower than that there."""
    if total.device.type != "cpu":
        total.index_add_(0, row, values)
        return
    for i, r in enumerate(row.tolist()):
        total[r] += values[i]


def logits_for(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The target logit of each row, without building a graph."""
    with torch.inference_mode():
        return model(x).gather(1, target.view(-1, 1)).squeeze(1).float()


def expand_baseline(value: Any, inputs: torch.Tensor, name: str = "baselines") -> torch.Tensor:
    """A number or a tensor broadcastable to ``inputs`` → a tensor shaped like ``inputs``."""
    if isinstance(value, torch.Tensor):
        try:
            return value.to(inputs.device, inputs.dtype).expand_as(inputs).clone()
        except RuntimeError:
            raise ParamError(name, f"shape {tuple(value.shape)} does not broadcast to {tuple(inputs.shape)}") from None
    return torch.full_like(inputs, float(value))
