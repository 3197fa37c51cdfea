"""Experiment (issue 8, not used by the engine): one-token attention over a static KV cache, in one kernel of our
own, against PyTorch's SDPA (cuDNN) as the fast path calls it.

    python bench/gpu_decode_attention.py [--model meta-llama/Llama-3.1-8B-Instruct --tokenizer DIR]

Why: in the fast path's decode step of an 8B model, cuDNN's attention takes a fixed ~8-9 µs per layer for a few
hundred positions of 8 KV heads (~1.5 MB read; bench/results/gpu_profile_hqq4fast_8b_h200_2026-11-26g.log):
0.26-0.30 ms of a 2.88 ms token. Reading 1.5 MB takes ~0.4 µs at the HBM's rate, so the time is the kernel's
fixed cost and its parallelism.

The kernel (flash-decoding in one launch): a block per (KV head, slice of 128 positions). Each thread scores one
position for the KV head's G query heads (its key row in 16-byte loads, the queries in shared memory), a warp per
query head takes the slice's softmax statistics, then each warp sums a quarter of the slice's weighted values (a
lane D/32 dimensions) and the warps' sums are added in shared memory. Each block writes (max, sum, weighted values)
per head to a scratch buffer; the last block of a KV head to finish (an atomic ticket, reset by that block) combines
the slices (weights per slice in shared memory, then each thread one (head, dimension) over the slices). A boolean
mask (True = attend) drops positions, as transformers' SDPA mask does past the cache's write position.

Prints, per cache length, the time per call of each (a CUDA graph of 200 calls cycling through 32 caches, as
32 layers would) and the largest error against an fp32 reference; with ``--model``, the fast path's step with the
kernel in place of the engine's attention, both fed the same 40 tokens (logits compared step by step).

Measured (H200, 2026-11-26, ninth session; bench/results/gpu_decode_attention_h200_2026-11-26h.log): correct on
every case (largest error 0.0076 against fp32, bf16 output); per call 11.3 / 15.0 / 13.6 / 15.3 / 19.8 / 30.5 µs
at 256 / 512 / 1,024 / 2,048 / 4,096 / 8,192 positions against cuDNN's 11.8 / 14.1 / 12.7 / 14.2 / 17.4 / 20.3;
in the 8B step 2.96 ms per token against 2.80 with cuDNN. **Not faster, so not used.** Both are bound by
latency (a few dependent memory round trips and the launch), not by the bytes read. History: the first version
(eighth session) failed on the device with "invalid argument"; compute-sanitizer showed an out-of-bounds 16-byte
shared-memory read: nvcc read the scores' tail as LDS.128 vectors past the dynamic allocation (fixed by a pad).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SRC = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <math_constants.h>

constexpr int P = 128;  // positions per block: one per thread when scoring

__device__ __forceinline__ void bf16x8(const uint4& u, float* f) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

// grid (KV heads, slices of P positions), 128 threads. q [H, D]; k, v: KV head h's positions at k + h * hs, D
// apart; mask: n bools or null; parts: [KVH, S, G, D] fp32 and [KVH, S, G] (max, sum); counters [KVH] int32,
// zero between calls. Dynamic shared memory: S * G floats (the combining block's weights).
template <int D, int G>
__global__ void __launch_bounds__(128) decode_attention(const __nv_bfloat16* __restrict__ q,
    const __nv_bfloat16* __restrict__ k, const __nv_bfloat16* __restrict__ v, long long hs,
    const bool* __restrict__ mask, int n, float scale, float* __restrict__ part_acc,
    float2* __restrict__ part_ml, int* __restrict__ counters, __nv_bfloat16* __restrict__ out) {
  constexpr int CH = D / 8, EPL = D / 32;
  __shared__ __align__(16) float qs[G][D];
  __shared__ float sc[G][P];
  __shared__ float red[4][G][D];
  __shared__ float sm[G], sl[G];
  __shared__ bool last;
  extern __shared__ float wts[];  // [G][S]
  const int kvh = blockIdx.x, split = blockIdx.y, S = gridDim.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int p0 = split * P, np = min(P, n - p0);
  const __nv_bfloat16* kh = k + kvh * hs;
  const __nv_bfloat16* vh = v + kvh * hs;
  for (int i = tid; i < G * D; i += 128) qs[i / D][i % D] = __bfloat162float(q[(size_t)kvh * G * D + i]) * scale;
  __syncthreads();
  {  // scores: thread t scores position p0 + t for the G query heads
    const int p = p0 + tid;
    const bool keep = tid < np && (mask == nullptr || mask[p]);
    float s[G];
#pragma unroll
    for (int g = 0; g < G; ++g) s[g] = 0.f;
    if (keep) {
      const uint4* row = reinterpret_cast<const uint4*>(kh + (size_t)p * D);
      uint4 kv[CH];
#pragma unroll
      for (int c = 0; c < CH; ++c) kv[c] = __ldg(row + c);
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        float f[8];
        bf16x8(kv[c], f);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float4 a = *reinterpret_cast<const float4*>(&qs[g][c * 8]);
          const float4 b = *reinterpret_cast<const float4*>(&qs[g][c * 8 + 4]);
          s[g] = fmaf(f[0], a.x, fmaf(f[1], a.y, fmaf(f[2], a.z, fmaf(f[3], a.w, s[g]))));
          s[g] = fmaf(f[4], b.x, fmaf(f[5], b.y, fmaf(f[6], b.z, fmaf(f[7], b.w, s[g]))));
        }
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) sc[g][tid] = keep ? s[g] : -CUDART_INF_F;
  }
  __syncthreads();
  for (int g = warp; g < G; g += 4) {  // the slice's softmax statistics per query head; sc becomes exp(s - m)
    float m = -CUDART_INF_F;
#pragma unroll
    for (int i = 0; i < P / 32; ++i) m = fmaxf(m, sc[g][lane + 32 * i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float l = 0.f;
#pragma unroll
    for (int i = 0; i < P / 32; ++i) {
      const float e = m == -CUDART_INF_F ? 0.f : __expf(sc[g][lane + 32 * i] - m);
      sc[g][lane + 32 * i] = e;
      l += e;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0) { sm[g] = m; sl[g] = l; }
  }
  __syncthreads();
  // weighted values: warp w takes positions w, w + 4, ...; a lane EPL dimensions of each
  float acc[G][EPL];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < EPL; ++e) acc[g][e] = 0.f;
#pragma unroll 16
  for (int i = warp; i < np; i += 4) {
    float f[EPL];
    const __nv_bfloat16* vp = vh + (size_t)(p0 + i) * D + lane * EPL;
    if constexpr (EPL == 4) {
      const uint2 u = __ldg(reinterpret_cast<const uint2*>(vp));
      const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
      const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
      f[0] = a.x; f[1] = a.y; f[2] = b.x; f[3] = b.y;
    } else {
      const float2 a = __bfloat1622float2(__ldg(reinterpret_cast<const __nv_bfloat162*>(vp)));
      f[0] = a.x; f[1] = a.y;
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float w = sc[g][i];
#pragma unroll
      for (int e = 0; e < EPL; ++e) acc[g][e] = fmaf(w, f[e], acc[g][e]);
    }
  }
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < EPL; ++e) red[warp][g][lane * EPL + e] = acc[g][e];
  __syncthreads();
  const size_t base = ((size_t)kvh * S + split) * G;
  for (int i = tid; i < G * D; i += 128) {
    const int g = i / D, d = i % D;
    part_acc[(base + g) * D + d] = red[0][g][d] + red[1][g][d] + red[2][g][d] + red[3][g][d];
  }
  if (tid < G) part_ml[base + tid] = make_float2(sm[tid], sl[tid]);
  __threadfence();
  __syncthreads();
  if (tid == 0) last = atomicAdd(&counters[kvh], 1) == S - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  // the last block of this KV head combines the slices: a warp per query head finds the largest max and the
  // total, the weights go to shared memory, then each thread sums its (head, dimension) over the slices
  const float2* ml = part_ml + (size_t)kvh * S * G;
  for (int g = warp; g < G; g += 4) {
    float M = -CUDART_INF_F;
    for (int s = lane; s < S; s += 32) M = fmaxf(M, __ldcg(&ml[s * G + g]).x);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
    float L = 0.f;
    for (int s = lane; s < S; s += 32) {
      const float2 x = __ldcg(&ml[s * G + g]);
      const float w = x.x == -CUDART_INF_F ? 0.f : __expf(x.x - M);
      wts[g * S + s] = w;
      L = fmaf(w, x.y, L);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) L += __shfl_xor_sync(0xffffffffu, L, o);
    if (lane == 0) sl[g] = L;
  }
  __syncthreads();
  const float* pa = part_acc + (size_t)kvh * S * G * D;
  for (int i = tid; i < G * D; i += 128) {
    const int g = i / D, d = i % D;
    float o = 0.f;
#pragma unroll 8
    for (int s = 0; s < S; ++s) o = fmaf(wts[g * S + s], __ldcg(&pa[((size_t)s * G + g) * D + d]), o);
    const float L = sl[g];
    out[(size_t)(kvh * G + g) * D + d] = __float2bfloat16(L > 0.f ? o / L : 0.f);
  }
  if (tid == 0) counters[kvh] = 0;
}

template <int D, int G>
static void run(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const bool* mask, int n,
                double scale, torch::Tensor& counters, torch::Tensor& out, int kvh) {
  const int S = (n + P - 1) / P;
  TORCH_CHECK(S * G * 4 <= 16384, "at most ", 16384 / 4 / G * P, " positions");
  auto stream = at::cuda::getCurrentCUDAStream();
  auto acc = torch::empty({kvh, S, G, D}, q.options().dtype(at::kFloat));
  auto ml = torch::empty({kvh, S, G, 2}, q.options().dtype(at::kFloat));
  // 8 floats of pad: nvcc may read the weights as 16-byte vectors past the last one (seen in the first version)
  decode_attention<D, G><<<dim3(kvh, S), 128, (S * G + 8) * sizeof(float), stream>>>(
      reinterpret_cast<const __nv_bfloat16*>(q.data_ptr()), reinterpret_cast<const __nv_bfloat16*>(k.data_ptr()),
      reinterpret_cast<const __nv_bfloat16*>(v.data_ptr()), k.stride(1), mask, n, (float)scale,
      acc.data_ptr<float>(), reinterpret_cast<float2*>(ml.data_ptr<float>()), counters.data_ptr<int>(),
      reinterpret_cast<__nv_bfloat16*>(out.data_ptr()));
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "decode_attention<", D, ", ", G, "> launch (", kvh, " x ", S, " blocks) failed: ",
              cudaGetErrorString(err));
}

// q [1, H, 1, D], k and v [1, KVH, n, D] (rows contiguous, the same head stride), mask [n] bool or None.
torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                     double scale, torch::Tensor counters) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "bf16 q, k, v");
  const int H = q.size(1), D = q.size(3), KVH = k.size(1), n = k.size(2);
  TORCH_CHECK(q.is_contiguous() && k.stride(3) == 1 && k.stride(2) == D && v.stride(3) == 1 && v.stride(2) == D &&
              k.stride(1) == v.stride(1) && n > 0, "rows of k and v contiguous, the same head stride");
  TORCH_CHECK(H % KVH == 0 && counters.numel() >= KVH, "heads a multiple of KV heads; a counter per KV head");
  const int G = H / KVH;
  const bool* mp = nullptr;
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->numel() == n && mask->stride(-1) == 1, "mask: n bools");
    mp = mask->data_ptr<bool>();
  }
  auto out = torch::empty_like(q);
#define CASE(DD, GG) \
  if (D == DD && G == GG) { run<DD, GG>(q, k, v, mp, n, scale, counters, out, KVH); return out; }
  CASE(128, 1) CASE(128, 2) CASE(128, 3) CASE(128, 4) CASE(128, 5) CASE(128, 6) CASE(128, 7) CASE(128, 8)
  CASE(64, 1) CASE(64, 2) CASE(64, 3) CASE(64, 4) CASE(64, 5) CASE(64, 6) CASE(64, 7) CASE(64, 8)
#undef CASE
  TORCH_CHECK(false, "head size 64 or 128 and 1-8 query heads per KV head");
  return out;
}
"""
CPP = ("torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask, "
       "double scale, torch::Tensor counters);")


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

    # the schema spelled out: this module's annotations are strings (postponed), which infer_schema cannot read
    @torch.library.custom_op("qsbench::decode_attention", mutates_args=(),
                             schema="(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor")
    def decode_attention(q, k, v, mask, scale):
        return ext.attend(q, k, v, mask, scale, counters)

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

    forced = (torch.arange(40, device="cuda").reshape(40, 1, 1) * 977 + 13) % 120000
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
            r.prefill(torch.arange(16, device="cuda").reshape(1, 16) * 7)
            outs = []
            for t in forced:  # the same tokens for both: logits comparable step by step
                lg = r.step(t)
                outs.append(lg.float().clone())
            tok = r.greedy(lg)
            out = torch.cat(outs)
            ref = out if ref is None else ref
            diff = (out - ref).abs().max().item()
            agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
            best = float("inf")
            for _ in range(3):
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(steps):
                    tok = r.greedy(r.step(tok))
                torch.cuda.synchronize()
                best = min(best, (time.perf_counter() - t) / steps)
        print(f"{preset} hqq4-fast, {label}: {best * 1e3:.3f} ms per token = {1 / best:.1f} tok/s (position {r.pos}); "
              f"over {len(forced)} teacher-forced steps: largest logit difference vs the first {diff:.3f} (logits "
              f"up to {ref.abs().max().item():.1f}), the same argmax in {agree:.0%}", flush=True)
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
                for s in (1, 2):  # twice: the counters must have been reset by the first call
                    got = ext.attend(q, k, v, mask, scale, counters)
                    try:
                        torch.cuda.synchronize()
                    except Exception as e:
                        print(f"FAILED heads {h}/{kvh} d {d} n {n} mask {kind} call {s}: {str(e).splitlines()[0]}")
                        return 1
                    err = (got.float() - want).abs().max().item()
                    worst = max(worst, err)
                    if not err < 0.02:
                        print(f"MISMATCH heads {h}/{kvh} d {d} n {n} mask {kind} call {s}: max error {err:.4f}")
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
            return ext.attend(q, ck[:, :, :n], cv[:, :, :n], mask, d ** -0.5, counters)

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
