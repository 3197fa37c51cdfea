"""One-token attention over a static KV cache: the engine's kernel (engine/backends/decode_attention.py) against
PyTorch's SDPA as the fast path called it before (boolean mask, ``enable_gqa=True``, the output made contiguous).

    python bench/gpu_decode_attention.py        # on a CUDA machine (the device tool); ~30 s with the kernel build

Per head shape (an 8B's 32 query / 8 key-value heads of 128 features; a 1B's of 64) and cache length (the bucket
a captured step attends, and how many of its positions are used): microseconds per call, from a CUDA graph of
32 calls each on its own layer's cache (together 0.5-1 GB, so the keys and values come from memory, as in a
model), best of 5 x 20 replays; the ratio ours / SDPA; the largest difference between the two outputs; and the
kernel's per-head counters after the runs (must be 0).

History: the ninth session's kernel of this kind (a block per 128 positions, the chunks combined one after another
by the last block) was no faster than cuDNN (15.0 vs 14.1 µs at 512 positions) and was not used. The engine's
kernel issues a block's loads for the next 32 positions before using the current ones, combines the chunks with
all their loads in flight at once, and counts finished blocks with one release-acquire atomic instead of two
fences; results in docs/benchmarks.md (bench/results/gpu_decode_attention_h200_2026-11-27.log).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS = 32
CAP = 8192
CASES = ((256, 200), (512, 300), (512, 512), (1024, 900), (2048, 2000), (4096, 4000), (8192, 8000))


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_decode_attention: a run needs a CUDA GPU (none is visible here)")
        return 1
    from engine.backends import decode_attention as da

    print(f"{torch.cuda.get_device_name()} · torch {torch.__version__}")
    for heads, kvh, dim in ((32, 8, 128), (32, 8, 64)):
        why = da.why_not(heads, kvh, dim)
        if why:
            print(f"{heads}/{kvh} heads of {dim}: {why}")
            continue
        chunks = da.chunks_per_head(kvh, "cuda")
        ks = [torch.randn(1, kvh, CAP, dim, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
        vs = [torch.randn(1, kvh, CAP, dim, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
        counters = [torch.zeros(kvh, dtype=torch.int32, device="cuda") for _ in range(LAYERS)]
        q = torch.randn(1, heads, 1, dim, device="cuda", dtype=torch.bfloat16)
        scale = dim ** -0.5
        for n, used in CASES:
            full = torch.zeros(1, 1, 1, CAP, dtype=torch.bool, device="cuda")
            full[..., :used] = True
            mask = full[..., :n]

            def ours():
                return [da.attend(q, ks[i][:, :, :n], vs[i][:, :, :n], mask, counters[i], scale, chunks)
                        for i in range(LAYERS)]

            def sdpa():
                return [torch.nn.functional.scaled_dot_product_attention(
                    q, ks[i][:, :, :n], vs[i][:, :, :n], attn_mask=mask, scale=scale,
                    enable_gqa=True).transpose(1, 2).contiguous() for i in range(LAYERS)]

            res = {}
            for name, fn in (("sdpa", sdpa), ("ours", ours)):
                stream = torch.cuda.Stream()
                with torch.cuda.stream(stream):
                    fn()
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=stream):
                        outs = fn()
                graph.replay()
                torch.cuda.synchronize()
                times = []
                for _ in range(5):
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                    for _ in range(20):
                        graph.replay()
                    e1.record()
                    torch.cuda.synchronize()
                    times.append(e0.elapsed_time(e1) / 20 / LAYERS * 1000)
                res[name] = (min(times), outs[0].float())
            diff = (res["ours"][1] - res["sdpa"][1]).abs().max().item()
            left = sum(int(c.sum()) for c in counters)
            print(f"{heads}/{kvh} heads of {dim}, {n:5d} positions ({used:5d} used): SDPA {res['sdpa'][0]:6.2f} µs, "
                  f"ours {res['ours'][0]:6.2f} µs, ours/SDPA {res['ours'][0] / res['sdpa'][0]:.2f}; "
                  f"largest difference {diff:.4f}; counters left {left}")
        del ks, vs
    return 0


if __name__ == "__main__":
    sys.exit(main())
