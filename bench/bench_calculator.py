"""Memory calculator (issue 2): how long one estimate and one full tab update take, measured in one run.

    .venv/bin/python bench/bench_calculator.py

Targets: one ``engine.memory.estimate()`` call < 5 ms (each preset x format below); the tab's full update
(``ui.calculator.estimate`` with its defaults: every compared format, the verdict with its max-context
binary search, and the plotly figure) < 200 ms. Also prints, without a target, the same update end to end
through ``gradio_client`` against the app served on loopback. Exits 1 if a target is missed.

Both targets are checked cold and warm. engine.formats memoises the weights per (model object, format), so
a repeated call is warm; "cold" gives each call a fresh copy of the ModelSpec (estimate) or clears the
preset cache first (full update), as for the first request of a model and format in a running app.
"""
from __future__ import annotations

import copy
import logging
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from engine.formats import parse_method  # noqa: E402
from engine.memory import estimate as memory_estimate  # noqa: E402
from engine.sources import resolve  # noqa: E402
from engine.specs import RuntimeSpec, TrainingSpec  # noqa: E402

ESTIMATE_TARGET_MS = 5.0
UPDATE_TARGET_MS = 200.0
PRESETS = ("HuggingFaceTB/SmolLM2-135M-Instruct", "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-2-70b-hf",
           "mistralai/Mixtral-8x7B-Instruct-v0.1")
FORMATS = ("bf16", "nf4", "hqq4", "q4_k_m")
ESTIMATE_RUNS = 200
COLD_RUNS = 50
UPDATE_RUNS = 30
CLIENT_RUNS = 30


def timed(fn, runs: int, warmup: int = 3, setup=None) -> tuple[float, float]:
    """(mean, p95) of ``fn(setup())`` (or ``fn()``) in ms over ``runs`` calls after ``warmup`` untimed ones;
    ``setup`` runs outside the timing."""
    def once() -> float:
        arg = setup() if setup else None
        t0 = time.perf_counter_ns()
        fn(arg) if setup else fn()
        return (time.perf_counter_ns() - t0) / 1e6

    for _ in range(warmup):
        once()
    ts = sorted(once() for _ in range(runs))
    return statistics.fmean(ts), ts[min(len(ts) - 1, int(round(0.95 * (len(ts) - 1))))]


def row(label: str, cold: tuple[float, float] | None, warm: tuple[float, float], target: float | None) -> bool:
    """One line: cold mean/p95, warm mean/p95, worst p95 / target; True if the target is met."""
    worst = max(warm[1], cold[1] if cold else 0.0)
    ok = target is None or worst < target
    c = f"{cold[0]:9.3f} {cold[1]:9.3f}" if cold else f"{'-':>9} {'-':>9}"
    ratio = f"{worst / target:6.3f}" if target else f"{'-':>6}"
    verdict = ("ok" if ok else "MISSED") if target else "(no target)"
    tgt = f"{target:7.0f}" if target else f"{'-':>7}"
    print(f"{label:<44} {c} {warm[0]:9.3f} {warm[1]:9.3f} {tgt} {ratio}  {verdict}")
    return ok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    t_start = time.perf_counter()
    ok = True
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPU cores; times in ms; "
          "ratio = the worse p95 (cold or warm) / target")
    print(f"{'what':<44} {'cold mean':>9} {'cold p95':>9} {'warm mean':>9} {'warm p95':>9} {'target':>7} {'ratio':>6}")

    print(f"-- engine.memory.estimate(), context 4096, batch 1, inference: {COLD_RUNS} cold calls "
          f"(a fresh copy of the ModelSpec each), {ESTIMATE_RUNS} warm")
    worst = 0.0
    for ref in PRESETS:
        model = resolve(ref)
        for fmt in FORMATS:
            quant = parse_method(fmt)
            cold = timed(lambda m: memory_estimate(m, quant, RuntimeSpec(), TrainingSpec()), COLD_RUNS,
                         setup=lambda: copy.copy(model))
            warm = timed(lambda: memory_estimate(model, quant, RuntimeSpec(), TrainingSpec()), ESTIMATE_RUNS)
            worst = max(worst, cold[1], warm[1])
            ok &= row(f"{ref.split('/')[-1]} {fmt}", cold, warm, ESTIMATE_TARGET_MS)

    from engine import sources
    from ui.calculator import estimate as tab_update

    def clear_presets() -> None:
        # The parsed presets are cached (lru_cache); a fresh ModelSpec also misses the weights memo.
        getattr(sources, "_preset_spec").cache_clear()

    print(f"-- the tab's full update ui.calculator.estimate(): {COLD_RUNS // 5} cold calls (preset cache cleared "
          f"first), {UPDATE_RUNS} warm")
    updates = (("defaults (Llama-3.1-8B nf4, T4, 4096)", {}, UPDATE_TARGET_MS),
               ("Llama-2-70b-hf nf4, H100 (info)",
                dict(model="meta-llama/Llama-2-70b-hf", hardware="nvidia-h100-80gb-sxm"), None),
               ("Mixtral-8x7B q4_k_m, A100 80GB (info)",
                dict(model="mistralai/Mixtral-8x7B-Instruct-v0.1", method="q4_k_m", hardware="nvidia-a100-80gb"),
                None))
    for label, kw, target in updates:
        cold = timed(lambda _: tab_update(**kw), COLD_RUNS // 5, warmup=1, setup=clear_presets)
        warm = timed(lambda: tab_update(**kw), UPDATE_RUNS)
        ok &= row(label, cold, warm, target)

    print(f"-- the same defaults update through gradio_client on loopback, {CLIENT_RUNS} calls")
    import app
    from gradio_client import Client

    demo = app.build_app()
    demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                        share=False, inbrowser=False, ssr_mode=False)
    try:
        client = Client(demo.local_url, verbose=False, download_files=False, analytics_enabled=False)
        row("gradio_client predict('/estimate') (info)", None,
            timed(lambda: client.predict(api_name="/estimate"), CLIENT_RUNS), None)
    finally:
        demo.close(verbose=False)

    print(f"worst estimate() p95 {worst:.3f} ms = {worst / ESTIMATE_TARGET_MS:.3f} x target; "
          f"bench took {time.perf_counter() - t_start:.1f} s")
    print("PASS: all targets met" if ok else "FAIL: a target was missed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
