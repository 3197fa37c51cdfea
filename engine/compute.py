"""One compute thread per process: every decode step of every run happens on it, round-robin.

Why one thread. PyTorch's CPU build parallelises each op with OpenMP (libgomp), and libgomp keeps one pool
of worker threads *per thread that ever ran a parallel region*. While two such threads are alive, libgomp
manages more threads than there are cores and throttles its spin-wait to ~100 iterations, so every one of
the hundreds of small parallel regions of a decode step pays a futex wake-up. Measured on the 2-core CI
machine with the embedded model (bf16, 64 greedy tokens): 28 tok/s from any single thread, 20-22 tok/s from
the main thread once a second long-lived thread had run torch work (docs/benchmarks.md, issue 3). A server
calls in from many threads (Gradio's worker pool), so the engine funnels the work through one thread.

What it gives:

* :meth:`Scheduler.stream` runs a generator -- one model step per ``next()`` -- on the compute thread and
  hands its items to the caller through a queue. Several streams advance in turn, one step each, so two
  panes of a comparison (or two users) stream together without oversubscribing the cores, and a long
  generation cannot starve a short one. The compute thread runs ahead of a slow consumer.
* Closing the consumer's iterator (or the ``cancel`` event) stops the stream before its next step, and
  the generator is closed on the compute thread (its ``finally`` blocks run there).
* :meth:`Scheduler.call` runs one function on the compute thread (short work: a teacher-forced forward
  pass); :func:`isolated` runs long one-off work (loading, quantizing) on a short-lived thread whose
  OpenMP pool ends with it, so it does not slow the compute thread afterwards.

Each step runs inside the stream's ``step_context`` (e.g. ``torch.inference_mode``), entered and left
around that step only: thread-local modes do not leak from one interleaved stream into another.

A stream whose next item is not ready yet (a GPU step still running) yields :data:`PENDING` instead of blocking
the thread: the scheduler moves on to the next stream, so a fast model's run is not held to the pace of a slow one
beside it (on a GPU each runs on its own CUDA stream). When every stream is pending, the thread naps ~50 us.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, ContextManager, Iterator, Optional, TypeVar


log = logging.getLogger(__name__)

T = TypeVar("T")

_ITEM, _ERROR, _END = "item", "error", "end"

PENDING = object()  # yielded by a stream's generator: "nothing yet, let the others step" (never handed out)


class _Job:
    __slots__ = ("gen", "out", "cancel", "closed", "step_context", "name")

    def __init__(self, gen: Iterator, step_context: Optional[Callable[[], ContextManager]],
                 cancel: Optional[threading.Event], name: str):
        self.gen = gen
        self.out: "queue.SimpleQueue" = queue.SimpleQueue()
        self.cancel = cancel
        self.closed = threading.Event()  # the consumer is gone: stop without another step
        self.step_context = step_context
        self.name = name

    def stopped(self) -> bool:
        return self.closed.is_set() or (self.cancel is not None and self.cancel.is_set())


class _Task:
    __slots__ = ("fn", "done", "result", "error")

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: Optional[BaseException] = None


class StreamHandle:
    """The consumer's side of a stream: iterate it for the items; :meth:`close` stops the stream."""

    def __init__(self, sched: "Scheduler", job: _Job):
        self._sched = sched
        self._job = job
        self._finished = False

    def __iter__(self):
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        kind, val = self._job.out.get()
        if kind == _ITEM:
            return val
        self._finished = True
        if kind == _ERROR:
            raise val
        raise StopIteration

    def close(self) -> None:
        """Stop the stream (its generator is closed on the compute thread) and wait until it has ended."""
        if self._finished:
            return
        self._job.closed.set()
        self._sched._wake.set()
        while True:  # drain until the compute thread confirms the end, so the generator's cleanup has run
            kind, _val = self._job.out.get()
            if kind != _ITEM:
                break
        self._finished = True

    def __del__(self):  # an abandoned iterator must not keep the model busy
        if not self._finished:
            self._job.closed.set()
            self._sched._wake.set()


class Scheduler:
    """A daemon thread that interleaves the steps of every active stream (see the module docstring)."""

    def __init__(self, name: str = "quantscope-compute"):
        self.name = name
        self._lock = threading.Lock()
        self._jobs: "deque[_Job]" = deque()
        self._tasks: "deque[_Task]" = deque()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._ids = itertools.count(1)
        self.steps = 0  # total steps run (for tests and benchmarks)

    # ------------------------------------------------------------------ public
    def on_compute_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def stream(self, gen: Iterator[T], *, step_context: Optional[Callable[[], ContextManager]] = None,
               cancel: Optional[threading.Event] = None, name: str = "") -> StreamHandle:
        """Run ``gen`` on the compute thread, one ``next()`` per turn; iterate the handle for its items.

        Exceptions raised by ``gen`` are re-raised to the consumer. A set ``cancel`` event or
        :meth:`StreamHandle.close` stops it before its next step; ``gen.close()`` then runs on the compute thread.
        """
        job = _Job(gen, step_context, cancel, name or f"stream-{next(self._ids)}")
        with self._lock:
            self._ensure_thread()
            self._jobs.append(job)
        self._wake.set()
        return StreamHandle(self, job)

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` on the compute thread between steps and return its result."""
        if self.on_compute_thread():
            return fn(*args, **kwargs)
        task = _Task(lambda: fn(*args, **kwargs))
        with self._lock:
            self._ensure_thread()
            self._tasks.append(task)
        self._wake.set()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.result

    def active(self) -> int:
        """Streams not finished yet."""
        with self._lock:
            return len(self._jobs)

    # ------------------------------------------------------------------ compute thread
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        idle = 0  # consecutive steps that were PENDING
        while True:
            self._wake.wait()
            with self._lock:
                task = self._tasks.popleft() if self._tasks else None
                job = self._jobs.popleft() if self._jobs and task is None else None
                if task is None and job is None:
                    self._wake.clear()
                    continue
                waiting = len(self._jobs) + 1
            if task is not None:
                self._run_task(task)
                idle = 0
                continue
            going = self._step(job)
            if going is PENDING:
                idle += 1
                if idle >= waiting:  # a whole round with nothing ready
                    time.sleep(50e-6)
                    idle = 0
            else:
                idle = 0
            if going:
                with self._lock:
                    self._jobs.append(job)  # back of the line: round-robin

    @staticmethod
    def _run_task(task: _Task) -> None:
        try:
            task.result = task.fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            task.error = e
        finally:
            task.done.set()

    def _step(self, job: _Job):
        """One step of ``job``: True if it continues, PENDING if it continues and had nothing ready, False if it
        ended."""
        if job.stopped():
            self._finish(job, None)
            return False
        ctx = job.step_context() if job.step_context is not None else contextlib.nullcontext()
        try:
            with ctx:
                item = next(job.gen)
        except StopIteration:
            job.out.put((_END, None))
            return False
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            job.out.put((_ERROR, e))
            return False
        if item is PENDING:
            return PENDING
        self.steps += 1
        job.out.put((_ITEM, item))
        return True

    @staticmethod
    def _finish(job: _Job, _unused) -> None:
        ctx = job.step_context() if job.step_context is not None else contextlib.nullcontext()
        err: Optional[BaseException] = None
        try:
            with ctx:
                job.gen.close()
        except BaseException as e:  # noqa: BLE001
            err = e
        if err is not None and not job.closed.is_set():
            job.out.put((_ERROR, err))
        else:
            if err is not None:
                log.warning("closing %s raised %r", job.name, err)
            job.out.put((_END, None))


_default: Optional[Scheduler] = None
_default_lock = threading.Lock()


def scheduler() -> Scheduler:
    """The process's scheduler (created on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Scheduler()
        return _default


def isolated(fn: Callable[..., T], *args, name: str = "quantscope-load", **kwargs) -> T:
    """Run ``fn`` on a new thread and wait for it: its OpenMP pool ends with the thread (see module docstring)."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    th = threading.Thread(target=target, name=name, daemon=True)
    th.start()
    th.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


def _after_fork_in_child() -> None:
    """A forked child (ZeroGPU runs each GPU call in one) inherits no threads: start from a fresh scheduler
    instead of queueing work for a compute thread that exists only in the parent."""
    global _default, _default_lock
    _default, _default_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
