"""GPU check of the engine (issue 3): a random-weight model built from a real config, loaded in each format
through ``engine.backends.load`` on CUDA, then decoded through the engine's streaming path and through the
raw ``model.generate`` on the same loaded object.

Run on a CUDA machine (device tool), with the embedded model's tokenizer files carried in a folder (on the
dev machine: ``cp $(python -m engine embedded-path)/{tokenizer*,chat_template.jinja} some/dir/``)::

    python bench/gpu_engine_check.py --tokenizer some/dir [PRESET] [--formats bf16,nf4,int8,hqq4]

The checkpoint (``/tmp/qs-ckpt-<preset>``, bf16, random weights from the preset's config.json) is written
once, like ``bench/gpu_calculator_check.py``; the tokenizer files are copied into it so that the engine's
loader (``AutoTokenizer.from_pretrained(folder)``) finds them. SmolLM2's tokenizer has ids < 49152 and the
model's vocabulary is 128256, so prompts encode fine; generated ids above the tokenizer's vocabulary
decode to nothing, which does not matter for timing. Memory and speed do not depend on weight values.

Per format it records: load time (and the quantize part where separable), TTFT and decode tok/s through the
engine (``engine.generation.run``: ``RunMetrics``) and through raw ``generate`` (a minimal timestamping
streamer; ``min_new_tokens`` = ``max_new_tokens``), interleaved raw / engine after a short warm-up; measured
weights vs. predicted; ``torch.cuda.max_memory_allocated`` over the load and over a run vs. the predicted
total minus the CUDA overhead; NVML process memory vs. the predicted total. Writes JSON lines to
``$OUT/gpu_engine_check.jsonl`` (or ``./artifacts/``) and prints a table.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
warnings.filterwarnings("ignore")

MiB = 2**20
PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a mysterious map. "
          "Describe every scene in detail.")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def nvml_process_bytes():
    import torch

    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if p.pid == os.getpid():
                return int(p.usedGpuMemory)
    except Exception as e:  # noqa: BLE001 - an absent measurement is reported as None
        print("nvml:", e)
    return None


def decode_tps(times):
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) >= 2 and times[-1] > times[0] else None


def build_checkpoint(preset: str, tokenizer_dir: Path) -> str:
    import torch
    import transformers as tf

    from engine.sources import PRESETS_DIR, _find_preset

    p = _find_preset(preset)
    cfg = json.loads((PRESETS_DIR / p["file"]).read_text())
    mt = cfg.pop("model_type")
    ckpt = Path(f"/tmp/qs-ckpt-{p['file'].removesuffix('.json')}")
    if not (ckpt / "config.json").exists():
        t0 = time.perf_counter()
        with torch.device("cuda"):
            m = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(mt, **cfg), dtype=torch.bfloat16)
        m.save_pretrained(ckpt)
        del m
        gc.collect()
        torch.cuda.empty_cache()
        print(f"random checkpoint written to {ckpt} in {time.perf_counter() - t0:.0f} s", flush=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, ckpt / name)
            copied.append(name)
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise SystemExit(f"--tokenizer {tokenizer_dir} holds no tokenizer.json / tokenizer.model")
    return str(ckpt)


def raw_fn(loaded, settings, n: int):
    """One raw run of exactly n greedy tokens on the engine's prompt tokens: (ids, t_call, times). Raw
    ``model.generate`` for the plain path; for a fast format, the path the engine wraps: its static runner driven
    by a bare prefill / argmax / step loop on the calling thread (no compute thread, no streaming)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from engine.backends.base import to_messages

    model, tok = loaded.model, loaded.tokenizer
    enc = tok.apply_chat_template(to_messages(PROMPT, settings), add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    dev = loaded.info.get("input_device", loaded.device)
    inputs = {k: v.to(dev) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if loaded.quant.fast:
        return _raw_fast(loaded, inputs["input_ids"], n)

    class Stamps(BaseStreamer):
        def __init__(self):
            self.first = True
            self.ids, self.t = [], []

        def put(self, value):
            if self.first:  # the prompt
                self.first = False
                return
            self.t.append(time.perf_counter())
            self.ids.extend(value.reshape(-1).tolist())

        def end(self):
            pass

    def once(n=n):
        s = Stamps()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad,
                           streamer=s)
        return s.ids, t0, s.t

    return once


def _raw_fast(loaded, ids, n: int):
    import torch

    from engine.backends.runners import acquire

    def once(n=n):
        r = acquire(loaded, int(ids.shape[1]), n)
        out, times = [], []
        try:
            t0 = time.perf_counter()
            with torch.inference_mode():
                logits = r.prefill(ids)
                for i in range(n):
                    nxt = r.greedy(logits)
                    out.append(int(nxt.item()))
                    times.append(time.perf_counter())
                    if i + 1 < n:
                        logits = r.step(nxt)
        finally:
            r.release()
        return out, t0, times

    return once


def engine_once(loaded, settings):
    from engine.backends.base import TokenEvent
    from engine.generation import RunMetrics, run

    ids, m = [], None
    for ev in run(loaded, PROMPT, settings):
        if isinstance(ev, TokenEvent) and ev.token_id is not None:
            ids.append(ev.token_id)
        elif isinstance(ev, RunMetrics):
            m = ev
    return ids, m


def check(fmt: str, ckpt: str, n: int, reps: int) -> dict:
    import torch

    from engine.backends import backend_of, load
    from engine.backends.base import GenerationSettings

    settings = GenerationSettings(max_new_tokens=n, temperature=0.0)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loaded = load(ckpt, fmt, "cuda")
    torch.cuda.synchronize()
    load_peak = torch.cuda.max_memory_allocated() - base
    alloc = torch.cuda.memory_allocated() - base
    try:
        raw = raw_fn(loaded, settings, n)
        raw(8)
        engine_once(loaded, GenerationSettings(max_new_tokens=8, temperature=0.0))
        raw_tps, raw_ttft, eng_tps, eng_ttft, runs = [], [], [], [], []
        for _ in range(reps):
            r_ids, t0, r_t = raw()
            raw_tps.append(decode_tps(r_t))
            raw_ttft.append(r_t[0] - t0)
            e_ids, m = engine_once(loaded, settings)
            eng_tps.append(m.tokens_per_s)
            eng_ttft.append(m.ttft_s)
            runs.append(dict(tokens=m.tokens, finish=m.finish_reason, same_tokens=e_ids == r_ids[:len(e_ids)]))
        nv = nvml_process_bytes()
        raw_med = statistics.median(raw_tps)
        eng_med = statistics.median(x for x in eng_tps if x is not None) if any(eng_tps) else None
        w_pred = m.predicted_weights_bytes
        peak_pred = None if m.predicted_bytes is None else m.predicted_bytes - m.predicted_overhead_bytes
        return dict(
            format=loaded.method, backend=loaded.backend, device=torch.cuda.get_device_name(),
            load_s=round(loaded.load_s, 2), quantize_s=loaded.quantize_s, info={k: v for k, v in loaded.info.items()
                                                                                 if k != "input_device"},
            prompt_tokens=m.prompt_tokens, new_tokens=n,
            ttft_engine_s=statistics.median(eng_ttft), ttft_raw_s=statistics.median(raw_ttft),
            tps_engine=eng_med, tps_raw=raw_med, engine_over_raw=None if eng_med is None else eng_med / raw_med,
            tps_engine_runs=eng_tps, tps_raw_runs=raw_tps, engine_runs=runs,
            weights_measured=loaded.weights_bytes, weights_predicted=w_pred,
            weights_err=None if w_pred is None else (w_pred - loaded.weights_bytes) / loaded.weights_bytes,
            allocated_after_load=alloc, peak_allocated_load=load_peak, peak_allocated_run=m.peak_bytes,
            peak_kind=m.peak_kind, peak_predicted_no_overhead=peak_pred,
            peak_err=None if not (peak_pred and m.peak_bytes) else (peak_pred - m.peak_bytes) / m.peak_bytes,
            nvml_process=nv, predicted_total=m.predicted_bytes,
            nvml_err=None if not (nv and m.predicted_bytes) else (m.predicted_bytes - nv) / nv)
    finally:
        backend_of(loaded).unload(loaded)
        del loaded
        gc.collect()
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("preset", nargs="?", default="meta-llama/Llama-3.1-8B-Instruct")
    ap.add_argument("--tokenizer", required=True, type=Path,
                    help="folder with the embedded model's tokenizer files (python -m engine embedded-path)")
    ap.add_argument("--formats", default="bf16,nf4,int8,hqq4")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    logging.disable(logging.WARNING)
    import torch
    import transformers as tf

    out_dir = Path(os.environ.get("OUT") or ROOT / "artifacts")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "gpu_engine_check.jsonl"
    torch.zeros(1, device="cuda")
    vers = []
    for lib in ("bitsandbytes", "hqq", "gemlite", "torchao"):
        try:
            from importlib.metadata import version

            vers.append(f"{lib} {version(lib)}")
        except Exception:  # noqa: BLE001
            vers.append(f"{lib} -")
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} transformers {tf.__version__} "
          f"{', '.join(vers)}", flush=True)
    ckpt = build_checkpoint(a.preset, a.tokenizer)
    rows, t_all = [], time.perf_counter()
    for fmt in a.formats.split(","):
        t0 = time.perf_counter()
        try:
            r = check(fmt.strip(), ckpt, a.tokens, a.reps)
        except Exception as e:  # noqa: BLE001 - one format failing must not lose the others
            r = dict(format=fmt, error=f"{e.__class__.__name__}: {e}")
            print(f"{fmt}: FAILED {r['error']}", flush=True)
        r["preset"], r["wall_s"] = a.preset, round(time.perf_counter() - t0, 1)
        with out.open("a") as f:
            f.write(json.dumps(r, default=str) + "\n")
        rows.append(r)
        if "error" not in r:
            print(f"{r['format']:8} done in {r['wall_s']:.0f} s: engine {r['tps_engine_runs']} raw "
                  f"{[round(x, 2) for x in r['tps_raw_runs']]} runs {r['engine_runs']} {r['info']}", flush=True)
    print(f"\n| format | load s | TTFT engine / raw ms | decode tok/s engine / raw | ratio | weights meas / pred MiB "
          "| peak load / run / pred MiB | NVML / pred MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['format']} | failed: {r['error'][:80]} |")
            continue

        def mib(x):
            return "-" if x is None else f"{x / MiB:.1f}"

        print(f"| {r['format']} | {r['load_s']:.1f} | {r['ttft_engine_s'] * 1e3:.0f} / {r['ttft_raw_s'] * 1e3:.0f} | "
              f"{r['tps_engine'] or 0:.1f} / {r['tps_raw']:.1f} | {r['engine_over_raw'] or 0:.3f} | "
              f"{mib(r['weights_measured'])} / {mib(r['weights_predicted'])} | {mib(r['peak_allocated_load'])} / "
              f"{mib(r['peak_allocated_run'])} / {mib(r['peak_predicted_no_overhead'])} | {mib(r['nvml_process'])} / "
              f"{mib(r['predicted_total'])} |")
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; JSON lines in {out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
