"""Two fast-path models side by side on one GPU, below the engine: speed, and whether running together changes
what they compute (issue 4).

    python bench/gpu_side_by_side_check.py --tokenizer DIR [--preset meta-llama/Llama-3.1-8B-Instruct] [--tokens 128]

Loads bf16-fast and hqq4-fast of a random-weight checkpoint (real config), then per round: each runner alone
(greedy, its logits kept), both interleaved step by step on one thread with each runner on its own CUDA stream
(the engine's arrangement), once fed each model's own alone tokens ("forced") and once free. Prints the wall
times (ratio to the slowest alone), the largest logit difference between forced side by side and alone (in the
first 4 steps and over all), whether the free runs made the alone tokens, and the same comparison between two
rounds of the same model alone. Bit-identical first steps with later drift of the size seen between two alone
rounds point to run-to-run nondeterminism, not to a race between the models.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--preset", default="meta-llama/Llama-3.1-8B-Instruct")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    import torch

    from engine.backends import load, runners
    from gpu_engine_check import build_checkpoint

    ckpt = build_checkpoint(a.preset, a.tokenizer)
    n = a.tokens
    names = ("bf16-fast", "hqq4-fast")
    lms = [load(ckpt, f, "cuda") for f in names]
    rs = [runners.acquire(lm, 16, n + 2) for lm in lms]
    ids = torch.randint(0, 1000, (1, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    print(f"{torch.cuda.get_device_name()} · {a.preset} (random weights) · {names[1]} on "
          f"{lms[1].info.get('hqq_backend')}", flush=True)

    def run(which, forced=None):
        out = {w: [] for w in which}
        toks = {w: [] for w in which}
        with torch.inference_mode():
            nxt = {}
            for w in which:
                lg = rs[w].prefill(ids)
                with rs[w].on_stream():
                    nxt[w] = lg.argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for i in range(n):
                for w in which:
                    with rs[w].on_stream():
                        tok = forced[w][i].view(1, 1) if forced else nxt[w]
                        lg = rs[w].step(tok)
                        out[w].append(lg.float().clone())
                        toks[w].append(tok.view(()))
                        nxt[w] = lg.argmax(-1, keepdim=True)
            for w in which:
                rs[w].stream.synchronize()
            dt = time.perf_counter() - t
        return dt, {w: torch.stack(toks[w]) for w in which}, out

    def maxdiff(xs, ys, k=None):
        return max((x - y).abs().max().item() for x, y in list(zip(xs, ys))[:k])

    prev = None
    for r in range(a.rounds):
        alone = [run([w]) for w in (0, 1)]
        ta, tb = alone[0][0], alone[1][0]
        ts, _, ls = run([0, 1], forced={w: alone[w][1][w] for w in (0, 1)})
        tg, tok_g, _ = run([0, 1])
        slow = max(ta, tb)
        print(f"round {r}: alone {names[0]} {ta:.3f} s, {names[1]} {tb:.3f} s | side by side forced {ts:.3f} s "
              f"({ts / slow:.2f}x slowest), free {tg:.3f} s ({tg / slow:.2f}x)", flush=True)
        for w in (0, 1):
            la, tok_a = alone[w][2][w], alone[w][1][w]
            same = torch.equal(tok_g[w], tok_a)
            first = -1 if same else int((tok_g[w] != tok_a).nonzero()[0])
            line = (f"  {names[w]}: forced side by side vs alone, max |logit diff| steps 0-3 "
                    f"{maxdiff(ls[w], la, 4):.4g}, all {maxdiff(ls[w], la):.4g}; free side by side made the alone "
                    f"tokens: {same}" + ("" if same else f" (first difference at step {first})"))
            if prev is not None:
                pa, ptok = prev[w]
                same_prev = torch.equal(ptok, tok_a)
                line += (f"; alone vs the previous round alone: same tokens {same_prev}" +
                         ("" if same_prev else f" (first difference at step {int((ptok != tok_a).nonzero()[0])})"))
            print(line, flush=True)
        prev = [(alone[w][2][w], alone[w][1][w]) for w in (0, 1)]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
