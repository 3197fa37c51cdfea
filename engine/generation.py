"""Streaming runs and what they measure, next to what the calculator predicted.

:func:`run` yields the run's :class:`~engine.backends.base.TokenEvent`\\ s as they arrive, then one final
:class:`RunMetrics`:

* ``load_s`` / ``quantize_s`` / ``weights_bytes`` -- from the :class:`~engine.backends.base.LoadedModel`;
* ``ttft_s`` -- time to first token: from the start of the run (chat template and tokenisation included)
  to the first generated token;
* ``tokens_per_s`` -- decode speed: tokens after the first divided by the time after the first (so the
  prefill is not counted twice); None with fewer than two tokens;
* ``peak_bytes`` -- the memory high-water mark during the run (``peak_kind`` says which):
  ``cuda_max_allocated`` (PyTorch's allocator on the GPU: tensors only, no CUDA context),
  ``nvml_process`` (this process's GPU memory from NVML, for llama.cpp on a GPU), or ``rss`` (resident
  memory of the whole process on CPU: the Linux ``VmHWM`` high-water mark, reset at the start of the run
  through ``/proc/self/clear_refs``; psutil samples every 10 ms only where that reset is refused). All are
  process-wide: concurrent runs in one process share them;
* ``predicted_bytes`` -- :func:`engine.memory.estimate` for the same model, format, device and the
  context the run ended with (llama.cpp: the ``n_ctx`` it allocated up front, f16 KV cache), with its
  weights term as ``predicted_weights_bytes``. On CUDA ``cuda_max_allocated`` excludes the CUDA context,
  so compare it with ``predicted_bytes - predicted_overhead_bytes``. For LLM.int8 the prediction uses the share
  of outlier columns the prompt's prefill had (``int8_outliers``: the layer kind where they cost the most and
  that share, counted by :mod:`engine.backends.int8_outliers`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Iterator, Optional, Union

from .backends import backend_of
from .backends.base import GenerationSettings, LoadedModel, Prompt, TokenEvent
from .backends.int8_outliers import outlier_columns, worst
from .errors import QuantScopeError
from .monitor import mark


@dataclass
class RunMetrics:
    backend: str
    method: str
    device: str
    text: str
    tokens: int
    prompt_tokens: int
    finish_reason: str
    load_s: float
    quantize_s: Optional[float]
    ttft_s: Optional[float]
    decode_s: Optional[float]
    total_s: float
    tokens_per_s: Optional[float]
    weights_bytes: int
    peak_bytes: Optional[int]
    peak_kind: str
    predicted_bytes: Optional[int]
    predicted_weights_bytes: Optional[int]
    predicted_overhead_bytes: Optional[int]
    decode_path: str = ""  # plain / fast: ... (engine.backends.runners); empty where the backend has one path
    # LLM.int8: (layer kind, share of its input columns above the outlier threshold) in the prompt's prefill, the
    # share the prediction used (engine.backends.int8_outliers); None for other formats
    int8_outliers: Optional[tuple[str, float]] = None

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Peak memory
# ---------------------------------------------------------------------------------------------
def _reset_hwm() -> bool:
    """Reset this process's VmHWM (Linux >= 4.0: writing 5 to clear_refs)."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _read_hwm() -> Optional[int]:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PeakMemory:
    """Context manager measuring the memory high-water mark of this process on ``device`` while it is open."""

    INTERVAL_S = 0.01

    def __init__(self, device: str, backend: str):
        self.device = device
        self.backend = backend
        self.kind = "rss"
        self.peak: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._sample = None
        self._hwm = False

    def _torch_cuda(self) -> bool:
        if not self.device.startswith("cuda") or self.backend == "llama.cpp":
            return False
        import torch

        return torch.cuda.is_available()

    def _nvml_sampler(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            idx = int(self.device.split(":")[1]) if ":" in self.device else 0
            handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
            pid = os.getpid()

            def sample():
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if p.pid == pid and p.usedGpuMemory:
                        return int(p.usedGpuMemory)
                return None

            sample()
            return sample
        except Exception:  # noqa: BLE001 - NVML absent or not supported: no GPU peak
            return None

    def __enter__(self):
        if self._torch_cuda():
            import torch

            self.kind = "cuda_max_allocated"
            # The caching allocator counts on the host, when memory is allocated: no synchronize is needed (a
            # device-wide one here made a run starting beside another wait for that run's queued GPU work).
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        if self.device.startswith("cuda"):
            self.kind = "nvml_process"
            self._sample = self._nvml_sampler()
        else:
            self.kind = "rss"
            self._hwm = _reset_hwm()
            try:
                import psutil

                proc = psutil.Process()
                self._sample = lambda: proc.memory_info().rss
            except ImportError:
                self._sample = None
        if self._sample is not None:
            self._take()
            # With the kernel's high-water mark reset, sampling adds nothing (VmHWM is at least every sample),
            # and on a small CPU a thread waking every 10 ms takes a core from the decode's worker threads.
            if not self._hwm:
                self._thread = threading.Thread(target=self._loop, name="peak-memory", daemon=True)
                self._thread.start()
        return self

    def _take(self):
        try:
            v = self._sample()
        except Exception:  # noqa: BLE001
            v = None
        if v is not None and (self.peak is None or v > self.peak):
            self.peak = v

    def _loop(self):
        while not self._stop.wait(self.INTERVAL_S):
            self._take()

    def __exit__(self, *exc):
        if self.kind == "cuda_max_allocated":
            import torch

            self.peak = int(torch.cuda.max_memory_allocated(self.device))
            return False
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._sample is not None:
            self._take()
        if self._hwm:
            hwm = _read_hwm()
            if hwm is not None and (self.peak is None or hwm > self.peak):
                self.peak = hwm
        return False


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
def predict(loaded: LoadedModel, context_tokens: int, int8_outlier_share: Optional[float] = None):
    """The calculator's estimate for this loaded model at ``context_tokens`` (None if its shape is unknown), with
    LLM.int8's outlier share where it was measured."""
    if loaded.spec is None:
        return None
    from .memory import estimate

    try:
        runtime = backend_of(loaded).runtime_spec(loaded, context_tokens)
        if int8_outlier_share is not None:
            runtime = dataclasses.replace(runtime, int8_outlier_share=int8_outlier_share)
        return estimate(loaded.spec, loaded.quant, runtime)
    except QuantScopeError:
        return None


def run(loaded: LoadedModel, prompt: Prompt, settings: GenerationSettings = GenerationSettings(),
        cancel_event: Optional[threading.Event] = None) -> Iterator[Union[TokenEvent, RunMetrics]]:
    """Stream one generation: every :class:`TokenEvent`, then a final :class:`RunMetrics`.

    Setting ``cancel_event`` (or closing this generator) stops the run at the next token; a cancelled run
    still ends with its metrics when iterated to the end.
    """
    backend = backend_of(loaded)
    parts: list[str] = []
    times: list[float] = []
    label = f"{loaded.method} on {loaded.device}"
    count = outlier_columns(loaded.model) if loaded.quant.method == "int8" else contextlib.nullcontext({})
    with PeakMemory(loaded.device, loaded.backend) as peak, count as outliers:
        t0 = time.perf_counter()
        stream = backend.stream(loaded, prompt, settings, cancel_event)
        mark("generate_start", label)
        try:
            for ev in stream:
                parts.append(ev.text)
                if ev.token_id is not None:
                    times.append(ev.t)
                yield ev
        finally:
            stream.close()
            mark("generate_stop", label)
        t_end = time.perf_counter()
    n = len(times)
    ttft = times[0] - t0 if n else None
    decode_s = times[-1] - times[0] if n >= 2 else None
    tps = (n - 1) / decode_s if decode_s else None
    # this run's prefill (a run of the same model beside it, with a prompt of another length, is not counted)
    int8 = worst(outliers.get(stream.prompt_tokens, {}))
    est = predict(loaded, stream.prompt_tokens + n, None if int8 is None else int8[1])
    yield RunMetrics(
        backend=loaded.backend, method=loaded.method, device=loaded.device, text="".join(parts), tokens=n,
        prompt_tokens=stream.prompt_tokens, finish_reason=stream.finish_reason or "length",
        load_s=round(loaded.load_s, 4), quantize_s=None if loaded.quantize_s is None else round(loaded.quantize_s, 4),
        ttft_s=None if ttft is None else round(ttft, 4), decode_s=None if decode_s is None else round(decode_s, 4),
        total_s=round(t_end - t0, 4), tokens_per_s=None if tps is None else round(tps, 3),
        weights_bytes=loaded.weights_bytes, peak_bytes=peak.peak, peak_kind=peak.kind,
        predicted_bytes=None if est is None else est.total_bytes,
        predicted_weights_bytes=None if est is None else est.weights_bytes,
        predicted_overhead_bytes=None if est is None else est.overhead_bytes,
        decode_path=stream.decode_path, int8_outliers=int8,
    )
