"""A job backend on Celery and Redis: web nodes admit and follow jobs, workers on any machine run them.

With ``BROKER_URL`` set, the service takes :class:`CeleryBackend` in place of the in-process
:class:`~insights.jobs.JobRunner`, behind the same :class:`~insights.jobs.JobBackend` calls, so the
views and the page see the same answers (200 or 202 with a job, progress with an ETA, event
streams, cancel tokens, identical requests sharing a job, the admission limits).

Where things live:

* **The database** (``DATABASE_URL``; without it SQLite in the store folder, for one machine)
  holds every job in the table ``jobs``: its request (the task's JSON payload: kind, model, image
  id, method, parameters, target, result id), status, tries, the run that holds it and that run's
  heartbeat, and its answer; ``job_holds`` keeps each submitter's hold (a digest of its cancel
  token). The database is the truth: a Redis that loses its data loses no job.
* **Redis** (``BROKER_URL``) holds what must be quick or seen by every node: the Celery queues,
  whose messages carry a job id only (JSON serializer: never tensors or pickles); progress;
  cancel flags; change notices (pub/sub, so a waiting request wakes within a millisecond of its
  answer); and the admission bookkeeping (active jobs, holds, identical-request keys, a token
  bucket per client), changed atomically by Lua scripts so that the limits hold across nodes.
* **Workers** (:mod:`insights.worker`) claim a job in the database (``UPDATE ... WHERE status =
  'queued'``), take its queued batch mates the same way, compute, store the answer through the
  store, and end the job in the database, then in Redis.

Faults: messages are acknowledged late and given back when a worker dies
(``task_reject_on_worker_lost``), and Redis gives unacknowledged messages back after
``BROKER_VISIBILITY_S``. A redelivered message finds its job ``running``: it waits
``LOST_AFTER_S`` for the run's heartbeat (a counter the run bumps every ``HEARTBEAT_S``) to move,
and takes the job over when it does not, at most ``MAX_TRIES`` runs in all; then the job fails
with ``worker_lost``. A janitor in every worker (:meth:`CeleryBackend.sweep`, every ``SWEEP_S``)
requeues a running job whose heartbeat stood still for ``STALE_S`` (its message was lost with
Redis, or a copy was already dropped), sends again the messages of queued jobs that a restarted
Redis lost, and rebuilds Redis's admission state from the database. Heartbeats are counters, not
times, so clocks of different machines never need to agree.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from .admission import DEFAULT_RETRY_S, digest, limit, wait_for_first
from .errors import Busy, Forbidden, StoreUnavailable
from .jobs import FINAL, Job, Ticket

log = logging.getLogger("insights.distributed")

PREFIX = "insights"  # of every Redis key and channel (one deployment per Redis database)
TASK = "insights.run"  # the Celery task: its one argument is a job id
QUEUES = {"main": "insights.main", "light": "insights.light"}  # the lanes, as Celery queues
URGENT, QUEUED = 0, 6  # message priorities (Redis: lower first): a waiting request, a costly job
MAX_TRIES = 3  # runs of one job; a job whose worker died this many times fails
HEARTBEAT_S = 0.5  # a run bumps its jobs' heartbeat this often
LOST_AFTER_S = 2.0  # a redelivered job whose heartbeat stood still this long is taken over
STALE_S = 10.0  # the janitor requeues a running job whose heartbeat stood still this long
SWEEP_S = 2.0  # the janitor's period
POLL_S = 0.5  # a waiting request re-reads its job at least this often (a notice may be lost)
PROGRESS_S = 0.1  # a run writes progress to Redis at most this often per job
CANCEL_CHECK_S = 0.2  # a run looks for a cancel flag in Redis at most this often
KEEP_S = 86400.0  # finished jobs are kept this long (rows, Redis state, holds)
VISIBILITY_S = 60.0  # BROKER_VISIBILITY_S's default


# --------------------------------------------------------------------------- the database


def _tables():
    """The job tables, on their own MetaData (created lazily: SQLAlchemy is a scale-out extra)."""
    from sqlalchemy import Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text

    metadata = MetaData()
    jobs = Table(
        "jobs", metadata,
        Column("id", String(32), primary_key=True),
        Column("kind", String(16), nullable=False),  # predict | explain
        Column("model", String(200)), Column("image", String(64)), Column("method", String(100)),
        Column("request", Text, nullable=False),  # the task's payload (Task.to_payload), JSON
        Column("key", String(200)),  # identical requests share the active job of this key (the result id)
        Column("batch_key", Text),  # queued jobs of one batch key may be computed together
        Column("lane", String(16), nullable=False), Column("urgent", Boolean, nullable=False),
        Column("status", String(16), nullable=False),  # queued | running | done | failed | cancelled
        Column("cancel", Boolean, nullable=False, default=False),  # every submitter cancelled
        Column("done", Integer, nullable=False, default=0), Column("total", Integer, nullable=False),
        Column("tries", Integer, nullable=False, default=0),  # runs so far
        Column("worker", String(200)),  # the run holding it: node/pid/run id
        Column("beats", Integer, nullable=False, default=0),  # that run's heartbeat (a counter)
        Column("epoch", String(32)),  # the Redis its message went to (None: not sent)
        Column("version", Integer, nullable=False, default=0),  # bumps with every change of state
        Column("created", Float, nullable=False), Column("started", Float), Column("finished", Float),
        Column("result", Text), Column("error", Text), Column("error_status", Integer),
    )
    Index("jobs_by_status", jobs.c.status, jobs.c.batch_key)
    Index("jobs_by_end", jobs.c.finished)
    holds = Table(
        "job_holds", metadata,
        Column("job_id", String(32), primary_key=True),
        Column("token", String(64), primary_key=True),  # sha256 of the cancel token
        Column("client", String(200), nullable=False),
    )
    return metadata, jobs, holds


class JobTable:
    """The ``jobs`` and ``job_holds`` tables: one statement per change, each atomic, so that
    web nodes, workers and janitors on many machines never step on each other."""

    def __init__(self, url: str):
        from sqlalchemy import create_engine, event

        from .db import parse_url  # postgresql:// as psycopg 3, as the store's index reads DATABASE_URL

        self.url = parse_url(url)
        self.metadata, self.jobs, self.holds = _tables()
        sqlite = self.url.get_backend_name() == "sqlite"
        self.engine = create_engine(self.url, pool_pre_ping=True,
                                    connect_args={"timeout": 30} if sqlite else {"connect_timeout": 5})
        if sqlite:  # readers beside a writer, writers wait for each other, commits without fsync
            @event.listens_for(self.engine, "connect")  # (a crash of the machine may lose the last)
            def _pragmas(conn, _record):
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA busy_timeout=30000")

    def create(self) -> None:
        """Creates the tables when missing; another process creating them at once is no error."""
        from sqlalchemy.exc import DBAPIError

        for attempt in range(3):
            try:
                self.metadata.create_all(self.engine, checkfirst=True)
                return
            except DBAPIError:
                if attempt == 2:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        self.engine.dispose()

    # -- reads --------------------------------------------------------------------------

    def row(self, job_id: str) -> dict | None:
        with self.engine.connect() as db:
            found = db.execute(self.jobs.select().where(self.jobs.c.id == job_id)).mappings().first()
        return dict(found) if found else None

    def active(self) -> list[dict]:
        with self.engine.connect() as db:
            rows = db.execute(self.jobs.select().where(self.jobs.c.status.in_(("queued", "running")))).mappings()
            return [dict(r) for r in rows]

    def recent(self, finished: int) -> list[dict]:
        """The active jobs and the ``finished`` that ended last (for /metrics)."""
        j = self.jobs
        with self.engine.connect() as db:
            ended = db.execute(j.select().where(j.c.status.in_(FINAL)).order_by(j.c.finished.desc())
                               .limit(finished)).mappings().all()
        return self.active() + [dict(r) for r in ended]

    def holds_of(self, job_ids: Iterable[str]) -> dict[str, dict[str, str]]:
        """job id → {token digest: client}."""
        out: dict[str, dict[str, str]] = {}
        with self.engine.connect() as db:
            for r in db.execute(self.holds.select().where(self.holds.c.job_id.in_(list(job_ids)))).mappings():
                out.setdefault(r["job_id"], {})[r["token"]] = r["client"]
        return out

    # -- writes -------------------------------------------------------------------------

    def insert(self, row: dict | None, hold: tuple[str, str, str] | None) -> None:
        """A new job's row and/or a submitter's hold (job id, token digest, client), together."""
        with self.engine.begin() as db:
            if row is not None:
                db.execute(self.jobs.insert().values(**row))
            if hold is not None:
                db.execute(self.holds.insert().values(job_id=hold[0], token=hold[1], client=hold[2]))

    def drop_hold(self, job_id: str, token: str) -> int | None:
        """Drops a hold; answers how many the job still has, or None when it had no such hold."""
        from sqlalchemy import func, select

        h = self.holds
        with self.engine.begin() as db:
            gone = db.execute(h.delete().where((h.c.job_id == job_id) & (h.c.token == token))).rowcount
            left = db.execute(select(func.count()).select_from(h).where(h.c.job_id == job_id)).scalar()
        return int(left) if gone else None

    def _update(self, where, **values) -> list[dict]:
        """Updates the rows ``where`` holds (bumping their version); answers them as they are now."""
        j = self.jobs
        with self.engine.begin() as db:
            rows = db.execute(j.update().where(where).values(version=j.c.version + 1, **values)
                              .returning(*j.c)).mappings()
            return [dict(r) for r in rows]

    def claim(self, job_id: str, run: str) -> dict | None:
        """A queued job for ``run``: running, one more try."""
        j = self.jobs
        rows = self._update((j.c.id == job_id) & (j.c.status == "queued"), status="running", worker=run,
                            tries=j.c.tries + 1, started=time.time(), done=0)
        return rows[0] if rows else None

    def claim_batch(self, batch_key: str, run: str, count: int) -> list[dict]:
        """Up to ``count`` queued jobs of ``batch_key``, oldest first, for ``run``."""
        from sqlalchemy import select

        j = self.jobs
        oldest = (select(j.c.id).where((j.c.status == "queued") & (j.c.batch_key == batch_key))
                  .order_by(j.c.created).limit(count).scalar_subquery())
        return self._update(j.c.id.in_(oldest) & (j.c.status == "queued"), status="running", worker=run,
                            tries=j.c.tries + 1, started=time.time(), done=0)

    def take_over(self, dead: str, beats: int, run: str) -> list[dict]:
        """The jobs of the run ``dead`` (its heartbeat still at ``beats``), for ``run``; those
        that ran ``MAX_TRIES`` times are left to :meth:`fail_lost`."""
        j = self.jobs
        return self._update((j.c.worker == dead) & (j.c.status == "running") & (j.c.beats == beats)
                            & (j.c.tries < MAX_TRIES), worker=run, tries=j.c.tries + 1, started=time.time(), done=0)

    def requeue(self, dead: str, beats: int, epoch: str) -> list[dict]:
        """The jobs of the run ``dead`` back in the queue (their message is sent again)."""
        j = self.jobs
        return self._update((j.c.worker == dead) & (j.c.status == "running") & (j.c.beats == beats)
                            & (j.c.tries < MAX_TRIES), status="queued", worker=None, epoch=epoch)

    def fail_lost(self, dead: str) -> list[dict]:
        """The jobs of the run ``dead`` that ran ``MAX_TRIES`` times: failed, saying so."""
        j = self.jobs
        return self._update((j.c.worker == dead) & (j.c.status == "running") & (j.c.tries >= MAX_TRIES),
                            status="failed", finished=time.time(), error_status=500,
                            error=json.dumps(lost_error(MAX_TRIES)))

    def move_to(self, job_id: str, old_epoch: str | None, epoch: str, status: str) -> bool:
        """Marks a job of ``status`` as known to ``epoch``'s Redis (a queued one: its message sent
        there); True for the one janitor that did it."""
        j = self.jobs
        same = j.c.epoch.is_(None) if old_epoch is None else j.c.epoch == old_epoch
        return bool(self._update((j.c.id == job_id) & (j.c.status == status) & same, epoch=epoch))

    def unsent(self, job_id: str) -> None:
        """Its message could not be sent: the janitor sends it."""
        self._update(self.jobs.c.id == job_id, epoch=None)

    def beat(self, run: str) -> set[str]:
        """Bumps the heartbeat of ``run``'s jobs; answers those whose submitters all cancelled."""
        j = self.jobs
        with self.engine.begin() as db:
            rows = db.execute(j.update().where((j.c.worker == run) & (j.c.status == "running"))
                              .values(beats=j.c.beats + 1).returning(j.c.id, j.c.cancel)).all()
        return {r.id for r in rows if r.cancel}

    def request_cancel(self, job_id: str) -> dict | None:
        """Flags a job cancelled; a queued one ends now (answered with its row), a running one
        at its run's next check."""
        j = self.jobs
        active = (j.c.id == job_id) & j.c.status.in_(("queued", "running"))
        self._update(active, cancel=True)
        rows = self._update((j.c.id == job_id) & (j.c.status == "queued"), status="cancelled",
                            finished=time.time())
        return rows[0] if rows else None

    def end(self, job_id: str, run: str | None, status: str, **values) -> dict | None:
        """Ends a running job of ``run`` (or any active one for None); answers its row, or None
        when another run holds it now or it had ended."""
        j = self.jobs
        where = (j.c.id == job_id) & j.c.status.in_(("queued", "running"))
        if run is not None:
            where &= j.c.worker == run
        rows = self._update(where, status=status, finished=time.time(), **values)
        return rows[0] if rows else None

    def forget_before(self, when: float) -> int:
        """Deletes jobs (and their holds) that ended before ``when``."""
        j, h = self.jobs, self.holds
        with self.engine.begin() as db:
            old = [r.id for r in db.execute(j.select().with_only_columns(j.c.id)
                                            .where(j.c.finished < when).limit(1000)).all()]
            if old:
                db.execute(h.delete().where(h.c.job_id.in_(old)))
                db.execute(j.delete().where(j.c.id.in_(old)))
        return len(old)


def lost_error(tries: int) -> dict:
    return {"code": "worker_lost", "field": None,
            "message": f"the worker running this job stopped {tries} times (killed, or its machine lost); "
                       "it is not tried again"}


# --------------------------------------------------------------------------- Redis


def make_redis(url: str):
    """A Redis client that reconnects by itself (each command retries a dropped connection)."""
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2,
                                health_check_interval=15, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError])


# Admits a submission atomically: joins the active job of its key, or makes a new one within the
# limits; records the hold. Answers {outcome, job id or count, epoch | ids in the way...}.
ADMIT = """
local p, client, key, new_id, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local max_jobs, per_client, keep = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[9])
local epoch = redis.call('GET', p .. ':epoch')
if not epoch then redis.call('SET', p .. ':epoch', ARGV[8]); epoch = ARGV[8] end
local active = p .. ':active'
local joined = false
if key ~= '' then
  local id = redis.call('GET', p .. ':key:' .. key)
  if id and redis.call('SISMEMBER', active, id) == 1 then joined = id end
end
local mine, holding = {}, false
local mine_key = p .. ':client:' .. client
if client ~= '' then
  for _, id in ipairs(redis.call('SMEMBERS', mine_key)) do
    if redis.call('SISMEMBER', active, id) == 1 then
      table.insert(mine, id)
      if id == joined then holding = true end
    else
      redis.call('SREM', mine_key, id)
    end
  end
end
if not joined and max_jobs > 0 then
  local n = redis.call('SCARD', active)
  if n >= max_jobs then
    redis.call('HINCRBY', p .. ':refused', 'queue_full', 1)
    return {'queue_full', tostring(n), unpack(redis.call('SRANDMEMBER', active, 4))}
  end
end
if per_client > 0 and not holding and #mine >= per_client then
  redis.call('HINCRBY', p .. ':refused', 'client_jobs', 1)
  return {'client_jobs', tostring(#mine), unpack(mine)}
end
local id = joined or new_id
if not joined then
  redis.call('SADD', active, id)
  if key ~= '' then redis.call('SET', p .. ':key:' .. key, id, 'EX', keep) end
end
if client ~= '' then
  redis.call('HSET', p .. ':holds:' .. id, token, client)
  redis.call('EXPIRE', p .. ':holds:' .. id, keep)
  redis.call('SADD', mine_key, id)
  redis.call('EXPIRE', mine_key, keep)
end
return {joined and 'joined' or 'new', id, epoch}
"""

# Drops a hold: answers the holds left, or -1 when the token holds nothing on the job.
RELEASE = """
local holds = ARGV[1] .. ':holds:' .. ARGV[2]
if redis.call('HDEL', holds, ARGV[3]) == 0 then return -1 end
return redis.call('HLEN', holds)
"""

# The job ended: it counts no more, and its key no longer joins it.
ENDED = """
redis.call('SREM', ARGV[1] .. ':active', ARGV[2])
if ARGV[3] ~= '' and redis.call('GET', ARGV[1] .. ':key:' .. ARGV[3]) == ARGV[2] then
  redis.call('DEL', ARGV[1] .. ':key:' .. ARGV[3])
end
return 1
"""

# A token bucket per client on Redis's clock: '0' when allowed, else the seconds to wait.
TAKE = """
local per_min = tonumber(ARGV[2])
local rate = per_min / 60.0
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local b = redis.call('HMGET', ARGV[1], 'tokens', 'at')
local tokens, at = tonumber(b[1]) or per_min, tonumber(b[2]) or now
tokens = math.min(per_min, tokens + math.max(0, now - at) * rate)
if tokens < 1 then
  redis.call('HSET', ARGV[1], 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('EXPIRE', ARGV[1], 120)
  return tostring((1 - tokens) / rate)
end
redis.call('HSET', ARGV[1], 'tokens', tostring(tokens - 1), 'at', tostring(now))
redis.call('EXPIRE', ARGV[1], 120)
return '0'
"""


class RedisAdmission:
    """The calls of :class:`~insights.admission.Admission` on Redis, so the limits hold across web
    nodes: a write per client (a token bucket), jobs in all and per client, a hold with its own
    cancel token per submitter. ``admit`` checks and holds in one script (two nodes cannot both
    take the last place)."""

    def __init__(self, backend: "CeleryBackend"):
        self.backend = backend
        self.max_jobs: int | None = 32
        self.per_client: int | None = 4
        self.rate_per_min: int | None = 120

    def configure(self, config) -> None:
        self.max_jobs = limit(config.get("MAX_QUEUED_JOBS"))
        self.per_client = limit(config.get("MAX_JOBS_PER_CLIENT"))
        self.rate_per_min = limit(config.get("RATE_LIMIT_PER_MIN"))

    def _key(self, *parts: str) -> str:
        return ":".join((self.backend.prefix,) + parts)

    def allow_write(self, client: str) -> None:
        """Counts one write of ``client``, or refuses it (429 ``busy``) past the rate limit."""
        if self.rate_per_min is None:
            return
        with broker_errors():
            wait = float(self.backend.script(TAKE)(args=[self._key("rate", client), self.rate_per_min]))
            if wait > 0:
                self.backend.redis.hincrby(self._key("refused"), "rate_limit", 1)
        if wait > 0:
            raise Busy(f"too many requests: at most {self.rate_per_min} writes a minute per client "
                       f"(RATE_LIMIT_PER_MIN); try again in {max(1, round(wait))} s", wait, reason="rate_limit")

    def admit(self, client: str, key: str | None, job_id: str, token: str | None, limits: bool = True):
        """(job id, joined, epoch) of an admitted submission: the active job of ``key``, or the
        new ``job_id``; else :class:`~insights.errors.Busy` (503 the server is full, 429 the
        client holds its share)."""
        args = [self.backend.prefix, client or "", key or "", job_id, digest(token) if token else "",
                (self.max_jobs or 0) if limits else 0, (self.per_client or 0) if limits else 0,
                uuid.uuid4().hex, int(KEEP_S)]
        with broker_errors():
            answer = self.backend.script(ADMIT)(args=args)
        outcome = answer[0]
        if outcome == "queue_full":
            raise Busy(f"the server is full: {answer[1]} jobs are queued or running (MAX_QUEUED_JOBS); "
                       "try again later", self.backend.seconds_to_end(answer[2:]), status=503, reason="queue_full")
        if outcome == "client_jobs":
            raise Busy(f"you have {answer[1]} jobs queued or running, the most one client may have "
                       "(MAX_JOBS_PER_CLIENT); wait for one to finish or cancel it",
                       self.backend.seconds_to_end(answer[2:]), reason="client_jobs")
        return answer[1], outcome == "joined", answer[2]

    def release(self, job_id: str, token: str) -> int:
        """Drops the hold of ``token``; answers the holds left (403 ``forbidden`` for a token that
        holds nothing on this job). The database's copy decides when Redis has lost its own."""
        left = -1
        try:
            left = int(self.backend.script(RELEASE)(args=[self.backend.prefix, job_id, digest(token)]))
        except redis_errors():
            pass
        in_db = self.backend.table.drop_hold(job_id, digest(token))
        if left < 0 and in_db is None:
            raise Forbidden("this cancel token does not belong to this job: only a submitter may cancel it, "
                            "with the cancel_token its submission answered", "cancel_token")
        return in_db if in_db is not None else left

    def ended(self, job_id: str, key: str | None = None) -> None:
        """The job ended: it no longer counts against anyone."""
        try:
            self.backend.script(ENDED)(args=[self.backend.prefix, job_id, key or ""])
        except redis_errors():  # the janitor sets it right when Redis is back
            log.warning("job %s ended, but Redis did not hear it", job_id)

    def restore(self, row: dict, holds: dict[str, str]) -> None:
        """Puts an active job back into Redis's bookkeeping (Redis lost its data)."""
        r, job_id = self.backend.redis.pipeline(), row["id"]
        r.sadd(self._key("active"), job_id)
        if row["key"]:
            r.set(self._key("key", row["key"]), job_id, ex=int(KEEP_S), nx=True)
        for token, client in holds.items():
            r.hset(self._key("holds", job_id), token, client)
            r.sadd(self._key("client", client), job_id)
            r.expire(self._key("client", client), int(KEEP_S))
        r.expire(self._key("holds", job_id), int(KEEP_S))
        r.execute()

    @property
    def refused(self) -> dict:
        try:
            return {k: int(v) for k, v in self.backend.redis.hgetall(self._key("refused")).items()}
        except redis_errors():
            return {}

    def counts(self) -> dict:
        """Active jobs and refusals by reason, across every node."""
        try:
            active = int(self.backend.redis.scard(self._key("active")))
        except redis_errors():
            active = 0
        return {"active": active, "refused": self.refused}


def redis_errors() -> tuple:
    import redis

    return (redis.RedisError, OSError)


@contextmanager
def broker_errors():
    """Redis not answering, as a 503 the client may retry."""
    try:
        yield
    except redis_errors() as exc:
        log.warning("Redis is not answering: %s", exc)
        raise Busy("the job queue (Redis, BROKER_URL) is not answering; try again in a moment", DEFAULT_RETRY_S,
                   status=503, reason="broker_down") from None


@contextmanager
def database_errors():
    """The database not answering, as a 503 the client may retry."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    try:
        yield
    except (OperationalError, InterfaceError) as exc:  # not answering, or busy; not a wrong statement
        log.warning("the job database is not answering: %s", exc)
        # The same answer as the store's when the database is down: one fault, one code.
        raise StoreUnavailable("the job database (DATABASE_URL) is not answering; try again in a moment",
                               DEFAULT_RETRY_S) from None


# --------------------------------------------------------------------------- Celery


def make_celery(broker_url: str, visibility_s: float | None = None):
    """The Celery app of web nodes (which send) and workers (which run): JSON messages, late
    acknowledgements, messages given back when a worker dies or after ``visibility_s``."""
    from celery import Celery
    from kombu import Exchange, Queue

    visibility = float(visibility_s or VISIBILITY_S)
    app = Celery("insights", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json", accept_content=["json"], result_serializer="json",
        task_ignore_result=True, result_backend=None,
        task_acks_late=True, task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a worker holds the message it runs, no more
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES.values()],
        task_default_queue=QUEUES["main"],
        broker_transport_options={
            "visibility_timeout": visibility,
            "unacked_restore_interval": max(1, int(visibility // 4)), "unacked_restore_throttle": 1,
            "priority_steps": list(range(10)), "socket_timeout": 10, "socket_connect_timeout": 5,
            "health_check_interval": 15,
        },
        broker_connection_retry_on_startup=True, broker_connection_max_retries=None,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
        worker_proc_alive_timeout=120,  # a new pool process builds the app (imports torchvision) first
        worker_cancel_long_running_tasks_on_connection_loss=False,  # Redis restarts: runs go on
    )
    return app


# --------------------------------------------------------------------------- jobs as the web reads them


class RemoteJob(Job):
    """A job of the database, read by a web node: :class:`~insights.jobs.Job`'s fields (so its
    ``to_dict`` and ``final``), refreshed from the database (status, answer) and Redis (progress)."""

    def __init__(self, backend: "CeleryBackend", job_id: str, row: dict | None = None):
        super().__init__(None)
        self.id, self.backend = job_id, backend
        if row is not None:
            self.load(row, {})

    def load(self, row: dict, progress: dict) -> "RemoteJob":
        final = row["status"] in FINAL
        with self._cond:
            self.status, self.key, self.urgent, self.lane = row["status"], row["key"], row["urgent"], row["lane"]
            self.total = int(progress.get("total") or row["total"])
            self.done = int(row["done"]) if final else max(int(row["done"]), int(progress.get("done") or 0))
            self.result = json.loads(row["result"]) if row["result"] else None
            self.error = json.loads(row["error"]) if row["error"] else None
            self.error_status = row["error_status"]
            self.created, self.started, self.finished = row["created"], row["started"], row["finished"]
            first = progress.get("first_t")
            self._first = (float(first), int(progress.get("first_done") or 0)) if first else None
            self.version = int(row["version"]) + int(progress.get("v") or 0)
            partial = progress.get("partial")
            self.partial = json.loads(partial) if partial and not final else None
        return self

    def refresh(self) -> "RemoteJob":
        """Reads the job again (keeps what it knew when the database does not answer)."""
        from sqlalchemy.exc import DBAPIError

        try:
            row = self.backend.table.row(self.id)
        except DBAPIError as exc:
            log.warning("job %s: the database is not answering: %s", self.id, exc)
            return self
        return self.load(row, self.backend.progress(self.id)) if row is not None else self

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the job is finished (True) or ``timeout`` passes (False); woken by the
        job's notices, and re-reading it every ``POLL_S`` whatever comes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.backend.notices.watching(self.id) as changed:
            while True:
                changed.clear()
                if self.refresh().final:
                    return True
                left = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
                if left <= 0:
                    return False
                changed.wait(left)


class Notices:
    """The change notices of jobs (Redis pub/sub, one subscriber thread per process), for the
    threads of this process that wait on a job. A notice lost (Redis restarting) costs at most
    ``POLL_S``: waiters re-read their job that often anyway."""

    def __init__(self, backend: "CeleryBackend"):
        self.backend = backend
        self._waiting: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watching(self, job_id: str) -> Iterator[threading.Event]:
        """An event set whenever the job changes, while the block runs."""
        changed = threading.Event()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._listen, name="insights-notices", daemon=True)
                self._thread.start()
            self._waiting.setdefault(job_id, set()).add(changed)
        try:
            yield changed
        finally:
            with self._lock:
                waiting = self._waiting.get(job_id, set())
                waiting.discard(changed)
                if not waiting:
                    self._waiting.pop(job_id, None)

    def _listen(self) -> None:
        pattern, backoff = f"{self.backend.prefix}:ev:*", 0.1
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self.backend.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe(pattern)
                backoff = 0.1
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.25)
                    if message is not None:
                        job_id = str(message["channel"]).rsplit(":", 1)[-1]
                        with self._lock:
                            for changed in self._waiting.get(job_id, ()):
                                changed.set()
            except redis_errors() as exc:
                log.info("job notices: Redis is not answering (%s); listening again in %.1f s", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(2.0, backoff * 2)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except redis_errors():
                        pass

    def close(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(2)


# --------------------------------------------------------------------------- the backend


class CeleryBackend:
    """A :class:`~insights.jobs.JobBackend` on Celery and Redis, with job state in a database.
    Web nodes call ``admit``/``get``/``cancel``/``events``; workers (:mod:`insights.worker`) and
    their janitor use the rest."""

    def __init__(self, prefix: str = PREFIX):
        self.prefix = prefix
        self.admission = RedisAdmission(self)
        self.notices = Notices(self)
        self.redis = None
        self.table: JobTable | None = None
        self._celery = None
        self.broker_url = ""
        self.visibility_s = VISIBILITY_S
        self.batch_window = 0.005
        self.batch_max = 16
        self._scripts: dict[str, Any] = {}
        self._forgot = float("-inf")  # when the janitor last deleted old jobs

    def init_app(self, app) -> None:
        self.configure(app.config, app.instance_path)

    def configure(self, config, folder: str) -> None:
        """Connects to ``BROKER_URL`` and the job database (``DATABASE_URL``, else SQLite in the
        store folder: ``STORE_PATH`` or ``folder``), and makes the tables when missing."""
        import os

        self.broker_url = str(config["BROKER_URL"])
        if not self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"BROKER_URL must be a Redis URL (redis://host:port/db), got {self.broker_url[:40]!r}")
        self.visibility_s = float(config.get("BROKER_VISIBILITY_S") or VISIBILITY_S)
        self.batch_window = float(config.get("BATCH_WINDOW_MS", 5)) / 1000.0
        self.batch_max = int(config.get("BATCH_MAX", 16))
        self.admission.configure(config)
        try:
            self.redis = make_redis(self.broker_url)
        except ImportError as exc:
            raise RuntimeError(f"BROKER_URL needs the scale-out packages ({exc.name} is missing): "
                               "pip install -r requirements-scale.txt") from None
        url = config.get("DATABASE_URL")
        if not url:
            store = os.path.abspath(config.get("STORE_PATH") or folder)
            os.makedirs(store, exist_ok=True)
            url = "sqlite:///" + os.path.join(store, "jobs.sqlite3")
        self.table = JobTable(str(url))
        self.table.create()

    @property
    def celery(self):
        if self._celery is None:
            self._celery = make_celery(self.broker_url, self.visibility_s)
        return self._celery

    def script(self, source: str):
        """A Lua script, loaded once per Redis (redis-py loads it again after a restart)."""
        if source not in self._scripts:
            self._scripts[source] = self.redis.register_script(source)
        return self._scripts[source]

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix,) + parts)

    # -- the JobBackend calls (web nodes) --------------------------------------------------

    def admit(self, work: Any, client: str, key: str | None = None, total: int = 0, urgent: bool = False,
              batch: bool = False, lane: str = "main") -> Ticket:
        """Admits ``work`` (a :class:`~insights.tasks.Task`) for ``client`` within the limits kept
        in Redis; answers the job (new, or the identical one it joined) and this submitter's token."""
        token = secrets.token_urlsafe(18)
        return Ticket(self._enqueue(work, client, key, total, urgent, batch, lane, token), token)

    def submit(self, work: Any, key: str | None = None, total: int = 0, urgent: bool = False,
               batch: bool = False, lane: str = "main") -> Job:
        """Queues ``work`` with no admission check (joins the active job of ``key``)."""
        return self._enqueue(work, "", key, total, urgent, batch, lane, None)

    def _enqueue(self, work, client, key, total, urgent, batch, lane, token) -> RemoteJob:
        if lane not in QUEUES:
            raise ValueError(f"no lane {lane!r}; lanes: {', '.join(QUEUES)}")
        payload = work.to_payload()
        job_id, joined, epoch = self.admission.admit(client, key, uuid.uuid4().hex, token, limits=bool(client))
        hold = (job_id, digest(token), client) if token else None
        row = None
        if not joined:
            batch_key = getattr(work, "batch_key", None) if batch else None
            row = {"id": job_id, "kind": payload["kind"], "model": payload.get("model"),
                   "image": payload.get("image"), "method": payload.get("method"), "request": json.dumps(payload),
                   "key": key, "batch_key": json.dumps(batch_key) if batch_key is not None else None, "lane": lane,
                   "urgent": bool(urgent), "status": "queued", "cancel": False, "done": 0, "total": int(total),
                   "tries": 0, "worker": None, "beats": 0, "epoch": epoch, "version": 1, "created": time.time(),
                   "started": None, "finished": None, "result": None, "error": None, "error_status": None}
        try:
            with database_errors():
                self.table.insert(row, hold)
        except Exception:
            if row is not None:  # the place taken in Redis goes back
                self.admission.ended(job_id, key)
            raise
        if row is None:
            return self.get(job_id) or RemoteJob(self, job_id)
        self.send(job_id, lane, urgent)
        return RemoteJob(self, job_id, row)

    def send(self, job_id: str, lane: str, urgent: bool) -> None:
        """Sends the job's message (its id); one that cannot go now is left to the janitor."""
        try:
            self.celery.send_task(TASK, args=[job_id], queue=QUEUES.get(lane, QUEUES["main"]),
                                  priority=URGENT if urgent else QUEUED)
        except Exception as exc:  # noqa: BLE001 - kombu's errors vary by transport
            log.warning("job %s: its message could not be sent (%s); the janitor sends it", job_id, exc)
            try:
                self.table.unsent(job_id)
            except Exception:  # noqa: BLE001
                log.exception("job %s: could not mark it unsent", job_id)

    def get(self, job_id: str) -> RemoteJob | None:
        if not (isinstance(job_id, str) and len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)):
            return None
        with database_errors():
            row = self.table.row(job_id)
        return RemoteJob(self, job_id).load(row, self.progress(job_id)) if row is not None else None

    def snapshot(self, finished: int = 200) -> list[RemoteJob]:
        """Jobs of every node as /metrics reads them: queued, running and the ``finished`` that
        ended last (the in-process runner's ``JOBS_KEPT``)."""
        with database_errors():
            rows = self.table.recent(finished)
        return [RemoteJob(self, row["id"], row) for row in rows]

    def cancel(self, job_id: str, token: str | None = None) -> RemoteJob | None:
        """Drops the submitter's hold (403 without a good ``token``); when none is left, a queued
        job is cancelled at once and a running one at its run's next check (within
        ``CANCEL_CHECK_S`` of a progress step)."""
        job = self.get(job_id)
        if job is None:
            return None
        if token is not None:
            with database_errors():
                if self.admission.release(job_id, token) > 0:
                    return job
        if job.final:
            return job
        try:
            self.redis.set(self._key("cancel", job_id), 1, ex=int(KEEP_S))
        except redis_errors():
            pass  # the flag in the database reaches the run with its next heartbeat
        with database_errors():
            ended = self.table.request_cancel(job_id)
        if ended is not None:
            self.admission.ended(job_id, ended["key"])
        self.notify(job_id)
        return self.get(job_id)

    def events(self, job: RemoteJob, heartbeat: float, until: float | None = None) -> Iterator[dict | None]:
        """The job's state at every change, ending with its final state or at ``until`` (a
        ``time.monotonic()`` deadline); None after ``heartbeat`` seconds without a change."""
        version, sent = -1, time.monotonic()
        with self.notices.watching(job.id) as changed:
            while True:
                changed.clear()
                state = job.refresh().to_dict()
                now = time.monotonic()
                if state["version"] != version:
                    version, sent = state["version"], now
                    yield state
                    if state["status"] in FINAL:
                        return
                if until is not None and now >= until:
                    return
                if now - sent >= heartbeat:
                    sent = now
                    yield None
                waits = [POLL_S, heartbeat - (now - sent)] + ([until - now] if until is not None else [])
                changed.wait(max(0.0, min(waits)))

    def shutdown(self, timeout: float = 5.0) -> None:
        """Closes this node's connections; the jobs go on (other nodes and workers hold them)."""
        self.notices.close()
        if self._celery is not None:
            self._celery.close()
        if self.table is not None:
            self.table.close()
        if self.redis is not None:
            self.redis.close()

    def seconds_to_end(self, job_ids: Iterable[str]) -> float:
        """About how long until the first of these jobs ends (their smallest ETA)."""
        etas = []
        for job_id in list(job_ids)[:4]:
            try:
                job = self.get(job_id)
            except Busy:
                job = None
            if job is not None:
                etas.append(job.to_dict()["eta_s"])
        return wait_for_first(etas)

    # -- state in Redis (workers write, web nodes read) -----------------------------------

    def progress(self, job_id: str) -> dict:
        try:
            return self.redis.hgetall(self._key("job", job_id))
        except redis_errors():
            return {}

    def notify(self, job_id: str, **progress) -> None:
        """Records ``progress`` fields (``done``, ``total``, ``first_t``...) and tells the
        waiters of the job it changed; Redis not answering loses only this notice."""
        key = self._key("job", job_id)
        try:
            pipe = self.redis.pipeline(transaction=False)
            if progress.pop("restart", False):
                pipe.hdel(key, "first_t", "first_done", "partial")
            if progress:
                pipe.hset(key, mapping=progress)
            pipe.hincrby(key, "v", 1)
            pipe.expire(key, int(KEEP_S))
            pipe.publish(self._key("ev", job_id), "")
            pipe.execute()
        except redis_errors() as exc:
            log.info("job %s: Redis did not take its progress (%s)", job_id, exc)

    def cancel_flagged(self, job_id: str) -> bool:
        try:
            return bool(self.redis.exists(self._key("cancel", job_id)))
        except redis_errors():
            return False

    def ended(self, row: dict) -> None:
        """After a job's row ended: Redis's bookkeeping and the waiters hear it."""
        self.admission.ended(row["id"], row["key"])
        self.notify(row["id"])

    def epoch(self) -> str:
        """The id of the Redis data set now: new when Redis lost its data (restarted empty)."""
        self.redis.set(self._key("epoch"), uuid.uuid4().hex, nx=True)
        return self.redis.get(self._key("epoch"))

    # -- the janitor (run by every worker) --------------------------------------------------

    def sweep(self, seen: dict[str, tuple[str, int, float]]) -> dict:
        """One pass of the janitor. ``seen`` (kept by the caller between passes) holds each running
        job's (run, heartbeat, since when unchanged, on this machine's clock). Answers counts."""
        counts = {"restored": 0, "resent": 0, "requeued": 0, "failed": 0}
        epoch = self.epoch()
        rows = self.table.active()
        now = time.monotonic()
        lost = [r for r in rows if r["epoch"] != epoch]
        if lost:  # Redis restarted empty (or a message was never sent): its state comes back
            holds = self.table.holds_of(r["id"] for r in lost)
            for r in lost:
                self.admission.restore(r, holds.get(r["id"], {}))  # the same from every janitor
                if not self.table.move_to(r["id"], r["epoch"], epoch, r["status"]):
                    continue  # another janitor did it, or the job moved on
                counts["restored"] += 1
                if r["status"] == "queued":  # its message went with the old Redis
                    self.send(r["id"], r["lane"], r["urgent"])
                    counts["resent"] += 1
        running = {}
        for r in rows:
            if r["status"] != "running":
                continue
            mark = (r["worker"], r["beats"])
            before = seen.get(r["id"])
            since = before[2] if before is not None and before[:2] == mark else now
            running[r["id"]] = mark + (since,)
            if now - since < STALE_S:
                continue
            for dead in self.table.fail_lost(r["worker"]):
                self.ended(dead)
                counts["failed"] += 1
            for back in self.table.requeue(r["worker"], r["beats"], epoch):
                self.notify(back["id"], restart=True, done=0)
                self.send(back["id"], back["lane"], back["urgent"])
                counts["requeued"] += 1
        seen.clear()
        seen.update(running)
        try:  # jobs Redis counts as active that the database ended
            active_ids = {r["id"] for r in rows}
            for job_id in self.redis.smembers(self._key("active")) - active_ids:
                row = self.table.row(job_id)
                if row is None or row["status"] in FINAL:
                    self.admission.ended(job_id, row["key"] if row else None)
        except redis_errors():
            pass
        if time.monotonic() - self._forgot > 60:
            self._forgot = time.monotonic()
            self.table.forget_before(time.time() - KEEP_S)
        return counts
