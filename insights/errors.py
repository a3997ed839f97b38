"""Errors a client can act on, and the one mapping from any exception to its HTTP answer.

Errors of the service carry their own ``status`` (HTTP), ``code`` (docs/api.md) and ``field``;
the engine's errors know nothing of HTTP and are mapped here. Views and the job runner both
use :func:`describe`, so a failure reads the same whether it happened inline or in a job.
"""
from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass

from .engine import InsightsError, UnknownMethod, UnsupportedModel
from .engine.errors import shown

log = logging.getLogger("insights.errors")


class ServiceError(Exception):
    """A request the service refuses: an HTTP status, a stable code, a message, the field."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, field: str | None = None, *, code: str | None = None,
                 status: int | None = None):
        super().__init__(message)
        self.message = message
        self.field = field
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class NotFound(ServiceError):
    status, code = 404, "not_found"


class BadParam(ServiceError):
    code = "bad_param"


class Conflict(ServiceError):
    status, code = 409, "cancelled"


def retry_after_s(wait: float) -> int:
    """``Retry-After`` for a wait of ``wait`` seconds: a whole number of seconds, at least 1."""
    return max(1, math.ceil(wait))


class Busy(ServiceError):
    """Refused for now by admission control: 429 (this client's share is used up) or 503 (the
    server is full); ``retry_after`` seconds is when trying again is likely to succeed."""

    status, code = 429, "busy"

    def __init__(self, message: str, retry_after: float, *, status: int = 429, reason: str = "busy"):
        super().__init__(message, status=status)
        self.retry_after = retry_after_s(retry_after)
        self.reason = reason  # queue_full, client_jobs, rate_limit, event_streams (for metrics)


class Forbidden(ServiceError):
    status, code = 403, "forbidden"


class StoreUnavailable(ServiceError):
    """The store's index (its database) does not answer: 503 with ``Retry-After``; the request
    wrote nothing, and the same request may succeed once the database is back."""

    status, code = 503, "store_unavailable"

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after_s(retry_after)


@dataclass(frozen=True)
class Described:
    """What a client is told about an exception."""

    status: int
    code: str
    message: str
    field: str | None

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "field": self.field}


def new_request_id() -> str:
    """A fresh id for a request or a failure, to find its log lines by."""
    return uuid.uuid4().hex


def describe(exc: BaseException, request_id: str | None = None) -> Described:
    """The answer for ``exc``: its own status and code where it carries them, the engine's
    errors as 400s, anything else as a 500 ``internal`` error whose message says only the
    request id (``request_id``, or a new one) and whose detail goes to the log under that id."""
    if isinstance(exc, ServiceError) or _carries_its_answer(exc):
        return Described(int(exc.status), exc.code, getattr(exc, "message", None) or str(exc),
                         getattr(exc, "field", None))
    if isinstance(exc, UnknownMethod):
        return Described(400, "unknown_method", str(exc), "method")
    if isinstance(exc, UnsupportedModel):
        return Described(400, "unsupported_method", str(exc), "method")
    if isinstance(exc, InsightsError):
        field = getattr(exc, "field", None)
        return Described(400, "bad_target" if field == "target" else "bad_param", str(exc), field)
    return _internal(exc, request_id)


def _internal(exc: BaseException, request_id: str | None) -> Described:
    """Logs the exception with its traceback once, under the first id it is described with (a
    job's failure is described by the worker, then again by the request that waited for it: the
    second id is logged as pointing to the first)."""
    first = getattr(exc, "_insights_request_id", None)
    rid = request_id or first or new_request_id()
    if first is None:
        try:
            exc._insights_request_id = rid  # type: ignore[attr-defined]
        except AttributeError:  # an exception that takes no attributes: logged again if described again
            pass
        log.error("internal error; request id %s", rid, exc_info=(type(exc), exc, exc.__traceback__),
                  extra={"request_id": rid})
    elif rid != first:
        log.error("internal error; request id %s (the failure logged under request id %s)", rid, first,
                  extra={"request_id": rid})
    return Described(500, "internal", f"internal error; request id {rid}", None)


def _carries_its_answer(exc: BaseException) -> bool:
    """Our own errors outside this module (a bad image, an unknown model, a bad overlay option)
    carry ``status`` and ``code`` too; another library's exception with such attributes (an
    HTTPError raised by a model's own code) is still an internal error."""
    return type(exc).__module__.startswith("insights.") and hasattr(exc, "status") and hasattr(exc, "code")


# --------------------------------------------------------------------------- checked values


def as_int(value, field: str, lo: int, hi: int, code: str = "bad_param") -> int:
    """``value`` (a JSON number or a numeric string) as an integer in [lo, hi], or a 400."""
    words = f"{field}: must be an integer, got {shown(value)}"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BadParam(words, field, code=code)
    if isinstance(value, int):
        number = value  # exact, however large: compared below without a float conversion
    else:
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise BadParam(words, field, code=code) from None
        if not math.isfinite(number) or not number.is_integer():
            raise BadParam(words, field, code=code)
    if not lo <= number <= hi:
        raise BadParam(f"{field}: must be between {lo} and {hi}, got {shown(value)}", field, code=code)
    return int(number)


def as_number(value, field: str, lo: float, hi: float) -> float:
    """``value`` as a finite number in [lo, hi], or a 400."""
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        raise BadParam(f"{field}: must be a number, got {shown(value)}", field) from None
    if not lo <= x <= hi:
        raise BadParam(f"{field}: must be between {lo} and {hi}, got {shown(value)}", field)
    return x
