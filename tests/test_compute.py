"""The compute thread (engine.compute): streams interleave round-robin on one thread, errors reach the
consumer, closing or cancelling stops a stream before its next step and closes its generator there, step
contexts wrap each step only, and calls run between steps."""
from __future__ import annotations

import contextlib
import threading
import time

import pytest

from engine.compute import Scheduler, isolated


def counting(n, log=None, tag="", delay=0.0):
    for i in range(n):
        if delay:
            time.sleep(delay)
        if log is not None:
            log.append((tag, i, threading.current_thread().name))
        yield i


def test_stream_yields_items_on_the_compute_thread():
    s = Scheduler(name="qs-test")
    log = []
    assert list(s.stream(counting(5, log, "a"))) == [0, 1, 2, 3, 4]
    assert {name for _t, _i, name in log} == {"qs-test"}
    assert s.steps == 5 and s.active() == 0


def test_two_streams_advance_in_turn():
    s = Scheduler()
    log = []
    gate = threading.Event()

    def gated(tag):
        gate.wait(5)  # both streams are registered before either takes a step
        yield from counting(4, log, tag)

    ha, hb = s.stream(gated("a")), s.stream(gated("b"))
    gate.set()
    results = {}
    ta = threading.Thread(target=lambda: results.setdefault("a", list(ha)))
    tb = threading.Thread(target=lambda: results.setdefault("b", list(hb)))
    ta.start(), tb.start(), ta.join(5), tb.join(5)
    assert results == {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]}
    tags = [t for t, _i, _n in log]
    assert tags == ["a", "b"] * 4  # strict round-robin: one step each


def test_errors_reach_the_consumer():
    s = Scheduler()

    def boom():
        yield 1
        raise ValueError("bad step")

    h = s.stream(boom())
    assert next(h) == 1
    with pytest.raises(ValueError, match="bad step"):
        next(h)
    with pytest.raises(StopIteration):
        next(h)
    assert list(s.stream(counting(2))) == [0, 1]  # the thread keeps serving


def test_close_stops_before_the_next_step_and_closes_the_generator_on_the_compute_thread():
    s = Scheduler(name="qs-close")
    closed_on = []
    steps = []

    def long():
        try:
            for i in range(10_000):
                steps.append(i)
                time.sleep(0.001)
                yield i
        finally:
            closed_on.append(threading.current_thread().name)

    h = s.stream(long())
    assert next(h) == 0
    h.close()
    n = len(steps)
    time.sleep(0.05)
    assert len(steps) == n < 10_000
    assert closed_on == ["qs-close"]
    with pytest.raises(StopIteration):
        next(h)
    assert s.active() == 0


def test_cancel_event_stops_the_stream():
    s = Scheduler()
    cancel = threading.Event()
    got = []
    for i in s.stream(counting(10_000, delay=0.001), cancel=cancel):
        got.append(i)
        if i == 3:
            cancel.set()
    assert 4 <= len(got) < 50


def test_abandoned_stream_is_stopped():
    s = Scheduler()
    h = s.stream(counting(100_000, delay=0.0005))
    next(h)
    del h  # garbage collected without close(): the compute thread must not run it to the end
    deadline = time.time() + 5
    while s.active() and time.time() < deadline:
        time.sleep(0.01)
    assert s.active() == 0 and s.steps < 100_000


def test_step_context_wraps_each_step_only():
    s = Scheduler()
    state = {"depth": 0}
    seen = []

    @contextlib.contextmanager
    def ctx():
        state["depth"] += 1
        try:
            yield
        finally:
            state["depth"] -= 1

    def with_ctx():
        for _ in range(3):
            seen.append(("ctx", state["depth"]))
            yield 0

    def without():
        for _ in range(3):
            seen.append(("plain", state["depth"]))
            yield 0

    gate = threading.Event()

    def gated(g):
        gate.wait(5)
        yield from g

    ha, hb = s.stream(gated(with_ctx()), step_context=ctx), s.stream(gated(without()))
    gate.set()
    list(ha), list(hb)
    assert {d for k, d in seen if k == "ctx"} == {1}
    assert {d for k, d in seen if k == "plain"} == {0}  # the other stream's mode did not leak


def test_call_runs_between_steps_and_returns_or_raises():
    s = Scheduler(name="qs-call")
    assert s.call(lambda: threading.current_thread().name) == "qs-call"
    with pytest.raises(KeyError):
        s.call(lambda: {}["missing"])
    # a call made while a stream runs is served between two of its steps
    h = s.stream(counting(200, delay=0.002))
    next(h)
    t0 = time.perf_counter()
    assert s.call(lambda: 42) == 42
    assert time.perf_counter() - t0 < 0.2
    h.close()
    # re-entrant: a call from the compute thread runs inline instead of deadlocking
    assert s.call(lambda: s.call(lambda: 7)) == 7


def test_isolated_runs_on_a_thread_that_ends():
    names = []
    assert isolated(lambda: names.append(threading.current_thread().name) or 5, name="qs-load") == 5
    assert names == ["qs-load"]
    assert not any(t.name == "qs-load" for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="load failed"):
        isolated(lambda: (_ for _ in ()).throw(RuntimeError("load failed")))



def test_a_pending_stream_lets_the_others_step_and_its_consumer_never_sees_pending():
    from engine.compute import PENDING

    s = Scheduler()
    log = []
    gate = threading.Event()
    ready = threading.Event()

    def slow():  # its "GPU step" finishes only once the fast stream is done
        gate.wait(5)
        for i in range(3):
            while not ready.is_set():
                yield PENDING
            log.append(("slow", i))
            yield i

    def fast():
        gate.wait(5)
        for i in range(5):
            log.append(("fast", i))
            yield i
        ready.set()

    a, b = s.stream(slow()), s.stream(fast())
    gate.set()
    got_b = list(b)
    got_a = list(a)
    assert got_a == [0, 1, 2] and got_b == [0, 1, 2, 3, 4]  # PENDING never reaches a consumer
    assert log[:5] == [("fast", i) for i in range(5)]  # the fast one was not held to the slow one's pace
    assert s.steps == 8  # pending turns are not steps


def test_all_streams_pending_does_not_spin_the_cpu():
    from engine.compute import PENDING

    s = Scheduler()
    until = time.monotonic() + 0.3

    def waiting():
        while time.monotonic() < until:
            yield PENDING
        yield "done"

    p0 = time.process_time()
    assert list(s.stream(waiting())) == ["done"]
    # the compute thread naps between all-pending rounds (the consumer blocks on its queue): a busy loop would
    # burn the whole 0.3 s of CPU here
    assert time.process_time() - p0 < 0.2
