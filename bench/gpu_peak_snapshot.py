"""What is alive at the allocator's peak of a prefill: the calculator's activation terms, read off a real GPU.

    python bench/gpu_peak_snapshot.py --tokenizer DIR [--model meta-llama/Llama-3.1-8B-Instruct] --format int8 \\
        [--contexts 512,8192]

Run on a CUDA machine (device tool). The model is a random-weight checkpoint of the preset's config
(``gpu_engine_check.build_checkpoint``), loaded through the engine; per context, a prompt of that many random
tokens + 16 greedy tokens through ``model.generate`` with PyTorch's allocator history recorded. The history is
replayed to the moment the most bytes were allocated, and the blocks alive then are grouped by where they were
allocated (the first three Python frames outside torch). Used for ``engine/memory.py``'s ``HIDDEN_ROWS`` and its
LLM.int8 terms (bench/results/gpu_peak_snapshot_*_h200_2026-11-26e.log).
"""
from __future__ import annotations

import argparse
import collections
import gc
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import engine  # noqa: E402,F401 - the engine's allocator setting, before torch touches CUDA

MiB = 2**20


def live_at_peak(trace: list) -> tuple[int, list]:
    """Replay an allocator trace: (most bytes allocated at once, the blocks alive at that moment)."""
    live, total, best, best_set = {}, 0, 0, []
    for ev in trace:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            total += ev["size"]
            if total > best:
                best, best_set = total, list(live.values())
        elif ev["action"] == "free_completed":
            e = live.pop(ev["addr"], None)
            if e is not None:
                total -= e["size"]
    return best, best_set


def where(block: dict) -> str:
    frames = [f for f in block.get("frames", []) if f["filename"].endswith(".py") and "torch/" not in f["filename"]]
    return " < ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in frames[:3]) or "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="meta-llama/Llama-3.1-8B-Instruct")
    ap.add_argument("--format", default="int8")
    ap.add_argument("--contexts", default="512,8192")
    ap.add_argument("--tokenizer", type=Path, required=True, help="folder holding tokenizer files")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_peak_snapshot.py needs a CUDA GPU (run it on the device machine); none is visible here.")
    from gpu_engine_check import build_checkpoint
    from engine.backends import load

    lm = load(build_checkpoint(a.model, a.tokenizer), a.format, "cuda")
    for ctx in (int(c) for c in a.contexts.split(",")):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(max_entries=200_000)
        ids = torch.randint(0, 49152, (1, ctx), device="cuda")
        with torch.inference_mode():
            lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                              do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        peak = torch.cuda.max_memory_allocated() - base
        best, blocks = live_at_peak(snap["device_traces"][0])
        print(f"== {a.format} ctx {ctx}: peak above base {peak / MiB:.0f} MiB; replayed peak {best / MiB:.0f} MiB; "
              f"{len(blocks)} live blocks")
        size, count = collections.Counter(), collections.Counter()
        for b in blocks:
            size[where(b)] += b["size"]
            count[where(b)] += 1
        for w, b in size.most_common(14):
            print(f"  {b / MiB:8.1f} MiB  x{count[w]:3d}  {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
