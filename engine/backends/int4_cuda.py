"""A 4-bit GEMV of our own for one token at a time on CUDA (the decode step of ``hqq4-fast``).

At batch 1 every weight is read once per token, so the matmul's speed is the rate at which it streams the 4-bit
codes. PyTorch's int4 kernel (tinygemm) reads them at 32-44% of the copy bandwidth on an H200 at Llama-8B's layer
shapes (docs/benchmarks.md); this kernel is written for that one case.

Layout (built from HQQ's codes by :func:`pack`, same bytes as HQQ's: two codes per byte, one bf16 scale and one
bf16 zero term per group of 64 input features):

- ``words`` int32 [N, K/8]: word ``w`` of a row holds features ``8w .. 8w+7``, feature ``8w+i`` in bits
  ``4i .. 4i+3``. Within each block of 1,024 features (128 words), the words are stored transposed, [4][32] ->
  [32][4], so that lane ``t`` of a warp loads its four words in one 16-byte load and they hold features
  ``256j + 8t .. +7`` (j = 0..3): the 32 lanes then read the input in four contiguous 512-byte runs.
- ``sz`` bf16 [N, K/64, 2]: per group, HQQ's scale ``s`` and ``(8 - z) * s`` (tinygemm's zero term); ``w =
  (q - z) * s``, and per 8 features a lane adds ``s * sum(q x) + ((8 - z) s - 8 s) * sum(x)``. Within each
  block of 16 groups the groups are stored [j][g] -> [g][j] (lane ``t`` of a step meets groups ``4j + t/8``),
  so a lane loads its four (scale, zero) pairs in one 16-byte load.

Codes become floats without a conversion instruction: a code at bits ``c .. c+3`` of a word, masked out and read
as an fp32 bit pattern, is exactly ``q * 2**(c - 149)`` (patterns below 2**24 are subnormals or the lowest normal
binade, where value = pattern * 2**-149). Nibbles 0-5 are masked in place, nibbles 6-7 after one shift by 8; the
input is pre-scaled per nibble by ``2**(E - c)`` so products land at ``q * x * 2**(E - 149)``, well inside fp32's
normal range, and the group sum is scaled back with the group's scale. Per code: one AND and one FMA. This needs
subnormals kept (nvcc's default, ``-ftz=false``, passed explicitly).

One token (the decode step): ``gemv_int4<R, KS, PF>``, R rows per block, KS warps splitting a row's K, PF
prefetching the next step's weights; the fastest of :data:`CONFIGS` is timed per layer shape at load
(:func:`pick_config`, on copies of the weights larger than the L2 cache). A prompt of fewer than
:data:`DEQUANT_MIN_TOKENS` tokens: ``gemm_int4``, the same arithmetic applied by each block to 8 tokens at a time
(CUDA cores); a longer one: ``dequant_int4`` writes :data:`DEQUANT_BYTES` of rows at a time as bf16 into a buffer
that ``cublasGemmEx`` multiplies (tensor cores; 512 tokens of an 8B: 32 ms instead of 449 ms).
Sibling projections (q/k/v, gate/up) can be stacked into one call (:func:`fuse_codes`).

Compiled at first use with ``torch.utils.cpp_extension.load_inline`` (needs nvcc and ninja; ~50 s, cached in
``~/.cache/quantscope`` or ``QUANTSCOPE_KERNEL_CACHE``); where either is missing, :func:`why_not` says so and
``hqq4-fast`` keeps tinygemm. Rows of K not a multiple of 1,024 or a group size other than 64 also keep tinygemm.
Measured on an H200 (bench/gpu_int4_kernels.py, docs/benchmarks.md): 38-64% of the copy bandwidth per layer of an
8B model, tinygemm 32-44%; the 8B decodes at 341 tok/s on it (tinygemm: 261-275).
"""
from __future__ import annotations

import functools
import os
import shutil
from typing import Optional

import torch

from ..memory import FAST_INT4_DEQUANT_BYTES

GROUP = 64
BLOCK = 1024  # features per warp step: 32 lanes x 4 words x 8 codes
E = 100  # inputs are pre-scaled by 2^(E - c) per nibble (the CUDA source's constants 0x1p100f .. 0x1p80f)
# prompts of at least this many tokens: dequantize + cuBLAS, chunks of at most this many bytes (chunk_rows)
DEQUANT_MIN_TOKENS = 32
DEQUANT_BYTES = FAST_INT4_DEQUANT_BYTES  # the calculator counts this buffer
# (rows per block, warps per block, prefetch): the launch shapes compiled; the fastest per layer shape is used
CONFIGS = ((4, 2, 0), (4, 2, 1), (8, 2, 0), (8, 2, 1), (4, 4, 0), (8, 1, 1), (2, 4, 1), (4, 1, 1), (8, 4, 0),
           (2, 2, 1))

# Headers and the two load helpers, shared with the tensor-core experiment (bench/gpu_int4_mma.py).
SRC_HEADER = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <stdint.h>

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
"""

_SRC = SRC_HEADER + r"""

__device__ __forceinline__ float dot8(uint32_t w, const float* xf) {
  const uint32_t wh = w >> 8;
  float p = __uint_as_float(w & 0xFu) * xf[0];
  p = fmaf(__uint_as_float(w & 0xF0u), xf[1], p);
  p = fmaf(__uint_as_float(w & 0xF00u), xf[2], p);
  p = fmaf(__uint_as_float(w & 0xF000u), xf[3], p);
  p = fmaf(__uint_as_float(w & 0xF0000u), xf[4], p);
  p = fmaf(__uint_as_float(w & 0xF00000u), xf[5], p);
  p = fmaf(__uint_as_float(wh & 0xF0000u), xf[6], p);
  p = fmaf(__uint_as_float(wh & 0xF00000u), xf[7], p);
  return p;
}

#define BACK 0x1p49f  // 2^(149 - E): scales a group's sum of code x input products back

// Eight bf16 inputs at p (16-byte aligned) -> xf, each pre-scaled by 2^(E - c) for the bit position c of its
// nibble (c = 0,4,..,20, then 16, 20 after the shift); returns their plain sum.
__device__ __forceinline__ float prep_x8(const __nv_bfloat16* p, float* xf) {
  const float kScale[8] = {0x1p100f, 0x1p96f, 0x1p92f, 0x1p88f, 0x1p84f, 0x1p80f, 0x1p84f, 0x1p80f};
  const uint4 xv = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* xb = reinterpret_cast<const __nv_bfloat162*>(&xv);
  float xs = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = __bfloat1622float2(xb[i]);
    xs += v.x + v.y;
    xf[2 * i] = v.x * kScale[2 * i];
    xf[2 * i + 1] = v.y * kScale[2 * i + 1];
  }
  return xs;
}

// R rows per block; KS warps per block split the row's 1,024-feature steps between them; PF: each warp loads its
// next step's weights before working on this one (more bytes in flight per warp, more registers).
template <int R, int KS, bool PF>
__global__ void __launch_bounds__(32 * KS) gemv_int4(const __nv_bfloat16* __restrict__ x,
    const uint4* __restrict__ W, const __nv_bfloat162* __restrict__ SZ, __nv_bfloat16* __restrict__ y,
    int N, int K) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = blockIdx.x * R;
  const int KV = K >> 5, KG = K >> 6, steps = K >> 10;
  // per row: sum over words of s * dot8 (scaled by 2^(E-149)), of s * sum(x), and of (8 - z) s * sum(x)
  float acc[R], accs[R], accz[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = accs[r] = accz[r] = 0.f;
  const uint4* wrow[R];
  const __nv_bfloat162* szrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const size_t row = (size_t)min(row0 + r, N - 1);
    wrow[r] = W + row * KV + lane;
    szrow[r] = SZ + row * KG + (lane >> 3) * 4;
  }
  uint4 nxt[PF ? R : 1];
  if (PF && warp < steps) {
#pragma unroll
    for (int r = 0; r < R; ++r) nxt[PF ? r : 0] = ld_stream(wrow[r] + warp * 32);
  }
  for (int c = warp; c < steps; c += KS) {
    uint4 cur[R], szv[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (PF) {
        cur[r] = nxt[PF ? r : 0];
      } else {
        cur[r] = ld_stream(wrow[r] + c * 32);
      }
    }
    if (PF && c + KS < steps) {
#pragma unroll
      for (int r = 0; r < R; ++r) nxt[PF ? r : 0] = ld_stream(wrow[r] + (c + KS) * 32);
    }
    // this lane's four groups of the step (j = 0..3), one 16-byte load per row; lanes 8g..8g+7 share it
#pragma unroll
    for (int r = 0; r < R; ++r) szv[r] = *reinterpret_cast<const uint4*>(szrow[r] + c * 16);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float xf[8];
      const float xs = prep_x8(x + c * 1024 + j * 256 + lane * 8, xf);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint32_t w = part(cur[r], j), szw = part(szv[r], j);
        const float sx = __uint_as_float(szw << 16), zx = __uint_as_float(szw & 0xFFFF0000u);  // bf16 pair
        acc[r] = fmaf(sx, dot8(w, xf), acc[r]);
        accs[r] = fmaf(sx, xs, accs[r]);
        accz[r] = fmaf(zx, xs, accz[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    acc[r] = fmaf(acc[r], BACK, fmaf(-8.f, accs[r], accz[r]));  // s (q - 8) x + (8 - z) s x = s (q - z) x
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
  }
  if (KS == 1) {
    if (lane == 0) {
#pragma unroll
      for (int r = 0; r < R; ++r) if (row0 + r < N) y[row0 + r] = __float2bfloat16(acc[r]);
    }
    return;
  }
  __shared__ float part[KS][R];
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) part[warp][r] = acc[r];
  }
  __syncthreads();
  if (threadIdx.x < R && row0 + threadIdx.x < N) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < KS; ++k) s += part[k][threadIdx.x];
    y[row0 + threadIdx.x] = __float2bfloat16(s);
  }
}


// A prompt (M > 1 tokens): blocks of R rows x MT tokens (grid y); each warp loads its weights once per step and
// applies them to the MT tokens of its block, so the weights are read ceil(M / MT) times in all.
template <int R, int KS, int MT>
__global__ void __launch_bounds__(32 * KS) gemm_int4(const __nv_bfloat16* __restrict__ x,
    const uint4* __restrict__ W, const __nv_bfloat162* __restrict__ SZ, __nv_bfloat16* __restrict__ y,
    int M, int N, int K) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int row0 = blockIdx.x * R, m0 = blockIdx.y * MT;
  const int KV = K >> 5, KG = K >> 6, steps = K >> 10;
  float acc[MT][R];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
  for (int c = warp; c < steps; c += KS) {
    uint4 cur[R];
    float2 szf[R][4];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const size_t row = (size_t)min(row0 + r, N - 1);
      cur[r] = ld_stream(W + row * KV + c * 32 + lane);
      const uint4 szv = *reinterpret_cast<const uint4*>(SZ + row * KG + c * 16 + (lane >> 3) * 4);
      const __nv_bfloat162* szr = reinterpret_cast<const __nv_bfloat162*>(&szv);
#pragma unroll
      for (int j = 0; j < 4; ++j) szf[r][j] = __bfloat1622float2(szr[j]);
    }
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m0 + m >= M) break;
      const __nv_bfloat16* xm = x + (size_t)(m0 + m) * K;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float xf[8];
        const float xs = prep_x8(xm + c * 1024 + j * 256 + lane * 8, xf);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          acc[m][r] = fmaf(szf[r][j].x * BACK, dot8(part(cur[r], j), xf), acc[m][r]);
          acc[m][r] = fmaf(fmaf(-8.f, szf[r][j].x, szf[r][j].y), xs, acc[m][r]);
        }
      }
    }
  }
  __shared__ float part[KS][MT][R];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) part[warp][m][r] = v;
    }
  __syncthreads();
  for (int i = threadIdx.x; i < MT * R; i += 32 * KS) {
    const int m = i / R, r = i % R;
    if (m0 + m < M && row0 + r < N) {
      float v = 0.f;
#pragma unroll
      for (int k = 0; k < KS; ++k) v += part[k][m][r];
      y[(size_t)(m0 + m) * N + row0 + r] = __float2bfloat16(v);
    }
  }
}

// Rows of W -> a bf16 [rows, K] matrix in the usual layout (feature k of row n at n * K + k): one thread per
// lane's 16 bytes of words (32 features), value s (q - 8) + (8 - z) s as in the kernels above, rounded to bf16.
__global__ void dequant_int4(const uint4* __restrict__ W, const __nv_bfloat162* __restrict__ SZ,
                             __nv_bfloat16* __restrict__ out, int rows, int K) {
  const int KV = K >> 5, KG = K >> 6;
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= (long)rows * KV) return;
  const int row = i / KV, v = i % KV, c = v >> 5, lane = v & 31;
  const uint4 w = ld_stream(W + i);
  const uint4 szv = *reinterpret_cast<const uint4*>(SZ + (size_t)row * KG + c * 16 + (lane >> 3) * 4);
  const __nv_bfloat162* szb = reinterpret_cast<const __nv_bfloat162*>(&szv);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 sz = __bfloat1622float2(szb[j]);
    const uint32_t word = part(w, j);
    __nv_bfloat162 o[4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
      o[k] = __floats2bfloat162_rn(fmaf((float)((word >> (8 * k)) & 0xF) - 8.f, sz.x, sz.y),
                                   fmaf((float)((word >> (8 * k + 4)) & 0xF) - 8.f, sz.x, sz.y));
    *reinterpret_cast<uint4*>(out + (size_t)row * K + c * 1024 + j * 256 + lane * 8) =
        *reinterpret_cast<const uint4*>(o);
  }
}

template <int R, int KS, bool PF>
static void launch(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz, torch::Tensor& y,
                   int N, int K) {
  auto stream = at::cuda::getCurrentCUDAStream();
  gemv_int4<R, KS, PF><<<(N + R - 1) / R, 32 * KS, 0, stream>>>(
      reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), reinterpret_cast<const uint4*>(w.data_ptr()),
      reinterpret_cast<const __nv_bfloat162*>(sz.data_ptr()), reinterpret_cast<__nv_bfloat16*>(y.data_ptr()), N, K);
}

// chunk_rows > 0: rows of W are dequantized chunk_rows at a time into a bf16 buffer that a cuBLAS matmul reads
// (tensor cores; the buffer is small enough to stay in L2); 0: gemm_int4 (weights read ceil(M / 8) times).
torch::Tensor gemm(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t chunk_rows) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 2 &&
              x.size(1) == w.size(1) * 8, "x: contiguous bf16 [M, K]");
  TORCH_CHECK(w.scalar_type() == at::kInt && w.is_contiguous() && sz.scalar_type() == at::kBFloat16 &&
              sz.is_contiguous(), "words int32 and sz bf16, contiguous");
  const int M = x.size(0), N = w.size(0), K = w.size(1) * 8;
  TORCH_CHECK(K % 1024 == 0, "K must be a multiple of 1024");
  auto stream = at::cuda::getCurrentCUDAStream();
  auto y = torch::empty({M, N}, x.options());
  if (chunk_rows > 0) {
    const int rows = (int)std::min<int64_t>(chunk_rows, N);
    auto buf = torch::empty({rows, K}, x.options());
    cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();  // on this stream, with PyTorch's workspace
    const float one = 1.f, zero = 0.f;
    auto* yp = reinterpret_cast<__nv_bfloat16*>(y.data_ptr());
    for (int r0 = 0; r0 < N; r0 += rows) {
      const int n = std::min(rows, N - r0);
      const long threads = (long)n * (K >> 5);
      dequant_int4<<<(threads + 255) / 256, 256, 0, stream>>>(
          reinterpret_cast<const uint4*>(w.data_ptr()) + (size_t)r0 * (K >> 5),
          reinterpret_cast<const __nv_bfloat162*>(sz.data_ptr()) + (size_t)r0 * (K >> 6),
          reinterpret_cast<__nv_bfloat16*>(buf.data_ptr()), n, K);
      // columns r0 .. r0 + n of y [M, N] (row-major) = x [M, K] @ buf[:n].T; cuBLAS is column-major: y.T's rows
      // r0.. (leading dimension N) = buf[:n] (K x n, transposed) times x.T (K x M). cuBLAS directly, not
      // at::mm: a prompt makes hundreds of these calls and waits on their host time, not on the GPU's.
      const cublasStatus_t st = cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, M, K, &one, buf.data_ptr(),
          CUDA_R_16BF, K, x.data_ptr(), CUDA_R_16BF, K, &zero, yp + r0, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F,
          CUBLAS_GEMM_DEFAULT);
      TORCH_CHECK(st == CUBLAS_STATUS_SUCCESS, "cublasGemmEx failed with status ", (int)st);
    }
    return y;
  }
  dim3 grid((N + 3) / 4, (M + 7) / 8);
  gemm_int4<4, 2, 8><<<grid, 64, 0, stream>>>(
      reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), reinterpret_cast<const uint4*>(w.data_ptr()),
      reinterpret_cast<const __nv_bfloat162*>(sz.data_ptr()), reinterpret_cast<__nv_bfloat16*>(y.data_ptr()), M, N, K);
  return y;
}

torch::Tensor gemv(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t rows, int64_t warps, int64_t prefetch) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.numel() == w.size(1) * 8,
              "x: one contiguous bf16 row of K features");
  TORCH_CHECK(w.scalar_type() == at::kInt && w.is_contiguous() && sz.scalar_type() == at::kBFloat16 &&
              sz.is_contiguous(), "words int32 and sz bf16, contiguous");
  const int N = w.size(0), K = w.size(1) * 8;
  TORCH_CHECK(K % 1024 == 0, "K must be a multiple of 1024");
  auto y = torch::empty({1, N}, x.options());
  const int key = rows * 100 + warps * 10 + prefetch;
  switch (key) {
    case 420: launch<4, 2, false>(x, w, sz, y, N, K); break;
    case 421: launch<4, 2, true>(x, w, sz, y, N, K); break;
    case 820: launch<8, 2, false>(x, w, sz, y, N, K); break;
    case 821: launch<8, 2, true>(x, w, sz, y, N, K); break;
    case 440: launch<4, 4, false>(x, w, sz, y, N, K); break;
    case 811: launch<8, 1, true>(x, w, sz, y, N, K); break;
    case 241: launch<2, 4, true>(x, w, sz, y, N, K); break;
    case 411: launch<4, 1, true>(x, w, sz, y, N, K); break;
    case 840: launch<8, 4, false>(x, w, sz, y, N, K); break;
    case 221: launch<2, 2, true>(x, w, sz, y, N, K); break;
    default: TORCH_CHECK(false, "no such configuration");
  }
  return y;
}
"""

_CPP = ("torch::Tensor gemv(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t rows, int64_t warps, "
        "int64_t prefetch);\n"
        "torch::Tensor gemm(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t chunk_rows);")


def _build_dir() -> str:
    d = os.environ.get("QUANTSCOPE_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "quantscope", f"int4_gemv_torch{torch.__version__.replace('+', '_')}")
    os.makedirs(d, exist_ok=True)
    return d


@functools.lru_cache(maxsize=1)
def _ext():
    """The compiled extension, or the reason it cannot be built here (a string)."""
    from torch.utils import cpp_extension

    if not torch.cuda.is_available():
        return "no CUDA device"
    if not (cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))):
        return "nvcc (the CUDA toolkit) is not installed, so the kernel cannot be compiled"
    if not (shutil.which("ninja") or _ninja_from_pip()):
        return "ninja is not installed (pip install ninja), so the kernel cannot be compiled"
    major, minor = torch.cuda.get_device_capability()
    try:
        return cpp_extension.load_inline(
            name="quantscope_int4_gemv", cpp_sources=_CPP, cuda_sources=_SRC, functions=["gemv", "gemm"],
            extra_cuda_cflags=["-O3", "-ftz=false", "-prec-div=true",
                               f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"],
            extra_ldflags=["-lcublas"], build_directory=_build_dir(), verbose=False)
    except Exception as e:  # a toolkit too old for this GPU, a compiler error: say it, keep tinygemm
        last = str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""
        return f"the kernel did not compile ({type(e).__name__}: {last})"


def _ninja_from_pip() -> bool:
    try:
        import ninja
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return True


def available() -> Optional[str]:
    """None when the kernel is built (or builds now) on this machine, else why not."""
    e = _ext()
    return e if isinstance(e, str) else None


def why_not(n: int, k: int, group_size: int) -> Optional[str]:
    """None when an N x K layer with this group size can use the kernel, else the reason."""
    if group_size != GROUP:
        return f"our GEMV takes group size {GROUP}, not {group_size}"
    if k % BLOCK:
        return f"our GEMV needs a multiple of {BLOCK} input features, not {k}"
    return available()


PACK_ROWS = 1024  # rows packed at a time: the int32 temporaries stay small (16 MB at K = 4,096)


def pack(q: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Codes [N, K] (0..15) -> words int32 [N, K/8] in the kernel's layout (module docstring), written into
    ``out`` (rows of a stacked layer) when given. Packed ``PACK_ROWS`` rows at a time: a loading model's
    temporaries stay small, so the caching allocator is not left holding large blocks between the weights."""
    n, k = q.shape
    if out is None:
        out = torch.empty((n, k // 8), dtype=torch.int32, device=q.device)
    for r in range(0, n, PACK_ROWS):
        c = q[r:r + PACK_ROWS].to(torch.int32).reshape(-1, k // 8, 8)
        words = c[:, :, 0].clone()
        for i in range(1, 8):
            words |= c[:, :, i] << (4 * i)  # bit 31 may be set: int32 wraps, the bits are what counts
        rows = c.shape[0]
        out[r:r + rows] = words.reshape(rows, k // BLOCK, 4, 32).transpose(2, 3).reshape(rows, k // 8)
    return out


def unpack(words: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack`: [N, K/8] int32 -> [N, K] uint8 codes."""
    n, kw = words.shape
    w = words.reshape(n, kw // 128, 32, 4).transpose(2, 3).reshape(n, kw, 1)
    shifts = (4 * torch.arange(8, device=words.device, dtype=torch.int32)).reshape(1, 1, 8)
    return ((w >> shifts) & 0xF).to(torch.uint8).reshape(n, kw * 8)


def pack_sz(s: torch.Tensor, z: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """HQQ's scales and zeros [N, K/64] -> bf16 [N, K/64, 2] = (s, (8 - z) * s), computed in fp32 (tinygemm's
    zero term: half the rounding error of storing ``-z * s``, as the codes' midpoint 8 is taken out exactly);
    written into ``out`` when given."""
    s, z = s.float(), z.float()
    n, g = s.shape
    sz = torch.stack([s, (8 - z) * s], dim=-1).to(torch.bfloat16)  # [N, G, 2], group = 16c + 4j + t
    sz = sz.reshape(n, g // 16, 4, 4, 2).transpose(2, 3).reshape(n, g, 2)
    if out is None:
        return sz.contiguous()
    out.copy_(sz)
    return out


def unpack_sz(sz: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_sz`'s reordering: [N, G, 2] in group order."""
    n, g, _ = sz.shape
    return sz.reshape(n, g // 16, 4, 4, 2).transpose(2, 3).reshape(n, g, 2)


def dequantize(words: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """The weight [N, K] in bf16 as the kernel sees it: ``s * (q - 8) + (8 - z) s`` per group."""
    q = unpack(words).float()
    n, k = q.shape
    szf = unpack_sz(sz).float()
    w = (q.reshape(n, k // GROUP, GROUP) - 8) * szf[..., :1] + szf[..., 1:]
    return w.reshape(n, k).to(torch.bfloat16)


def chunk_rows(m: int, k: int) -> int:
    """How a prompt of ``m`` tokens is multiplied by an N x ``k`` layer: 0 -> ``gemm_int4`` (CUDA cores, the
    weights read once per 8 tokens); else this many rows at a time are dequantized into a bf16 buffer of at most
    :data:`DEQUANT_BYTES` that a cuBLAS matmul reads (tensor cores; the buffer stays in L2)."""
    if m < DEQUANT_MIN_TOKENS:
        return 0
    return max(64, DEQUANT_BYTES // (2 * k) // 64 * 64)


def gemv(x2: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, rows: int, warps: int, prefetch: int) -> torch.Tensor:
    """``x2 @ W.T`` for one token x2 [1, K] bf16 on CUDA with the compiled kernel (a configuration of
    :data:`CONFIGS`)."""
    return _ext().gemv(x2, words, sz, rows, warps, prefetch)


def pick_config(n: int, k: int, device=None, reps: int = 50, timings: Optional[dict] = None,
                rotate_bytes: int = 96 << 20) -> tuple[int, int, int]:
    """The fastest of :data:`CONFIGS` for an N x K layer on this GPU, timed on random codes in a CUDA graph
    (``timings``, if given, receives seconds per call for each configuration). The graph cycles through copies of
    the weights adding up to ``rotate_bytes`` (more than the L2 cache), as a model's layers do: a small matrix
    timed alone would be served from L2 and favour the wrong configuration."""
    dev = torch.device(device or "cuda")
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
                gemv(x, ws[i], szs[i], *cfg)
        torch.cuda.current_stream(dev).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        # thread_local: on a shared server another thread may be decoding on this GPU while a model loads
        with torch.cuda.graph(g, stream=s, capture_error_mode="thread_local"):
            for i in range(calls):
                gemv(x, ws[i % copies], szs[i % copies], *cfg)
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


def _mm(x2: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, rows: int, warps: int,
        prefetch: int) -> torch.Tensor:
    """``x2 @ W.T`` for x2 [M, K] bf16 contiguous: one token -> the GEMV, a prompt -> ``gemm``."""
    if x2.data_ptr() % 16:  # the kernels read the input 16 bytes at a time
        x2 = x2.clone()
    if x2.shape[0] == 1:
        return _ext().gemv(x2, words, sz, rows, warps, prefetch)
    return _ext().gemm(x2, words, sz, chunk_rows(x2.shape[0], x2.shape[1]))


@torch.library.custom_op("quantscope::int4_gemv", mutates_args=())
def _int4_mm(x2: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, rows: int, warps: int,
             prefetch: int) -> torch.Tensor:
    return _mm(x2, words, sz, rows, warps, prefetch)


@_int4_mm.register_fake
def _(x2, words, sz, rows, warps, prefetch):
    return x2.new_empty((x2.shape[0], words.shape[0]))


def _apply(x, words, sz, bias, config):
    """``x @ W.T + b`` for W = (words, sz) in this kernel's layout, any leading dimensions of ``x``."""
    shape = x.shape
    # the custom op is for torch.compile (the decode step); called eagerly (a prompt), its wrapper's host time
    # would add up over the hundreds of calls of a prefill
    mm = torch.ops.quantscope.int4_gemv if torch.compiler.is_compiling() else _mm
    y = mm(x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous(), words, sz, *config)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], int(words.shape[0]))


class GemvInt4Linear(torch.nn.Module):
    """``y = x @ W.T + b`` with W in this kernel's layout (one token: the GEMV; a prompt: the same arithmetic,
    each block applying its weights to 8 tokens at a time)."""

    def __init__(self, words, sz, in_features: int, bias, config: tuple[int, int, int]):
        super().__init__()
        self.in_features, self.out_features = in_features, int(words.shape[0])
        self.group_size = GROUP
        self.register_buffer("words", words)
        self.register_buffer("sz", sz)
        self.bias = bias
        self.config = tuple(config)

    def forward(self, x):
        return _apply(x, self.words, self.sz, self.bias, self.config)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={GROUP}, "
                f"kernel=QuantScope int4 GEMV (rows, warps, prefetch per block: {self.config})")


_PICKED: dict = {}


def from_codes(q, s, z, bias=None, config: Optional[tuple[int, int, int]] = None) -> GemvInt4Linear:
    """A :class:`GemvInt4Linear` from codes ``q`` [N, K] (0..15) and HQQ's scales and zeros [N, K/64]; the
    launch configuration is timed once per shape and device in this process (:func:`pick_config`)."""
    n, k = q.shape
    return GemvInt4Linear(pack(q), pack_sz(s, z), k, bias, config or _config(n, k, q.device))


def _config(n: int, k: int, device) -> tuple[int, int, int]:
    key = (n, k, str(device))
    if key not in _PICKED:
        _PICKED[key] = pick_config(n, k, device)
    return _PICKED[key]


# Sibling projections that read the same input, in the order transformers' modules call them.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Fused(torch.nn.Module):
    """One :class:`GemvInt4Linear` for several sibling projections (rows stacked): the first sibling's call
    computes all of them, the others take their slice of that result when called with the same input."""

    def __init__(self, linear: GemvInt4Linear, sizes: list[int]):
        super().__init__()
        self.linear, self.sizes = linear, sizes
        self._x, self._out = None, None

    def part(self, i: int, x):
        # A prompt multiplied on dequantized row chunks (chunk_rows > 0) computes each sibling's rows on its own:
        # stacking saves nothing there, and the stacked output would keep every sibling's result alive until the
        # last one is used (gate/up: 4 intermediate rows per token at the MLP's peak instead of the plain path's 3).
        if i == 0 and not chunk_rows(x.numel() // x.shape[-1], x.shape[-1]):
            self._x, self._out = x, self.linear(x).split(self.sizes, dim=-1)
        if self._x is not x or self._out is None:  # a prompt, or called alone or out of order: this part's rows
            rows = slice(sum(self.sizes[:i]), sum(self.sizes[:i + 1]))
            lin = self.linear
            return _apply(x, lin.words[rows], lin.sz[rows], None if lin.bias is None else lin.bias[rows], lin.config)
        y = self._out[i]
        if i == len(self.sizes) - 1:  # the last sibling: let go of the input and the stacked output
            self._x, self._out = None, None
        return y


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


def fuse_codes(parent, names, sizes: list[int], parts) -> _Fused:
    """Replace the sibling projections ``names`` of ``parent`` (e.g. q/k/v) by one stacked GEMV: ``parts``
    yields each sibling's (codes [n_i, K], scales, zeros, bias or None), n_i = ``sizes[i]``, in order; each is
    packed straight into its rows of the stacked weights (allocated first, so no per-sibling copy is made and
    freed between a loading model's weights). Each name then holds a :class:`_Part`; returns the group."""
    words = sz = None
    biases, r0 = [], 0
    for size, (q, s, z, bias) in zip(sizes, parts):
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
        bias = torch.nn.Parameter(torch.cat([b.data for b in biases]), requires_grad=False)
    n = int(words.shape[0])
    fused = _Fused(GemvInt4Linear(words, sz, k, bias, _config(n, k, words.device)), list(sizes))
    setattr(parent, "fused_" + "_".join(nm.split("_")[0] for nm in names), fused)
    for i, (nm, size) in enumerate(zip(names, sizes)):
        setattr(parent, nm, _Part(fused, i, k, size))
    return fused
