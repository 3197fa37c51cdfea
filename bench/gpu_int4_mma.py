"""Experiment (issue 8, not used by the engine): a 4-bit GEMV on tensor cores, against our CUDA GEMV.

    python bench/gpu_int4_mma.py

Our GEMV (``engine/backends/int4_cuda.py``) spends two instructions per 4-bit code (an AND and an FMA) plus the
input's preparation. This kernel spends about half: a word of 8 codes becomes four bf16 pairs ``128 + q`` with
one shift and one AND|OR each (``(w >> 4m) & 0x000F000F | 0x43004300``: bf16 128.0 with the code in its low
mantissa bits), an ``mma.sync.m16n8k16`` multiplies a 16-row x 16-feature tile of them by the token (column 0 of
the B operand; up to 8 tokens in its 8 columns), a second mma with an all-ones A gives the sum of the inputs per
group, and per group of 64 features ``s * d + ((8 - z) s - 136 s) * sum(x)`` = ``s (q - z) . x`` in fp32.
Layout: per tile of 16 rows and group of 64 features, 512 bytes in the order of the mma's A fragments (lane
``4g + t``, word ``i``: rows ``g``/``g+8``, features ``16i + 2t (+1, +8, +9)``), so each lane loads 16 bytes.

Measured on an H200 (docs/benchmarks.md): correct (relative error ~3e-3, bf16 output rounding). Timed cycling
through 96 MB of weight copies (seventh session) it looked no faster than our GEMV; that timing still had L2 hits.
Cycling through ~1 GB, as a model reads its weights (ninth session, bench/results/gpu_int4_mma_h200_2026-11-26h_1gb.log),
it is **faster on every shape the model uses**: q/o 5.9 vs 6.6 µs, q+k+v 7.8 vs 8.8, gate+up 25.8 vs 27.0, down
14.5 vs 16.2 (−4.6 µs per layer, ~0.15 ms per token of an 8B). Not in the engine yet. Timing as in
``bench/gpu_int4_kernels.py`` (a CUDA graph of 200 calls cycling through ~1 GB of copies of the weights).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from engine.backends.int4_cuda import SRC_HEADER  # noqa: E402

SRC = SRC_HEADER + r"""
__device__ __forceinline__ void mma_bf16(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#define LOW4 0x000F000Fu
#define MAGIC 0x43004300u
#define ONES 0x3F803F80u

// KS warps per block share a tile of 16 rows and split its groups; U groups' loads are issued together.
template <int KS, int U>
__global__ void __launch_bounds__(32 * KS) mma_int4(const __nv_bfloat16* __restrict__ x,
    const uint4* __restrict__ W, const uint2* __restrict__ SZ, __nv_bfloat16* __restrict__ y, int M, int N, int K) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x, m0 = blockIdx.y * 8, G = K >> 6;
  const int per = (G + KS - 1) / KS, g0 = warp * per, g1 = min(G, g0 + per);
  const uint32_t* xr = reinterpret_cast<const uint32_t*>(x + (size_t)min(m0 + g, M - 1) * K) + t;
  const uint4* wp = W + (size_t)tile * G * 32 + lane;
  const uint2* sp = SZ + (size_t)tile * G * 8 + g;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int b = g0; b < g1; b += U) {
    uint4 wv[U];
    uint2 sv[U];
    uint32_t xb[U][8];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int grp = min(b + u, g1 - 1);
      wv[u] = ld_stream(wp + (size_t)grp * 32);
      sv[u] = __ldg(sp + (size_t)grp * 8);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        xb[u][2 * i] = __ldg(xr + grp * 32 + i * 8);
        xb[u][2 * i + 1] = __ldg(xr + grp * 32 + i * 8 + 4);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (b + u < g1) {
        float d[4] = {0.f, 0.f, 0.f, 0.f}, e[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t w = part(wv[u], i);
          mma_bf16(d, (w & LOW4) | MAGIC, ((w >> 4) & LOW4) | MAGIC, ((w >> 8) & LOW4) | MAGIC,
                   ((w >> 12) & LOW4) | MAGIC, xb[u][2 * i], xb[u][2 * i + 1]);
          mma_bf16(e, ONES, ONES, ONES, ONES, xb[u][2 * i], xb[u][2 * i + 1]);
        }
        const float slo = __uint_as_float(sv[u].x << 16), tlo = __uint_as_float(sv[u].x & 0xFFFF0000u);
        const float shi = __uint_as_float(sv[u].y << 16), thi = __uint_as_float(sv[u].y & 0xFFFF0000u);
        const float zlo = fmaf(-136.f, slo, tlo), zhi = fmaf(-136.f, shi, thi);
        acc[0] = fmaf(slo, d[0], fmaf(zlo, e[0], acc[0]));
        acc[1] = fmaf(slo, d[1], fmaf(zlo, e[1], acc[1]));
        acc[2] = fmaf(shi, d[2], fmaf(zhi, e[0], acc[2]));
        acc[3] = fmaf(shi, d[3], fmaf(zhi, e[1], acc[3]));
      }
    }
  }
  const int n0 = tile * 16;
  __shared__ float red[KS][8][16];
  red[warp][2 * t][g] = acc[0];
  red[warp][2 * t + 1][g] = acc[1];
  red[warp][2 * t][g + 8] = acc[2];
  red[warp][2 * t + 1][g + 8] = acc[3];
  __syncthreads();
  for (int i = threadIdx.x; i < 128; i += 32 * KS) {
    const int c = i >> 4, r = i & 15;
    if (m0 + c < M) {
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < KS; ++k) s += red[k][c][r];
      y[(size_t)(m0 + c) * N + n0 + r] = __float2bfloat16(s);
    }
  }
}

template <int KS, int U>
static void launch(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz, torch::Tensor& y,
                   int M, int N, int K) {
  dim3 grid(N / 16, (M + 7) / 8);
  mma_int4<KS, U><<<grid, 32 * KS, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), reinterpret_cast<const uint4*>(w.data_ptr()),
      reinterpret_cast<const uint2*>(sz.data_ptr()), reinterpret_cast<__nv_bfloat16*>(y.data_ptr()), M, N, K);
}

torch::Tensor mm(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t ks, int64_t u) {
  const int M = x.size(0), K = x.size(1), N = w.size(0) * 16;
  auto y = torch::empty({M, N}, x.options());
  switch (ks * 10 + u) {
    case 24: launch<2, 4>(x, w, sz, y, M, N, K); break;
    case 44: launch<4, 4>(x, w, sz, y, M, N, K); break;
    case 84: launch<8, 4>(x, w, sz, y, M, N, K); break;
    case 42: launch<4, 2>(x, w, sz, y, M, N, K); break;
    case 82: launch<8, 2>(x, w, sz, y, M, N, K); break;
    case 162: launch<16, 2>(x, w, sz, y, M, N, K); break;
    case 164: launch<16, 4>(x, w, sz, y, M, N, K); break;
    default: TORCH_CHECK(false, "no such configuration");
  }
  return y;
}
"""
CONFIGS = ((2, 4), (4, 4), (8, 4), (4, 2), (8, 2), (16, 2), (16, 4))


def pack(q):
    """Codes [N, K] -> int32 [N/16, K/64 * 128]: per (tile, group) the 32 lanes' four words (module docstring)."""
    import torch

    n, k = q.shape
    c = q.to(torch.int32).reshape(n // 16, 2, 8, k // 64, 4, 2, 4, 2)  # tile, row/8, g, group, i, k/8, t, k%2
    c = c.permute(0, 3, 2, 6, 4, 7, 5, 1).reshape(n // 16, k // 64, 8, 4, 4, 8)  # nibble = k%2, k/8, row/8
    w = c[..., 0].clone()
    for j in range(1, 8):
        w |= c[..., j] << (4 * j)
    return w.reshape(n // 16, -1).contiguous()


def pack_sz(s, z):
    """Scales and zeros [N, K/64] -> bf16 per (tile, group, g): (s, (8 - z) s) of rows g and g + 8."""
    import torch

    n, g = s.shape
    sz = torch.stack([s.float(), (8 - z.float()) * s.float()], -1).to(torch.bfloat16)
    return sz.reshape(n // 16, 2, 8, g, 2).permute(0, 3, 2, 1, 4).contiguous().reshape(n // 16, -1)


def main() -> int:
    import torch
    from torch.utils import cpp_extension

    from engine.backends import int4_cuda
    from gpu_int4_kernels import SHAPES, copies_for, graph_time
    from gpu_validate import copy_bandwidth

    if not torch.cuda.is_available():
        print("gpu_int4_mma: a run needs a CUDA GPU (none is visible here)")
        return 1
    major, minor = torch.cuda.get_device_capability()
    ext = cpp_extension.load_inline(name="quantscope_int4_mma", cpp_sources=(
        "torch::Tensor mm(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t ks, int64_t u);"),
        cuda_sources=SRC, functions=["mm"], verbose=False,
        extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"])
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}; copy bandwidth {bw / 1e12:.2f} TB/s\n")
    print("| layer | N x K | tensor-core GEMV us (% copy), best config | our GEMV us (% copy) | max rel. error |")
    print("|---|---|---|---|---|")
    for name, n, k in SHAPES:
        if "bf16" in name:
            continue
        torch.manual_seed(0)
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
        s = (torch.rand((n, k // 64), device="cuda") * 0.01 + 0.001).to(torch.bfloat16).float()
        z = (torch.rand((n, k // 64), device="cuda") * 15).to(torch.bfloat16).float()
        wref = ((q.float().reshape(n, k // 64, 64) - z[..., None]) * s[..., None]).reshape(n, k)
        w, sz = pack(q), pack_sz(s, z)
        err = 0.0
        for m in (1, 3, 8, 9, 20):
            x = torch.randn((m, k), dtype=torch.bfloat16, device="cuda")
            want = x.float() @ wref.T
            for cfg in CONFIGS:
                err = max(err, ((ext.mm(x, w, sz, *cfg).float() - want).abs().max() / want.abs().max()).item())
        wbytes = q.numel() // 2 + s.numel() * 4
        copies = copies_for(wbytes)
        ws, szs = [w] + [w.clone() for _ in range(copies - 1)], [sz] + [sz.clone() for _ in range(copies - 1)]
        ours = int4_cuda.from_codes(q, s, z)
        theirs = [ours] + [int4_cuda.GemvInt4Linear(ours.words.clone(), ours.sz.clone(), k, None, ours.config)
                           for _ in range(copies - 1)]
        x = torch.randn((1, k), dtype=torch.bfloat16, device="cuda")
        state = {"i": 0}

        def turn():
            state["i"] = (state["i"] + 1) % copies
            return state["i"]

        times = {cfg: graph_time(lambda cfg=cfg: ext.mm(x, ws[turn()], szs[state["i"]], *cfg), 200) for cfg in CONFIGS}
        best = min(times, key=times.get)
        t_ours = graph_time(lambda: theirs[turn()](x), 200)
        print(f"| {name} | {n} x {k} | {times[best] * 1e6:.1f} ({wbytes / times[best] / bw:.0%}), {best} | "
              f"{t_ours * 1e6:.1f} ({wbytes / t_ours / bw:.0%}) | {err:.1e} |", flush=True)
        ws = szs = theirs = ours = None
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
