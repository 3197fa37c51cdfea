"""Per-session limits on generation: one run at a time per session, and at most N starts in a sliding window.

A shared classroom instance has a small generation queue (``QUANTSCOPE_GENERATION_CONCURRENCY``); without a
per-session limit one student who keeps clicking "Compare" (or a script looping over the API) fills it and the
others wait. The key is the caller's session (Gradio's ``session_hash``: one per open page or API client), not
the IP address: a class behind one NAT shares an address. Pure Python, no gradio; the UI passes the key.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional

from .errors import InputError


class RateLimitedError(InputError):
    """This session asked for more generation than the server allows; the message says when to try again."""


class SessionLimiter:
    """``with limiter.run(key): ...`` admits a run or raises :class:`RateLimitedError`.

    ``per_window`` starts are allowed per ``window_s`` seconds (0 = no rate limit); a session may hold one run at a
    time either way. Only admitted runs count. State is bounded: sessions idle for a window are forgotten.
    """

    def __init__(self, per_window: int = 6, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        if per_window < 0 or window_s <= 0:
            raise ValueError("per_window must be >= 0 and window_s > 0")
        self.per_window, self.window_s, self._clock = per_window, window_s, clock
        self._starts: Dict[str, deque] = {}
        self._running: Dict[str, int] = {}
        self._lock = threading.Lock()

    def _prune(self, now: float) -> None:
        for key in [k for k, q in self._starts.items() if (not q or now - q[-1] >= self.window_s)
                    and not self._running.get(k)]:
            del self._starts[key]

    def admit(self, key: Optional[str]) -> str:
        """Count a start for ``key`` (None: an anonymous caller, limited as one shared session)."""
        key = key or "anonymous"
        now = self._clock()
        with self._lock:
            self._prune(now)
            if self._running.get(key):
                raise RateLimitedError("A comparison of yours is still running (maybe in another tab). Wait for it "
                                       "to finish or press Stop, then run again.")
            starts = self._starts.setdefault(key, deque())
            while starts and now - starts[0] >= self.window_s:
                starts.popleft()
            if self.per_window and len(starts) >= self.per_window:
                wait = max(1, int(self.window_s - (now - starts[0]) + 0.999))
                raise RateLimitedError(f"You started {len(starts)} runs in the last {self.window_s:g} s; this server "
                                       f"allows {self.per_window}. Try again in {wait} s.")
            starts.append(now)
            self._running[key] = 1
        return key

    def release(self, key: str) -> None:
        with self._lock:
            self._running.pop(key, None)

    @contextmanager
    def run(self, key: Optional[str]) -> Iterator[None]:
        k = self.admit(key)
        try:
            yield
        finally:
            self.release(k)

    def sessions(self) -> int:
        with self._lock:
            self._prune(self._clock())
            return len(self._starts)
