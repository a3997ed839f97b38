"""Admission control: who a client is, how much of the server each may hold, how fast each may write.

:func:`client_id` names the client of the current request (its access token, else its address).
:class:`Admission` is the bookkeeping a job backend keeps for it: which clients hold which active
jobs (each submitter holds its own cancel token), the bound on jobs in all and per client, and a
token bucket per client for writes. It knows nothing of threads or HTTP, so a backend that runs
jobs on other machines reimplements these few calls on its shared store (Redis, a database).
:class:`Slots` bounds what a single server process may tie up of its own request threads: event
streams and requests waiting for their computation.

Every refusal is a :class:`~insights.errors.Busy` with the seconds after which trying again is
likely to succeed; the API answers it with ``Retry-After``.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import secrets
import threading
import time
from collections import Counter
from typing import Callable, Iterable

from .errors import Busy, Forbidden

DEFAULT_RETRY_S = 5.0  # when nothing better is known (a job that has not reported progress yet)
MAX_RETRY_S = 300.0
TRACKED_CLIENTS = 4096  # rate buckets kept before the full (idle) ones are dropped


def client_id() -> str:
    """The current request's client: ``token:`` and a digest of the access token the request
    presented (``flask.g.token``, set by the access check when tokens are configured), else
    ``addr:`` and its address (``X-Forwarded-For`` is applied before this by ProxyFix, and only
    for the trusted proxy hops the operator configured)."""
    from flask import g, request

    token = getattr(g, "token", None)
    if token:
        return "token:" + digest(token)[:16]
    return address_id(request.remote_addr)


def digest(token: str) -> str:
    """A token's SHA-256 as 64 hex digits: what is kept or shown of a token instead of itself."""
    return hashlib.sha256(str(token).encode()).hexdigest()


IPV6_PREFIX = 64  # one site's network: every IPv6 host is given a /64 of addresses to pick from


def address_id(addr: str | None) -> str:
    """``addr:`` and a client's address as limits count it: an IPv4 address (or one mapped into
    IPv6) as it is, an IPv6 address by its /64 network, since any host on one can use as many of
    its 2^64 addresses as it likes, one per request, and would count as that many clients."""
    text = (addr or "unknown").strip()
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return "addr:" + text[:100]
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return "addr:" + str(ip.ipv4_mapped)
        return "addr:" + str(ipaddress.ip_network(f"{ip}/{IPV6_PREFIX}", strict=False))
    return "addr:" + str(ip)


def wait_for_first(etas: Iterable[float | None]) -> float:
    """About how long until the first of some jobs ends: the smallest of their ``etas`` that is
    known, kept within [1, :data:`MAX_RETRY_S`], or :data:`DEFAULT_RETRY_S` when none is."""
    known = [e for e in etas if e is not None]
    return min(MAX_RETRY_S, max(1.0, min(known))) if known else DEFAULT_RETRY_S


def limit(value) -> int | None:
    """A count setting: a positive integer, or None (0, None, or a negative number: no limit)."""
    if value is None:
        return None
    n = int(value)
    return n if n > 0 else None


class RateLimiter:
    """A token bucket per client: ``per_min`` writes a minute, with bursts of up to ``per_min``."""

    def __init__(self, per_min: int | None, clock: Callable[[], float] = time.monotonic):
        self.per_min = limit(per_min)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client → (tokens, when counted)
        self._swept = float("-inf")
        self._lock = threading.Lock()

    def take(self, client: str) -> float:
        """Takes one write for ``client``: 0.0 when allowed, else the seconds until one is free
        (nothing is taken then)."""
        if self.per_min is None:
            return 0.0
        rate, now = self.per_min / 60.0, self.clock()
        with self._lock:
            tokens = self._level(client, now, rate)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                return (1.0 - tokens) / rate
            self._buckets[client] = (tokens - 1.0, now)
            if len(self._buckets) > TRACKED_CLIENTS and now - self._swept > 1.0:
                self._sweep(now, rate)
            return 0.0

    def wait(self, client: str) -> float:
        """Seconds until ``client`` may :meth:`take` one (0.0: now), taking nothing."""
        if self.per_min is None:
            return 0.0
        rate, now = self.per_min / 60.0, self.clock()
        with self._lock:
            tokens = self._level(client, now, rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate

    def _level(self, client: str, now: float, rate: float) -> float:
        """The writes ``client`` has in hand now: its bucket refilled since it was last counted
        (a client not seen yet has a full one)."""
        tokens, then = self._buckets.get(client, (float(self.per_min), now))
        return min(float(self.per_min), tokens + (now - then) * rate)

    def _sweep(self, now: float, rate: float) -> None:
        """Forgets the buckets that have filled up again: they are the same as new ones (at most
        once a second, so that many busy clients do not make every write walk them all)."""
        self._swept = now
        full = [c for c, (tokens, then) in self._buckets.items() if tokens + (now - then) * rate >= self.per_min]
        for c in full:
            del self._buckets[c]


class Admission:
    """The admission bookkeeping of one job backend.

    A job is *active* from its admission until it ends. Each admission of a client onto a job
    (a new job, or joining an identical one still active) is a *hold* with its own cancel token;
    a client's share is the number of distinct active jobs it holds. Holds outlive the job (the
    runner forgets them with the job), so a late cancel with a good token is not refused.
    """

    def __init__(self, max_jobs: int | None = 32, per_client: int | None = 4, rate_per_min: int | None = 120,
                 clock: Callable[[], float] = time.monotonic):
        self.max_jobs = limit(max_jobs)
        self.per_client = limit(per_client)
        self.rate = RateLimiter(rate_per_min, clock)
        self.refused: Counter = Counter()  # reason → count (queue_full, client_jobs, rate_limit, ...)
        self._active: set[str] = set()
        self._holds: dict[str, dict[str, str]] = {}  # job id → {cancel token: client}
        self._lock = threading.Lock()

    def configure(self, config) -> None:
        self.max_jobs = limit(config.get("MAX_QUEUED_JOBS"))
        self.per_client = limit(config.get("MAX_JOBS_PER_CLIENT"))
        self.rate = RateLimiter(config.get("RATE_LIMIT_PER_MIN"), self.rate.clock)

    # -- writes ------------------------------------------------------------------------------

    def allow_write(self, client: str) -> None:
        """Counts one write of ``client``, or refuses it (429 ``busy``) past the rate limit."""
        wait = self.rate.take(client)
        if wait > 0:
            self.refused["rate_limit"] += 1
            raise Busy(f"too many requests: at most {self.rate.per_min} writes a minute per client "
                       f"(RATE_LIMIT_PER_MIN); try again in {math.ceil(wait)} s", wait, reason="rate_limit")

    # -- jobs --------------------------------------------------------------------------------

    def check(self, client: str, joining: str | None = None,
              wait: Callable[[Iterable[str]], float] = lambda ids: DEFAULT_RETRY_S) -> None:
        """Refuses (:class:`Busy`) a new job for ``client``, or its joining the active job
        ``joining``: 503 when the server holds ``max_jobs`` active jobs (joining adds none), 429
        when the client holds ``per_client`` of them already. ``wait(job_ids)`` estimates the
        seconds until the first of those jobs ends (the ``Retry-After``)."""
        with self._lock:
            active = set(self._active)
            mine = {j for j in active if client in self._holds.get(j, {}).values()}
        if joining is None and self.max_jobs is not None and len(active) >= self.max_jobs:
            self.refused["queue_full"] += 1
            raise Busy(f"the server is full: {len(active)} jobs are queued or running (MAX_QUEUED_JOBS); "
                       "try again later", wait(active), status=503, reason="queue_full")
        if self.per_client is not None and joining not in mine and len(mine) >= self.per_client:
            self.refused["client_jobs"] += 1
            raise Busy(f"you have {len(mine)} jobs queued or running, the most one client may have "
                       "(MAX_JOBS_PER_CLIENT); wait for one to finish or cancel it", wait(mine),
                       reason="client_jobs")

    def hold(self, job_id: str, client: str, new: bool = True) -> str:
        """Records ``client``'s hold on the job and returns its cancel token; a ``new`` job
        becomes active (one joined may have ended meanwhile: it does not count again)."""
        token = secrets.token_urlsafe(18)
        with self._lock:
            if new:
                self._active.add(job_id)
            self._holds.setdefault(job_id, {})[token] = client
        return token

    def release(self, job_id: str, token: str) -> int:
        """Drops the hold of ``token`` on the job; answers how many holds remain. A token that
        holds nothing on this job is refused with 403 ``forbidden``."""
        with self._lock:
            holds = self._holds.get(job_id, {})
            match = next((t for t in holds if hmac.compare_digest(t.encode(), str(token).encode())), None)
            if match is None:
                raise Forbidden("this cancel token does not belong to this job: only a submitter may cancel it, "
                                "with the cancel_token its submission answered", "cancel_token")
            del holds[match]
            return len(holds)

    def ended(self, job_id: str) -> None:
        """The job ended: it no longer counts against anyone."""
        with self._lock:
            self._active.discard(job_id)

    def forget(self, job_id: str) -> None:
        """The job is gone (no longer kept): its holds go too."""
        with self._lock:
            self._active.discard(job_id)
            self._holds.pop(job_id, None)

    def counts(self) -> dict:
        """Active jobs, clients holding them, and refusals by reason (for metrics and tests)."""
        with self._lock:
            clients = {c for j in self._active for c in self._holds.get(j, {}).values()}
            return {"active": len(self._active), "clients": len(clients), "refused": dict(self.refused)}


class Slot:
    """One place taken in :class:`Slots`; ``release`` gives it back (more than once is harmless)."""

    def __init__(self, owner: "Slots"):
        self.owner = owner
        self.since = time.monotonic()

    def release(self) -> None:
        self.owner._give_back(self)


class Slots:
    """At most ``size`` places taken at once (None: any number): what a server process lets
    event streams or waiting requests hold of its request threads."""

    def __init__(self, size: int | None):
        self.size = limit(size)
        self._taken: set[Slot] = set()
        self._lock = threading.Lock()

    def take(self) -> Slot | None:
        """A place, or None when all are taken."""
        with self._lock:
            if self.size is not None and len(self._taken) >= self.size:
                return None
            slot = Slot(self)
            self._taken.add(slot)
            return slot

    def seconds_to_free(self, lifetime: float) -> float:
        """Seconds until the oldest place reaches ``lifetime`` (when its holder must let go)."""
        with self._lock:
            oldest = min((s.since for s in self._taken), default=time.monotonic())
        return max(1.0, min(MAX_RETRY_S, oldest + lifetime - time.monotonic()))

    @property
    def taken(self) -> int:
        with self._lock:
            return len(self._taken)

    def _give_back(self, slot: Slot) -> None:
        with self._lock:
            self._taken.discard(slot)
