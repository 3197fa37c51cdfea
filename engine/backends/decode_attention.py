"""Attention for one query token on CUDA in one kernel launch (the fast paths' captured decode step).

At batch 1 a decode step's attention reads little (an 8B model at 512 positions: 2 MB of keys and values per
layer, ~0.5 µs at the H200's bandwidth), yet PyTorch's SDPA took 9.3 µs per layer in the model (cuDNN; 0.30 ms of
a 2.43 ms token), and FlashAttention's split over positions needs a second kernel to combine the parts, which
costs a launch and its latency again (docs/benchmarks.md). Here the positions are split over blocks (a block per
key/value head and chunk of positions, a query head group's scores, softmax and weighted values per block with
the usual running maximum), and the last block of each head to finish (an atomic counter per head, set back to
zero by that block) combines the chunks: one launch, no second pass over the cache.

Same semantics as ``scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)`` for
q [1, H, 1, D], k and v [1, Hkv, n, D] (the last two dimensions contiguous: a static cache cut to its first n
positions is) and a boolean mask [1, 1, 1, n] (True: attend) or none; query head h reads key/value head
h // (H / Hkv). D is 64 or 128, H / Hkv at most 8, bf16 only; :func:`why_not` says when not. Masked positions
are read (a block does not wait for the mask before issuing its loads) but never enter a sum, whatever they hold.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from . import cuda_ext

HEAD_DIMS = (64, 128)
MAX_GROUP = 8
# Longer attention goes to SDPA: per call on an H200, 8B heads, ours vs SDPA 16.5 vs 17.3 µs at 4,096 positions,
# 25.6 vs 20.1 at 8,192 (bench/results/gpu_decode_attention_h200_2026-11-27.log)
LONGEST = 4096

_SRC = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <stdint.h>
""" + cuda_ext.PDL_SRC + r"""
#define MAX_CHUNKS 64

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ void bf16x8(const uint4& v, float* f) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(w[i] << 16);
    f[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
  }
}

// Grid (chunks, Hkv), 128 threads. LP = D / 8 lanes hold a position (8 features each, 16 bytes), a warp PW = 32 / LP
// positions at a time; a sub-chunk is 4 warps x PW x STEPS positions. Block (c, j) reads positions
// [c * per, min(n, (c + 1) * per)) of key/value head j for query heads j * G .. j * G + G - 1.
// part: fp32, [Hkv, chunks, G, D] (a chunk's weighted values) then [Hkv, chunks, G, 2] (its maximum and its sum
// of weights, log2 units); counters [Hkv] int32, zero before the launch and after it. chunks <= MAX_CHUNKS.
template <int D, int G>
__global__ void __launch_bounds__(128) decode_attn(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v,
    const bool* __restrict__ mask, __nv_bfloat16* __restrict__ out, float* __restrict__ part,
    int* __restrict__ counters, int n, long sk, long sv, int per, float scale_log2) {
  constexpr int LP = D / 8, PW = 32 / LP, STEPS = 4, SUB = 4 * PW * STEPS;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, sub = lane % LP, slot = lane / LP;
  const int c = blockIdx.x, j = blockIdx.y, chunks = gridDim.x;
  const int p0 = c * per, p1 = min(n, p0 + per);
  __shared__ float sc[G][SUB];          // a sub-chunk's scores, then its weights
  __shared__ float ms[G], ls[G], fac[G];  // running maximum, running sum of weights, this sub-chunk's rescale
  __shared__ float red[4][G][D];
  __shared__ bool last;
  if (threadIdx.x < G) {
    ms[threadIdx.x] = -INFINITY;
    ls[threadIdx.x] = 0.f;
  }
  pdl_wait();  // q and this step's key and value come from the kernel before
  pdl_trigger();
  float qf[G][8], acc[G][8];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    const uint4 qv = *reinterpret_cast<const uint4*>(q + (size_t)(j * G + h) * D + sub * 8);
    bf16x8(qv, qf[h]);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      qf[h][i] *= scale_log2;
      acc[h][i] = 0.f;
    }
  }
  const uint4* kp = reinterpret_cast<const uint4*>(k + (size_t)j * sk) + sub;
  const uint4* vp = reinterpret_cast<const uint4*>(v + (size_t)j * sv) + sub;
  // a sub-chunk's loads, all issued before any is used; the next sub-chunk's are issued before this one is used
  uint4 kv[STEPS], vv[STEPS];
  bool ok[STEPS];
  auto load = [&](int b, uint4* kd, uint4* vd, bool* okd) {
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
      const int p = b + (s * 4 + warp) * PW + slot;
      okd[s] = p < p1;
      const int pc = okd[s] ? p : p0;
      kd[s] = ld_stream(kp + (size_t)pc * (D / 8));
      vd[s] = ld_stream(vp + (size_t)pc * (D / 8));
      if (mask) okd[s] = okd[s] && mask[pc];
    }
  };
  if (p0 < p1) load(p0, kv, vv, ok);
  for (int b = p0; b < p1; b += SUB) {
    uint4 kn[STEPS], vn[STEPS];
    bool okn[STEPS];
    const bool more = b + SUB < p1;
    if (more) load(b + SUB, kn, vn, okn);
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
      float kf[8];
      bf16x8(kv[s], kf);
#pragma unroll
      for (int h = 0; h < G; ++h) {
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) d = fmaf(qf[h][i], kf[i], d);
#pragma unroll
        for (int o = LP / 2; o; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        if (sub == 0) sc[h][(s * 4 + warp) * PW + slot] = ok[s] ? d : -INFINITY;
      }
    }
    __syncthreads();
    for (int h = warp; h < G; h += 4) {  // warp w: heads w and w + 4
      float mx = -INFINITY;
      for (int i = lane; i < SUB; i += 32) mx = fmaxf(mx, sc[h][i]);
#pragma unroll
      for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float mo = ms[h], mn = fmaxf(mo, mx);
      float sum = 0.f;
      for (int i = lane; i < SUB; i += 32) {
        const float e = sc[h][i] == -INFINITY ? 0.f : exp2f(sc[h][i] - mn);
        sc[h][i] = e;
        sum += e;
      }
#pragma unroll
      for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      if (lane == 0) {
        const float f = mo == -INFINITY ? 0.f : exp2f(mo - mn);  // nothing summed yet: nothing to rescale
        fac[h] = f;
        ls[h] = ls[h] * f + sum;
        ms[h] = mn;
      }
    }
    __syncthreads();
#pragma unroll
    for (int h = 0; h < G; ++h) {
      const float f = fac[h];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[h][i] *= f;
    }
#pragma unroll
    for (int s = 0; s < STEPS; ++s) {
      if (!ok[s]) continue;  // a masked position's values never enter a sum, whatever they hold
      float vf[8];
      bf16x8(vv[s], vf);
#pragma unroll
      for (int h = 0; h < G; ++h) {
        const float w = sc[h][(s * 4 + warp) * PW + slot];
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[h][i] = fmaf(w, vf[i], acc[h][i]);
      }
    }
    __syncthreads();  // sc and fac are rewritten by the next sub-chunk
    if (more) {
#pragma unroll
      for (int s = 0; s < STEPS; ++s) {
        kv[s] = kn[s];
        vv[s] = vn[s];
        ok[s] = okn[s];
      }
    }
  }
  // the lanes of a warp that hold the same features, then the four warps
#pragma unroll
  for (int h = 0; h < G; ++h) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int o = LP; o < 32; o <<= 1) acc[h][i] += __shfl_xor_sync(0xffffffffu, acc[h][i], o);
      if (slot == 0) red[warp][h][sub * 8 + i] = acc[h][i];
    }
  }
  __syncthreads();
  if (chunks == 1) {
    for (int t = threadIdx.x; t < G * D; t += 128) {
      const int h = t / D, d = t % D;
      const float o = red[0][h][d] + red[1][h][d] + red[2][h][d] + red[3][h][d];
      out[(size_t)(j * G + h) * D + d] = __float2bfloat16(o / ls[h]);
    }
    return;
  }
  // part: [Hkv, chunks, G, D] weighted values, then [Hkv, chunks, G, 2] (maximum, sum of weights)
  float* pv = part + ((size_t)j * chunks + c) * G * D;
  float* pml = part + (size_t)gridDim.y * chunks * G * D + ((size_t)j * chunks + c) * G * 2;
  for (int t = threadIdx.x; t < G * D; t += 128) {
    const int h = t / D, d = t % D;
    pv[t] = red[0][h][d] + red[1][h][d] + red[2][h][d] + red[3][h][d];
  }
  if (threadIdx.x < G) {
    pml[threadIdx.x * 2] = ms[threadIdx.x];
    pml[threadIdx.x * 2 + 1] = ls[threadIdx.x];
  }
  // the block's writes, then one release-acquire count by thread 0 (the pattern of CUTLASS's GenericBarrier): the
  // last block to count sees every other block's part
  __syncthreads();
  if (threadIdx.x == 0) {
    int prev;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(prev) : "l"(counters + j) : "memory");
    last = prev == chunks - 1;
  }
  __syncthreads();
  if (!last) return;
  // the last block of head j: out = sum_c acc_c 2^(m_c - M) / sum_c l_c 2^(m_c - M), M the largest m_c. Every
  // load of the parts issued at once (one L2 round trip), then the chunks' weights, then the sums.
  __shared__ float cw[MAX_CHUNKS][G];
  __shared__ float cm[MAX_CHUNKS][G];
  const float* ml = part + (size_t)gridDim.y * chunks * G * D + (size_t)j * chunks * G * 2;
  const float4* all = reinterpret_cast<const float4*>(part + (size_t)j * chunks * G * D);
  constexpr int HELD = 16;  // chunks whose parts a thread holds in registers while the weights are computed
  const int t0 = threadIdx.x;
  const bool mine4 = t0 < G * D / 4;
  float4 held[HELD];
#pragma unroll
  for (int cc = 0; cc < HELD; ++cc)
    if (cc < chunks && mine4) held[cc] = __ldcg(all + (size_t)cc * G * D / 4 + t0);
  for (int t = threadIdx.x; t < chunks * G; t += 128) {
    cm[t / G][t % G] = __ldcg(ml + 2 * t);
    cw[t / G][t % G] = __ldcg(ml + 2 * t + 1);
  }
  __syncthreads();
  if (threadIdx.x < G) {
    const int h = threadIdx.x;
    float M = -INFINITY, L = 0.f;
    for (int cc = 0; cc < chunks; ++cc) M = fmaxf(M, cm[cc][h]);
    for (int cc = 0; cc < chunks; ++cc) L += cm[cc][h] == -INFINITY ? 0.f : cw[cc][h] * exp2f(cm[cc][h] - M);
    ms[h] = M;
    ls[h] = L;
  }
  __syncthreads();
  for (int t = threadIdx.x; t < chunks * G; t += 128) {  // a chunk of masked positions only weighs nothing
    const int cc = t / G, h = t % G;
    cw[cc][h] = cm[cc][h] == -INFINITY ? 0.f : exp2f(cm[cc][h] - ms[h]) / ls[h];
  }
  __syncthreads();
  for (int t = threadIdx.x; t < G * D / 4; t += 128) {
    const int h = t / (D / 4);
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    auto add = [&](const float4& a, float w) {
      o.x = fmaf(a.x, w, o.x);
      o.y = fmaf(a.y, w, o.y);
      o.z = fmaf(a.z, w, o.z);
      o.w = fmaf(a.w, w, o.w);
    };
    if (t == t0) {  // the first output: its first HELD chunks are in registers
#pragma unroll
      for (int cc = 0; cc < HELD; ++cc)
        if (cc < chunks) add(held[cc], cw[cc][h]);
    }
#pragma unroll 8
    for (int cc = t == t0 ? HELD : 0; cc < chunks; ++cc) add(__ldcg(all + (size_t)cc * G * D / 4 + t), cw[cc][h]);
    __nv_bfloat162* dst = reinterpret_cast<__nv_bfloat162*>(out + (size_t)j * G * D + 4 * t);
    dst[0] = __floats2bfloat162_rn(o.x, o.y);
    dst[1] = __floats2bfloat162_rn(o.z, o.w);
  }
  if (threadIdx.x == 0) counters[j] = 0;  // every block of head j has counted: ready for the next launch
}

template <int D, int G>
static void launch(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const bool* mask,
                   torch::Tensor& out, torch::Tensor& part, torch::Tensor& counters, int n, int chunks, int per,
                   float scale_log2) {
  dim3 grid(chunks, k.size(1));
  launch_pdl(decode_attn<D, G>, grid, dim3(128),
      reinterpret_cast<const __nv_bfloat16*>(q.data_ptr()), reinterpret_cast<const __nv_bfloat16*>(k.data_ptr()),
      reinterpret_cast<const __nv_bfloat16*>(v.data_ptr()), mask, reinterpret_cast<__nv_bfloat16*>(out.data_ptr()),
      chunks > 1 ? part.data_ptr<float>() : nullptr, counters.data_ptr<int>(), n, k.stride(1), v.stride(1), per,
      scale_log2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// q [1, H, 1, D] -> out [1, 1, H, D]; k, v [1, Hkv, n, D] with the last two dimensions contiguous; mask: n bools
// (stride 1) or none; counters: int32, at least Hkv, zero; chunks: blocks per key/value head.
torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                     torch::Tensor counters, double scale, int64_t chunks_wanted) {
  TORCH_CHECK(q.is_cuda() && q.scalar_type() == at::kBFloat16 && q.is_contiguous() && q.dim() == 4 &&
              q.size(0) == 1 && q.size(2) == 1 && (uintptr_t)q.data_ptr() % 16 == 0,
              "q: contiguous bf16 [1, H, 1, D], 16-byte aligned");
  const int H = q.size(1), D = q.size(3), Hkv = k.size(1), n = k.size(2);
  for (const auto* t : {&k, &v}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->dim() == 4 && t->size(0) == 1 && t->size(1) == Hkv &&
                t->size(2) == n && t->size(3) == D && t->stride(3) == 1 && t->stride(2) == D &&
                t->stride(1) % 8 == 0 && t->data_ptr() != nullptr && (uintptr_t)t->data_ptr() % 16 == 0,
                "k, v: bf16 [1, Hkv, n, D], the last two dimensions contiguous, 16-byte aligned");
  }
  TORCH_CHECK(H % Hkv == 0, "query heads must be a multiple of key/value heads");
  TORCH_CHECK(counters.scalar_type() == at::kInt && counters.is_contiguous() && counters.numel() >= Hkv,
              "counters: int32, one per key/value head");
  const bool* mp = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->numel() == n && mask->stride(-1) == 1,
                "mask: n bools");
    mp = mask->data_ptr<bool>();
  }
  const int G = H / Hkv, sub = 4 * (32 / (D / 8)) * 4;
  const int nsub = (n + sub - 1) / sub;
  int chunks = (int)std::max<int64_t>(1, std::min<int64_t>({(int64_t)nsub, chunks_wanted, (int64_t)MAX_CHUNKS}));
  const int per = (nsub + chunks - 1) / chunks * sub;
  chunks = (n + per - 1) / per;
  auto out = torch::empty({1, 1, H, D}, q.options());
  TORCH_CHECK(chunks <= MAX_CHUNKS, "at most ", MAX_CHUNKS, " chunks per head");
  auto part = chunks > 1 ? torch::empty({Hkv * chunks * G * (D + 2)}, q.options().dtype(at::kFloat))
                         : torch::Tensor();
  const float sl2 = (float)(scale * 1.4426950408889634);
#define QS_ATTN(DD, GG) if (D == DD && G == GG) { launch<DD, GG>(q, k, v, mp, out, part, counters, n, chunks, per, sl2); return out; }
#define QS_ATTN_D(DD) QS_ATTN(DD, 1) QS_ATTN(DD, 2) QS_ATTN(DD, 3) QS_ATTN(DD, 4) QS_ATTN(DD, 5) QS_ATTN(DD, 6) \
    QS_ATTN(DD, 7) QS_ATTN(DD, 8)
  QS_ATTN_D(64)
  QS_ATTN_D(128)
  TORCH_CHECK(false, "head dimension ", D, " with ", G, " query heads per key/value head is not compiled");
  return out;
}
"""

_CPP = ("torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask, "
        "torch::Tensor counters, double scale, int64_t chunks_wanted);")

COUNTERS = "quantscope_attn_counters"  # the buffer a model's attention module holds for the kernel


@functools.lru_cache(maxsize=1)
def _ext():
    """The compiled extension, or the reason it cannot be built here (a string)."""
    return cuda_ext.build("quantscope_decode_attn", _CPP, _SRC, ["attend"], "the decode attention kernel")


def why_not(heads: int, kv_heads: int, head_dim: int, dtype=torch.bfloat16) -> Optional[str]:
    """None when a model with these attention shapes can use the kernel (it builds here), else the reason."""
    if dtype != torch.bfloat16:
        return f"the decode attention kernel is for bf16, not {dtype}"
    if head_dim not in HEAD_DIMS:
        return f"the decode attention kernel takes head dimensions {HEAD_DIMS}, not {head_dim}"
    if kv_heads <= 0 or heads % kv_heads or heads // kv_heads > MAX_GROUP:
        return (f"the decode attention kernel takes up to {MAX_GROUP} query heads per key/value head, not "
                f"{heads} over {kv_heads}")
    e = _ext()
    return e if isinstance(e, str) else None


def chunks_per_head(kv_heads: int, device) -> int:
    """Blocks per key/value head: about two per SM in all (fewer where the positions run out)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, -(-2 * sms // kv_heads))


@torch.library.custom_op("quantscope::decode_attention", mutates_args=())
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], counters: torch.Tensor,
           scale: float, chunks: int) -> torch.Tensor:
    """q [1, H, 1, D], k and v [1, Hkv, n, D], mask n bools or None -> [1, 1, H, D]. ``counters`` (int32, one per
    key/value head, zero) is left as it was found: not declared mutated. Over :data:`LONGEST` positions, SDPA
    (chosen here, at the call, so that one compiled step serves every bucket)."""
    if k.shape[2] > LONGEST:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).contiguous()
    q = q.contiguous()
    if q.data_ptr() % 16:  # the kernel reads q 16 bytes at a time
        q = q.clone()
    return _ext().attend(q, k, v, mask, counters, scale, chunks)


@attend.register_fake
def _(q, k, v, mask, counters, scale, chunks):
    return q.new_empty((1, 1, q.shape[1], q.shape[3]))


def attend_for(module, query, key, value, mask, scale: float):
    """:func:`attend` (the op, as a compiled step calls it) with the counters and chunks :func:`prepare` gave
    ``module``."""
    return torch.ops.quantscope.decode_attention(query, key, value, mask, getattr(module, COUNTERS), float(scale),
                                                 module.quantscope_attn_chunks)


def usable(module, query, key, value, mask) -> bool:
    """Whether one decode step's attention can go to :func:`attend`: the module holds counters (given by
    :func:`prepare`), one query token of batch 1 in bf16, a boolean mask or none."""
    counters = getattr(module, COUNTERS, None)
    if counters is None or query.shape[0] != 1 or query.shape[2] != 1 or query.dtype != torch.bfloat16:
        return False
    return usable_cache(key, value, mask)


def usable_cache(key, value, mask) -> bool:
    """Whether the kernel reads these keys and values (each position's features contiguous) with this mask (boolean,
    one row, or none)."""
    if key.stride(-1) != 1 or key.stride(-2) != key.shape[-1] or value.stride(-1) != 1 \
            or value.stride(-2) != value.shape[-1]:
        return False
    return mask is None or (mask.dtype == torch.bool and mask.numel() == mask.shape[-1])


def prepare(model, device) -> Optional[str]:
    """Give every attention module of ``model`` the kernel's counters (a non-persistent buffer, zero) and its
    number of chunks per head (:func:`chunks_per_head`); None when done, else why the kernel is not used (and
    nothing is changed). ``QUANTSCOPE_DECODE_ATTN=0`` turns it off."""
    if os.environ.get("QUANTSCOPE_DECODE_ATTN", "1") == "0":
        return "turned off (QUANTSCOPE_DECODE_ATTN=0)"
    if not str(device).startswith("cuda"):
        return "CUDA only"
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    why = why_not(heads, kv_heads, head_dim, getattr(model, "dtype", torch.bfloat16))
    if why:
        return why
    chunks = chunks_per_head(kv_heads, device)
    for m in model.modules():
        if hasattr(m, "num_key_value_groups") and hasattr(m, "head_dim") and COUNTERS not in m._buffers:
            m.register_buffer(COUNTERS, torch.zeros(kv_heads, dtype=torch.int32, device=device), persistent=False)
            m.quantscope_attn_chunks = chunks
    return None
