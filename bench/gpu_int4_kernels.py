"""The 4-bit matmul kernels of the fast path, one layer shape at a time, against the memory bandwidth (issue 8).

    python bench/gpu_int4_kernels.py [--group-size 64] [--reps 200]

Run on a CUDA machine (device tool). For each weight shape of Llama-3.1-8B's decoder layer (q/o 4096x4096, k/v
1024x4096, q+k+v fused 6144x4096, gate/up 14336x4096, gate+up fused 28672x4096, down 4096x14336) and batch 1:
PyTorch's int4 kernel (tinygemm, ``aten._weight_int4pack_mm``; ``hqq4-fast`` keeps it where ours cannot run), our
experimental
Triton kernels (``bench/int4_triton.py``), our CUDA GEMV (``engine/backends/int4_cuda.py``, what ``hqq4-fast`` uses
on CUDA) and a bf16 linear for scale. Each kernel runs ``reps`` times inside one CUDA graph (as in the fast path's
captured decode step), cycling through ~1 GB of copies of the weights (:data:`ROTATE_BYTES`; as a model's
layers are), so the time per call includes what a launch costs there and reads from HBM;
bandwidth = bytes the weights hold (codes + scales + zeros) / time, against a device-to-device copy measured in the
same run. Every 4-bit kernel is first checked against the dequantized weight in fp32 (batch 1 and 7).
Prints a markdown table and writes ``$OUT/gpu_int4_kernels.json`` (or ./artifacts/).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SHAPES = [("q/o", 4096, 4096), ("k/v", 1024, 4096), ("q+k+v", 6144, 4096), ("gate/up", 14336, 4096),
          ("gate+up", 28672, 4096), ("down", 4096, 14336), ("lm_head bf16", 128256, 4096)]


# Copies of the weights a timing cycles through, ~1 GB in all: each call then reads its weights from HBM, as in a
# model. 96 MB (twice the 50 MB L2 of an H100/H200, used until 2026-11-26) still left L2 hits: gate+up 23.7 µs per
# call there, 26.9 µs from 0.5 GB on and in the model (bench/results/gpu_int4_rotation_h200_2026-11-26h.log).
ROTATE_BYTES = 1 << 30
MAX_COPIES = 256


def copies_for(nbytes: int) -> int:
    """How many copies of ``nbytes`` of weights make up :data:`ROTATE_BYTES` (2 to :data:`MAX_COPIES`)."""
    return max(2, min(MAX_COPIES, -(-ROTATE_BYTES // nbytes)))


def rotating(layer, nbytes: int):
    """A function calling ``layer`` or one of its copies in turn, copies holding ``ROTATE_BYTES`` in all: a model
    reads each layer's weights from HBM once per token; one small matrix called again and again would be served
    from L2 and look faster than it is."""
    import copy

    layers = [layer] + [copy.deepcopy(layer) for _ in range(copies_for(nbytes) - 1)]
    state = {"i": 0}

    def call(x):
        state["i"] = (state["i"] + 1) % len(layers)
        return layers[state["i"]](x)

    return call


def graph_time(fn, reps: int) -> float:
    """Seconds per call of ``fn`` replayed ``reps`` times inside one CUDA graph (median of 5 replays)."""
    import statistics

    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--wide", action="store_true", help="autotune the Triton kernel over a wide set of tile shapes")
    ap.add_argument("--tune", default="", help="the Triton kernels' autotuning set: mid or wide (default: small)")
    ap.add_argument("--variants", default="triton,cuda",
                    help="kernels to time beside tinygemm: triton (bench/int4_triton.py, codes read as subnormals), "
                         "magic (the same with the exponent trick), cuda (engine/backends/int4_cuda.py)")
    a = ap.parse_args()
    if a.wide or a.tune:
        os.environ["QUANTSCOPE_INT4_TUNE"] = a.tune or "wide"
    import torch

    import int4_triton
    from engine.backends import int4
    from gpu_validate import copy_bandwidth

    gs = a.group_size
    bw = copy_bandwidth()
    rows = []
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {bw / 1e12:.2f} TB/s; group size {gs}\n")
    cols = ["tinygemm"] + a.variants.split(",")
    print("| layer | N x K | weight MB | " + " | ".join(f"{c} us (% copy)" for c in cols) + " | bf16 us (% copy) |")
    print("|---" * (len(cols) + 4) + "|")
    for name, n, k in SHAPES:
        torch.manual_seed(0)
        x = torch.randn((1, k), dtype=torch.bfloat16, device="cuda")
        row = dict(layer=name, n=n, k=k)
        if "bf16" in name:
            w = torch.randn((n, k), dtype=torch.bfloat16, device="cuda") * 0.02
            t16 = graph_time(lambda: torch.nn.functional.linear(x, w), a.reps)
            row.update(bf16_s=t16, bf16_bytes=w.numel() * 2)
            print(f"| {name} | {n} x {k} | {w.numel() * 2 / 1e6:.1f} | - | - | - | - | - | - | {t16 * 1e6:.1f} | "
                  f"{w.numel() * 2 / t16 / bw:.0%} |")
            rows.append(row)
            del w
            continue
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
        s = torch.rand((n, k // gs), device="cuda") * 0.01 + 0.001
        z = torch.rand((n, k // gs), device="cuda") * 15
        s, z = s.to(torch.bfloat16).float(), z.to(torch.bfloat16).float()  # what HQQ stores
        ref = x.float() @ ((q.float().reshape(n, k // gs, gs) - z[..., None]) * s[..., None]).reshape(n, k).T
        tg = int4.from_codes(q, s, z, gs)
        tr = int4_triton.from_codes(q, s, z, gs)
        cu = None
        if "cuda" in a.variants.split(","):
            from engine.backends import int4_cuda
            why = int4_cuda.why_not(n, k, gs)
            if why:
                print("cuda:", why, flush=True)
            else:
                cu = int4_cuda.from_codes(q, s, z)
                row["cuda_config"] = str(cu.config)
        wbytes = q.numel() // 2 + 2 * s.numel() * 2
        row.update(weight_bytes=wbytes)
        cells = []
        for label, layer, var in [("tinygemm", tg, None)] + [(v, cu if v == "cuda" else tr, v)
                                                              for v in a.variants.split(",")]:
            if layer is None:
                cells.append("n/a")
                continue
            if var:
                os.environ["QUANTSCOPE_INT4_GEMV"] = var
            err = 0.0
            for m in (1, 7):
                xm = torch.randn((m, k), dtype=torch.bfloat16, device="cuda")
                want = xm.float() @ ((q.float().reshape(n, k // gs, gs) - z[..., None]) * s[..., None]).reshape(n, k).T
                err = max(err, ((layer(xm).float() - want).abs().max() / want.abs().max()).item())
            row[f"{label}_err"] = err
            if err > 2e-2:
                print(f"{label} {name}: relative error {err:.3g}, not timed", flush=True)
                cells.append("wrong")
                continue
            call = rotating(layer, wbytes)
            t = graph_time(lambda: call(x), a.reps)
            row[f"{label}_s"] = t
            if var and var != "cuda":
                row[f"{label}_config"] = str(int4_triton._gemv_kernel.best_config)
            cells.append(f"{t * 1e6:.1f} ({wbytes / t / bw:.0%})")
        lin16 = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        w16 = lin16.weight
        call16 = rotating(lin16, w16.numel() * 2)
        t16 = graph_time(lambda: call16(x), a.reps)
        row.update(bf16_s=t16, bf16_bytes=w16.numel() * 2)
        rows.append(row)
        print(f"| {name} | {n} x {k} | {wbytes / 1e6:.1f} | " + " | ".join(cells) +
              f" | {t16 * 1e6:.1f} ({w16.numel() * 2 / t16 / bw:.0%}) |",
              {kk: v for kk, v in row.items() if kk.endswith("_config")}, flush=True)
        del q, tg, tr, cu, w16, lin16, call, call16, ref
        torch.cuda.empty_cache()
    out = Path(os.environ.get("OUT", ROOT / "artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_int4_kernels.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), bandwidth=bw,
                                                               group_size=gs, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
