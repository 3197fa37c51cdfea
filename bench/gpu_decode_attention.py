"""Experiment (issue 8, not used by the engine yet): one-token attention over a static KV cache, in one kernel of
our own, against PyTorch's SDPA (cuDNN) as the fast path calls it.

    python bench/gpu_decode_attention.py [--model meta-llama/Llama-3.1-8B-Instruct --tokenizer DIR]

Why: in the fast path's decode step of an 8B model, cuDNN's attention takes a fixed ~8-9 µs per layer for a few
hundred positions of 8 KV heads (~1.5 MB read; bench/results/gpu_profile_hqq4fast_8b_h200_2026-11-26g.log):
0.26-0.30 ms of a 2.88 ms token. Reading 1.5 MB takes ~0.4 µs at the HBM's rate, so the time is the kernel's
fixed cost and its parallelism (one block per head pair and query tile).

The kernel (flash-decoding in one launch): a block per (KV head, slice of positions); its warps score the slice's
positions for the KV head's G query heads (a lane holds D/32 elements of each query, dot products reduced across
the warp), softmax statistics per head over the slice, then each thread a dimension's weighted sum of values.
Each block writes (max, sum, weighted values) per head to a scratch buffer; the last block of a KV head to finish
(an atomic ticket, reset by that block) combines the slices. A boolean mask (True = attend) drops positions, as
transformers' SDPA mask does past the cache's write position.

Prints, per cache length, the time per call of each (a CUDA graph of 200 calls cycling through 32 caches, as
32 layers would) and the largest error against an fp32 reference; with ``--model``, the fast path's step with the
kernel in place of the engine's attention.

Status (2026-11-26, eighth session): **not run to the end yet.** It compiles (nvcc 13 for sm_90: 32-56 registers,
no spills), but on the H200 the correctness check stopped at its first call: without a launch check the next
PyTorch kernel reported "CUDA error: invalid argument"; with a check that then read the kernel's attributes, the
process segfaulted inside ``attend`` (``CUDA_LAUNCH_BLOCKING=1``, faulthandler). Suspected, not verified: the error
was left pending by the fp32 reference, ``F.scaled_dot_product_attention(..., enable_gqa=True)``, and read back as
this launch's. Since then (not yet run on a GPU): the reference is plain matmuls (:func:`reference`), the launch
first reports any error already pending, and the attribute read is gone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SRC = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <math_constants.h>

template <int EPL>
__device__ __forceinline__ void load_bf16(const __nv_bfloat16* p, float* f) {
  if constexpr (EPL == 4) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
    const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
    f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y;
  } else {
    const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
    f[0] = a.x; f[1] = a.y;
  }
}

// grid (KV heads, slices), 128 threads. q [H, D]; k, v: KV head h's positions at k + h * hs, D apart; mask: n bools
// or null; parts: [KVH, S, G, D] fp32 and [KVH, S, G] (max, sum); counters [KVH] int32, zero between calls.
template <int D, int G>
__global__ void __launch_bounds__(128) decode_attention(const __nv_bfloat16* __restrict__ q,
    const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v, long long hs,
    const bool* __restrict__ mask, int n, int chunk, float scale, float* __restrict__ part_acc,
    float2* __restrict__ part_ml, int* __restrict__ counters, __nv_bfloat16* __restrict__ out) {
  constexpr int EPL = D / 32;
  extern __shared__ float sc[];  // [G][chunk]: scores, then their exponentials
  __shared__ float sm[G], sl[G];
  __shared__ bool last;
  const int kvh = blockIdx.x, split = blockIdx.y, S = gridDim.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int p0 = split * chunk, np = max(0, min(n, p0 + chunk) - p0);
  const __nv_bfloat16* kh = k + kvh * hs;
  const __nv_bfloat16* vh = v + kvh * hs;
  float qf[G][EPL];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    load_bf16<EPL>(q + (size_t)(kvh * G + g) * D + lane * EPL, qf[g]);
#pragma unroll
    for (int e = 0; e < EPL; ++e) qf[g][e] *= scale;
  }
#pragma unroll 2
  for (int i = warp; i < np; i += 4) {
    float kf[EPL];
    load_bf16<EPL>(kh + (size_t)(p0 + i) * D + lane * EPL, kf);
    float s[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      s[g] = 0.f;
#pragma unroll
      for (int e = 0; e < EPL; ++e) s[g] = fmaf(qf[g][e], kf[e], s[g]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
#pragma unroll
      for (int g = 0; g < G; ++g) s[g] += __shfl_xor_sync(0xffffffffu, s[g], o);
    if (lane == 0) {
      const bool keep = mask == nullptr || mask[p0 + i];
#pragma unroll
      for (int g = 0; g < G; ++g) sc[g * chunk + i] = keep ? s[g] : -CUDART_INF_F;
    }
  }
  __syncthreads();
  for (int g = warp; g < G; g += 4) {
    float m = -CUDART_INF_F;
    for (int i = lane; i < np; i += 32) m = fmaxf(m, sc[g * chunk + i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.f;
    for (int i = lane; i < np; i += 32) {
      const float e = m == -CUDART_INF_F ? 0.f : __expf(sc[g * chunk + i] - m);
      sc[g * chunk + i] = e;
      l += e;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0) { sm[g] = m; sl[g] = l; }
  }
  __syncthreads();
  const size_t base = ((size_t)kvh * S + split) * G;
  for (int d = tid; d < D; d += 128) {
    float acc[G];
#pragma unroll
    for (int g = 0; g < G; ++g) acc[g] = 0.f;
#pragma unroll 8
    for (int i = 0; i < np; ++i) {
      const float x = __bfloat162float(vh[(size_t)(p0 + i) * D + d]);
#pragma unroll
      for (int g = 0; g < G; ++g) acc[g] = fmaf(sc[g * chunk + i], x, acc[g]);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) part_acc[(base + g) * D + d] = acc[g];
  }
  if (tid < G) part_ml[base + tid] = make_float2(sm[tid], sl[tid]);
  __threadfence();
  __syncthreads();
  if (tid == 0) last = atomicAdd(&counters[kvh], 1) == S - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int idx = tid; idx < G * D; idx += 128) {
    const int g = idx / D, d = idx % D;
    float M = -CUDART_INF_F;
    for (int s = 0; s < S; ++s) M = fmaxf(M, __ldcg(&part_ml[((size_t)kvh * S + s) * G + g]).x);
    float L = 0.f, o = 0.f;
    for (int s = 0; s < S; ++s) {
      const size_t b = ((size_t)kvh * S + s) * G + g;
      const float2 ml = __ldcg(&part_ml[b]);
      const float w = ml.x == -CUDART_INF_F ? 0.f : __expf(ml.x - M);
      L = fmaf(w, ml.y, L);
      o = fmaf(w, __ldcg(&part_acc[b * D + d]), o);
    }
    out[(size_t)(kvh * G + g) * D + d] = __float2bfloat16(L > 0.f ? o / L : 0.f);
  }
  if (tid == 0) counters[kvh] = 0;
}

template <int D, int G>
static void run(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const bool* mask, int n,
                double scale, torch::Tensor& counters, torch::Tensor& out, int kvh, int S, int chunk) {
  // an error left pending by an earlier call would be reported as this launch's (see the module's status)
  const cudaError_t before = cudaGetLastError();
  TORCH_CHECK(before == cudaSuccess, "an earlier CUDA call left an error pending: ", cudaGetErrorString(before));
  auto stream = at::cuda::getCurrentCUDAStream();
  auto acc = torch::empty({kvh, S, G, D}, q.options().dtype(at::kFloat));
  auto ml = torch::empty({kvh, S, G, 2}, q.options().dtype(at::kFloat));
  decode_attention<D, G><<<dim3(kvh, S), 128, G * chunk * sizeof(float), stream>>>(
      reinterpret_cast<const __nv_bfloat16*>(q.data_ptr()), reinterpret_cast<const __nv_bfloat16*>(k.data_ptr()),
      reinterpret_cast<const __nv_bfloat16*>(v.data_ptr()), k.stride(1), mask, n, chunk, (float)scale,
      acc.data_ptr<float>(), reinterpret_cast<float2*>(ml.data_ptr<float>()), counters.data_ptr<int>(),
      reinterpret_cast<__nv_bfloat16*>(out.data_ptr()));
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "decode_attention<", D, ", ", G, "> launch (", kvh, " x ", S, " blocks, ",
              G * chunk * 4, " bytes of shared memory) failed: ", cudaGetErrorString(err));
}

// q [1, H, 1, D], k and v [1, KVH, n, D] (rows contiguous, the same head stride), mask [n] bool or None.
torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                     double scale, torch::Tensor counters, int64_t slices) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "bf16 q, k, v");
  const int H = q.size(1), D = q.size(3), KVH = k.size(1), n = k.size(2);
  TORCH_CHECK(q.is_contiguous() && k.stride(3) == 1 && k.stride(2) == D && v.stride(3) == 1 && v.stride(2) == D &&
              k.stride(1) == v.stride(1), "rows of k and v contiguous, the same head stride");
  TORCH_CHECK(H % KVH == 0 && counters.numel() >= KVH, "heads a multiple of KV heads; a counter per KV head");
  const int G = H / KVH;
  const bool* mp = nullptr;
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->numel() == n && mask->stride(-1) == 1, "mask: n bools");
    mp = mask->data_ptr<bool>();
  }
  // a slice's scores live in shared memory (48 KiB without opting in to more)
  if (slices <= 0) {  // about two blocks per SM in all, at most 1,024 positions a slice
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    slices = std::max<int64_t>(std::min<int64_t>((n + 15) / 16, (2 * sms + KVH - 1) / KVH), (n + 1023) / 1024);
  }
  const int S = std::max<int>({1, (int)std::min<int64_t>(slices, n), (n * G * 4 + 49151) / 49152});
  const int chunk = (n + S - 1) / S;
  auto out = torch::empty_like(q);
#define CASE(DD, GG) \
  if (D == DD && G == GG) { run<DD, GG>(q, k, v, mp, n, scale, counters, out, KVH, S, chunk); return out; }
  CASE(128, 1) CASE(128, 2) CASE(128, 3) CASE(128, 4) CASE(128, 5) CASE(128, 6) CASE(128, 7) CASE(128, 8)
  CASE(64, 1) CASE(64, 2) CASE(64, 3) CASE(64, 4) CASE(64, 5) CASE(64, 6) CASE(64, 7) CASE(64, 8)
#undef CASE
  TORCH_CHECK(false, "head size 64 or 128 and 1-8 query heads per KV head");
  return out;
}
"""
CPP = ("torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask, "
       "double scale, torch::Tensor counters, int64_t slices);")


def reference(q, k, v, mask, scale: float):
    """One-token attention in fp32 with plain matmuls (key/value heads repeated for their query heads)."""
    import torch

    g = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(g, dim=1), v.float().repeat_interleave(g, dim=1)
    scores = (q.float() @ kf.transpose(-1, -2)) * scale  # [1, H, 1, n]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ vf


def in_the_model(ext, preset: str, tokenizer: str, steps: int = 100) -> None:
    """The fast path's step (hqq4-fast) with the engine's attention, then with this kernel in its place (the same
    loaded model; recompiled): time per token and the largest logit difference over 20 steps."""
    import time

    import torch
    from transformers import AttentionInterface

    from engine.backends import load, runners
    from gpu_engine_check import build_checkpoint

    counters = torch.zeros(64, dtype=torch.int32, device="cuda")

    @torch.library.custom_op("qsbench::decode_attention", mutates_args=())
    def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                         scale: float) -> torch.Tensor:
        return ext.attend(q, k, v, mask, scale, counters, 0)

    @decode_attention.register_fake
    def _(q, k, v, mask, scale):
        return torch.empty_like(q)

    engine_attention = runners.gqa_attention

    def ours(module, query, key, value, attention_mask, *args, **kwargs):
        if query.shape[2] == 1 and torch.compiler.is_compiling() and query.dtype == torch.bfloat16 and \
                kwargs.get("softcap") is None and kwargs.get("position_bias") is None and \
                (attention_mask is None or attention_mask.dtype == torch.bool):
            bucket = kwargs.pop("kv_bucket", None)
            n = bucket.shape[0] if bucket is not None else key.shape[2]
            mask = None if attention_mask is None else attention_mask[..., :n].reshape(-1)
            scaling = kwargs.get("scaling", args[1] if len(args) > 1 else None) or query.shape[-1] ** -0.5
            out = torch.ops.qsbench.decode_attention(query.contiguous(), key[:, :, :n], value[:, :, :n], mask,
                                                     float(scaling))
            return out.transpose(1, 2).contiguous(), None
        return engine_attention(module, query, key, value, attention_mask, *args, **kwargs)

    ckpt = build_checkpoint(preset, Path(tokenizer))
    lm = load(ckpt, "hqq4-fast", "cuda")
    ref = None
    for label, fn in (("engine's attention (cuDNN SDPA)", engine_attention), ("this kernel", ours)):
        AttentionInterface.register(runners.GQA_ATTENTION, fn)
        torch._dynamo.reset()
        with runners._RUNNERS_LOCK:
            old, lm.fast_runner = lm.fast_runner, None
        if old is not None:
            old.close()
        r = runners.acquire(lm, 16, 400)
        with torch.inference_mode():
            tok = r.prefill(torch.arange(16, device="cuda").reshape(1, 16) * 7).argmax(-1, keepdim=True)
            outs = []
            for _ in range(20):
                lg = r.step(tok)
                outs.append(lg.float())
                tok = lg.argmax(-1, keepdim=True)
            out = torch.cat(outs)
            ref = out if ref is None else ref
            diff = (out - ref).abs().max().item()
            best = float("inf")
            for _ in range(3):
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(steps):
                    tok = r.step(tok).argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                best = min(best, (time.perf_counter() - t) / steps)
        print(f"{preset} hqq4-fast, {label}: {best * 1e3:.3f} ms per token = {1 / best:.1f} tok/s (position {r.pos}); "
              f"largest logit difference vs the first over 20 steps {diff:.3f}", flush=True)
        r.release()
    AttentionInterface.register(runners.GQA_ATTENTION, engine_attention)


def main() -> int:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils import cpp_extension

    from gpu_int4_kernels import graph_time

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="also time the fast path's step of this preset with the kernel in the model")
    ap.add_argument("--tokenizer", help="tokenizer folder for --model (as for tests/test_gpu.py)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_decode_attention: a run needs a CUDA GPU (none is visible here)")
        return 1
    major, minor = torch.cuda.get_device_capability()
    ext = cpp_extension.load_inline(name="quantscope_decode_attention", cpp_sources=CPP, cuda_sources=SRC,
                                    functions=["attend"], verbose=False,
                                    extra_cuda_cflags=["-O3",
                                                       f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, torch {torch.__version__}\n")
    counters = torch.zeros(64, dtype=torch.int32, device="cuda")

    # correctness: head shapes of the presets (8B / Mistral: 32 x 128 over 8; Qwen2.5-7B: 28 over 4; SmolLM2: 9 x 64
    # over 3), cache lengths, masks that drop the bucket's tail or whole slices
    worst = 0.0
    for h, kvh, d in ((32, 8, 128), (28, 4, 128), (9, 3, 64)):
        for n in (1, 5, 200, 256, 777, 2048, 8192):
            for kind in ("none", "tail", "holes"):
                torch.manual_seed(n + h)
                q = torch.randn(1, h, 1, d, device="cuda", dtype=torch.bfloat16)
                cache_k = torch.randn(1, kvh, n + 64, d, device="cuda", dtype=torch.bfloat16)
                cache_v = torch.randn(1, kvh, n + 64, d, device="cuda", dtype=torch.bfloat16)
                k, v = cache_k[:, :, :n], cache_v[:, :, :n]
                mask = None
                if kind != "none":
                    mask = torch.ones(n, dtype=torch.bool, device="cuda")
                    mask[max(1, n - n // 3):] = False
                    if kind == "holes":
                        mask[: n // 2] = False
                        mask[0] = True
                scale = d ** -0.5
                want = reference(q, k, v, mask, scale)
                torch.cuda.synchronize()
                for s in (1, 3, 0):  # 0: the kernel's own choice
                    got = ext.attend(q, k, v, mask, scale, counters, s)
                    try:
                        torch.cuda.synchronize()
                    except Exception as e:
                        print(f"FAILED heads {h}/{kvh} d {d} n {n} mask {kind} slices {s}: {str(e).splitlines()[0]}")
                        return 1
                    err = (got.float() - want).abs().max().item()
                    worst = max(worst, err)
                    if not err < 0.02:
                        print(f"MISMATCH heads {h}/{kvh} d {d} n {n} mask {kind} slices {s}: max error {err:.4f}")
                        return 1
    assert int(counters.abs().sum()) == 0, "a counter was left set"
    print(f"correct on every case: largest error {worst:.4f} against fp32 (bf16 output)\n")

    print("| positions | SDPA µs: PyTorch's pick / cuDNN forced | ours µs | MB read |")
    print("|---|---|---|---|")
    h, kvh, d = 32, 8, 128
    for n in (256, 512, 1024, 2048, 4096, 8192):
        lmax = max(2048, n)
        caches = [(torch.randn(1, kvh, lmax, d, device="cuda", dtype=torch.bfloat16),
                   torch.randn(1, kvh, lmax, d, device="cuda", dtype=torch.bfloat16)) for _ in range(32)]
        q = torch.randn(1, h, 1, d, device="cuda", dtype=torch.bfloat16)
        mask = torch.ones(n, dtype=torch.bool, device="cuda")
        mask[n - 40:] = False
        m4 = mask.reshape(1, 1, 1, n)
        s = 0  # the kernel's own choice of slices
        state = {"i": 0}

        def turn():
            state["i"] = (state["i"] + 1) % len(caches)
            return caches[state["i"]]

        def theirs():
            ck, cv = turn()
            return F.scaled_dot_product_attention(q, ck[:, :, :n], cv[:, :, :n], attn_mask=m4, scale=d ** -0.5,
                                                  enable_gqa=True)

        def ours():
            ck, cv = turn()
            return ext.attend(q, ck[:, :, :n], cv[:, :, :n], mask, d ** -0.5, counters, s)

        t_theirs, t_ours = graph_time(theirs, 200), graph_time(ours, 200)
        try:
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                t_cudnn = f"{graph_time(theirs, 200) * 1e6:.1f}"
        except RuntimeError as e:
            t_cudnn = f"refused ({str(e).splitlines()[0][:60]})"
        mb = 2 * kvh * n * d * 2 / 1e6
        print(f"| {n} | {t_theirs * 1e6:.1f} / {t_cudnn} | {t_ours * 1e6:.1f} | {mb:.1f} |", flush=True)
        caches = None
        torch.cuda.empty_cache()
    if args.model:
        print()
        in_the_model(ext, args.model, args.tokenizer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
