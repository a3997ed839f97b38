"""The job runner: one worker thread, order, progress and ETA, cancel, failures, de-duplication."""
from __future__ import annotations

import re
import threading
import time

import pytest

from insights.jobs import JobRunner
from insights.tasks import Task
from insights.engine import Cancelled, ParamError


@pytest.fixture
def runner():
    r = JobRunner(keep=3)
    yield r
    r.shutdown()


def test_jobs_run_in_order_on_one_worker_thread(runner):
    threads, order = set(), []

    def work(n):
        def fn(job):
            threads.add(threading.get_ident())
            order.append(n)
            return n * n
        return fn

    jobs = [runner.submit(work(n)) for n in range(5)]
    for j in jobs:
        assert j.wait(5)
    assert [j.result for j in jobs] == [0, 1, 4, 9, 16] and order == [0, 1, 2, 3, 4]
    assert len(threads) == 1 and threading.get_ident() not in threads
    assert all(j.to_dict()["status"] == "done" for j in jobs)


def test_progress_and_eta(runner, monkeypatch):
    import insights.jobs as jobs_module

    clock = [1000.0]
    monkeypatch.setattr(jobs_module, "clock", lambda: clock[0])
    gate, reported = threading.Event(), threading.Event()

    def fn(job):
        clock[0] += 10.0  # start-up (loading the model) before the first report
        job.progress(1, 9)
        clock[0] += 4.0  # then 2 s per unit
        job.progress(3, 9)
        reported.set()
        gate.wait(5)
        return "r" * 64

    job = runner.submit(fn, total=9)
    assert reported.wait(5)
    mid = job.to_dict()
    assert mid["status"] == "running" and (mid["done"], mid["total"]) == (3, 9)
    assert mid["elapsed_s"] == 14.0 and mid["eta_s"] == 12.0  # 6 units left at 2 s each
    gate.set()
    assert job.wait(5)
    final = job.to_dict()
    assert final["status"] == "done" and final["eta_s"] == 0.0 and final["result_id"] == "r" * 64
    assert final["done"] == final["total"] == 9


def test_cancel_queued_and_running(runner):
    started = threading.Event()

    def long(job):
        started.set()
        while True:
            if job.cancel.is_set():
                raise Cancelled("stop")
            time.sleep(0.005)

    ran = []
    first = runner.submit(long)
    second = runner.submit(lambda job: ran.append(1))
    assert started.wait(5)
    runner.cancel(second.id)
    assert second.status == "cancelled"  # at once, without waiting for the worker
    assert second.work is None  # and what it would have computed on is let go
    runner.cancel(first.id)
    assert first.wait(5) and first.status == "cancelled"
    after = runner.submit(lambda job: "ok")
    assert after.wait(5) and after.result == "ok" and ran == []


def test_urgent_jobs_go_ahead_of_queued_costly_ones(runner):
    gate, order = threading.Event(), []
    runner.submit(lambda job: gate.wait(5))
    runner.submit(lambda job: order.append("costly 1"))
    runner.submit(lambda job: order.append("costly 2"))
    urgent = runner.submit(lambda job: order.append("urgent"), urgent=True)
    gate.set()
    assert urgent.wait(5)
    runner.submit(lambda job: None).wait(5)
    assert order == ["urgent", "costly 1", "costly 2"]


def test_failures_are_reported_and_the_worker_goes_on(runner):
    bad = runner.submit(lambda job: (_ for _ in ()).throw(ParamError("n_steps", "must be at most 10")), urgent=True)
    boom = runner.submit(lambda job: 1 / 0)
    ok = runner.submit(lambda job: 7)
    assert ok.wait(5) and ok.result == 7
    assert bad.to_dict()["error"] == {"code": "bad_param", "message": "n_steps: must be at most 10",
                                      "field": "n_steps"}
    assert boom.to_dict()["error"]["code"] == "internal"
    assert re.fullmatch(r"internal error; request id [0-9a-f]{32}", boom.error["message"])  # the detail is logged
    assert isinstance(bad.exception, ParamError) and boom.exception is None  # only waiting requests re-raise


def test_same_key_shares_a_job_until_it_finishes(runner):
    gate = threading.Event()
    a = runner.submit(lambda job: gate.wait(5), key="k")
    b = runner.submit(lambda job: 1, key="k")
    assert a is b
    gate.set()
    assert a.wait(5)
    c = runner.submit(lambda job: 2, key="k")
    assert c is not a and c.wait(5) and c.result == 2


def test_only_the_last_finished_jobs_are_kept(runner):
    jobs = [runner.submit(lambda job: 0) for _ in range(6)]
    jobs[-1].wait(5)
    time.sleep(0.01)
    runner.submit(lambda job: 0).wait(5)
    assert runner.get(jobs[0].id) is None and runner.get(jobs[-1].id) is jobs[-1]


def two_steps(step: threading.Event, finish: threading.Event, result=None):
    """A job function that reports 1 of 2 once ``step`` is set and returns once ``finish`` is."""
    def fn(job):
        step.wait(5)
        job.progress(1, 2)
        finish.wait(5)
        return result
    return fn


def test_wait_change_wakes_on_progress(runner):
    step, finish = threading.Event(), threading.Event()
    job = runner.submit(two_steps(step, finish))
    while job.status != "running":
        time.sleep(0.005)
    v = job.version
    step.set()
    assert job.wait_change(v, 5) != v and job.done == 1
    finish.set()
    assert job.wait(5)


class Item(Task):
    """A task of the batch key "k": computes ten times its number, recording each call's size."""

    batch_key = "k"

    def __init__(self, n: int, calls: list, error: Exception | None = None):
        self.n, self.calls, self.error = n, calls, error

    @classmethod
    def compute(cls, tasks, jobs):
        tasks[0].calls.append(len(tasks))
        if tasks[0].error is not None:
            raise tasks[0].error
        return [t.n * 10 for t in tasks]


def test_batchable_jobs_queued_together_run_in_one_call(runner):
    gate, busy = threading.Event(), threading.Event()

    def blocker(job):
        busy.set()
        gate.wait(5)
        return "blocker"

    calls = []
    first = runner.submit(blocker)
    assert busy.wait(5)
    other = runner.submit(lambda job: "other", urgent=True)  # a different kind: not batched
    jobs = [runner.submit(Item(n, calls), urgent=True, batch=True) for n in range(4)]
    gate.set()
    for j in [first, other, *jobs]:
        assert j.wait(5)
    assert [j.result for j in jobs] == [0, 10, 20, 30]
    assert other.result == "other" and first.result == "blocker"
    assert calls == [4]


def test_tasks_not_submitted_for_batching_run_alone_and_are_finished_off_the_worker(runner):
    finishers = []

    class Finished(Item):
        def finish(self, computed):
            finishers.append(threading.current_thread().name)
            return f"stored {computed}"

    gate, busy = threading.Event(), threading.Event()
    runner.submit(lambda job: (busy.set(), gate.wait(5)))
    assert busy.wait(5)
    calls = []
    queued = [runner.submit(Finished(n, calls)) for n in range(3)]
    waiting = runner.submit(Finished(7, calls), urgent=True)
    gate.set()
    for j in [*queued, waiting]:
        assert j.wait(5) and j.status == "done"
    assert [j.result for j in queued] == ["stored 0", "stored 10", "stored 20"]
    assert waiting.result == "stored 70"  # done means finished, for a waiting request too
    assert calls == [1, 1, 1, 1]
    assert len(finishers) == 4 and all(name.startswith("insights-finish") for name in finishers)
    assert all(j.work is None for j in [*queued, waiting])  # the tasks (and their inputs) let go


def test_a_failing_finish_fails_its_job_only(runner):
    class Flaky(Item):
        def finish(self, computed):
            if computed == 10:
                raise ParamError("store", "is full")
            return computed

    gate, busy = threading.Event(), threading.Event()
    runner.submit(lambda job: (busy.set(), gate.wait(5)))
    assert busy.wait(5)
    jobs = [runner.submit(Flaky(n, []), urgent=True, batch=True) for n in range(3)]
    gate.set()
    for j in jobs:
        assert j.wait(5)
    assert [j.status for j in jobs] == ["done", "failed", "done"]
    assert jobs[1].error["field"] == "store" and jobs[1].error_status == 400
    assert isinstance(jobs[1].exception, ParamError)  # a waiting request re-raises it


def test_batch_waits_only_within_its_window_and_respects_the_cap():
    r = JobRunner(batch_window=0.0, batch_max=2)
    calls = []
    gate, busy = threading.Event(), threading.Event()
    r.submit(lambda job: (busy.set(), gate.wait(5)))
    assert busy.wait(5)
    jobs = [r.submit(Item(n, calls), batch=True) for n in range(5)]
    gate.set()
    for j in jobs:
        assert j.wait(5) and j.status == "done"
    r.shutdown()
    assert calls == [1] * 5  # a zero window never waits for company


def test_a_failing_batch_fails_each_of_its_jobs(runner):
    gate, busy = threading.Event(), threading.Event()
    runner.submit(lambda job: (busy.set(), gate.wait(5)))
    assert busy.wait(5)
    calls = []
    error = ParamError("stdevs", "must be at least 0")
    jobs = [runner.submit(Item(n, calls, error), urgent=True, batch=True) for n in range(3)]
    gate.set()
    for j in jobs:
        assert j.wait(5)
        assert j.status == "failed" and j.error["field"] == "stdevs"


def test_events_send_each_change_a_keep_alive_when_idle_and_end_with_the_final_state(runner):
    step, finish = threading.Event(), threading.Event()
    job = runner.submit(two_steps(step, finish, "r" * 64), total=2)
    events = runner.events(job, heartbeat=0.05)
    states = [next(events)]
    while states[-1]["status"] != "running":  # queued, then running
        states.append(next(events))
    assert next(events) is None  # nothing changed for a heartbeat
    step.set()
    progressed = next(events)
    assert progressed["done"] == 1 and progressed["version"] > states[-1]["version"]
    finish.set()
    rest = [s for s in events if s is not None]
    assert rest[-1]["status"] == "done" and rest[-1]["result_id"] == "r" * 64 and rest[-1]["done"] == 2
    assert [s["version"] for s in rest] == sorted(set(s["version"] for s in rest))
