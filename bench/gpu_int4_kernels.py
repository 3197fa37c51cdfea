"""The 4-bit matmul kernels of the fast path, one layer shape at a time, against the memory bandwidth (issue 8).

    python bench/gpu_int4_kernels.py [--group-size 64] [--reps 200]

Run on a CUDA machine (device tool). For each weight shape of Llama-3.1-8B's decoder layer (q/o 4096x4096, k/v
1024x4096, q+k+v fused 6144x4096, gate/up 14336x4096, gate+up fused 28672x4096, down 4096x14336) and batch 1:
PyTorch's int4 kernel (tinygemm, ``aten._weight_int4pack_mm``, what ``hqq4-fast`` uses), our experimental
Triton kernel (``bench/int4_triton.py``) and a bf16 ``F.linear`` for scale. Each kernel runs ``reps`` times inside one
CUDA graph (as in the fast path's captured decode step), so the time per call includes what a launch costs there;
bandwidth = bytes the weights hold (codes + scales + zeros) / time, against a device-to-device copy measured in the
same run. Both 4-bit kernels are first checked against the dequantized weight in fp32.
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
    a = ap.parse_args()
    if a.wide:
        os.environ["QUANTSCOPE_INT4_TUNE"] = "wide"
    import torch

    import int4_triton
    from engine.backends import int4
    from gpu_validate import copy_bandwidth

    gs = a.group_size
    bw = copy_bandwidth()
    rows = []
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {bw / 1e12:.2f} TB/s; group size {gs}\n")
    print("| layer | N x K | weight MB | tinygemm us | GB/s | % copy | triton us | GB/s | % copy | bf16 us | % copy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
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
        for label, layer in (("tinygemm", tg), ("triton", tr)):
            for m in (1, 7):
                xm = torch.randn((m, k), dtype=torch.bfloat16, device="cuda")
                want = xm.float() @ ((q.float().reshape(n, k // gs, gs) - z[..., None]) * s[..., None]).reshape(n, k).T
                err = ((layer(xm).float() - want).abs().max() / want.abs().max()).item()
                row[f"{label}_err_m{m}"] = err
                assert err < 2e-2, f"{label} {name} batch {m}: relative error {err:.3g}"
        wbytes = q.numel() // 2 + 2 * s.numel() * 2
        t_tg = graph_time(lambda: tg(x), a.reps)
        t_tr = graph_time(lambda: tr(x), a.reps)
        w16 = torch.randn((n, k), dtype=torch.bfloat16, device="cuda")
        t16 = graph_time(lambda: torch.nn.functional.linear(x, w16), a.reps)
        row.update(weight_bytes=wbytes, tinygemm_s=t_tg, triton_s=t_tr, bf16_s=t16, bf16_bytes=w16.numel() * 2,
                   triton_config=str(int4_triton._gemv_kernel.best_config))
        rows.append(row)
        print(f"| {name} | {n} x {k} | {wbytes / 1e6:.1f} | {t_tg * 1e6:.1f} | {wbytes / t_tg / 1e9:.0f} | "
              f"{wbytes / t_tg / bw:.0%} | {t_tr * 1e6:.1f} | {wbytes / t_tr / 1e9:.0f} | {wbytes / t_tr / bw:.0%} | "
              f"{t16 * 1e6:.1f} | {w16.numel() * 2 / t16 / bw:.0%} |", row["triton_config"], flush=True)
        del q, tg, tr, w16, ref
        torch.cuda.empty_cache()
    out = Path(os.environ.get("OUT", ROOT / "artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_int4_kernels.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), bandwidth=bw,
                                                               group_size=gs, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
