"""ModelManager: the process's cache of loaded models, within a memory budget.

One manager per process (created by the app and passed in). It

* keys every loaded model by :class:`ModelKey` -- the resolved model reference, the storage format
  (:class:`~engine.specs.QuantSpec`), the device and the loader settings -- and loads each key once:
  concurrent requests for the same key wait for the one load and get the same :class:`LoadedModel`;
* asks the calculator before loading (:meth:`ModelManager.estimate`: the weights of the model in that
  format plus the device's fixed overhead, :func:`engine.memory.estimate`) and refuses what cannot fit with
  :class:`~engine.errors.DoesNotFitError`, after evicting least-recently-used idle models to make room;
* counts leases (:meth:`ModelManager.use`): a model in use by a run is never evicted; an explicit
  :meth:`~ModelManager.unload` of a busy model takes it out of the cache at once and frees it when its
  last lease ends;
* runs generations under a lease (:meth:`ModelManager.generate`) and turns an out-of-memory error during
  generation into :class:`~engine.errors.OutOfMemoryDuringGenerationError`, unloading that model so the
  manager keeps serving.

The budget is a number of bytes for the models of each device: ``budget_bytes`` when given, otherwise the
memory free on that device when it is first used (CUDA ``mem_get_info``; on CPU psutil's available RAM)
times ``safety_fraction``. Reservations are the calculator's estimates, not measurements, so the budget
accounting does not depend on when the allocator hands memory back.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from .backends import backend_for, backend_of, parse_load_method
from .backends.base import (GenerationSettings, LoadedModel, Prompt, check_device, is_embedded, locate, model_spec,
                            release_memory)
from .monitor import mark
from .errors import DoesNotFitError, InputError, OutOfMemoryDuringGenerationError, QuantScopeError
from .memory import GiB, OVERHEAD_BYTES, estimate as calc_estimate
from .specs import QuantSpec, RuntimeSpec

log = logging.getLogger(__name__)

SAFETY_FRACTION = 0.85

# Settings that choose the storage format (passed to parse_load_method with a method name) and settings
# that configure the loader (part of the key, handed to the backend).
FORMAT_SETTINGS = ("group_size", "double_quant", "dtype")
LOADER_SETTINGS = ("n_ctx",)

# What to suggest when a format does not fit: smaller formats, most faithful first.
SMALLER = {
    "fp32": "bf16, int8 or nf4", "fp16": "int8, nf4 or hqq4", "bf16": "int8, nf4 or hqq4",
    "int8": "nf4 or hqq4", "bnb4": "hqq3 or hqq2", "hqq": "fewer HQQ bits (e.g. hqq3 or hqq2)",
    "gguf": "a smaller GGUF type (e.g. Q4_K_M or Q3_K_M)", "gptq": "gptq3 or gptq2", "awq": "nf4 or hqq3",
}


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


@dataclass(frozen=True)
class ModelKey:
    """What identifies one loaded model: resolved reference, format, device and loader settings."""

    ref: str
    quant: QuantSpec
    device: str
    settings: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        name = Path(self.ref).name if ("/" in self.ref or "\\" in self.ref) else self.ref
        return f"{name} as {self.quant.name} on {self.device}"


@dataclass(frozen=True)
class FitEstimate:
    """What the manager reserves for one model: the calculator's weights plus the device's overhead."""

    weights_bytes: int
    overhead_bytes: int
    source: str  # "calculator" or "file size" (when the model's shape is unknown)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.overhead_bytes


@dataclass(eq=False)
class _Entry:
    key: ModelKey
    loaded: LoadedModel
    reserved: int
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)
    doomed: bool = False  # unloaded while busy: freed when the last lease ends


def _device_kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def free_memory(device: str) -> int:
    """Bytes free on ``device`` now: CUDA ``mem_get_info`` on a GPU, psutil's available RAM on the CPU."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` or anything in its cause/context chain is an out-of-memory error."""
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    try:
        import torch

        oom_types: tuple = (MemoryError, torch.OutOfMemoryError)
    except (ImportError, AttributeError):  # pragma: no cover
        oom_types = (MemoryError,)
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, oom_types):
            return True
        if isinstance(e, RuntimeError) and "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


class ModelManager:
    """Thread-safe cache of loaded models within a memory budget (see the module docstring)."""

    def __init__(self, budget_bytes: Optional[int] = None, safety_fraction: float = SAFETY_FRACTION):
        if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int)
                                         or budget_bytes < 0):
            raise InputError(f"The memory budget must be a whole number of bytes, 0 or more, got {budget_bytes!r}.")
        if not 0 < safety_fraction <= 1:
            raise InputError(f"The safety fraction must be above 0 and at most 1, got {safety_fraction!r}.")
        self._fixed_budget = budget_bytes
        self.safety_fraction = safety_fraction
        self._budgets: dict[str, int] = {}
        self._lock = threading.RLock()
        self._entries: "OrderedDict[ModelKey, _Entry]" = OrderedDict()  # oldest use first
        self._loading: dict[ModelKey, tuple[Future, int]] = {}  # key -> (future, bytes reserved)
        self._by_model: dict[int, _Entry] = {}  # id(LoadedModel) -> entry, for leases by object
        self.loads = 0
        self.evictions = 0

    # ------------------------------------------------------------------ keys and estimates
    def key(self, model_ref: str, method: Union[str, QuantSpec], device: Optional[str] = None,
            **settings) -> ModelKey:
        """The cache key of a request (validates the reference, method, device and settings)."""
        unknown = sorted(set(settings) - set(FORMAT_SETTINGS) - set(LOADER_SETTINGS))
        if unknown:
            raise InputError(f"Unknown load setting(s): {', '.join(unknown)}. "
                             f"Known: {', '.join(FORMAT_SETTINGS + LOADER_SETTINGS)}.")
        fmt = {k: v for k, v in settings.items() if k in FORMAT_SETTINGS and v is not None}
        if isinstance(method, QuantSpec):
            if fmt:
                raise InputError(f"{', '.join(sorted(fmt))} only apply to a method given by name.")
            quant = method
        else:
            quant = parse_load_method(method, **fmt)
        dev = check_device(device)
        files = locate(model_ref, "gguf" if quant.method == "gguf" else "hf")
        if is_embedded(files.ref):
            ref = "embedded"
        else:
            p = files.gguf if quant.method == "gguf" else files.hf_dir
            ref = str(Path(p).resolve()) if p is not None else files.ref
        loader = tuple(sorted((k, v) for k, v in settings.items() if k in LOADER_SETTINGS and v is not None))
        if loader and quant.method != "gguf":
            raise InputError(f"{', '.join(k for k, _ in loader)} only applies to GGUF models (llama.cpp).")
        return ModelKey(ref=ref, quant=quant, device=dev, settings=loader)

    def estimate(self, key: ModelKey) -> FitEstimate:
        """What loading ``key`` needs: the calculator's weight bytes plus the device's fixed overhead.

        GGUF files hold their weights as stored, so their size on disk is used; a model whose shape
        cannot be read falls back to the size of its weight files."""
        overhead = OVERHEAD_BYTES[_device_kind(key.device)]
        files = locate(key.ref, "gguf" if key.quant.method == "gguf" else "hf")
        if key.quant.method == "gguf" and files.gguf is not None:
            return FitEstimate(files.gguf.stat().st_size, overhead, "file size")
        spec = model_spec(files)
        if spec is not None:
            try:
                est = calc_estimate(spec, key.quant, RuntimeSpec(context=1, device=_device_kind(key.device)))
                return FitEstimate(est.weights_bytes, est.overhead_bytes, "calculator")
            except QuantScopeError:
                pass
        size = 0
        if files.hf_dir is not None:
            for pat in ("*.safetensors", "*.bin", "*.pt"):
                size += sum(f.stat().st_size for f in Path(files.hf_dir).glob(pat))
        return FitEstimate(size, overhead, "file size")

    def budget(self, device: str = "cpu") -> int:
        """Bytes available to models on ``device`` (fixed at first use when not given)."""
        kind = device if device.startswith("cuda") else "cpu"
        with self._lock:
            if self._fixed_budget is not None:
                return self._fixed_budget
            if kind not in self._budgets:
                self._budgets[kind] = int(free_memory(kind) * self.safety_fraction)
            return self._budgets[kind]

    def _pool(self, device: str) -> str:
        return device if device.startswith("cuda") else "cpu"

    def used_bytes(self, device: str = "cpu") -> int:
        """Bytes reserved on ``device``'s pool by cached and loading models."""
        pool = self._pool(device)
        with self._lock:
            used = sum(e.reserved for e in self._entries.values() if self._pool(e.key.device) == pool)
            used += sum(r for k, (_f, r) in self._loading.items() if self._pool(k.device) == pool)
            used += sum(e.reserved for e in self._by_model.values()
                        if e.doomed and self._pool(e.key.device) == pool)
            return used

    # ------------------------------------------------------------------ get / use
    def get(self, model_ref: str, method: Union[str, QuantSpec], device: Optional[str] = None,
            **settings) -> LoadedModel:
        """The loaded model for this request, loading it (once) if needed. Raises DoesNotFitError."""
        return self._acquire(self.key(model_ref, method, device, **settings), lease=False).loaded

    def get_key(self, key: ModelKey) -> LoadedModel:
        return self._acquire(key, lease=False).loaded

    @contextlib.contextmanager
    def use(self, model: Union[str, ModelKey, LoadedModel], method: Union[str, QuantSpec, None] = None,
            device: Optional[str] = None, **settings) -> Iterator[LoadedModel]:
        """Lease a model for a run: ``with manager.use("embedded", "bf16") as loaded: ...``. A leased model is
        not evicted. Accepts a reference (+ method), a :class:`ModelKey` or a cached :class:`LoadedModel`."""
        if isinstance(model, LoadedModel):
            entry = self._lease_object(model)
        else:
            key = model if isinstance(model, ModelKey) else self.key(model, method or "bf16", device, **settings)
            entry = self._acquire(key, lease=True)
        try:
            yield entry.loaded
        finally:
            self._release(entry)

    def _lease_object(self, loaded: LoadedModel) -> _Entry:
        with self._lock:
            entry = self._by_model.get(id(loaded))
            if entry is None or entry.doomed or entry.loaded is not loaded:
                raise InputError("This model is not loaded by the manager (it may have been unloaded); get it again.")
            entry.refs += 1
            self._touch(entry)
            return entry

    def _touch(self, entry: _Entry) -> None:
        entry.last_used = time.monotonic()
        if entry.key in self._entries:
            self._entries.move_to_end(entry.key)

    def _acquire(self, key: ModelKey, lease: bool) -> _Entry:
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    if lease:
                        entry.refs += 1
                    self._touch(entry)
                    return entry
                pending = self._loading.get(key)
                if pending is None:
                    need = self.estimate(key)
                    to_free = self._make_room(key, need)  # raises DoesNotFitError
                    fut: Future = Future()
                    self._loading[key] = (fut, need.total_bytes)
                    break
            # Another thread is loading this key: wait for it, then take the cached entry (loop).
            pending[0].result()
        for victim in to_free:
            self._free(victim)
        try:
            loaded = self._load(key)
        except BaseException as e:
            with self._lock:
                self._loading.pop(key, None)
            fut.set_exception(e)
            raise
        with self._lock:
            reserved = self._loading.pop(key)[1]
            entry = _Entry(key=key, loaded=loaded, reserved=reserved, refs=1 if lease else 0)
            self._entries[key] = entry
            self._by_model[id(loaded)] = entry
            self.loads += 1
        fut.set_result(loaded)
        return entry

    def _load(self, key: ModelKey) -> LoadedModel:
        backend = backend_for(key.quant)
        for k, v in key.settings:
            setattr(backend, k, v)
        log.info("loading %s", key.describe())
        mark("load_start", key.describe())
        loaded = backend.load(key.ref, key.quant, key.device)
        mark("load", key.describe())
        return loaded

    def _make_room(self, key: ModelKey, need: FitEstimate) -> list[_Entry]:
        """Under the lock: pick LRU idle models of the same pool to evict so ``need`` fits, take them out of
        the cache and return them (freed by the caller outside the lock). Raises DoesNotFitError."""
        pool = self._pool(key.device)
        budget = self.budget(key.device)
        used = self.used_bytes(key.device)
        total = need.total_bytes
        if used + total <= budget:
            return []
        idle = [e for e in self._entries.values() if e.refs == 0 and self._pool(e.key.device) == pool]
        freeable = sum(e.reserved for e in idle)
        if total > budget or used - freeable + total > budget:
            busy = used - freeable
            detail = (f"{_gib(budget - busy)} is free for models on {key.device} "
                      f"(budget {_gib(budget)}" + (f", {_gib(busy)} held by models in use or loading)" if busy
                                                   else ")"))
            raise DoesNotFitError(
                f"{key.describe()} does not fit: the calculator estimates {_gib(total)} "
                f"(weights {_gib(need.weights_bytes)} + overhead {_gib(need.overhead_bytes)}), but only {detail}. "
                f"Try a smaller format such as {SMALLER.get(key.quant.method, 'a lower-bit format')}"
                + (", or wait for the running generations to finish." if busy else "."))
        victims = []
        for e in idle:  # oldest use first
            if used + total <= budget:
                break
            victims.append(e)
            used -= e.reserved
            del self._entries[e.key]
            self._by_model.pop(id(e.loaded), None)
            self.evictions += 1
            log.info("evicting %s to make room for %s", e.key.describe(), key.describe())
        return victims

    def _release(self, entry: _Entry) -> None:
        free_now = False
        with self._lock:
            entry.refs -= 1
            entry.last_used = time.monotonic()
            if entry.refs <= 0 and entry.doomed:
                self._by_model.pop(id(entry.loaded), None)
                free_now = True
        if free_now:
            self._free(entry)

    # ------------------------------------------------------------------ unload
    def _free(self, entry: _Entry) -> None:
        loaded = entry.loaded
        mark("unload", entry.key.describe())
        try:
            backend_of(loaded).unload(loaded)  # drops model + tokenizer, gc, empty_cache, malloc_trim
        except Exception:  # noqa: BLE001 - freeing must not fail the caller
            log.exception("unloading %s failed", entry.key.describe())
            loaded.model = None
            loaded.tokenizer = None
            release_memory(entry.key.device)

    def _resolve_entry(self, key: Union[ModelKey, LoadedModel]) -> Optional[_Entry]:
        if isinstance(key, LoadedModel):
            return self._by_model.get(id(key))
        return self._entries.get(key)

    def unload(self, key: Union[ModelKey, LoadedModel]) -> bool:
        """Take a model out of the cache and free its memory (once its last lease ends if it is in use).
        Returns whether it was cached."""
        with self._lock:
            entry = self._resolve_entry(key)
            if entry is None or entry.doomed:
                return False
            self._entries.pop(entry.key, None)
            if entry.refs > 0:
                entry.doomed = True  # stays in _by_model (and keeps its reservation) until released
                return True
            self._by_model.pop(id(entry.loaded), None)
        self._free(entry)
        return True

    def unload_all(self) -> int:
        """Unload every cached model; returns how many."""
        with self._lock:
            keys = list(self._entries)
        return sum(self.unload(k) for k in keys)

    # ------------------------------------------------------------------ generation
    def generate(self, model_ref: Union[str, ModelKey, LoadedModel], method: Union[str, QuantSpec, None],
                 prompt: Prompt, gen_settings: GenerationSettings = GenerationSettings(),
                 cancel_event: Optional[threading.Event] = None, device: Optional[str] = None,
                 **settings) -> Iterator:
        """:func:`engine.generation.run` under a lease: every TokenEvent, then the RunMetrics.

        An out-of-memory error during the run unloads the model and raises
        :class:`~engine.errors.OutOfMemoryDuringGenerationError`; the manager keeps serving."""
        from .generation import run

        with self.use(model_ref, method, device, **settings) as loaded:
            try:
                yield from run(loaded, prompt, gen_settings, cancel_event)
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                oom = e
            else:
                return
        # Lease released: unloading frees the model now (unless another run still holds it).
        self.unload(loaded)
        release_memory(loaded.device)
        raise OutOfMemoryDuringGenerationError(
            f"Ran out of memory on {loaded.device} while generating with {loaded.method}; the model was unloaded "
            "to free its memory. Try fewer new tokens, a shorter prompt, or a smaller format, then run again."
        ) from oom

    # ------------------------------------------------------------------ introspection
    def cached(self) -> list[dict]:
        """The cached models, least recently used first (for display)."""
        with self._lock:
            return [{"key": e.key, "model": e.key.describe(), "reserved_bytes": e.reserved, "in_use": e.refs,
                     "weights_bytes": e.loaded.weights_bytes, "last_used": e.last_used}
                    for e in self._entries.values()]

    def __contains__(self, key: ModelKey) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
