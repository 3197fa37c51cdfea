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

Requires N a multiple of 16 and K a multiple of 64 (group size 64); other layers keep tinygemm (:func:`why_not`).
Compiled at first use with ``torch.utils.cpp_extension.load_inline`` (needs nvcc and ninja; ~50 s, cached in
``~/.cache/quantscope`` or ``QUANTSCOPE_KERNEL_CACHE``); where either is missing, :func:`why_not` says so and
``hqq4-fast`` keeps tinygemm. Measured on an H200 (docs/benchmarks.md; timed cycling through ~1 GB of weights, as
a model reads them): q/o 5.9 µs, q+k+v 7.8, gate+up 25.8, down 14.5 per call for an 8B's layer shapes (38-60% of
the copy bandwidth); the CUDA-core GEMV it replaced 6.6 / 8.8 / 27.0 / 16.2.
"""
from __future__ import annotations

import functools
import os
import shutil
from typing import Optional

import torch

from ..memory import FAST_INT4_DEQUANT_BYTES

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
// together. x [M, K] bf16 (4-byte aligned rows), y [M, N].
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

template <int KS, int U>
static void launch(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& sz, torch::Tensor& y,
                   int M, int N, int K) {
  dim3 grid(N / 16, (M + 7) / 8);
  mma_int4<KS, U><<<grid, 32 * KS, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), reinterpret_cast<const uint4*>(w.data_ptr()),
      reinterpret_cast<const uint2*>(sz.data_ptr()), reinterpret_cast<__nv_bfloat16*>(y.data_ptr()), M, N, K);
}

// x [M, K] @ W.T. chunk_rows > 0: rows of W are dequantized chunk_rows at a time into a bf16 buffer that a cuBLAS
// matmul reads (tensor cores at full width; the buffer is small enough to stay in L2); 0: mma_int4 with launch
// shape (ks, u) (the weights read once per 8 tokens).
torch::Tensor mm(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t ks, int64_t u, int64_t chunk_rows) {
  TORCH_CHECK(x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.is_contiguous() && x.dim() == 2 &&
              x.size(1) == w.size(1) * 8, "x: contiguous bf16 [M, K]");
  TORCH_CHECK(w.scalar_type() == at::kInt && w.is_contiguous() && sz.scalar_type() == at::kBFloat16 &&
              sz.is_contiguous(), "words int32 and sz bf16, contiguous");
  const int M = x.size(0), N = w.size(0), K = w.size(1) * 8;
  TORCH_CHECK(K % 64 == 0 && N % 16 == 0, "K must be a multiple of 64 and N of 16");
  auto y = torch::empty({M, N}, x.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  if (chunk_rows > 0) {
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
    return y;
  }
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

_CPP = "torch::Tensor mm(torch::Tensor x, torch::Tensor w, torch::Tensor sz, int64_t ks, int64_t u, int64_t chunk_rows);"


def _build_dir() -> str:
    d = os.environ.get("QUANTSCOPE_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "quantscope", f"int4_mma_torch{torch.__version__.replace('+', '_')}")
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
    if major < 8:
        return f"the kernel needs bf16 tensor cores (compute capability 8.0 or newer; this GPU has {major}.{minor})"
    try:
        return cpp_extension.load_inline(
            name="quantscope_int4_mma", cpp_sources=_CPP, cuda_sources=_SRC, functions=["mm"],
            extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"],
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


def mm(x2: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, warps: int, loads: int) -> torch.Tensor:
    """``x2 @ W.T`` for a few tokens x2 [M, K] bf16 on CUDA with the compiled kernel (a configuration of
    :data:`CONFIGS`)."""
    return _ext().mm(x2, words, sz, warps, loads, 0)


def pick_config(n: int, k: int, device=None, reps: int = 50, timings: Optional[dict] = None,
                rotate_bytes: int = 96 << 20) -> tuple[int, int]:
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
                mm(x, ws[i], szs[i], *cfg)
        torch.cuda.current_stream(dev).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        # thread_local: on a shared server another thread may be decoding on this GPU while a model loads
        with torch.cuda.graph(g, stream=s, capture_error_mode="thread_local"):
            for i in range(calls):
                mm(x, ws[i % copies], szs[i % copies], *cfg)
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


def _mm(x2: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, warps: int, loads: int) -> torch.Tensor:
    """``x2 @ W.T`` for x2 [M, K] bf16 contiguous: a few tokens -> ``mma_int4``, a long prompt -> cuBLAS on
    dequantized rows."""
    if x2.data_ptr() % 16:  # the kernel reads the input 4 bytes at a time, cuBLAS prefers 16
        x2 = x2.clone()
    return _ext().mm(x2, words, sz, warps, loads, chunk_rows(x2.shape[0], x2.shape[1]))


@torch.library.custom_op("quantscope::int4_mma", mutates_args=())
def _int4_mm(x2: torch.Tensor, words: torch.Tensor, sz: torch.Tensor, warps: int, loads: int) -> torch.Tensor:
    return _mm(x2, words, sz, warps, loads)


@_int4_mm.register_fake
def _(x2, words, sz, warps, loads):
    return x2.new_empty((x2.shape[0], words.shape[0]))


def _apply(x, words, sz, bias, config):
    """``x @ W.T + b`` for W = (words, sz) in this kernel's layout, any leading dimensions of ``x``."""
    shape = x.shape
    # the custom op is for torch.compile (the decode step); called eagerly (a prompt), its wrapper's host time
    # would add up over the hundreds of calls of a prefill
    op = torch.ops.quantscope.int4_mma if torch.compiler.is_compiling() else _mm
    y = op(x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous(), words, sz, *config)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], int(words.shape[0]))


class GemvInt4Linear(torch.nn.Module):
    """``y = x @ W.T + b`` with W in this kernel's layout (a few tokens: ``mma_int4``, 8 tokens per block; a long
    prompt: cuBLAS on dequantized rows)."""

    def __init__(self, words, sz, in_features: int, bias, config: tuple[int, int]):
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
                f"kernel=QuantScope int4 GEMV (tensor cores; warps, groups loaded together: {self.config})")


_PICKED: dict = {}


def from_codes(q, s, z, bias=None, config: Optional[tuple[int, int]] = None) -> GemvInt4Linear:
    """A :class:`GemvInt4Linear` from codes ``q`` [N, K] (0..15) and HQQ's scales and zeros [N, K/64]; the
    launch configuration is timed once per shape and device in this process (:func:`pick_config`)."""
    n, k = q.shape
    return GemvInt4Linear(pack(q), pack_sz(s, z), k, bias, config or _config(n, k, q.device))


def _config(n: int, k: int, device) -> tuple[int, int]:
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
