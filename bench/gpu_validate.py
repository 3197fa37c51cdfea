"""The calculator against a real GPU, over models x formats x contexts (issue 8), in one run.

    python bench/gpu_validate.py --tokenizer DIR [--models meta-llama/Llama-3.2-1B-Instruct,...]
                                 [--formats bf16,nf4,nf4-dq,fp4,int8,hqq4,hqq2] [--contexts 512,4096,8192]

Run on a CUDA machine (device tool). Each model is a random-weight bf16 checkpoint built from its preset's
config.json (``bench/gpu_engine_check.build_checkpoint``: memory and speed do not depend on weight values), with
the embedded model's tokenizer files copied in. Each format is loaded once through the engine
(``engine.backends.load``), then:

- per context (after the speed runs): a prefill of that many random tokens plus 16 decoded tokens, through raw
  ``model.generate`` (plain formats) or the engine's static runner sized for that run (fast formats: what a fast
  run holds is its static cache of ``runtime_spec``'s length, built at load or, for a long run, in its place);
  measured: ``torch.cuda.max_memory_allocated`` over the call (+ what the weights hold) and NVML's process memory,
  against the calculator's prediction for exactly that (model, format, context) (peak without the CUDA overhead;
  total with it). After each context the allocator cache is emptied, so NVML sees that context's own peak.
- decode speed on the chat prompt: the engine's streaming path and raw ``generate`` on the same loaded object,
  interleaved (``gpu_engine_check.check``'s method); and the HBM roofline: bytes read per decoded token (the
  weights as loaded + the KV cache at that length) x tok/s / the bandwidth of a device-to-device copy measured
  in the same run.

Writes JSON lines to ``$OUT/gpu_validate.jsonl`` (or ./artifacts/). One failing format does not lose the others.
``python bench/gpu_validate.py --report FILE.jsonl [MORE.jsonl ...] [--chart FILE.html]`` (no GPU needed) prints
the markdown tables of docs/benchmarks.md and writes a plotly chart of predicted vs measured peak memory.

LLM.int8 rows also record, per context, the outlier columns the prompt had in each layer kind
(``engine.backends.int8_outliers``) and tell the calculator that share (``RuntimeSpec.int8_outlier_share``).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import engine  # noqa: E402,F401 - before torch touches CUDA: the engine's allocator setting (engine/__init__.py)

MiB = 2**20
DEFAULT_MODELS = "meta-llama/Llama-3.2-1B-Instruct,meta-llama/Llama-3.1-8B-Instruct"


def copy_bandwidth(gib: float = 4.0, reps: int = 20) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), the roofline's denominator."""
    import torch

    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * a.numel() * a.element_size() * reps / (time.perf_counter() - t0)
    del a, b
    torch.cuda.empty_cache()
    return bw


def context_row(loaded, spec, quant, ctx: int, weights_alloc: int) -> dict:
    """One context's memory: a prompt of ``ctx`` random tokens + 16 decoded, the way a run of this format does it
    (plain formats: raw ``model.generate``, a dynamic cache; fast formats: the engine's static runner, prefill +
    steps, sized for ``ctx`` + 16 like a run's), against the calculator's prediction for what that run holds (for a
    fast format the static cache's length, ``runtime_spec``: at short contexts the runner built at load, at long
    ones a longer runner that replaces it)."""
    import torch

    from gpu_engine_check import nvml_process_bytes
    from engine.backends import backend_of
    from engine.backends.int8_outliers import outlier_columns, worst
    from engine.memory import estimate

    gc.collect()
    torch.cuda.empty_cache()
    ids = torch.randint(0, min(spec.vocab_size, 49152), (1, ctx), device=loaded.info.get("input_device", "cuda"))
    fast = loaded.quant.fast
    if fast:
        _drop_runner(loaded)  # what a run holds is measured from the weights alone (the runner is part of it)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode(), outlier_columns(loaded.model) as outliers:
        if fast:
            _fast_run(loaded, ids, 16)
        else:
            loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                                  do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base + weights_alloc
    nv = nvml_process_bytes()
    reserved = torch.cuda.memory_reserved()  # what NVML sees of PyTorch's allocator: in use or cached
    runtime = backend_of(loaded).runtime_spec(loaded, ctx + 16)
    outliers = outliers.get(ctx, {})  # the prefill's calls (the prompt is ctx tokens)
    share = worst(outliers)[1] if outliers else None
    if share is not None:  # LLM.int8: the calculator is told the share of outlier columns this prompt had
        runtime = dataclasses.replace(runtime, int8_outlier_share=share)
    est = estimate(spec, quant, runtime)
    pred_peak = est.total_bytes - est.overhead_bytes
    del ids
    return dict(context=ctx, peak_allocated=peak, peak_predicted=pred_peak, peak_err=(pred_peak - peak) / peak,
                nvml_process=nv, reserved=reserved, predicted_total=est.total_bytes,
                nvml_err=None if not nv else (est.total_bytes - nv) / nv, kv_predicted=est.kv_cache_bytes,
                kv_context=runtime.context, activations_predicted=est.activations_bytes,
                overhead_predicted=est.overhead_bytes, **({"int8_outliers": outliers, "int8_outlier_share": share}
                                                          if share is not None else {}))


def _drop_runner(loaded) -> None:
    """Let go of a fast model's static runner (its KV cache and captured step), as unloading does."""
    from engine.backends.base import release_memory

    r, loaded.fast_runner = loaded.fast_runner, None
    if r is not None:
        r.close()
        del r
    gc.collect()
    release_memory(loaded.device)


def _fast_run(loaded, ids, n: int) -> None:
    """A fast run's forward passes: the model's runner for this length (built, compiled and captured here if the
    model has none long enough, as in a run), its prefill and n - 1 graph-replayed steps."""
    from engine.backends.runners import acquire

    r = acquire(loaded, int(ids.shape[1]), n)
    try:
        logits = r.prefill(ids)
        for _ in range(n - 1):
            logits = r.step(logits.argmax(dim=-1, keepdim=True))
    finally:
        r.release()


def estimate_weights(spec, quant) -> int:
    from engine.memory import estimate
    from engine.specs import RuntimeSpec

    return estimate(spec, quant, RuntimeSpec(context=1, batch=1, device="cuda")).weights_bytes


def run_format(preset: str, ckpt: str, fmt: str, contexts: list, tokens: int, reps: int, bandwidth: float) -> dict:
    import torch

    from gpu_engine_check import decode_tps, engine_once, raw_fn
    from engine.backends import backend_of, load
    from engine.backends.base import GenerationSettings
    from engine.backends.runners import warm
    from engine.sources import resolve

    spec = resolve(preset)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    loaded = load(ckpt, fmt, "cuda")
    torch.cuda.synchronize()
    load_wall = time.perf_counter() - t0
    weights_alloc = torch.cuda.memory_allocated() - base
    quant = loaded.quant
    if quant.fast:  # the runner built at load is not weights (context_row counts it where a run holds it)
        had_runner = loaded.fast_runner is not None
        _drop_runner(loaded)
        weights_alloc = torch.cuda.memory_allocated() - base
        if had_runner:
            warm(loaded)  # as at load, for the speed runs
    try:
        if len(loaded.tokenizer) > spec.vocab_size:
            # The carried tokenizer (SmolLM2's, 49,152 ids) would index past this model's embedding (Mistral:
            # 32,768), a device-side assert that poisons the CUDA context: memory only for such models.
            rows = [context_row(loaded, spec, quant, c, weights_alloc) for c in contexts]
            return dict(preset=preset, format=loaded.method, backend=loaded.backend,
                        device=torch.cuda.get_device_name(), load_s=round(load_wall, 1), quantize_s=loaded.quantize_s,
                        weights_measured=loaded.weights_bytes, weights_allocated=weights_alloc,
                        weights_predicted=estimate_weights(spec, quant),
                        contexts=rows, bandwidth=bandwidth, decode="skipped: tokenizer larger than the vocabulary")
        settings = GenerationSettings(max_new_tokens=tokens, temperature=0.0)
        raw = raw_fn(loaded, settings, tokens)
        raw(8)
        engine_once(loaded, GenerationSettings(max_new_tokens=8, temperature=0.0))
        raw_tps, eng_tps, prompt_tokens = [], [], None
        for _ in range(reps):
            _, _, r_t = raw()
            raw_tps.append(decode_tps(r_t))
            _, m = engine_once(loaded, settings)
            eng_tps.append(m.tokens_per_s)
            prompt_tokens = m.prompt_tokens
        raw_med, eng_med = statistics.median(raw_tps), statistics.median(eng_tps)
        from engine.memory import estimate
        from engine.specs import RuntimeSpec

        kv = estimate(spec, quant, RuntimeSpec(context=prompt_tokens + tokens // 2, batch=1, device="cuda"))
        emb = loaded.model.get_input_embeddings().weight
        # The input embedding is read one row per token unless it is tied to the output layer (read in full).
        emb_unread = 0 if getattr(loaded.model.config, "tie_word_embeddings", False) else emb.numel() * emb.element_size()
        bytes_per_token = loaded.weights_bytes - emb_unread + kv.kv_cache_bytes
        best = max(eng_med, raw_med)
        # memory after speed: a long context replaces a fast model's runner by a longer one (slower attention)
        rows = [context_row(loaded, spec, quant, c, weights_alloc) for c in contexts]
        return dict(preset=preset, format=loaded.method, backend=loaded.backend, device=torch.cuda.get_device_name(),
                    load_s=round(load_wall, 1), quantize_s=loaded.quantize_s,
                    weights_measured=loaded.weights_bytes, weights_allocated=weights_alloc,
                    weights_predicted=kv.weights_bytes,
                    weights_err=(kv.weights_bytes - loaded.weights_bytes) / loaded.weights_bytes,
                    contexts=rows, tps_engine=eng_med, tps_raw=raw_med, engine_over_raw=eng_med / raw_med,
                    tps_engine_runs=eng_tps, tps_raw_runs=raw_tps, bytes_per_token=bytes_per_token,
                    bandwidth=bandwidth, roofline_tps=bandwidth / bytes_per_token,
                    roofline_fraction=best * bytes_per_token / bandwidth)
    finally:
        backend_of(loaded).unload(loaded)
        del loaded
        gc.collect()
        torch.cuda.empty_cache()


def repredict(r: dict) -> dict:
    """The row's predictions (and errors) recomputed with the calculator as it is now: measurements are kept,
    so a results file checks the current constants, not the ones of the day it was measured."""
    from engine.backends import parse_load_method
    from engine.memory import estimate
    from engine.sources import resolve
    from engine.specs import RuntimeSpec

    name = r["format"].replace("nf4+dq", "nf4-dq")  # e.g. "hqq4/g64 fast": the method and the fast suffix
    name = name.split("/")[0] + (" fast" if name.endswith(" fast") and "/" in name else "")
    spec, quant = resolve(r["preset"]), parse_load_method(name)
    for c in r["contexts"]:
        # kv_context: the positions the run's cache held (a fast run's static cache; older files: the context)
        # int8_outlier_share: LLM.int8's outlier columns as the run's prompt had them (older files: the bound, 1.0)
        est = estimate(spec, quant, RuntimeSpec(context=c.get("kv_context", c["context"]), batch=1, device="cuda",
                                                int8_outlier_share=c.get("int8_outlier_share", 1.0)))
        c["peak_predicted"] = est.total_bytes - est.overhead_bytes
        c["peak_err"] = (c["peak_predicted"] - c["peak_allocated"]) / c["peak_allocated"]
        c["predicted_total"] = est.total_bytes
        c["nvml_err"] = None if not c.get("nvml_process") else (est.total_bytes - c["nvml_process"]) / c["nvml_process"]
    r["weights_predicted"] = estimate_weights(spec, quant)
    return r


def report(files: list[Path], chart: Path | None) -> int:
    # a (model, format) measured in a later file replaces the same one from an earlier file
    latest: dict = {}
    for jsonl in files:
        for x in jsonl.read_text().splitlines():
            if x.strip():
                r = json.loads(x)
                latest[(r["preset"], r["format"])] = r
    rows = list(latest.values())
    ok = [repredict(r) for r in rows if "error" not in r]
    device = ok[0]["device"] if ok else "?"
    print(f"Device: {device}; copy bandwidth {ok[0]['bandwidth'] / 1e12:.2f} TB/s\n" if ok else "")
    print("| model | format | load s | weights meas / pred MiB | peak err 512 / 4096 / 8192 | NVML err 512 / 4096 / 8192 "
          "| allocator | decode tok/s engine / raw | engine/raw | % of roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = r["preset"].split("/")[-1]
        if "error" in r:
            print(f"| {name} | {r['format']} | failed: {r['error'][:60]} |")
            continue
        pe = " / ".join(f"{c['peak_err']:+.1%}" for c in r["contexts"])
        ne = " / ".join("-" if c["nvml_err"] is None else f"{c['nvml_err']:+.1%}" for c in r["contexts"])
        speed = (f"{r['tps_engine']:.1f} / {r['tps_raw']:.1f} | {r['engine_over_raw']:.2f} | "
                 f"{r['roofline_fraction']:.0%}") if "tps_engine" in r else "not measured¹ | - | -"
        print(f"| {name} | {r['format']} | {r['load_s']:.0f} | {r['weights_measured'] / MiB:,.0f} / "
              f"{r['weights_predicted'] / MiB:,.0f} | {pe} | {ne} | {r.get('alloc_conf', '?')} | {speed} |")
    within = [abs(c["peak_err"]) <= 0.03 for r in ok for c in r["contexts"]]
    print(f"\npredicted peak within 3% of the allocator's: {sum(within)} of {len(within)} (model, format, context)")
    if chart and ok:
        import plotly.graph_objects as go

        fig = go.Figure()
        for r in ok:
            fig.add_scatter(x=[c["peak_allocated"] / 2**30 for c in r["contexts"]],
                            y=[c["peak_predicted"] / 2**30 for c in r["contexts"]], mode="markers+lines",
                            name=f"{r['preset'].split('/')[-1]} {r['format']}",
                            text=[f"context {c['context']}: {c['peak_err']:+.1%}" for c in r["contexts"]])
        top = max(c["peak_allocated"] for r in ok for c in r["contexts"]) / 2**30 * 1.05
        fig.add_scatter(x=[0, top], y=[0, top], mode="lines", line=dict(dash="dash", color="#999"), name="exact")
        fig.update_layout(title=f"Predicted vs measured peak (PyTorch allocator), {device}", template="plotly_white",
                          xaxis_title="measured peak GiB", yaxis_title="predicted peak GiB", height=600)
        chart.write_text(fig.to_html(include_plotlyjs="cdn"))
        print(f"chart: {chart}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", type=Path, nargs="+", help="print the tables of results files (no GPU needed) and "
                    "exit; a (model, format) in a later file replaces the same one in an earlier file")
    ap.add_argument("--chart", type=Path, help="with --report: write a plotly chart (HTML) here")
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--formats", default="bf16,nf4,nf4-dq,fp4,int8,hqq4,hqq2")
    ap.add_argument("--contexts", default="512,4096,8192")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep the random checkpoints for another run")
    a = ap.parse_args()
    if a.report:
        for f in a.report:
            if not f.is_file():
                ap.error(f"--report {f}: no such file (a .jsonl written by a run, e.g. under bench/results/)")
        return report(a.report, a.chart)
    if a.tokenizer is None:
        ap.error("--tokenizer is required for a run")
    logging.disable(logging.WARNING)
    import shutil

    import torch

    from gpu_engine_check import build_checkpoint

    if not torch.cuda.is_available():
        ap.error("a run needs a CUDA GPU (the device machine); --report FILE works anywhere")
    out_dir = Path(os.environ.get("OUT") or ROOT / "artifacts")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "gpu_validate.jsonl"
    torch.zeros(1, device="cuda")
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()} · torch {torch.__version__} · copy bandwidth {bw / 1e12:.2f} TB/s",
          flush=True)
    contexts = [int(c) for c in a.contexts.split(",")]
    rows, t_all = [], time.perf_counter()
    for preset in a.models.split(","):
        ckpt = build_checkpoint(preset, a.tokenizer)
        for fmt in a.formats.split(","):
            t0 = time.perf_counter()
            try:
                r = run_format(preset, ckpt, fmt.strip(), contexts, a.tokens, a.reps, bw)
            except Exception as e:  # noqa: BLE001 - one format failing must not lose the others
                r = dict(preset=preset, format=fmt, error=f"{e.__class__.__name__}: {e}"[:400])
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            # the allocator this run had (the engine sets expandable_segments unless the environment chose)
            r["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default").split(":")[0]
            with out.open("a") as f:
                f.write(json.dumps(r, default=str) + "\n")
            rows.append(r)
            if "error" in r:
                print(f"{preset} {fmt}: FAILED {r['error']}", flush=True)
            else:
                errs = " ".join(f"{c['context']}:{c['peak_err']:+.1%}/{(c['nvml_err'] or 0):+.1%}" for c in r["contexts"])
                speed = (f"tok/s engine {r['tps_engine']:.1f} raw {r['tps_raw']:.1f} roofline "
                         f"{r['roofline_fraction']:.0%}") if "tps_engine" in r else r.get("decode", "")
                print(f"{preset} {r['format']:8} {r['wall_s']:5.0f}s {speed} | peak/nvml err {errs}", flush=True)
        if not a.keep_checkpoints:
            shutil.rmtree(ckpt, ignore_errors=True)  # the disk holds one 8B checkpoint at a time
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; JSON lines in {out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
