"""ModelManager with real components: the embedded SmolLM2-135M-Instruct on CPU through the transformers backend.

Loads are counted by wrapping the backend's real ``load`` (the wrapper calls it); budgets are computed from
the manager's own estimates (the calculator's weights + overhead) so that exactly two 16-bit copies fit.
The out-of-memory test makes the loaded model's forward raise ``torch.OutOfMemoryError`` on its third call.
"""
from __future__ import annotations

import threading
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from engine.backends.base import GenerationSettings, LoadedModel  # noqa: E402
from engine.backends.transformers_backend import TransformersBackend  # noqa: E402
from engine.errors import DoesNotFitError, GenerationError, OutOfMemoryDuringGenerationError  # noqa: E402
from engine.generation import RunMetrics  # noqa: E402
from engine.manager import ModelManager, is_out_of_memory  # noqa: E402

SHORT = GenerationSettings(max_new_tokens=3)


@pytest.fixture(autouse=True)
def _quiet():
    from transformers.utils import logging as tlog

    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


@pytest.fixture
def load_calls(monkeypatch):
    """Every call of TransformersBackend.load as (ref, method, thread name); the real load still runs."""
    calls: list[tuple[str, str, str]] = []
    real = TransformersBackend.load
    lock = threading.Lock()

    def counting(self, ref, quant, device=None):
        with lock:
            calls.append((ref, quant.name, threading.current_thread().name))
        time.sleep(0.2)  # widen the window in which a second request could start its own load
        return real(self, ref, quant, device)

    monkeypatch.setattr(TransformersBackend, "load", counting)
    return calls


@pytest.fixture
def managers():
    made: list[ModelManager] = []

    def make(**kw) -> ModelManager:
        m = ModelManager(**kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.unload_all()


def _need(method: str) -> int:
    m = ModelManager(budget_bytes=0)
    return m.estimate(m.key("embedded", method, "cpu")).total_bytes


def test_concurrent_requests_for_one_key_load_once(managers, load_calls):
    mgr = managers(budget_bytes=10 * 2**30)
    results: list[LoadedModel] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def worker():
        try:
            barrier.wait()
            results.append(mgr.get("embedded", "bf16", "cpu"))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, name=f"w{i}") for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(load_calls) == 1
    assert len(results) == 3 and all(r is results[0] for r in results)
    assert results[0].loaded and results[0].method == "bf16"
    assert mgr.get("embedded", "bf16", "cpu") is results[0]  # cached
    assert len(load_calls) == 1 and mgr.loads == 1


def test_different_keys_load_separately(managers, load_calls):
    mgr = managers(budget_bytes=10 * 2**30)
    a = mgr.get("embedded", "bf16", "cpu")
    b = mgr.get("embedded", "fp16", "cpu")
    assert a is not b and a.method == "bf16" and b.method == "fp16"
    assert [c[1] for c in load_calls] == ["bf16", "fp16"]
    assert mgr.get("embedded", "bf16", "cpu") is a
    assert len(mgr) == 2
    assert mgr.unload(mgr.key("embedded", "bf16", "cpu")) and not a.loaded
    assert len(mgr) == 1 and b.loaded
    assert mgr.unload_all() == 1 and not b.loaded and len(mgr) == 0


def test_tiny_budget_refuses_with_the_estimate(managers, load_calls):
    mgr = managers(budget_bytes=50 * 2**20)
    need = mgr.estimate(mgr.key("embedded", "bf16", "cpu"))
    with pytest.raises(DoesNotFitError) as err:
        mgr.get("embedded", "bf16", "cpu")
    msg = str(err.value)
    assert f"{need.total_bytes / 2**30:.2f} GiB" in msg  # the estimate
    assert "0.05 GiB" in msg  # the free memory (budget)
    assert "smaller format" in msg and "nf4" in msg
    assert load_calls == [] and len(mgr) == 0


def test_default_budget_is_free_memory_times_fraction():
    import psutil

    mgr = ModelManager(safety_fraction=0.5)
    avail = psutil.virtual_memory().available
    assert 0.3 * avail < mgr.budget("cpu") < 0.7 * avail


def test_lru_eviction_unloads_the_oldest_idle_model(managers, load_calls):
    a16, c32 = _need("bf16"), _need("fp32")
    assert _need("fp16") == a16
    # bf16 + fp16 fit, all three do not; fp16 + fp32 fit once bf16 (least recently used) is gone.
    mgr = managers(budget_bytes=a16 + c32)
    bf16 = mgr.get("embedded", "bf16", "cpu")
    fp16 = mgr.get("embedded", "fp16", "cpu")
    assert len(mgr) == 2 and mgr.evictions == 0
    fp32 = mgr.get("embedded", "fp32", "cpu")
    assert mgr.evictions == 1
    assert not bf16.loaded and fp16.loaded and fp32.loaded
    assert [e["model"] for e in mgr.cached()] == ["embedded as fp16 on cpu", "embedded as fp32 on cpu"]
    assert mgr.used_bytes("cpu") == a16 + c32
    # Using fp16 makes fp32 the oldest: asking for bf16 again evicts fp32, not fp16.
    assert mgr.get("embedded", "fp16", "cpu") is fp16
    bf16_again = mgr.get("embedded", "bf16", "cpu")
    assert bf16_again is not bf16 and bf16_again.loaded and fp16.loaded and not fp32.loaded
    assert [c[1] for c in load_calls] == ["bf16", "fp16", "fp32", "bf16"]


def test_model_in_use_is_not_evicted(managers, load_calls):
    a16, c32 = _need("bf16"), _need("fp32")
    mgr = managers(budget_bytes=a16 + c32)
    with mgr.use("embedded", "bf16", "cpu") as bf16:  # oldest, but busy
        fp16 = mgr.get("embedded", "fp16", "cpu")
        fp32 = mgr.get("embedded", "fp32", "cpu")  # needs room: fp16 (idle) goes, bf16 stays
        assert bf16.loaded and not fp16.loaded and fp32.loaded
        # Nothing idle can make room for a second copy next to a busy one when the busy one alone is too big.
        small = managers(budget_bytes=a16 + a16 // 2)
        with small.use("embedded", "bf16", "cpu"):
            with pytest.raises(DoesNotFitError, match="in use"):
                small.get("embedded", "fp16", "cpu")
        # An explicit unload of a busy model takes it out of the cache and frees it when the lease ends.
        assert mgr.unload(mgr.key("embedded", "bf16", "cpu"))
        assert bf16.loaded and mgr.key("embedded", "bf16", "cpu") not in mgr
    assert not bf16.loaded


def test_generate_streams_under_a_lease(managers):
    mgr = managers(budget_bytes=10 * 2**30)
    events = list(mgr.generate("embedded", "bf16", "What is the capital of France?", SHORT, device="cpu"))
    metrics = events[-1]
    assert isinstance(metrics, RunMetrics) and metrics.tokens >= 1 and metrics.text.strip()
    assert mgr.cached()[0]["in_use"] == 0


def test_oom_during_generation_unloads_and_keeps_serving(managers, load_calls):
    mgr = managers(budget_bytes=10 * 2**30)
    key = mgr.key("embedded", "bf16", "cpu")
    loaded = mgr.get_key(key)
    model = loaded.model
    real_forward = model.forward
    calls = {"n": 0}

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (injected)")
        return real_forward(*args, **kwargs)

    model.forward = failing_forward
    got = []
    with pytest.raises(OutOfMemoryDuringGenerationError) as err:
        for ev in mgr.generate(key, None, "Tell me a story about a dragon.", GenerationSettings(max_new_tokens=20)):
            got.append(ev)
    assert calls["n"] == 3
    assert len(got) >= 1 and not any(isinstance(e, RunMetrics) for e in got)  # tokens came before the failure
    assert isinstance(err.value, GenerationError) and is_out_of_memory(err.value)
    assert "out of memory" in str(err.value).lower() and "unloaded" in str(err.value)
    assert key not in mgr and not loaded.loaded and len(mgr) == 0
    del model, real_forward
    # The manager keeps serving: the next request loads afresh and generates text.
    fresh = mgr.get_key(key)
    assert fresh is not loaded and fresh.loaded
    events = list(mgr.generate(key, None, "What is the capital of France?", SHORT))
    assert isinstance(events[-1], RunMetrics) and events[-1].text.strip()
    assert [c[1] for c in load_calls] == ["bf16", "bf16"]


def test_non_oom_errors_pass_through_and_keep_the_model(managers):
    mgr = managers(budget_bytes=10 * 2**30)
    key = mgr.key("embedded", "bf16", "cpu")
    loaded = mgr.get_key(key)
    real_forward = loaded.model.forward

    def broken(*args, **kwargs):
        raise ValueError("shape mismatch (injected)")

    loaded.model.forward = broken
    try:
        with pytest.raises(GenerationError) as err:
            list(mgr.generate(key, None, "Hello", SHORT))
        assert not isinstance(err.value, OutOfMemoryDuringGenerationError)
        assert key in mgr and loaded.loaded
    finally:
        loaded.model.forward = real_forward


def test_is_out_of_memory():
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    wrapped = GenerationError("failed")
    wrapped.__cause__ = torch.OutOfMemoryError("x")
    assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(ValueError("out of range"))
