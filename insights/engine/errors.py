"""The errors of the engine: those a caller can fix, and cancellation."""
from __future__ import annotations

from typing import Any, Sequence


def shown(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters, so that an error never echoes a huge input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 1]}… ({len(text)} characters)"


class InsightsError(ValueError):
    """Base class of the errors a caller can fix (bad method, parameter, target or layer)."""

    field: str | None = None


class UnknownMethod(InsightsError):
    def __init__(self, name: str, known: Sequence[str]):
        super().__init__(f"unknown method {shown(name)}; known methods: {', '.join(known)}")
        self.name = name
        self.field = "method"


class ParamError(InsightsError):
    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


class UnsupportedModel(InsightsError):
    """The method cannot run on this kind of model (e.g. it needs hooks a TorchScript module
    does not take); the message says why and what to do instead."""

    def __init__(self, method: str, reason: str):
        super().__init__(reason)
        self.method = method
        self.field = "method"


class Cancelled(Exception):
    """Raised inside :func:`insights.attribute` when the caller's cancel signal is set."""
