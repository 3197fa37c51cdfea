"""A 4-bit matmul of our own for decode steps and short prompts on CUDA (``hqq4-fast``), on tensor cores.

At batch 1 every weight is read once per token, so the matmul's speed is the rate at which it streams the 4-bit
codes. PyTorch's int4 kernel (tinygemm) reads them at 32-44% of the copy bandwidth on an H200 at Llama-8B's layer
shapes; this kernel is written for few tokens.

How (one ``mma.sync.m16n8k16`` per 16 rows x 16 features): a word of 8 codes becomes four bf16 pairs ``128 + q``
with one shift and one AND|OR each (``(w >> 4m) & 0x000F000F | 0x43004300``: bf16 128.0 with the code in its low
mantissa bits, exact), the mma multiplies a 16-row x 16-feature tile of them by up to 8 tokens (the B operand's 8
columns), a second mma with an all-ones A gives each token's sum of inputs, and per group of 64 features ``s * d +
((8 - z) s - 136 s) * sum(x)`` = ``s (q - z) . x`` in fp32 (``(8 - z) s`` is tinygemm's zero term: half the
rounding error of ``-z s``). ``mma_int4<KS, U>``: a block per tile of 16 rows (and per 8 tokens), KS warps
splitting its groups, U groups' loads issued together; the fastest of :data:`CONFIGS` is timed per layer shape at
load (:func:`pick_config`). Prompts of :data:`DEQUANT_MIN_TOKENS` tokens or more: ``dequant_int4`` writes
:data:`DEQUANT_BYTES` of rows at a time as bf16 into a buffer that ``cublasGemmEx`` multiplies.

Layout (built from HQQ's codes by :func:`pack`, same bytes as HQQ's: two codes per byte, one bf16 scale and one
bf16 zero term per group of 64 input features):

- ``words`` int32, stored as [N, K/8] but in tile order: per tile of 16 rows and group of 64 features, 128 words =
  32 lanes x 4, in the order of the mma's A fragments. Lane ``4g + t``'s word ``i`` holds rows ``g`` and ``g + 8``
  at features ``16i + 2t``, ``+1``, ``+8``, ``+9`` of the group; its nibble ``j`` is row ``g + 8 (j & 1)``, feature
  ``16i + 2t + 8 ((j >> 1) & 1) + (j >> 2)``. Each lane loads its four words in one 16-byte load. Rows sliced at
  multiples of 16 are whole tiles (sibling projections are stacked and sliced that way).
- ``sz`` bf16, stored as [N, K/64, 2], in tile order: per tile and group, for g = 0..7, ``(s, (8 - z) s)`` of rows
  ``g`` and ``g + 8`` (one 8-byte load per lane group).

Folded into a decode call where a Llama-style decoder layer allows (:data:`MODES`, :mod:`engine.backends.int4_fusion`):
an RMSNorm of the input, the residual add (with the next norm's input), SiLU(gate) * up; and in the fast path's
one-token step, RoPE of q and k with the key/value cache writes (:func:`qkv_rope`; q and k rows stored in
:func:`rope_order`, so that each feature's RoPE partner is in the same 16-row tile).

Requires N a multiple of 16 and K a multiple of 64 (group size 64); other layers keep tinygemm (:func:`why_not`).
Compiled at first use with ``torch.utils.cpp_extension.load_inline`` (needs nvcc and ninja; ~50 s, cached in
``~/.cache/quantscope`` or ``QUANTSCOPE_KERNEL_CACHE``); where either is missing, :func:`why_not` says so and
``hqq4-fast`` keeps tinygemm. Measured on an H200 (docs/benchmarks.md; timed cycling through ~1 GB of weights, as
a model reads them): q/o 5.9 µs, q+k+v 7.8, gate+up 25.8, down 14.5 per call for an 8B's layer shapes (38-60% of
the copy bandwidth); the CUDA-core GEMV it replaced 6.6 / 8.8 / 27.0 / 16.2.
"""
from __future__ import annotations

import functools
import threading
from typing import Optional

import torch

from ..memory import FAST_INT4_DEQUANT_BYTES
from . import cuda_ext

GROUP = 64
TILE = 16  # rows per tile (the mma's M)
# prompts of at least this many tokens: dequantize + cuBLAS, chunks of at most this many bytes (chunk_rows)
DEQUANT_MIN_TOKENS = 32
DEQUANT_BYTES = FAST_INT4_DEQUANT_BYTES  # the calculator counts this buffer
# (warps per block, groups loaded together): the launch shapes compiled; the fastest per layer shape is used
CONFIGS = ((2, 4), (4, 4), (8, 4), (4, 2), (8, 2), (16, 2), (16, 4))

_SRC = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <stdint.h>
""" + cuda_ext.PDL_SRC + r"""
// 16 bytes of weights read once: not kept in L1
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t part(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

__device__ __forceinline__ void mma_bf16(float* d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#define LOW4 0x000F000Fu
#define MAGIC 0x43004300u
#define ONES 0x3F803F80u


// A block per tile of 16 rows and 8 tokens (grid y); KS warps split the tile's groups; U groups' loads are issued
// together. x [M, K] bf16 (4-byte aligned rows), y [M, N] (N / 2 with act).
// Folded in (engine/backends/int4_fusion.py), none of it in the loop over the weights:
// - norm_part (not null): x is the residual stream times the RMSNorm's weight, norm_part [P, M] fp32 partial sums
//   of the stream's squares (P slices of 16 features, written by the layer that produced it); each token's sums
//   are scaled by rsqrt(sum / K + eps) (a per-token factor commutes with the product);
// - res (not null): y = res + bf16(sum), rounded as the separate add rounds; with next_w also xn = bf16(y *
//   next_w) (the next norm's input) and part_out [N / 16, M]: the sum of y^2 over this tile's 16 rows;
// - act: tile rows 0-7 are gate rows and 8-15 the matching up rows (gate_up_from_codes interleaves them),
//   y = bf16(silu(bf16(gate))) * bf16(up), rounded as the separate ops round.
// RoPE folded into a q+k+v GEMV (hd > 0; int4_fusion.folded_attention, the decode step): q and k rows are stored
// permuted within each head (int4_cuda.rope_order), so that a 16-row tile holds features 8t..8t+7 (rows 0-7) and
// their RoPE partners hd/2 + 8t.. (rows 8-15); y = q rotated, in the heads' feature order [M, q_rows]; k rotated
// and v are written into the static cache's layers k, v [Hkv, positions, hd] at position pos[0] + token.
struct Rope {
  const __nv_bfloat16* cos;  // [M, hd], as transformers' rotary embedding gives it
  const __nv_bfloat16* sin;
  __nv_bfloat16* k;
  __nv_bfloat16* v;
  const int64_t* pos;
  int q_rows, kv_rows, hd;
  long head_stride;  // elements per key/value head of the cache
};

template <int KS, int U, bool NORM>
__device__ __forceinline__ void mma_int4_body(const __nv_bfloat16* __restrict__ x,
    const uint4* __restrict__ W, const uint2* __restrict__ SZ, __nv_bfloat16* __restrict__ y, int M, int N, int K,
    const float* __restrict__ norm_part, int P, float eps, const __nv_bfloat16* __restrict__ res,
    const __nv_bfloat16* __restrict__ next_w, __nv_bfloat16* __restrict__ xn, float* __restrict__ part_out,
    bool act, const Rope& rp) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x, m0 = blockIdx.y * 8, G = K >> 6;
  const int per = (G + KS - 1) / KS, g0 = warp * per, g1 = min(G, g0 + per);
  const uint32_t* xr = reinterpret_cast<const uint32_t*>(x + (size_t)min(m0 + g, M - 1) * K) + t;
  const uint4* wp = W + (size_t)tile * G * 32 + lane;
  const uint2* sp = SZ + (size_t)tile * G * 8 + g;
  pdl_wait();  // x and the norm's partial sums come from the kernel before (PDL)
  pdl_trigger();
  // NORM: the first token's partial sums of squares are loaded before the weights, spread over the warps (warp w,
  // lane l: slices 32 (q KS + w) + l; a few registers: holding 8 per lane slowed an 8B's gate+up by 3 µs, summing
  // them after the loop from shared memory by 4 µs); each warp reduces its share after the loop
  constexpr int QN = NORM ? (256 + 32 * KS - 1) / (32 * KS) : 1;
  float np[QN];
  if (NORM) {
#pragma unroll
    for (int q = 0; q < QN; ++q) {
      const int p = (q * KS + warp) * 32 + lane;
      np[q] = p < P ? __ldg(norm_part + (size_t)p * M + m0) : 0.f;
    }
  }
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
  __shared__ float ssq[NORM ? KS : 1][8];
  red[warp][2 * t][g] = acc[0];
  red[warp][2 * t + 1][g] = acc[1];
  red[warp][2 * t][g + 8] = acc[2];
  red[warp][2 * t + 1][g + 8] = acc[3];
  if (NORM) {  // this warp's share of each token's sum of squares
    const int mb = min(8, M - m0);
    for (int c = 0; c < mb; ++c) {
      float v = 0.f;
      if (c == 0) {
#pragma unroll
        for (int q = 0; q < QN; ++q) v += np[q];
      }
      for (int p = ((c == 0 ? QN : 0) * KS + warp) * 32 + lane; p < P; p += 32 * KS)
        v += __ldg(norm_part + (size_t)p * M + m0 + c);
#pragma unroll
      for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) ssq[NORM ? warp : 0][c] = v;
    }
  }
  __syncthreads();
  const int outs = act ? 64 : 128;
  for (int i = threadIdx.x; i < outs; i += 32 * KS) {  // whole warps: 64 and 128 are multiples of 32
    const int c = act ? i >> 3 : i >> 4, r = act ? i & 7 : i & 15;
    const bool ok = m0 + c < M;
    float scale = 1.f;
    if (NORM && ok) {
      float ss = 0.f;
#pragma unroll
      for (int k = 0; k < KS; ++k) ss += ssq[NORM ? k : 0][c];
      scale = rsqrtf(ss / K + eps);
    }
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < KS; ++k) s += red[k][c][r];
    if (act) {
      float s2 = 0.f;
#pragma unroll
      for (int k = 0; k < KS; ++k) s2 += red[k][c][r + 8];
      const float gate = __bfloat162float(__float2bfloat16(s * scale));
      const float up = __bfloat162float(__float2bfloat16(s2 * scale));
      const float a = __bfloat162float(__float2bfloat16(gate / (1.f + expf(-gate))));
      if (ok) y[(size_t)(m0 + c) * (N / 2) + tile * 8 + r] = __float2bfloat16(a * up);
      continue;
    }
    __nv_bfloat16 v = __float2bfloat16(s * scale);
    if (rp.hd) {  // RoPE fold: a q/k row and its partner (r ^ 8) rotated, rounded as the separate ops round
      if (!ok) continue;
      const int hd = rp.hd, tok = m0 + c;
      const long p = (long)rp.pos[0] + tok;
      if (n0 < rp.q_rows + rp.kv_rows) {
        float s2 = 0.f;
#pragma unroll
        for (int k = 0; k < KS; ++k) s2 += red[k][c][r ^ 8];
        const float a = __bfloat162float(v), b = __bfloat162float(__float2bfloat16(s2 * scale));
        const int t16 = (n0 % hd) >> 4, f = r < 8 ? 8 * t16 + r : (hd >> 1) + 8 * t16 + r - 8;
        const float cf = __bfloat162float(rp.cos[(size_t)tok * hd + f]);
        const float sf = __bfloat162float(rp.sin[(size_t)tok * hd + f]);
        const __nv_bfloat16 o = __float2bfloat16(r < 8 ? a * cf - b * sf : a * cf + b * sf);
        if (n0 < rp.q_rows) y[(size_t)tok * rp.q_rows + n0 / hd * hd + f] = o;
        else rp.k[(size_t)((n0 - rp.q_rows) / hd) * rp.head_stride + p * hd + f] = o;
      } else {
        rp.v[(size_t)((n0 - rp.q_rows - rp.kv_rows) / hd) * rp.head_stride + p * hd + n0 % hd + r] = v;
      }
      continue;
    }
    if (res && ok) v = __float2bfloat16(__bfloat162float(res[(size_t)(m0 + c) * N + n0 + r]) + __bfloat162float(v));
    if (ok) y[(size_t)(m0 + c) * N + n0 + r] = v;
    if (part_out) {  // lanes 16h .. 16h + 15 hold token c's 16 rows
      const float f = __bfloat162float(v);
      float q = ok ? f * f : 0.f;
#pragma unroll
      for (int o = 8; o; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
      if (ok) {
        xn[(size_t)(m0 + c) * N + n0 + r] = __float2bfloat16(f * __bfloat162float(next_w[n0 + r]));
        if (r == 0) part_out[(size_t)tile * M + m0 + c] = q;
      }
    }
  }
}

#define MMA_INT4_ARGS const __nv_bfloat16* __restrict__ x, const uint4* __restrict__ W, \
    const uint2* __restrict__ SZ, __nv_bfloat16* __restrict__ y, int M, int N, int K, \
    const float* __restrict__ norm_part, int P, float eps, const __nv_bfloat16* __restrict__ res, \
    const __nv_bfloat16* __restrict__ next_w, __nv_bfloat16* __restrict__ xn, float* __restrict__ part_out, bool act, \
    const Rope rp
#define MMA_INT4_PASS x, W, SZ, y, M, N, K, norm_part, P, eps, res, next_w, xn, part_out, act, rp

template <int KS, int U>
__global__ void __launch_bounds__(32 * KS) mma_int4(MMA_INT4_ARGS) {
  mma_int4_body<KS, U, false>(MMA_INT4_PASS);
}

// with the norm: at most ~80 registers (the plain kernel's 4 x 4 and 8 x 4 use 78; the norm's few more would cost
// a block per SM there)
template <int KS, int U>
__global__ void __launch_bounds__(32 * KS, 65536 / (32 * KS * 80)) mma_int4_norm(MMA_INT4_ARGS) {
  mma_int4_body<KS, U, true>(MMA_INT4_PASS);
}

// Rows [r0, r0 + rows) of W (whole tiles) -> a bf16 [rows, K] matrix in the usual layout: a thread per lane's 16
// bytes of a (tile, group), value s (q - 8) + (8 - z) s as in the kernel above, rounded to bf16.
__global__ void dequant_int4(const uint4* __restrict__ W, const uint2* __restrict__ SZ,
                             __nv_bfloat16* __restrict__ out, int tiles, int K) {
  const int G = K >> 6;
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long)tiles * G * 32) return;
  const int lane = i & 31, g = lane >> 2, t = lane & 3;
  const long tg = i >> 5;  // tile * G + group
  const int tile = tg / G, grp = tg % G;
  const uint4 w = ld_stream(W + i);
  const uint2 sv = SZ[tg * 8 + g];
  const float s[2] = {__uint_as_float(sv.x << 16), __uint_as_float(sv.y << 16)};
  const float zt[2] = {__uint_as_float(sv.x & 0xFFFF0000u), __uint_as_float(sv.y & 0xFFFF0000u)};
#pragma unroll
  for (int wi = 0; wi < 4; ++wi) {
    const uint32_t word = part(w, wi);
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // nibbles j and j + 4: columns c and c + 1 of one row
      const int h = j & 1, c = 16 * wi + 2 * t + 8 * (j >> 1);
      const float a = fmaf((float)((word >> (4 * j)) & 0xF) - 8.f, s[h], zt[h]);
      const float b = fmaf((float)((word >> (4 * j + 16)) & 0xF) - 8.f, s[h], zt[h]);
      *reinterpret_cast<__nv_bfloat162*>(out + (size_t)(tile * 16 + g + 8 * h) * K + grp * 64 + c) =
          __floats2bfloat162_rn(a, b);
    }
  }
}

struct Fusions {
  const float* norm_part;
  int P;
  float eps;
  const __nv_bfloat16* res;
  const __nv_bfloat16* next_w;
  __nv_bfloat16* xn;
  float* part_out;
  bool act;
};

template <int KS, int U>
static void launch(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz, torch::Tensor& y,
                   int M, int N, int K, const Fusions& f, const Rope& rp) {
  dim3 grid(N / 16, (M + 7) / 8);
  auto kernel = f.norm_part ? mma_int4_norm<KS, U> : mma_int4<KS, U>;
  launch_pdl(kernel, grid, dim3(32 * KS), reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()),
      reinterpret_cast<const uint4*>(w.data_ptr()), reinterpret_cast<const uint2*>(sz.data_ptr()),
      reinterpret_cast<__nv_bfloat16*>(y.data_ptr()), M, N, K, f.norm_part, f.P, f.eps, f.res, f.next_w, f.xn,
      f.part_out, f.act, rp);
}

static void dispatch(int64_t ks, int64_t u, const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz,
                     torch::Tensor& y, int M, int N, int K, const Fusions& f, const Rope& rp) {
  switch (ks * 10 + u) {
    case 24: launch<2, 4>(x, w, sz, y, M, N, K, f, rp); break;
    case 44: launch<4, 4>(x, w, sz, y, M, N, K, f, rp); break;
    case 84: launch<8, 4>(x, w, sz, y, M, N, K, f, rp); break;
    case 42: launch<4, 2>(x, w, sz, y, M, N, K, f, rp); break;
    case 82: launch<8, 2>(x, w, sz, y, M, N, K, f, rp); break;
    case 162: launch<16, 2>(x, w, sz, y, M, N, K, f, rp); break;
    case 164: launch<16, 4>(x, w, sz, y, M, N, K, f, rp); break;
    default: TORCH_CHECK(false, "no such configuration");
  }
}

static void check_x(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 2 &&
              x.size(1) == w.size(1) * 8, "x: contiguous bf16 [M, K]");
  TORCH_CHECK(w.scalar_type() == at::kInt && w.is_contiguous() && sz.scalar_type() == at::kBFloat16 &&
              sz.is_contiguous(), "words int32 and sz bf16, contiguous");
  TORCH_CHECK(w.size(1) * 8 % 64 == 0 && w.size(0) % 16 == 0, "K must be a multiple of 64 and N of 16");
}

static void check(const torch::Tensor& t, at::ScalarType dtype, int64_t numel, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == dtype && t.is_contiguous() && t.numel() == numel,
              what, ": contiguous, ", numel, " elements of ", dtype);
}

// the RMSNorm fusion: norm_part [K / 16, M] fp32 partial sums of squares of the input (see mma_int4_body)
static void add_norm(Fusions& f, const c10::optional<torch::Tensor>& norm_part, int K, int M) {
  if (!norm_part.has_value()) return;
  TORCH_CHECK(norm_part->dim() == 2 && norm_part->size(1) == M && norm_part->size(0) * 16 == K,
              "norm_part: [K / 16, M]");
  check(*norm_part, at::kFloat, (int64_t)K / 16 * M, "norm_part");
  f.norm_part = norm_part->data_ptr<float>();
  f.P = K / 16;
}

// x [M, K] @ W.T. chunk_rows > 0: rows of W are dequantized chunk_rows at a time into a bf16 buffer that a cuBLAS
// matmul reads (tensor cores at full width; the buffer is small enough to stay in L2); 0: mma_int4 with launch
// shape (ks, u) (the weights read once per 8 tokens).
// The decode kernel only (chunk_rows == 0) takes the fusions of mma_int4: norm_part (+ eps), residual (+ next_w),
// act. Returns {y}, or {y, xn, part} with next_w.
std::vector<torch::Tensor> mm(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t ks, int64_t u,
    int64_t chunk_rows, c10::optional<torch::Tensor> norm_part, double eps, c10::optional<torch::Tensor> residual,
    c10::optional<torch::Tensor> next_w, bool act) {
  check_x(x, w, sz);
  const int M = x.size(0), N = w.size(0), K = w.size(1) * 8;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (chunk_rows > 0) {
    TORCH_CHECK(!norm_part.has_value() && !residual.has_value() && !next_w.has_value() && !act,
                "the fusions are for the decode kernel");
    auto y = torch::empty({M, N}, x.options());
    const int rows = (int)std::min<int64_t>(chunk_rows / 16 * 16, N);
    TORCH_CHECK(rows > 0, "chunk_rows must hold a tile of 16 rows");
    auto buf = torch::empty({rows, K}, x.options());
    cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // on this stream, with PyTorch's workspace
    const float one = 1.f, zero = 0.f;
    auto* yp = reinterpret_cast<__nv_bfloat16*>(y.data_ptr());
    for (int r0 = 0; r0 < N; r0 += rows) {
      const int n = std::min(rows, N - r0);
      const long threads = (long)(n / 16) * (K / 64) * 32;
      dequant_int4<<<(threads + 255) / 256, 256, 0, stream>>>(
          reinterpret_cast<const uint4*>(w.data_ptr()) + (size_t)r0 * (K >> 5),
          reinterpret_cast<const uint2*>(sz.data_ptr()) + (size_t)r0 * (K >> 6) / 2,
          reinterpret_cast<__nv_bfloat16*>(buf.data_ptr()), n / 16, K);
      // columns r0 .. r0 + n of y [M, N] (row-major) = x [M, K] @ buf[:n].T; cuBLAS is column-major: y.T's rows
      // r0.. (leading dimension N) = buf[:n] (K x n, transposed) times x.T (K x M). cuBLAS directly, not
      // at::mm: a prompt makes hundreds of these calls and waits on their host time, not on the GPU's.
      const cublasStatus_t st = cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, M, K, &one, buf.data_ptr(),
          CUDA_R_16BF, K, x.data_ptr(), CUDA_R_16BF, K, &zero, yp + r0, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F,
          CUBLAS_GEMM_DEFAULT);
      TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS, "cublasGemmEx failed with status ", (int)st);
    }
    return {y};
  }
  Fusions f{nullptr, 0, (float)eps, nullptr, nullptr, nullptr, nullptr, act};
  add_norm(f, norm_part, K, M);
  if (residual.has_value()) {
    check(*residual, at::kBFloat16, (int64_t)M * N, "residual");
    f.res = reinterpret_cast<const __nv_bfloat16*>(residual->data_ptr());
  }
  TORCH_CHECK(!(act && residual.has_value()), "act and residual do not go together");
  TORCH_CHECK(!next_w.has_value() || residual.has_value(), "next_w goes with residual");
  auto y = torch::empty({M, act ? N / 2 : N}, x.options());
  std::vector<torch::Tensor> out{y};
  if (next_w.has_value()) {
    check(*next_w, at::kBFloat16, N, "next_w");
    f.next_w = reinterpret_cast<const __nv_bfloat16*>(next_w->data_ptr());
    auto xn = torch::empty({M, N}, x.options());
    auto part = torch::empty({N / 16, M}, x.options().dtype(at::kFloat));
    f.xn = reinterpret_cast<__nv_bfloat16*>(xn.data_ptr());
    f.part_out = part.data_ptr<float>();
    out.push_back(xn);
    out.push_back(part);
  }
  dispatch(ks, u, x, w, sz, y, M, N, K, f, Rope{});
  return out;
}

// A q+k+v GEMV with RoPE folded in (struct Rope): returns q rotated [M, q_rows]; writes k rotated and v into the
// cache layers k_cache, v_cache [1, Hkv, positions, hd] at position pos + token. norm_part as in mm.
torch::Tensor mm_rope(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t ks, int64_t u,
    c10::optional<torch::Tensor> norm_part, double eps, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
    torch::Tensor v_cache, torch::Tensor pos, int64_t q_rows, int64_t hd) {
  check_x(x, w, sz);
  const int M = x.size(0), N = w.size(0), K = w.size(1) * 8;
  const int kv_rows = (N - (int)q_rows) / 2;
  TORCH_CHECK(hd % 16 == 0 && hd > 0 && q_rows % hd == 0 && kv_rows % hd == 0 && q_rows + 2 * kv_rows == N,
              "rows: q_rows + 2 * kv_rows, whole heads of a multiple of 16 features");
  check(cos, at::kBFloat16, (int64_t)M * hd, "cos");
  check(sin, at::kBFloat16, (int64_t)M * hd, "sin");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == 1 && k_cache.size(1) * hd == kv_rows && k_cache.size(3) == hd,
              "k_cache: [1, Hkv, positions, hd]");
  check(k_cache, at::kBFloat16, k_cache.numel(), "k_cache");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache: as k_cache");
  check(v_cache, at::kBFloat16, k_cache.numel(), "v_cache");
  check(pos, at::kLong, 1, "pos");
  Fusions f{nullptr, 0, (float)eps, nullptr, nullptr, nullptr, nullptr, false};
  add_norm(f, norm_part, K, M);
  Rope rp{reinterpret_cast<const __nv_bfloat16*>(cos.data_ptr()),
          reinterpret_cast<const __nv_bfloat16*>(sin.data_ptr()),
          reinterpret_cast<__nv_bfloat16*>(k_cache.data_ptr()), reinterpret_cast<__nv_bfloat16*>(v_cache.data_ptr()),
          pos.data_ptr<int64_t>(), (int)q_rows, kv_rows, (int)hd, (long)(k_cache.size(2) * hd)};
  auto y = torch::empty({M, q_rows}, x.options());
  dispatch(ks, u, x, w, sz, y, M, N, K, f, rp);
  return y;
}
"""

_CPP = ("std::vector<torch::Tensor> mm(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t ks, int64_t u, "
        "int64_t chunk_rows, c10::optional<torch::Tensor> norm_part, double eps, "
        "c10::optional<torch::Tensor> residual, c10::optional<torch::Tensor> next_w, bool act);"
        "torch::Tensor mm_rope(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t ks, int64_t u, "
        "c10::optional<torch::Tensor> norm_part, double eps, torch::Tensor cos, torch::Tensor sin, "
        "torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor pos, int64_t q_rows, int64_t hd);")


@functools.lru_cache(maxsize=1)
def _ext():
    """The compiled extension, or the reason it cannot be built here (a string)."""
    return cuda_ext.build("quantscope_int4_mma", _CPP, _SRC, ["mm", "mm_rope"], "the int4 kernel",
                          ldflags=("-lcublas",))


def available() -> Optional[str]:
    """None when the kernel is built (or builds now) on this machine, else why not."""
    e = _ext()
    return e if isinstance(e, str) else None


def why_not(n: int, k: int, group_size: int) -> Optional[str]:
    """None when an N x K layer with this group size can use the kernel, else the reason."""
    if group_size != GROUP:
        return f"our int4 kernel takes group size {GROUP}, not {group_size}"
    if n % TILE:
        return f"our int4 kernel needs a multiple of {TILE} output features, not {n}"
    if k % GROUP:
        return f"our int4 kernel needs a multiple of {GROUP} input features, not {k}"
    return available()


PACK_ROWS = 1024  # rows packed at a time (a multiple of TILE): the int32 temporaries stay small (16 MB at K = 4,096)


def pack(q: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Codes [N, K] (0..15) -> words int32 [N, K/8] in the kernel's layout (module docstring), written into
    ``out`` (rows of a stacked layer) when given. Packed ``PACK_ROWS`` rows at a time: a loading model's
    temporaries stay small, so the caching allocator is not left holding large blocks between the weights."""
    n, k = q.shape
    if out is None:
        out = torch.empty((n, k // 8), dtype=torch.int32, device=q.device)
    for r in range(0, n, PACK_ROWS):
        rows = min(PACK_ROWS, n - r)
        # [tile, row / 8, g, group, i, feature / 8 within 16, t, feature % 2]
        c = q[r:r + rows].to(torch.int32).reshape(rows // TILE, 2, 8, k // GROUP, 4, 2, 4, 2)
        # -> [tile, group, g, t, i, nibble]; nibble j = 4 (feature % 2) + 2 (feature / 8 within 16) + row / 8
        c = c.permute(0, 3, 2, 6, 4, 7, 5, 1).reshape(rows // TILE, k // GROUP, 8, 4, 4, 8)
        words = c[..., 0].clone()
        for j in range(1, 8):
            words |= c[..., j] << (4 * j)  # bit 31 may be set: int32 wraps, the bits are what counts
        out[r:r + rows] = words.reshape(rows, k // 8)
    return out


def unpack(words: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack`: [N, K/8] int32 -> [N, K] uint8 codes."""
    n, kw = words.shape
    k = kw * 8
    shifts = (4 * torch.arange(8, device=words.device, dtype=torch.int32))
    c = (words.reshape(n // TILE, k // GROUP, 8, 4, 4, 1) >> shifts) & 0xF  # [tile, group, g, t, i, nibble]
    c = c.reshape(n // TILE, k // GROUP, 8, 4, 4, 2, 2, 2)  # nibble -> (feature % 2, feature / 8, row / 8)
    return c.permute(0, 7, 2, 1, 4, 6, 3, 5).reshape(n, k).to(torch.uint8)


def pack_sz(s: torch.Tensor, z: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """HQQ's scales and zeros [N, K/64] -> bf16 [N, K/64, 2] holding (s, (8 - z) * s) in the kernel's order (per
    tile and group, rows g and g + 8 together), computed in fp32 (tinygemm's zero term: half the rounding error
    of storing ``-z * s``, as the codes' midpoint 8 is taken out exactly); written into ``out`` when given."""
    s, z = s.float(), z.float()
    n, g = s.shape
    sz = torch.stack([s, (8 - z) * s], dim=-1).to(torch.bfloat16)  # [N, G, 2]
    sz = sz.reshape(n // TILE, 2, 8, g, 2).permute(0, 3, 2, 1, 4).reshape(n, g, 2)
    if out is None:
        return sz.contiguous()
    out.copy_(sz)
    return out


def unpack_sz(sz: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_sz`'s reordering: [N, G, 2] in row and group order."""
    n, g, _ = sz.shape
    return sz.reshape(n // TILE, g, 8, 2, 2).permute(0, 3, 2, 1, 4).reshape(n, g, 2)


def dequantize(words: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """The weight [N, K] in bf16 as the kernel sees it: ``s * (q - 8) + (8 - z) s`` per group."""
    q = unpack(words).float()
    n, k = q.shape
    szf = unpack_sz(sz).float()
    w = (q.reshape(n, k // GROUP, GROUP) - 8) * szf[..., :1] + szf[..., 1:]
    return w.reshape(n, k).to(torch.bfloat16)


def chunk_rows(m: int, k: int) -> int:
    """How a prompt of ``m`` tokens is multiplied by an N x ``k`` layer: 0 -> ``mma_int4`` (the weights read once
    per 8 tokens); else this many rows at a time are dequantized into a bf16 buffer of at most
    :data:`DEQUANT_BYTES` that a cuBLAS matmul reads (tensor cores; the buffer stays in L2)."""
    if m < DEQUANT_MIN_TOKENS:
        return 0
    return max(64, DEQUANT_BYTES // (2 * k) // 64 * 64)


def mm(x2: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, warps: int, loads: int, norm_part=None,
       eps: float = 0.0, residual=None, next_w=None, act: bool = False):
    """``x2 @ W.T`` for a few tokens x2 [M, K] bf16 on CUDA with the compiled kernel (a configuration of
    :data:`CONFIGS`), with the fusions of :func:`_mm`."""
    out = _ext().mm(x2, words, sz, warps, loads, 0, norm_part, eps, residual, next_w, act)
    return out[0] if next_w is None else tuple(out)


def pick_config(n: int, k: int, device=None, reps: int = 50, timings: Optional[dict] = None,
                rotate_bytes: int = 96 << 20, mode: str = "") -> tuple[int, int]:
    """The fastest of :data:`CONFIGS` for an N x K layer on this GPU, timed on random codes in a CUDA graph
    (``timings``, if given, receives seconds per call for each configuration), with the fusions ``mode`` names
    (:data:`MODES`). The graph cycles through copies of the weights adding up to ``rotate_bytes`` (more than the L2
    cache), as a model's layers do: a small matrix timed alone would be served from L2 and favour the wrong
    configuration."""
    dev = torch.device(device or "cuda")
    fusions = _mode_args(mode, n, k, dev)
    one = n * k // 2 + n * (k // GROUP) * 4
    copies = max(1, min(32, -(-rotate_bytes // one)))
    ws = [torch.randint(-2 ** 31, 2 ** 31 - 1, (n, k // 8), dtype=torch.int32, device=dev) for _ in range(copies)]
    szs = [(torch.rand((n, k // GROUP, 2), device=dev) * 0.01).to(torch.bfloat16) for _ in range(copies)]
    x = torch.randn((1, k), device=dev, dtype=torch.bfloat16)
    calls = max(reps, copies)
    best, best_t = CONFIGS[0], float("inf")
    for cfg in CONFIGS:
        s = torch.cuda.Stream(dev)
        s.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(s):
            for i in range(copies):
                mm(x, ws[i], szs[i], *cfg, **fusions)
        torch.cuda.current_stream(dev).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        # thread_local: on a shared server another thread may be decoding on this GPU while a model loads
        with torch.cuda.graph(g, stream=s, capture_error_mode="thread_local"):
            for i in range(calls):
                mm(x, ws[i % copies], szs[i % copies], *cfg, **fusions)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        t = a.elapsed_time(b) / 1e3 / calls
        if timings is not None:
            timings[cfg] = t
        if t < best_t:
            best, best_t = cfg, t
        del g
    del ws, szs, x
    torch.cuda.empty_cache()
    return best


# What a layer's kernel call folds in (GemvInt4Linear.mode; engine/backends/int4_fusion.py): "" nothing; "norm": the
# RMSNorm of its input (the input comes multiplied by the norm's weight, with its partial sums of squares);
# "residual": the add of the residual stream to its output, and the next norm's input (x * weight, partial sums);
# "act": SiLU(gate) * up of interleaved gate/up rows.
MODES = ("", "norm", "residual", "act", "norm+act")


def _mode_args(mode: str, n: int, k: int, device) -> dict:
    """Random stand-ins for a ``mode``'s extra inputs (for timing it)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
    out = {}
    if "norm" in mode:
        out.update(norm_part=torch.rand((k // 16, 1), device=device), eps=1e-5)
    if mode == "residual":
        out.update(residual=torch.randn((1, n), device=device).to(torch.bfloat16),
                   next_w=torch.rand(n, device=device).to(torch.bfloat16))
    if "act" in mode:
        out["act"] = True
    return out


def squares(h: torch.Tensor) -> torch.Tensor:
    """h [M, N] -> [N / 16, M] fp32: each token's sum of squares per slice of 16 features (what the kernel writes
    with the next norm's input; the norm adds them up)."""
    return h.float().pow(2).unflatten(-1, (-1, 16)).sum(-1).T.contiguous()


def norm_input(h: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An RMSNorm's input as a fused GEMV takes it (mode "norm"): (h * weight in bf16, :func:`squares` of h)."""
    h2 = h.reshape(-1, h.shape[-1])
    return (h2 * weight).reshape(h.shape), squares(h2)


def rms_scale(norm_part: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """Each token's RMSNorm factor [M, 1] from the partial sums of squares [K / 16, M]."""
    return torch.rsqrt(norm_part.sum(0) / k + eps)[:, None]


def silu_mul(y: torch.Tensor) -> torch.Tensor:
    """[M, 2n] with gate and up rows interleaved 8 by 8 (:func:`gate_up_from_codes`) -> SiLU(gate) * up [M, n],
    rounded as the separate ops round. Computed in place in ``y``'s gate half, so a prompt holds no more than
    the plain MLP does (gate and up outputs, then the product)."""
    v = y.unflatten(-1, (-1, 2, 8))
    gate = torch.nn.functional.silu(v[..., 0, :], inplace=True)
    return gate.mul_(v[..., 1, :]).flatten(-2)


def _aligned(x2: torch.Tensor) -> torch.Tensor:
    """``x2``, copied when not 16-byte aligned (the kernels read the input 4 bytes at a time, cuBLAS prefers 16)."""
    return x2.clone() if x2.data_ptr() % 16 else x2


def _mm(x2: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, warps: int, loads: int, norm_part=None,
        eps: float = 0.0, residual=None, next_w=None, act: bool = False):
    """``x2 @ W.T`` for x2 [M, K] bf16 contiguous: a few tokens -> ``mma_int4``, a long prompt -> cuBLAS on
    dequantized rows. Folded in (the decode kernel does it in one launch; a prompt with PyTorch's ops around
    cuBLAS): ``norm_part`` [K / 16, M] (+ ``eps``): x2 is an RMSNorm's input times its weight, these its partial
    sums of squares (:func:`norm_input`), the product is normalized; ``residual`` [M, N]: added to the product,
    and with ``next_w`` the result's :func:`norm_input` for the norm with that weight is returned too:
    (y, y * next_w, squares); ``act``: SiLU(gate) * up of interleaved gate/up rows, [M, N / 2]."""
    x2 = _aligned(x2)
    rows = chunk_rows(x2.shape[0], x2.shape[1])
    if not rows:
        return mm(x2, words, sz, warps, loads, norm_part, eps, residual, next_w, act)
    if norm_part is not None:
        x2 = (x2.float() * rms_scale(norm_part, x2.shape[1], eps)).to(x2.dtype)
    y = _ext().mm(x2, words, sz, warps, loads, rows, None, 0.0, None, None, False)[0]
    if act:
        y = silu_mul(y)
    if residual is not None:
        y = residual + y
    return y if next_w is None else (y, *norm_input(y, next_w))


@torch.library.custom_op("quantscope::int4_mma", mutates_args=())
def _int4_mm(x2: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, warps: int, loads: int,
             norm_part: Optional[torch.Tensor], eps: float, residual: Optional[torch.Tensor], act: bool) -> torch.Tensor:
    return _mm(x2, words, sz, warps, loads, norm_part, eps, residual, None, act)


@_int4_mm.register_fake
def _(x2, words, sz, warps, loads, norm_part, eps, residual, act):
    n = words.shape[0]
    return x2.new_empty((x2.shape[0], n // 2 if act else n))


@torch.library.custom_op("quantscope::int4_mma_next", mutates_args=())
def _int4_mm_next(x2: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, warps: int, loads: int,
                  residual: torch.Tensor, next_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _mm(x2, words, sz, warps, loads, None, 0.0, residual, next_w, False)


@_int4_mm_next.register_fake
def _(x2, words, sz, warps, loads, residual, next_w):
    m, n = x2.shape[0], words.shape[0]
    return x2.new_empty((m, n)), x2.new_empty((m, n)), x2.new_empty((n // 16, m), dtype=torch.float32)


@torch.library.custom_op("quantscope::int4_qkv_rope", mutates_args=("k_cache", "v_cache"))
def _int4_qkv_rope(x2: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, warps: int, loads: int,
                   norm_part: Optional[torch.Tensor], eps: float, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor, q_rows: int,
                   head_dim: int) -> torch.Tensor:
    return _ext().mm_rope(_aligned(x2), words, sz, warps, loads, norm_part, eps, cos.contiguous(), sin.contiguous(),
                          k_cache, v_cache, position, q_rows, head_dim)


@_int4_qkv_rope.register_fake
def _(x2, words, sz, warps, loads, norm_part, eps, cos, sin, k_cache, v_cache, position, q_rows, head_dim):
    return x2.new_empty((x2.shape[0], q_rows))


def rope_order(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows (dim 0) of a q or k projection, whole heads, in the order the RoPE fold stores them: per head, tile t of 16
    rows holds features 8t..8t+7 and their RoPE partners head_dim/2 + 8t..: [head, half, t, 8] -> [head, t, half, 8]."""
    return t.unflatten(0, (-1, 2, head_dim // 16, 8)).transpose(1, 2).flatten(0, 3)


def rope_unorder(y: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of :func:`rope_order` on the last dimension of an output (features back in the heads' order)."""
    return y.unflatten(-1, (-1, head_dim // 16, 2, 8)).transpose(-3, -2).flatten(-4)


def qkv_rope(fused: "_Fused", x, cos, sin, k_cache, v_cache, position):
    """One decode step's q, k, v from a stacked q+k+v GEMV stored for the RoPE fold (``fused.rope``), its RMSNorm
    folded in (``put`` "norm"): returns q rotated [..., q_rows] and writes k rotated and v into the static cache
    layers ``k_cache``, ``v_cache`` [1, Hkv, positions, head_dim] at ``position`` (a one-element int64 tensor on the
    GPU) + token. What transformers' attention does with the three outputs, RoPE and ``cache.update``, in the one
    kernel call (no bias)."""
    head_dim, q_rows = fused.rope
    lin = fused.linear
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
    part, eps = get(fused, "norm") or (None, 0.0)
    op = torch.ops.quantscope.int4_qkv_rope if torch.compiler.is_compiling() else _int4_qkv_rope
    q = op(x2, lin.words, lin.sz, *lin.config, part, float(eps), cos.reshape(-1, head_dim),
           sin.reshape(-1, head_dim), k_cache, v_cache, position, q_rows, head_dim)
    return q.reshape(*shape[:-1], q_rows)


def _apply(x, words, sz, bias, config, norm=None, residual=None, next_w=None, act: bool = False):
    """``x @ W.T + b`` for W = (words, sz) in this kernel's layout, any leading dimensions of ``x``; ``norm``
    (partial sums, eps), ``residual``, ``next_w`` and ``act`` as in :func:`_mm` (no bias with ``residual`` or
    ``act``). Returns y, or (y, xn, partial sums) with ``next_w``."""
    if bias is not None and (residual is not None or act):
        raise ValueError("a bias goes before the residual add and the activation: not fused")
    if next_w is not None and residual is None:
        raise ValueError("next_w goes with residual")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
    part, eps = norm if norm is not None else (None, 0.0)
    if residual is not None:
        residual = residual.reshape(-1, residual.shape[-1]).contiguous()
    # the custom ops are for torch.compile (the decode step); called eagerly (a prompt), their wrappers' host time
    # would add up over the hundreds of calls of a prefill
    compiling = torch.compiler.is_compiling()
    if next_w is not None:
        op = torch.ops.quantscope.int4_mma_next if compiling else _mm
        y, xn, sq = op(x2, words, sz, *config, residual=residual, next_w=next_w)
        return y.reshape(*shape[:-1], y.shape[-1]), xn.reshape(*shape[:-1], y.shape[-1]), sq
    op = torch.ops.quantscope.int4_mma if compiling else _mm
    y = op(x2, words, sz, *config, norm_part=part, eps=float(eps), residual=residual, act=act)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], y.shape[-1])


class GemvInt4Linear(torch.nn.Module):
    """``y = x @ W.T + b`` with W in this kernel's layout (a few tokens: ``mma_int4``, 8 tokens per block; a long
    prompt: cuBLAS on dequantized rows). ``mode`` (:data:`MODES`) is what its calls fold in; the launch
    configuration was timed for it (:meth:`set_mode`)."""

    def __init__(self, words, sz, in_features: int, bias, config: tuple[int, int], mode: str = ""):
        super().__init__()
        self.in_features = in_features
        self.group_size = GROUP
        self.register_buffer("words", words)
        self.register_buffer("sz", sz)
        self.bias = bias
        self.config = tuple(config)
        self.mode = mode

    def set_mode(self, mode: str) -> None:
        """Fold ``mode``'s work into this layer's calls, with the launch configuration fastest for it."""
        n, k = int(self.words.shape[0]), self.in_features
        self.config, self.mode = _config(n, k, self.words.device, mode), mode

    @property
    def out_features(self) -> int:
        """Output features: the stored rows, half of them with "act" (gate and up rows give one product)."""
        return int(self.words.shape[0]) // (2 if "act" in self.mode else 1)

    def forward(self, x, norm=None, residual=None, next_w=None):
        """``norm`` (partial sums, eps), ``residual``, ``next_w``: see :func:`_mm`."""
        return _apply(x, self.words, self.sz, self.bias, self.config, norm, residual, next_w, "act" in self.mode)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={GROUP}, "
                f"kernel=QuantScope int4 GEMV (tensor cores; warps, groups loaded together: {self.config}"
                + (f"; folds in: {self.mode}" if self.mode else "") + ")")


_PICKED: dict = {}


def from_codes(q, s, z, bias=None, config: Optional[tuple[int, int]] = None) -> GemvInt4Linear:
    """A :class:`GemvInt4Linear` from codes ``q`` [N, K] (0..15) and HQQ's scales and zeros [N, K/64]; the
    launch configuration is timed once per shape and device in this process (:func:`pick_config`)."""
    n, k = q.shape
    return GemvInt4Linear(pack(q), pack_sz(s, z), k, bias, config or _config(n, k, q.device))


def _config(n: int, k: int, device, mode: str = "") -> tuple[int, int]:
    key = (n, k, str(device), mode)
    if key not in _PICKED:
        _PICKED[key] = pick_config(n, k, device, mode=mode)
    return _PICKED[key]


def interleave8(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of ``a`` and ``b`` (same shape [n, ...], n a multiple of 8) taken 8 by 8: a0..a7, b0..b7, a8.."""
    return torch.stack([a.unflatten(0, (-1, 8)), b.unflatten(0, (-1, 8))], dim=1).flatten(0, 2)


def gate_up_from_codes(gate, up, config: Optional[tuple[int, int]] = None) -> GemvInt4Linear:
    """One :class:`GemvInt4Linear` in mode "act" for a gated MLP's gate and up projections (each (codes [I, K],
    scales, zeros, bias None)): their rows interleaved 8 by 8, so each 16-row tile holds 8 gate rows and the
    matching 8 up rows and the kernel writes SiLU(gate) * up [M, I] itself. Packed ``PACK_ROWS`` rows at a time."""
    (qg, sg, zg, bg), (qu, su, zu, bu) = gate, up
    if bg is not None or bu is not None:
        raise ValueError("a gated MLP with biases is not fused")
    i, k = qg.shape
    if qu.shape != qg.shape or i % 8:
        raise ValueError(f"gate and up must have the same shape, a multiple of 8 rows ({tuple(qg.shape)}, "
                         f"{tuple(qu.shape)})")
    words = torch.empty((2 * i, k // 8), dtype=torch.int32, device=qg.device)
    half = PACK_ROWS // 2
    for r in range(0, i, half):
        pack(interleave8(qg[r:r + half], qu[r:r + half]), out=words[2 * r:2 * r + 2 * min(half, i - r)])
    sz = pack_sz(interleave8(sg, su), interleave8(zg, zu))
    return GemvInt4Linear(words, sz, k, None, config or _config(2 * i, k, qg.device, "act"), mode="act")


_CALL = threading.local()


def put(module, name: str, value) -> None:
    """Hand ``value`` to ``module`` for the call in progress (int4_fusion's layers to their projections). Inside
    torch.compile a module attribute (the compiled step runs in one thread; the compiler traces attributes);
    otherwise this thread's own slot: two eager runs of one model may run at once (a run that finds the fast
    runner busy takes the plain path), and neither may see the other's inputs."""
    if torch.compiler.is_compiling():
        setattr(module, name, value)
    else:
        _CALL.__dict__[(id(module), name)] = value


def get(module, name: str):
    """What :func:`put` handed ``module`` under ``name`` for this call (None if nothing)."""
    if torch.compiler.is_compiling():
        return getattr(module, name, None)
    return _CALL.__dict__.get((id(module), name))


def take(module, name: str):
    """:func:`get`, and the slot emptied."""
    value = get(module, name)
    put(module, name, None)
    return value


# Sibling projections that read the same input, in the order transformers' modules call them.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Fused(torch.nn.Module):
    """One :class:`GemvInt4Linear` for several sibling projections (rows stacked): the first sibling's call
    computes all of them, the others take their slice of that result when called with the same input."""

    def __init__(self, linear: GemvInt4Linear, sizes: list[int], rope: Optional[tuple[int, int]] = None):
        super().__init__()
        self.linear, self.sizes = linear, sizes
        # (head_dim, q rows): q/k rows stored for the RoPE fold (rope_order; the first two siblings), else None
        self.rope = rope
        self.norm = None  # (partial sums, eps) of an RMSNorm folded in: handed over per call (put/get "norm")
        self.stacked = None  # (input, every sibling's output) between the siblings' calls (put/get "stacked")

    def part(self, i: int, x):
        # A prompt multiplied on dequantized row chunks (chunk_rows > 0) computes each sibling's rows on its own:
        # stacking saves nothing there, and the stacked output would keep every sibling's result alive until the
        # last one is used (gate/up: 4 intermediate rows per token at the MLP's peak instead of the plain path's 3).
        # The stacked result goes from call to call through put/get, like the norm: two eager runs of one model
        # may run at once, and neither may take the other's rows.
        if i == 0 and not chunk_rows(x.numel() // x.shape[-1], x.shape[-1]):
            parts = self.linear(x, get(self, "norm")).split(self.sizes, dim=-1)
            put(self, "stacked", (x, tuple(self._in_heads_order(j, p) for j, p in enumerate(parts))))
        stacked = get(self, "stacked")
        if stacked is None or stacked[0] is not x:  # a prompt, or called alone or out of order: this part's rows
            rows = slice(sum(self.sizes[:i]), sum(self.sizes[:i + 1]))
            lin = self.linear
            return self._in_heads_order(i, _apply(x, lin.words[rows], lin.sz[rows],
                                                  None if lin.bias is None else lin.bias[rows], lin.config,
                                                  get(self, "norm")))
        if i == len(self.sizes) - 1:  # the last sibling: let go of the input and the stacked output
            put(self, "stacked", None)
        return stacked[1][i]

    def _in_heads_order(self, i: int, y):
        """Sibling ``i``'s output with its features in the heads' order (q and k rows stored for the RoPE fold are
        not)."""
        return rope_unorder(y, self.rope[0]) if self.rope and i < 2 else y


class _Part(torch.nn.Module):
    """Stands in for one sibling projection of a :class:`_Fused` group (holds no weights of its own)."""

    def __init__(self, fused: _Fused, index: int, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.index = index
        self.__dict__["fused"] = fused  # not a submodule: the parent module owns it (once)

    def forward(self, x):
        return self.fused.part(self.index, x)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, part {self.index} of a fused GEMV"


def rope_fits(sizes: list[int], head_dim: int) -> bool:
    """Whether q, k, v of ``sizes`` rows can be stored for the RoPE fold: whole heads of ``head_dim`` features, a
    multiple of 16, as many k rows as v rows."""
    return (len(sizes) == 3 and sizes[1] == sizes[2] and not any(n % head_dim for n in sizes)
            and head_dim % 16 == 0)


def fuse_codes(parent, names, sizes: list[int], parts, rope_head_dim: Optional[int] = None) -> _Fused:
    """Replace the sibling projections ``names`` of ``parent`` (e.g. q/k/v) by one stacked GEMV: ``parts``
    yields each sibling's (codes [n_i, K], scales, zeros, bias or None), n_i = ``sizes[i]``, in order; each is
    packed straight into its rows of the stacked weights (allocated first, so no per-sibling copy is made and
    freed between a loading model's weights). Each name then holds a :class:`_Part`; returns the group.
    ``rope_head_dim``: q, k, v without biases whose q and k rows are stored for the RoPE fold (:func:`rope_order`,
    :func:`qkv_rope`); the siblings' outputs stay in the heads' order."""
    if rope_head_dim and not rope_fits(sizes, rope_head_dim):
        raise ValueError(f"the RoPE fold takes q, k, v of whole heads of a multiple of 16 features, not {sizes} "
                         f"rows with heads of {rope_head_dim}")
    words = sz = None
    biases, r0 = [], 0
    for i, (size, (q, s, z, bias)) in enumerate(zip(sizes, parts)):
        if rope_head_dim and i < 2:
            q, s, z = (rope_order(t, rope_head_dim) for t in (q, s, z))
        k = int(q.shape[1])
        if words is None:
            words = torch.empty((sum(sizes), k // 8), dtype=torch.int32, device=q.device)
            sz = torch.empty((sum(sizes), k // GROUP, 2), dtype=torch.bfloat16, device=q.device)
        pack(q, out=words[r0:r0 + size])
        pack_sz(s, z, out=sz[r0:r0 + size])
        biases.append(bias)
        r0 += size
        del q, s, z
    if any(b is not None for b in biases) and not all(b is not None for b in biases):
        raise ValueError("siblings must all have a bias or none")
    bias = None
    if biases[0] is not None:
        if rope_head_dim:
            raise ValueError("the RoPE fold takes q, k, v without biases")
        bias = torch.nn.Parameter(torch.cat([b.data for b in biases]), requires_grad=False)
    n = int(words.shape[0])
    fused = _Fused(GemvInt4Linear(words, sz, k, bias, _config(n, k, words.device)), list(sizes),
                   (rope_head_dim, sizes[0]) if rope_head_dim else None)
    setattr(parent, "fused_" + "_".join(nm.split("_")[0] for nm in names), fused)
    for i, (nm, size) in enumerate(zip(names, sizes)):
        setattr(parent, nm, _Part(fused, i, k, size))
    return fused
