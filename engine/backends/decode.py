"""The decode loop of the transformers-based backends, one token per step (no ``model.generate``).

:func:`decode_steps` is a generator: its first ``next()`` runs the prefill and returns the first token,
each later ``next()`` one cached forward pass and one token. That is the unit the compute thread
interleaves (:mod:`engine.compute`), so several runs stream together on one thread; a run stops between
two tokens when it is cancelled. Greedy decoding gives the tokens of ``model.generate(do_sample=False)``
(the same forward passes: a test pins it); sampling applies temperature, then top-k, then top-p (nucleus),
with a per-run ``torch.Generator`` so concurrent runs with seeds stay reproducible.

Every step must run under ``torch.inference_mode()`` -- the caller's step context.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

from .base import GenerationSettings


@dataclass
class DecodeState:
    """What a run learnt, filled in by :func:`decode_steps` as it goes."""

    prompt_tokens: int = 0
    finish_reason: Optional[str] = None  # eos | length | cancelled (None while running)
    tokens: int = 0
    ids: list = field(default_factory=list)


def pick_token(logits, settings: GenerationSettings, generator=None):
    """The next token id (a ``[batch, 1]`` long tensor) from the last position's ``[batch, vocab]`` logits."""
    import torch

    if settings.greedy:
        return logits.argmax(dim=-1, keepdim=True)
    scores = logits.float() / float(settings.temperature)
    if settings.top_k and settings.top_k < scores.shape[-1]:
        kth = torch.topk(scores, settings.top_k, dim=-1).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cum > settings.top_p
        drop[..., 1:] = drop[..., :-1].clone()  # keep the token that crosses top_p
        drop[..., 0] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def new_generator(device: str, seed: Optional[int]):
    import torch

    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def decode_steps(runner, input_ids, attention_mask, settings: GenerationSettings, eos: set,
                 state: DecodeState, cancel: Optional[threading.Event] = None,
                 pending=None) -> Iterator[tuple[int, float]]:
    """Yield ``(token_id, perf_counter time)`` per generated token (batch 1).

    ``runner`` runs the forward passes (:mod:`engine.backends.runners`: the plain ``DynamicRunner`` or the fast
    ``StaticRunner``). Ends after an end-of-sequence token (it is yielded), after ``settings.max_new_tokens``
    tokens, or when ``cancel`` is set; ``state.finish_reason`` says which. With ``pending`` (the compute
    scheduler's :data:`engine.compute.PENDING`), a pipelined run yields it while its token is still on the GPU
    instead of waiting, so that other runs on the thread can step meanwhile.
    """
    device = input_ids.device
    generator = None if settings.greedy else new_generator(str(device), settings.seed)
    state.prompt_tokens = int(input_ids.shape[1])
    # The fast runner on CUDA works on a stream of its own; picking tokens goes there too (``on_stream``), so
    # that two runs interleaved on this thread keep the GPU busy with both models at once.
    on = getattr(runner, "on_stream", contextlib.nullcontext)
    pipelined = runner.pipelined
    greedy = getattr(runner, "greedy", None) if settings.greedy else None  # the fast step's own argmax

    def pick(logits):
        return greedy(logits) if greedy is not None else pick_token(logits, settings, generator)

    logits = runner.prefill(input_ids, attention_mask)
    with on():
        nxt = pick(logits)
        if pipelined:
            runner.send(nxt)
    picked = 1  # tokens picked on the device so far (read or not)
    while True:
        if pipelined:
            # Pipelined (fast path on CUDA): the steps that follow are launched before the host reads this token,
            # up to ``runner.depth`` tokens in flight, so the GPU keeps working while this run streams its tokens
            # and while the thread serves other runs (another pane's prompt takes tens of ms of Python). At an end
            # of sequence those steps are wasted (the run is over; the next run's prefill resets the cache).
            with on():
                while runner.in_flight() < runner.depth and picked < settings.max_new_tokens:
                    logits = runner.step(nxt)
                    nxt = pick(logits)
                    runner.send(nxt)
                    picked += 1
            logits = None
            if pending is not None:
                while not runner.ready():
                    yield pending
            tid = runner.received()
        else:
            with on():
                tid = int(nxt.item())  # the one device->host sync per token
        t = time.perf_counter()
        state.tokens += 1
        state.ids.append(tid)
        if tid in eos:
            state.finish_reason = "eos"
            yield tid, t
            return
        if state.tokens >= settings.max_new_tokens:
            state.finish_reason = "length"
            yield tid, t
            return
        yield tid, t
        if cancel is not None and cancel.is_set():
            state.finish_reason = "cancelled"
            return
        if not pipelined:
            with on():
                logits = runner.step(nxt)
                nxt = pick(logits)
            logits = None
