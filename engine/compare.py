"""Side by side: one prompt, up to four formats of one model, streaming together, then measured against pane A.

:func:`run_compare` is a generator of :class:`CompareState` snapshots (the UI renders each one):

1. **load** — every pane's model is leased from the :class:`~engine.manager.ModelManager` on its own thread
   (one load per distinct format; a format already cached loads nothing). A pane that fails to load shows its
   error; the others go on.
2. **generate** — once every load has finished, all panes start together. Their token steps interleave on the
   engine's compute thread (:mod:`engine.compute`), so each box fills while the others do.
3. **score** — pane A is the baseline: each other pane gets its free-running token agreement with A, and a
   teacher-forced comparison (per-token KL, top-1 agreement, perplexities; :mod:`engine.quality`) on A's own
   answer and on the shipped reference text.

Setting ``cancel`` (the stop button; the UI also sets it when the browser goes away) stops every pane before
its next token and skips scoring. Leases are held until the generator ends, so no model is evicted mid-way.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

from . import quality
from .backends import backend_of, parse_load_method
from .backends.base import GenerationSettings, LoadedModel, TokenEvent
from .errors import FastPathError, InputError, QuantScopeError
from .generation import RunMetrics
from .specs import QuantSpec

log = logging.getLogger(__name__)

MAX_PANES = 4
MAX_PROMPT_CHARS = 4000
UPDATE_INTERVAL_S = 0.05  # at most ~20 snapshots a second while streaming

# The formats a pane offers (the engine runs all of them on CPU and GPU when their library is installed).
PANE_CHOICES = ("bf16", "fp16", "fp32", "int8", "nf4", "nf4 + double quant", "fp4", "hqq8", "hqq4", "hqq3",
                "hqq2", "gguf", "bf16 fast", "hqq4 fast")
OFF = "(off)"


def pane_quant(choice: str) -> QuantSpec:
    """The storage format of a pane choice (``nf4 + double quant``, ``hqq3``, ``gguf``, ...)."""
    c = (choice or "").strip().lower()
    if not c or c == OFF:
        raise InputError("This pane is off.")
    dq = False
    for suffix in (" + double quant", "+dq", "-dq"):
        if c.endswith(suffix):
            c, dq = c[: -len(suffix)].strip(), True
    if dq and c not in ("nf4", "fp4"):
        raise InputError(f"Double quantization applies to bitsandbytes 4-bit (nf4, fp4), not {c}.")
    try:
        return parse_load_method(c, double_quant=dq)
    except FastPathError:  # a known format the fast path does not serve: its own message says which do
        raise
    except QuantScopeError:
        raise InputError(f"Unknown pane format {choice!r}. Choose one of: {', '.join(PANE_CHOICES)}.") from None


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------
@dataclass
class PaneState:
    index: int
    choice: str
    status: str = "waiting"  # waiting | loading | loaded | streaming | done | cancelled | error
    method: str = ""
    backend: str = ""
    cached: bool = False  # the model was already loaded (load time is from when it was)
    load_s: Optional[float] = None
    quantize_s: Optional[float] = None
    pieces: list = field(default_factory=list)  # [(text, token id or None)]
    metrics: Optional[RunMetrics] = None
    error: Optional[str] = None
    agreement: Optional[quality.Agreement] = None
    answer_quality: Optional[quality.Divergence] = None
    reference_quality: Optional[quality.Divergence] = None
    quality_note: Optional[str] = None  # why there is no teacher-forced comparison

    @property
    def letter(self) -> str:
        return "ABCD"[self.index]

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.pieces)

    @property
    def token_ids(self) -> list[int]:
        return [i for _, i in self.pieces if i is not None]

    def to_dict(self) -> dict:
        a = self.agreement
        return {
            "pane": self.letter, "format": self.choice, "method": self.method, "backend": self.backend,
            "status": self.status, "error": self.error, "text": self.text, "tokens": len(self.token_ids),
            "cached": self.cached, "load_s": self.load_s, "quantize_s": self.quantize_s,
            "metrics": None if self.metrics is None else self.metrics.to_dict(),
            "identical_to_A_percent": None if a is None else a.percent,
            "first_divergence": None if a is None else a.first_divergence,
            "answer": None if self.answer_quality is None else self.answer_quality.to_dict(),
            "reference": None if self.reference_quality is None else self.reference_quality.to_dict(),
            "quality_note": self.quality_note,
        }


@dataclass
class CompareState:
    panes: list
    phase: str = "load"  # load | generate | score | done | cancelled
    message: str = ""
    load_wall_s: Optional[float] = None
    generate_wall_s: Optional[float] = None
    score_wall_s: Optional[float] = None

    def to_dict(self) -> dict:
        return {"phase": self.phase, "message": self.message, "load_wall_s": self.load_wall_s,
                "generate_wall_s": self.generate_wall_s, "score_wall_s": self.score_wall_s,
                "panes": [p.to_dict() for p in self.panes]}


def validate_prompt(prompt: str, max_chars: int = MAX_PROMPT_CHARS) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("The prompt is empty: type a question or an instruction for the models.")
    if len(prompt) > max_chars:
        raise InputError(f"The prompt has {len(prompt):,} characters; the limit here is {max_chars:,}. "
                         "Shorten it and run again.")
    return prompt


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def run_compare(manager, model: str, choices: Sequence[str], prompt: str,
                settings: GenerationSettings = GenerationSettings(), cancel: Optional[threading.Event] = None,
                device: Optional[str] = None, max_prompt_chars: int = MAX_PROMPT_CHARS,
                score: bool = True) -> Iterator[CompareState]:
    """Stream a side-by-side comparison (see the module docstring). Raises :class:`InputError` at the call (not at
    the first ``next``) when the prompt, the pane list or the model is invalid, so that a caller can refuse the
    request before it counts against anything; a pane's own failure ends up in that pane."""
    validate_prompt(prompt, max_prompt_chars)
    choices = [c for c in choices if c and c != OFF]
    if not choices:
        raise InputError("Every pane is off: choose a format for pane A at least.")
    if len(choices) > MAX_PANES:
        raise InputError(f"At most {MAX_PANES} panes; {len(choices)} were given.")
    quants = [pane_quant(c) for c in choices]
    # Resolve every pane's model first: a reference no pane can use is one message, not four failed panes.
    keys: list = []
    for q in quants:
        try:
            keys.append(manager.key(model, q, device))
        except QuantScopeError as e:
            keys.append(e)
    if all(isinstance(k, QuantScopeError) for k in keys):
        raise keys[0]
    return _stream(manager, model, choices, quants, keys, prompt, settings, cancel or threading.Event(), device,
                   score)


def _stream(manager, model: str, choices: list, quants: list, keys: list, prompt: str, settings: GenerationSettings,
            cancel: threading.Event, device: Optional[str], score: bool) -> Iterator[CompareState]:
    state = CompareState(panes=[PaneState(i, c, method=q.name) for i, (c, q) in enumerate(zip(choices, quants))])
    events: "queue.Queue[tuple]" = queue.Queue()
    all_loaded = threading.Event()
    release = threading.Event()
    pending = [len(quants)]
    pending_lock = threading.Lock()
    loaded: list[Optional[LoadedModel]] = [None] * len(quants)

    def load_finished():
        with pending_lock:
            pending[0] -= 1
            if pending[0] == 0:
                all_loaded.set()

    def worker(i: int, quant: QuantSpec):
        with contextlib.ExitStack() as stack:
            try:
                events.put(("status", i, "loading"))
                key = keys[i]
                if isinstance(key, QuantScopeError):
                    raise key
                cached = key in manager
                lm = stack.enter_context(manager.use(key))
                loaded[i] = lm
                events.put(("loaded", i, lm, cached))
            except QuantScopeError as e:
                events.put(("error", i, str(e)))
                return
            except Exception as e:  # noqa: BLE001 - a library failure stays in its pane
                log.exception("pane %s: loading failed", "ABCD"[i])
                events.put(("error", i, f"Loading failed: {e.__class__.__name__}: {e}"))
                return
            finally:
                load_finished()
            all_loaded.wait()
            if cancel.is_set():
                events.put(("end", i, "cancelled"))
                release.wait()
                return
            try:
                for ev in manager.generate(lm, None, prompt, settings, cancel):
                    events.put(("event", i, ev))
                events.put(("end", i, None))
            except QuantScopeError as e:
                events.put(("error", i, str(e)))
            except Exception as e:  # noqa: BLE001
                log.exception("pane %s: generation failed", "ABCD"[i])
                events.put(("error", i, f"Generation failed: {e.__class__.__name__}: {e}"))
            release.wait()  # keep the lease until scoring is over

    threads = [threading.Thread(target=worker, args=(i, q), name=f"compare-pane-{'ABCD'[i]}", daemon=True)
               for i, q in enumerate(quants)]
    open_panes = set(range(len(quants)))
    t0 = time.perf_counter()
    t_gen = None
    try:
        for t in threads:
            t.start()
        state.message = "Loading the models…"
        yield state
        last, dirty = 0.0, False
        while open_panes:
            try:
                item = events.get(timeout=0.1)
            except queue.Empty:
                item = None
            if item is not None:
                dirty = _apply(state, item, open_panes) or dirty
            if state.phase == "load" and all_loaded.is_set() and t_gen is None:
                state.load_wall_s = round(time.perf_counter() - t0, 3)
                t_gen = time.perf_counter()
                state.phase = "generate"
                state.message = "Generating in every pane…"
                dirty = True
            now = time.perf_counter()
            if dirty and (now - last >= UPDATE_INTERVAL_S or item is None or item[0] != "event"):
                last, dirty = now, False
                yield state
        if t_gen is not None:
            state.generate_wall_s = round(time.perf_counter() - t_gen, 3)
        if cancel.is_set():
            state.phase = "cancelled"
            state.message = "Stopped."
            yield state
            return
        if score and len(state.panes) > 1:
            state.phase = "score"
            state.message = "Measuring each pane against pane A (teacher-forced KL, agreement, perplexity)…"
            yield state
            t_s = time.perf_counter()
            yield from _score(state, loaded, prompt, settings, cancel)
            state.score_wall_s = round(time.perf_counter() - t_s, 3)
        state.phase = "cancelled" if cancel.is_set() else "done"
        state.message = "Stopped." if cancel.is_set() else _summary(state)
        yield state
    finally:
        if state.phase not in ("done", "cancelled"):  # closed early (stop button, browser gone)
            cancel.set()
        release.set()
        for t in threads:
            t.join(timeout=1)


def _apply(state: CompareState, item: tuple, open_panes: set) -> bool:
    kind, i = item[0], item[1]
    p = state.panes[i]
    if kind == "status":
        p.status = item[2]
    elif kind == "loaded":
        lm, cached = item[2], item[3]
        p.status, p.method, p.backend, p.cached = "loaded", lm.method, lm.backend, cached
        p.load_s, p.quantize_s = lm.load_s, lm.quantize_s
    elif kind == "event":
        ev = item[2]
        if isinstance(ev, TokenEvent):
            p.status = "streaming"
            p.pieces.append((ev.text, ev.token_id))
        elif isinstance(ev, RunMetrics):
            p.metrics = ev
            p.status = "cancelled" if ev.finish_reason == "cancelled" else "done"
    elif kind == "end":
        if item[2] == "cancelled" or p.status in ("loaded", "waiting"):
            p.status = "cancelled"
        open_panes.discard(i)
    elif kind == "error":
        p.status, p.error = "error", item[2]
        open_panes.discard(i)
    return True


def _score(state: CompareState, loaded: list, prompt: str, settings: GenerationSettings,
           cancel: threading.Event) -> Iterator[CompareState]:
    base, base_lm = state.panes[0], loaded[0]
    if base.status != "done" or base_lm is None or not base_lm.loaded:
        for p in state.panes[1:]:
            p.quality_note = "No comparison: the baseline (pane A) did not finish."
        return
    bb = backend_of(base_lm)
    base_ids = base.token_ids
    try:
        prompt_ids = bb.chat_ids(base_lm, prompt, settings)
        answer = prompt_ids + base_ids
        base_answer = bb.score(base_lm, answer, len(prompt_ids)) if base_ids else None
        ref_ids = bb.tokenize(base_lm, quality.reference_text())
        base_ref = bb.score(base_lm, ref_ids, 1)
    except QuantScopeError as e:
        for p in state.panes[1:]:
            p.quality_note = f"No comparison: scoring the baseline failed ({e})."
        return
    for p, lm in zip(state.panes[1:], loaded[1:]):
        if cancel.is_set():
            return
        if p.status in ("done", "cancelled") and p.token_ids:
            p.agreement = quality.token_agreement(base_ids, p.token_ids)
        if lm is None or not lm.loaded:
            p.quality_note = "No teacher-forced comparison: this pane did not load."
            continue
        pb = backend_of(lm)
        try:
            if not quality.same_vocabulary(bb, base_lm, pb, lm):
                p.quality_note = "No teacher-forced comparison: this model's tokenizer differs from pane A's."
                continue
            if base_answer is not None:
                p.answer_quality = quality.compare_distributions(base_answer, pb.score(lm, answer, len(prompt_ids)),
                                                                 base_ids)
            p.reference_quality = quality.compare_distributions(base_ref, pb.score(lm, ref_ids, 1), ref_ids[1:])
        except QuantScopeError as e:
            p.quality_note = f"Teacher-forced comparison failed: {e}"
        except Exception as e:  # noqa: BLE001 - one pane's scoring failure stays in that pane
            log.exception("pane %s: scoring failed", p.letter)
            p.quality_note = f"Teacher-forced comparison failed: {e.__class__.__name__}: {e}"
        yield state


def _summary(state: CompareState) -> str:
    done = [p for p in state.panes if p.status == "done"]
    failed = [p for p in state.panes if p.status == "error"]
    parts = [f"{len(done)} of {len(state.panes)} panes finished"]
    if state.generate_wall_s is not None:
        parts.append(f"generation took {state.generate_wall_s:.1f} s side by side")
    if failed:
        parts.append("failed: " + ", ".join(p.letter for p in failed))
    return "; ".join(parts) + "."
