"""What keeps a shared model intact: a per-model reader/writer lock, and a scope that undoes
every hook and temporary change it made, also after an error."""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable

from torch import nn


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
