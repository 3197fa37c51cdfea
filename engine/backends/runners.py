"""How one decode step reaches the model: the plain path and the fast path.

:class:`DynamicRunner` is the plain path: transformers' ``DynamicCache`` (the KV cache grows by one position per
token) and one eager forward pass per token -- what ``model.generate`` does by default. On a GPU each token then
costs hundreds of small kernel launches issued one by one from Python, so a small or 4-bit model waits on the
CPU far more than on memory.

:class:`StaticRunner` is the fast path: a ``StaticCache`` allocated once for ``max_len`` positions, and on CUDA
the one-token forward pass captured in a CUDA graph at the first step and replayed for every later token (one
launch per token instead of hundreds). transformers >= 5.24 keeps the write position of a static cache in a
device tensor (``StaticLayer.cumulative_length``) and derives positions and the mask from it, so the captured
step advances by itself on replay. The prefill runs eagerly (its length varies). On CPU there is no graph:
the static cache alone (tests check it gives the plain path's tokens). More things make the CUDA step
fast: attention over the cache's used positions only, rounded up to :data:`BUCKET` (a graph per bucket, captured
at its first step; one compilation serves them all) instead of all ``max_len``; one-token attention on the
grouped key/value heads without a per-head copy of the cache (both in :func:`gqa_attention`); one position counter
for all the cache's layers, advanced once per step (:func:`_one_counter_layer`); the greedy token computed in the
graph (:func:`chunked_argmax`); inductor's combo kernels (independent small kernels in one launch); for
``hqq4-fast``, RoPE and the cache writes inside the q+k+v GEMV (``int4_fusion.folded_attention``); and pipelining
(:meth:`StaticRunner.send`/:meth:`StaticRunner.received`, used by ``decode_steps``): the steps that follow a token
are launched before the host reads it, up to :data:`PIPELINE_DEPTH` tokens in flight, so the GPU does not wait
while Python streams, nor while the compute thread runs another pane's prompt. Each CUDA runner
works on a stream of its own, so the runs of two models (a comparison's panes) share the GPU instead of taking
turns, and a run whose token is not ready yet lets the others step (``decode_steps``' ``pending``). The streams
come from a pool and go back to it when the runner is dropped (PyTorch keeps a cuBLAS workspace per stream).

A ``StaticRunner`` belongs to one loaded model and serves one run at a time (:func:`acquire`); a run that needs
more positions than it holds replaces it by a longer one; a run that finds it busy takes the plain path.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Optional

from .base import release_memory

BUCKET = 256  # a CUDA step attends the cache's used positions, rounded up to a multiple of this (a graph each)
PIPELINE_DEPTH = 8  # tokens in flight on CUDA: steps launched ahead of the host reading their tokens (decode_steps)
LEN_STEP = 512  # the static cache's length is rounded up to a multiple of this (a graph per length)
CUDA_MIN_LEN = 2048  # on CUDA the runner built (and compiled, captured) at load holds at least this many positions


def cache_keyword(model) -> str:
    """``cache`` (transformers >= 5.24, where ``past_key_values`` is deprecated) or ``past_key_values``."""
    import inspect

    try:
        params = inspect.signature(type(model).forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def static_unavailable() -> Optional[str]:
    """None when this transformers can run the fast path, else why not."""
    try:
        from transformers.cache_utils import StaticLayer
    except ImportError as e:  # pragma: no cover
        return f"transformers has no StaticCache ({e})"
    if "cumulative_length" not in getattr(StaticLayer, "__annotations__", {}):
        import transformers

        return (f"transformers {transformers.__version__} keeps the static cache's position on the host; the fast path "
                "needs transformers >= 5.24")
    return None


GQA_ATTENTION = "quantscope_sdpa"


def gqa_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' SDPA attention, except for one query token inside ``torch.compile`` (the fast path's captured
    step), where (1) the keys, values and mask are cut to the step's bucket of positions (``kv_bucket``, a tensor
    whose length is the bucket's: :class:`StaticRunner` captures a graph per bucket), so a step reads the cache's
    used positions, not all of them; (2) where the runner gave the model's attention modules the counters of
    :mod:`engine.backends.decode_attention` (bf16, CUDA), our one-launch kernel attends; (3) else grouped
    key/value heads go to SDPA as they are (``enable_gqa=True``).
    transformers 5.24 copies the key/value cache once per query head there (``repeat_kv``; it avoids the copy only
    outside compilation): on the static cache of an 8B model (2,048 positions) that took 0.90 ms of each token,
    against 0.30 ms for this (H200, compiled and graphed, 32 layers; bench/results/gpu_attention_h200_2026-11-26.log).
    Everything else, the prompt and the plain path included, goes to transformers' own function."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from . import decode_attention

    bucket = kwargs.pop("kv_bucket", None)
    if query.shape[2] == 1 and torch.compiler.is_compiling():
        if bucket is not None:
            n = bucket.shape[0]
            key, value = key[:, :, :n], value[:, :, :n]
            attention_mask = None if attention_mask is None else attention_mask[..., :n]
        plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None and \
            key.shape[-1] == value.shape[-1]
        scaling = kwargs.get("scaling", args[1] if len(args) > 1 else None)
        if plain and decode_attention.usable(module, query, key, value, attention_mask):
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            return decode_attention.attend_for(module, query, key, value, attention_mask, scale), None
        if getattr(module, "num_key_value_groups", 1) > 1 and plain:
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                                   scale=scaling, enable_gqa=True)
            return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


def use_gqa_attention(model) -> bool:
    """Switch a model on transformers' SDPA attention to :func:`gqa_attention` (registered once); True when the
    model is on it (switched now or by an earlier runner)."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == GQA_ATTENTION:
        return True
    if impl != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_ATTENTION, gqa_attention)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
    model.set_attn_implementation(GQA_ATTENTION)
    return True


class DynamicRunner:
    """The plain path: a growing ``DynamicCache`` and one eager forward per token."""

    pipelined = False  # see StaticRunner

    def __init__(self, model):
        self.model = model
        self.kw = cache_keyword(model)

    def prefill(self, ids, mask):
        from transformers import DynamicCache

        self.cache = {self.kw: DynamicCache(config=self.model.config)}
        self.mask = mask
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **self.cache)
        return out.logits[:, -1, :]

    def step(self, tok):
        if self.mask is not None:
            import torch

            self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=-1)
        return self.model(input_ids=tok, attention_mask=self.mask, use_cache=True, **self.cache).logits[:, -1, :]

    def release(self):
        self.cache = self.mask = None


ARGMAX_CHUNK = 1024


def chunked_argmax(logits):
    """``logits.argmax(dim=-1, keepdim=True)`` for [batch, vocab] logits, in two rounds: the first largest value of
    each chunk of :data:`ARGMAX_CHUNK` entries, then the first chunk holding the largest -- the same index as one
    argmax, ties included. Over a 128k vocabulary on an H200 one argmax is a single long reduction (35 µs eager,
    28 µs compiled into the step); the chunks' argmaxes run in parallel (bench/results/
    gpu_trace_hqq4fast_8b_h200_2026-11-26h.log)."""
    import torch

    pad = -logits.shape[-1] % ARGMAX_CHUNK
    x = torch.nn.functional.pad(logits, (0, pad), value=float("-inf")).view(logits.shape[0], -1, ARGMAX_CHUNK)
    inner = x.argmax(dim=-1)  # [batch, chunks]
    best = x.gather(-1, inner.unsqueeze(-1)).squeeze(-1)
    chunk = best.argmax(dim=-1, keepdim=True)
    return chunk * ARGMAX_CHUNK + inner.gather(-1, chunk)


@functools.lru_cache(maxsize=1)
def _one_counter_layer():
    """transformers' ``StaticLayer`` without the per-layer position update: every layer of a cache shares one
    position counter, which :class:`StaticRunner` advances once per forward pass. With a counter per layer, each
    layer's ``update`` bumps its own, and the captured step of an 8B model ends in 32 one-element kernels
    (~1.1 µs each plus the gap before it; bench/results/gpu_trace_hqq4fast_8b_h200_2026-11-26h.log)."""
    import torch
    from transformers.cache_utils import StaticLayer

    class OneCounterLayer(StaticLayer):
        quantscope_one_counter = True  # what int4_fusion.folded_attention asks (it writes at the shared counter)

        def lazy_initialization(self, key_states, value_states):
            shared = self.cumulative_length
            super().lazy_initialization(key_states, value_states)  # moves the counter to the layer's device
            if self.cumulative_length is not shared:  # a copy would never advance: wrong positions, silently
                raise RuntimeError(f"a cache layer on {self.device} cannot share the position counter on "
                                   f"{shared.device}: the fast path needs the whole model on one device")

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            position = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
            self.keys.index_copy_(2, position, key_states)
            self.values.index_copy_(2, position, value_states)
            return self.keys, self.values

    return OneCounterLayer


class StaticRunner:
    """The fast path: a static KV cache of ``max_len`` positions and, on CUDA, a CUDA-graph decode step."""

    def __init__(self, model, max_len: int, device: str):
        import torch
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        from . import decode_attention

        self.model = model
        self.max_len = int(max_len)
        self.kw = cache_keyword(model)
        gqa = use_gqa_attention(model)
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        # one position counter for the cache (_one_counter_layer), where every layer is a plain static layer
        self.counter = None
        if all(type(layer) is StaticLayer for layer in self.cache.layers):
            self.counter = torch.zeros((), dtype=torch.long, device=device)
            cls = _one_counter_layer()
            for layer in self.cache.layers:
                layer.__class__ = cls
                layer.cumulative_length = self.counter  # lazy_initialization's .to(device) keeps this tensor
        self.graphed = device.startswith("cuda")
        self.tok = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.graphs: dict = {}  # bucket length -> (CUDAGraph, its output), captured at a bucket's first step
        # the graphs' shared memory pool (they never run at the same time)
        self._pool = torch.cuda.graph_pool_handle() if self.graphed else None
        self.busy = threading.Lock()
        self.pos = 0
        # On CUDA a run is pipelined: up to ``depth`` tokens are in flight -- their steps launched before the host
        # reads them (decode_steps) through a ring of pinned buffers and events, so the GPU does not wait while
        # Python streams, nor while the compute thread runs another pane's prompt (tens of ms of eager Python).
        self.depth = PIPELINE_DEPTH if self.graphed else 1
        self._host = torch.empty((PIPELINE_DEPTH, 1), dtype=torch.long, pin_memory=self.graphed)
        self._copied = [torch.cuda.Event() for _ in range(PIPELINE_DEPTH)] if self.graphed else None
        self._sent = self._got = 0
        # On CUDA the runner's work goes to a stream of its own, so that two models' steps (the panes of a
        # comparison) run on the GPU at the same time instead of queueing behind each other; its graph is
        # captured on a capture stream of its own too. PyTorch keeps a cuBLAS workspace (32 MiB on an H200) per
        # stream cuBLAS ever ran on and never frees it: graphs captured on one shared stream would share it when
        # replayed side by side, and fresh streams per load grew the process by 96-128 MiB per fast model loaded
        # (measured). So the pair comes from a pool (_take_streams) and goes back to it (close).
        self.stream, self._capture_stream = _take_streams(device) if self.graphed else (None, None)
        self._device = device
        self._closed = False
        compiled = self.graphed and compile_wanted()
        # Attention over the used positions only (a graph per BUCKET positions, gqa_attention cuts the cache to
        # it): where the step is compiled (the cut needs our attention function) and every layer is a plain
        # static layer (a sliding-window layer is a ring buffer: its first positions are not the oldest).
        self.bucketed = compiled and gqa and self.counter is not None
        # and there, one query token's attention in one launch of our kernel where it builds (bf16 models)
        self.own_attention = self.bucketed and decode_attention.prepare(model, device) is None
        # one compilation for every bucket: the bucket's length is the only dynamic size. Inductor's combo kernels
        # put independent small kernels into one launch (a layer's RoPE of q and k, its two cache writes and the
        # mask: one kernel instead of four): 8B hqq4 fast 2.80 -> 2.69 ms per token on an H200, logits as close to
        # the eager plain path's as without (bench/results/gpu_combo_kernels_h200_2026-11-26h.log)
        self._step_fn = torch.compile(self._graph_step, dynamic=None if self.bucketed else False,
                                      options={"combo_kernels": True}) if compiled else self._graph_step
        self._last = None  # the last captured step's outputs: (logits, their argmax)

    def _forward(self, ids, bucket=None):
        extra = {} if bucket is None else {"kv_bucket": bucket}
        logits = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self.kw: self.cache},
                            **extra).logits[:, -1, :]
        if self.counter is not None:
            self.counter.add_(ids.shape[1])
        return logits

    def _graph_step(self, ids, bucket=None):
        """The captured step: the logits and their argmax (:func:`chunked_argmax`)."""
        logits = self._forward(ids, bucket)
        return logits, chunked_argmax(logits)

    def bucket_len(self, positions: int) -> int:
        """The attention length of a step that leaves ``positions`` positions in the cache."""
        if not self.bucketed:
            return self.max_len
        return min(self.max_len, -(-positions // BUCKET) * BUCKET)

    @property
    def graph(self):
        """The first bucket's captured step (None until the first CUDA step)."""
        return next(iter(self.graphs.values()))[0] if self.graphs else None

    def on_stream(self):
        """A context in which the caller's GPU work goes to this runner's stream (``decode_steps`` picks tokens
        there); a no-op on CPU."""
        import torch

        return contextlib.nullcontext() if self.stream is None else torch.cuda.stream(self.stream)

    @contextlib.contextmanager
    def _own_stream(self):
        """Run a method's GPU work on the runner's stream, ordered after the caller's stream (its inputs) and
        before it (its outputs); no waits where the caller is already on the runner's stream."""
        if self.stream is None:
            yield
            return
        import torch

        caller = torch.cuda.current_stream()
        if caller == self.stream:
            yield
            return
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            yield
        caller.wait_stream(self.stream)

    def prefill(self, ids, mask=None):
        """Batch 1, no padding: the mask is implied by the cache's position (``mask`` is ignored)."""
        if int(ids.shape[1]) >= self.max_len:
            raise ValueError(f"a prompt of {int(ids.shape[1])} tokens does not fit a {self.max_len}-position cache")
        with self._own_stream():
            self.cache.reset()
            self._last = None
            self.pos = int(ids.shape[1])
            self._sent = self._got = 0
            return self._forward(ids)

    def step(self, tok):
        if self.pos >= self.max_len:
            raise ValueError(f"the static cache holds {self.max_len} positions")
        self.pos += 1
        if not self.graphed:
            return self._forward(tok)
        with self._own_stream():
            self.tok.copy_(tok)
            n = self.bucket_len(self.pos)
            if n not in self.graphs:
                self.graphs[n] = self._capture(n)
            graph, self._last = self.graphs[n]
            graph.replay()
            return self._last[0]

    def greedy(self, logits):
        """The greedy token of ``logits``: the captured step's own argmax when they are that step's output."""
        if self._last is not None and logits is self._last[0]:
            return self._last[1]
        return logits.argmax(dim=-1, keepdim=True)

    def _capture(self, n: int):
        """Run the step once eagerly on a side stream (warm-up: kernels pick their algorithms, the cache's
        lazily allocated tensors exist), step the cache position back, then capture the same step for attention
        over ``n`` positions; the replay right after it performs the step for real."""
        import torch

        bucket = None
        if self.bucketed:
            bucket = torch.empty(n, dtype=torch.uint8, device=self.tok.device)
            torch._dynamo.mark_dynamic(bucket, 0)
        s = self._capture_stream
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            self._step_fn(self.tok, bucket)
            if self.counter is not None:
                self.counter.sub_(1)
            else:
                for layer in self.cache.layers:
                    layer.cumulative_length.sub_(1)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        # thread_local: loads and other runs on other threads may allocate while this thread captures
        with torch.cuda.graph(graph, pool=self._pool, stream=s, capture_error_mode="thread_local"):
            out = self._step_fn(self.tok, bucket)
        return graph, out

    @property
    def pipelined(self) -> bool:
        return self.depth > 1

    def in_flight(self) -> int:
        """Tokens started by :meth:`send` and not read by :meth:`received` yet."""
        return self._sent - self._got

    def send(self, tok):
        """Start copying the token tensor ``tok`` to the host (read it with :meth:`received`, oldest first, after
        launching the steps that follow it); at most ``depth`` at a time."""
        if self.in_flight() >= self.depth:
            raise RuntimeError(f"{self.depth} tokens are in flight already")
        slot = self._sent % PIPELINE_DEPTH
        with self._own_stream():
            self._host[slot].copy_(tok[0], non_blocking=self.graphed)
            if self._copied is not None:
                self._copied[slot].record()
        self._sent += 1

    def ready(self) -> bool:
        """True once the oldest token in flight is on the host (:meth:`received` will not wait)."""
        return self._copied is None or self._copied[self._got % PIPELINE_DEPTH].query()

    def received(self) -> int:
        """The oldest token in flight (waits for its copy)."""
        if not self.in_flight():
            raise RuntimeError("no token in flight")
        slot = self._got % PIPELINE_DEPTH
        if self._copied is not None:
            self._copied[slot].synchronize()
        self._got += 1
        return int(self._host[slot, 0])

    def close(self):
        """The runner is dropped (its model unloaded, or a longer runner replaces it): its streams go back to
        the pool. Idempotent."""
        if self.stream is not None and not self._closed:
            self._closed = True
            _give_back_streams(self._device, (self.stream, self._capture_stream))

    def release(self):
        if self.stream is not None:  # whatever runs next on the caller's stream comes after this run's work
            import torch

            torch.cuda.current_stream().wait_stream(self.stream)
        if self.busy.locked():
            self.busy.release()


_FREE_STREAMS: dict = {}  # device -> [(stream, capture stream)] no runner holds
_STREAMS_LOCK = threading.Lock()


def _take_streams(device: str):
    with _STREAMS_LOCK:
        free = _FREE_STREAMS.get(str(device))
        if free:
            return free.pop()
    import torch

    return torch.cuda.Stream(device=device), torch.cuda.Stream(device=device)


def _give_back_streams(device: str, pair) -> None:
    with _STREAMS_LOCK:
        _FREE_STREAMS.setdefault(str(device), []).append(pair)


def compile_wanted() -> bool:
    """``torch.compile`` of the captured step (fuses the many small element-wise kernels of a decoder layer);
    on by default, ``QUANTSCOPE_FAST_COMPILE=0`` turns it off (graph only)."""
    import os

    return os.environ.get("QUANTSCOPE_FAST_COMPILE", "1") != "0"


def needed_len(prompt_tokens: int, max_new_tokens: int, device: str = "cpu") -> int:
    n = prompt_tokens + max_new_tokens + 1
    n = -(-n // LEN_STEP) * LEN_STEP
    return max(n, CUDA_MIN_LEN) if device.startswith("cuda") else n


def warm(loaded) -> float:
    """On CUDA, build the model's runner now and run one step through it, so that compiling and capturing
    the step belong to the load, not to the first run. Returns the seconds it took (0.0 on CPU)."""
    import time

    import torch

    if not loaded.device.startswith("cuda"):
        return 0.0
    t0 = time.perf_counter()
    r = acquire(loaded, 1, 1)
    try:
        with torch.inference_mode():
            dev = loaded.info.get("input_device", loaded.device)
            logits = r.prefill(torch.zeros((1, 1), dtype=torch.long, device=dev))
            r.step(logits.argmax(dim=-1, keepdim=True))
            torch.cuda.synchronize()
    finally:
        r.release()
    return time.perf_counter() - t0


_RUNNERS_LOCK = threading.Lock()


def acquire(loaded, prompt_tokens: int, max_new_tokens: int) -> Optional[StaticRunner]:
    """The loaded model's static runner for one run, held until its ``release()``; a longer one replaces it when
    it is too short. None while another run holds it (the caller takes the plain path: a second static cache
    and graph per model would hold memory the calculator did not plan for)."""
    need = needed_len(prompt_tokens, max_new_tokens, loaded.device)
    with _RUNNERS_LOCK:
        r = loaded.fast_runner
        if r is not None:
            if not r.busy.acquire(blocking=False):
                return None
            if r.max_len >= need:
                return r
            loaded.fast_runner = None
            r.close()
            del r
            release_memory(loaded.device)
        r = StaticRunner(loaded.model, need, loaded.info.get("input_device", loaded.device))
        r.busy.acquire()
        loaded.fast_runner = r
        return r

