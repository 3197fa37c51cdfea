"""Side by side vs each pane alone (issue 4): generation wall time of the same panes, in one run.

    .venv/bin/python bench/bench_compare.py [--panes bf16,nf4] [--tokens 64] [--reps 3]      # CPU, embedded
    python bench/bench_compare.py --device cuda --random-preset meta-llama/Llama-3.1-8B-Instruct \\
        --tokenizer TOKDIR --panes bf16,nf4                                                   # on a GPU

The models are loaded once into one :class:`~engine.manager.ModelManager` (loading is not timed). Then,
interleaved for ``--reps`` rounds: each pane alone (``engine.compare.run_compare`` with that one pane) and all
panes together (the tab's path), greedy, ``--tokens`` new tokens, no scoring. The figure is
``CompareState.generate_wall_s``: from the moment every pane may start to the moment the last one finished,
as the tab reports it. Every run must produce the same tokens alone and side by side.

Targets (medians over the rounds): on CPU the side-by-side wall time is no worse than the panes run one after
the other (ratio to the sum of the alone times <= 1.0); on a GPU it is <= 1.3 x the slowest pane alone.
Exits 1 when the target is missed.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds a mysterious map. "
          "Describe every scene in detail.")
CPU_TARGET = 1.0
GPU_TARGET = 1.3


def one(manager, model, panes, n, device):
    from engine.backends.base import GenerationSettings
    from engine.compare import run_compare

    last = None
    for st in run_compare(manager, model, panes, PROMPT, GenerationSettings(max_new_tokens=n), device=device,
                          score=False):
        last = st
    bad = [p for p in last.panes if p.status != "done"]
    if bad:
        raise SystemExit(f"{[p.choice for p in bad]}: {[p.error or p.status for p in bad]}")
    return last.generate_wall_s, [p.token_ids for p in last.panes], [p.metrics.tokens_per_s for p in last.panes]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--panes", default="bf16,nf4")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--random-preset", help="GPU: build a random-weight checkpoint of this preset (see "
                    "bench/gpu_engine_check.py) and use it as --model")
    ap.add_argument("--tokenizer", type=Path, help="with --random-preset: folder holding tokenizer files")
    a = ap.parse_args()
    logging.disable(logging.WARNING)
    import torch

    from engine.manager import ModelManager

    model = a.model
    if a.random_preset:
        from gpu_engine_check import build_checkpoint

        model = build_checkpoint(a.random_preset, a.tokenizer)
    panes = [p.strip() for p in a.panes.split(",")]
    gpu = a.device.startswith("cuda")
    dev_name = torch.cuda.get_device_name() if gpu else f"{os.cpu_count()}-core CPU ({platform.machine()})"
    print(f"{dev_name}; torch {torch.__version__}; model {a.random_preset or a.model}; panes {panes}; "
          f"{a.tokens} greedy tokens; {a.reps} rounds", flush=True)
    mgr = ModelManager()
    t0 = time.perf_counter()
    for p in panes:
        one(mgr, model, [p], 4, a.device)  # load + warm-up
    one(mgr, model, panes, 4, a.device)
    print(f"loaded and warmed up in {time.perf_counter() - t0:.0f} s", flush=True)
    alone = {p: [] for p in panes}
    alone_tps = {p: [] for p in panes}
    together, together_tps, problems = [], [], []
    for r in range(a.reps):
        ids_alone = {}
        for p in panes:
            wall, ids, tps = one(mgr, model, [p], a.tokens, a.device)
            alone[p].append(wall)
            alone_tps[p].append(tps[0])
            ids_alone[p] = ids[0]
        wall, ids, tps = one(mgr, model, panes, a.tokens, a.device)
        together.append(wall)
        together_tps.append(tps)
        for p, got in zip(panes, ids):
            if got != ids_alone[p]:
                problems.append(f"round {r}: pane {p} made different tokens side by side")
        print(f"round {r}: alone " + ", ".join(f"{p} {alone[p][-1]:.2f} s" for p in panes)
              + f" | side by side {wall:.2f} s", flush=True)
    med_alone = {p: statistics.median(v) for p, v in alone.items()}
    med_together = statistics.median(together)
    seq = sum(med_alone.values())
    slowest = max(med_alone.values())
    print("\n| pane | alone s (tok/s) | side by side tok/s |")
    print("|---|---|---|")
    for i, p in enumerate(panes):
        print(f"| {p} | {med_alone[p]:.2f} ({statistics.median(alone_tps[p]):.1f}) | "
              f"{statistics.median(t[i] for t in together_tps):.1f} |")
    ratio_seq, ratio_slow = med_together / seq, med_together / slowest
    print(f"\nside by side {med_together:.2f} s; one after the other {seq:.2f} s (ratio {ratio_seq:.3f}); "
          f"slowest pane alone {slowest:.2f} s (ratio {ratio_slow:.3f})")
    if gpu:
        ok = ratio_slow <= GPU_TARGET
        print(f"GPU target: side by side <= {GPU_TARGET} x slowest alone: {'PASS' if ok else 'FAIL'}")
    else:
        ok = ratio_seq <= CPU_TARGET
        print(f"CPU target: side by side <= {CPU_TARGET} x one after the other: {'PASS' if ok else 'FAIL'}")
    for p in sorted(set(problems)):
        print("  problem:", p)
    mgr.unload_all()
    return 0 if ok and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
