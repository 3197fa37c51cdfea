"""Engine streaming vs. the raw library call (issue 3): decode tokens/s on the same loaded model, in one run.

    .venv/bin/python bench/bench_engine.py [--tokens 64] [--reps 3] [--backends bf16,nf4,hqq4,gguf,bf16-fast,hqq4-fast]

For each backend path -- bf16 (transformers), nf4 (bitsandbytes), hqq4 (HQQ), gguf (llama.cpp) -- the
embedded model (SmolLM2-135M-Instruct) is loaded once through ``engine.backends.load("embedded", ...)`` on
the CPU, and two ways of decoding the same prompt tokens are timed on that *same* loaded object:

* **engine**: ``engine.generation.run(loaded, PROMPT, GenerationSettings(max_new_tokens=N))`` (greedy): the
  backend's streaming path as the app uses it -- the decode steps run on the engine's compute thread
  (transformers/HQQ: the engine's own decode loop, prefill then one cached forward pass per token;
  llama.cpp: token-level ``Llama.generate``), tokens cross a queue to the consumer, which detokenises them
  incrementally.
* **raw**: the library alone, run on the one thread of the process that does torch work (the engine's
  compute thread, through ``scheduler().call``), as in a single-threaded script. transformers /
  bitsandbytes / HQQ: ``model.generate(**inputs,
  max_new_tokens=N, min_new_tokens=N, do_sample=False)`` on the chat-template tokens the engine builds;
  llama.cpp: ``Llama.generate(tokens, temp=0.0, repeat_penalty=1.0, reset=True)`` on the tokens the engine
  builds (same template, same tokenisation), stopped after N tokens. The fast formats (``bf16-fast``,
  ``hqq4-fast``): the model's static runner (the path the engine wraps) driven by a bare prefill / argmax /
  step loop (``gpu_engine_check._raw_fast``, the GPU benchmarks' raw side too).

Decode tokens/s is computed the same way on both sides: (tokens - 1) / (time of the last token - time of the
first token), so the prefill (time to first token) is excluded. Choice for raw ``generate``: a minimal
streamer (``put`` appends ``time.perf_counter()``, nothing else) timestamps each token, the same point at
which the engine's queue streamer timestamps it; this is exact where "total - separately measured prefill"
would add the noise of two measurements. For the engine two figures are kept: ``RunMetrics.tokens_per_s``
(what the engine reports, timestamps taken where the token is produced) and the *arrival* rate (timestamps
taken when the consumer of ``run()`` receives each event, i.e. what a UI sees); the check uses the lower.

The engine does not force a minimum length (EOS ends a run), so the prompt asks for a long text and the
script checks that every engine run reached N tokens (finish_reason ``length``) and that its greedy tokens
equal the raw call's. Repetitions are interleaved (raw, engine, raw, engine, ...) after one untimed warm-up
of each (8 tokens). Nothing runs torch work on the main thread: a second thread doing so keeps a second
OpenMP pool for the rest of the process and slows every later run, raw and engine alike (the effect the
engine's single compute thread avoids, :mod:`engine.compute`). Pass: median engine tok/s / median raw
tok/s >= 0.97 for every backend. Exits 1 otherwise.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

from engine.backends import backend_of, load  # noqa: E402
from engine.compute import scheduler  # noqa: E402
from engine.backends.base import GenerationSettings, TokenEvent, to_messages  # noqa: E402
from engine.generation import RunMetrics, run  # noqa: E402

TARGET = 0.97
PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a mysterious map. "
          "Describe every scene in detail.")
BACKENDS = ("bf16", "nf4", "hqq4", "gguf", "bf16-fast", "hqq4-fast")
WARMUP_TOKENS = 8


def decode_tps(times: list[float]) -> float | None:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) >= 2 and times[-1] > times[0] else None


# ---------------------------------------------------------------------------------------------
# Raw library calls on the loaded object
# ---------------------------------------------------------------------------------------------
def hf_raw(loaded, settings: GenerationSettings, n: int):
    """A function doing one raw ``model.generate`` of exactly ``n`` tokens; returns (token ids, times)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    model, tok = loaded.model, loaded.tokenizer
    enc = tok.apply_chat_template(to_messages(PROMPT, settings), add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    dev = loaded.info.get("input_device", loaded.device)
    inputs = {k: v.to(dev) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    class Stamps(BaseStreamer):
        def __init__(self):
            self.first = True
            self.ids: list[int] = []
            self.t: list[float] = []

        def put(self, value):
            if self.first:  # generate() puts the prompt first
                self.first = False
                return
            self.t.append(time.perf_counter())
            self.ids.extend(value.reshape(-1).tolist())

        def end(self):
            pass

    def once(n=n):
        s = Stamps()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad,
                           streamer=s)
        return s.ids, s.t

    return once, int(inputs["input_ids"].shape[1])


def llama_raw(loaded, settings: GenerationSettings, n: int):
    """One raw token-level ``Llama.generate`` of ``n`` tokens on the tokens the engine builds."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = loaded.model

    def piece(tid):
        return "" if tid is None or tid < 0 else llm.detokenize([tid], special=True).decode("utf-8", "replace")

    fmt = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token=piece(llm.token_eos()),
                              bos_token=piece(llm.token_bos()))
    tokens = llm.tokenize(fmt(messages=to_messages(PROMPT, settings)).prompt.encode("utf-8"), add_bos=True,
                          special=True)

    def once(n=n):
        ids: list[int] = []
        ts: list[float] = []
        with loaded.lock:
            llm.reset()
            gen = llm.generate(tokens, temp=0.0, repeat_penalty=1.0, reset=True)
            try:
                for tid in gen:
                    ts.append(time.perf_counter())
                    ids.append(int(tid))
                    if len(ids) >= n:
                        break
            finally:
                gen.close()
        return ids, ts

    return once, len(tokens)


def fast_raw(loaded, settings: GenerationSettings, n: int):
    """The fast formats' raw side: their static runner in a bare loop, on the tokens the engine builds."""
    import torch

    from gpu_engine_check import _raw_fast

    ids = torch.tensor([backend_of(loaded).chat_ids(loaded, PROMPT, settings)])
    loop = _raw_fast(loaded, ids, n)

    def once(n=n):
        out, _, times = loop(n)
        return out, times

    return once, int(ids.shape[1])


def on_compute_thread(fn):
    """``fn()`` on the engine's compute thread: the process's only torch thread, like a plain script."""
    return scheduler().call(fn)


def engine_once(loaded, settings: GenerationSettings):
    """One engine run; returns (token ids, arrival times, RunMetrics)."""
    ids: list[int] = []
    arrivals: list[float] = []
    metrics = None
    for ev in run(loaded, PROMPT, settings):
        if isinstance(ev, TokenEvent):
            if ev.token_id is not None:
                arrivals.append(time.perf_counter())
                ids.append(ev.token_id)
        elif isinstance(ev, RunMetrics):
            metrics = ev
    return ids, arrivals, metrics


# ---------------------------------------------------------------------------------------------
def bench(method: str, n: int, reps: int) -> dict:
    settings = GenerationSettings(max_new_tokens=n, temperature=0.0)
    loaded = load("embedded", method, "cpu")
    try:
        make = llama_raw if loaded.backend == "llama.cpp" else fast_raw if loaded.quant.fast else hf_raw
        raw_fn, prompt_tokens = make(loaded, settings, n)
        on_compute_thread(lambda: raw_fn(WARMUP_TOKENS))  # warm-up (untimed, short)
        engine_once(loaded, GenerationSettings(max_new_tokens=WARMUP_TOKENS, temperature=0.0))
        raw_tps, eng_tps, arr_tps, problems = [], [], [], []
        for _ in range(reps):
            r_ids, r_t = on_compute_thread(raw_fn)
            e_ids, e_arr, m = engine_once(loaded, settings)
            raw_tps.append(decode_tps(r_t))
            eng_tps.append(m.tokens_per_s)
            arr_tps.append(decode_tps(e_arr))
            if m.finish_reason != "length" or m.tokens != n:
                problems.append(f"engine run ended after {m.tokens} tokens ({m.finish_reason})")
            if len(r_ids) != n:
                problems.append(f"raw call made {len(r_ids)} tokens")
            if e_ids != r_ids[:len(e_ids)]:
                problems.append("engine and raw greedy tokens differ")
            if m.prompt_tokens != prompt_tokens:
                problems.append(f"prompt tokens differ (engine {m.prompt_tokens}, raw {prompt_tokens})")
        raw_med, eng_med, arr_med = (statistics.median(x) for x in (raw_tps, eng_tps, arr_tps))
        ratio, arr_ratio = eng_med / raw_med, arr_med / raw_med
        return dict(method=method, label=loaded.method, backend=loaded.backend, prompt_tokens=prompt_tokens,
                    load_s=loaded.load_s, raw=raw_tps, engine=eng_tps, arrival=arr_tps, raw_med=raw_med,
                    eng_med=eng_med, arr_med=arr_med, ratio=ratio, arr_ratio=arr_ratio,
                    ok=min(ratio, arr_ratio) >= TARGET and not problems, problems=sorted(set(problems)))
    finally:
        backend_of(loaded).unload(loaded)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backends", default=",".join(BACKENDS))
    a = ap.parse_args()
    import torch
    import transformers

    versions = [f"transformers {transformers.__version__}"]
    for lib in ("bitsandbytes", "hqq", "llama_cpp_python"):
        try:
            from importlib.metadata import version

            versions.append(f"{lib} {version(lib)}")
        except Exception:  # noqa: BLE001
            pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          + ", ".join(versions))
    print(f"Machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({cpu}), no GPU used")
    print(f"Embedded SmolLM2-135M-Instruct on cpu, greedy, {a.tokens} new tokens, {a.reps} interleaved reps "
          f"after an 8-token warm-up; decode tok/s = (tokens-1)/(t_last - t_first); target engine/raw >= {TARGET}\n")
    t_start = time.perf_counter()
    rows = []
    for method in a.backends.split(","):
        t0 = time.perf_counter()
        r = bench(method.strip(), a.tokens, a.reps)
        rows.append(r)
        print(f"{r['label']:6} ({r['backend']}, prompt {r['prompt_tokens']} tok, load {r['load_s']:.1f} s, "
              f"{time.perf_counter() - t0:.0f} s): raw {', '.join(f'{x:.1f}' for x in r['raw'])} | engine "
              f"{', '.join(f'{x:.1f}' for x in r['engine'])} | arrival {', '.join(f'{x:.1f}' for x in r['arrival'])}",
              flush=True)
    print(f"\n| backend | raw tok/s | engine tok/s | engine/raw | arrival tok/s | arrival/raw | result |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} ({r['backend']}) | {r['raw_med']:.1f} | {r['eng_med']:.1f} | {r['ratio']:.3f} | "
              f"{r['arr_med']:.1f} | {r['arr_ratio']:.3f} | {'PASS' if r['ok'] else 'FAIL'} |")
        for p in r["problems"]:
            print(f"    {r['label']}: {p}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
