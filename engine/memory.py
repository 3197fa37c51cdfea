"""The memory calculator: pure functions from (ModelSpec, QuantSpec, RuntimeSpec, TrainingSpec) to bytes.

Terms of the total, each an integer number of bytes:

* ``weights``     -- every byte the loaded weights hold (:mod:`engine.formats`), measured-exact;
* ``kv_cache``    -- 2 (K and V) x batch x layers x kv_heads x head_dim x cached tokens x bytes/element,
  grouped-query aware, sliding-window layers capped at ``window - 1`` tokens as transformers 5's
  ``DynamicSlidingWindowLayer`` keeps them; exact against a real cache after a forward pass;
* ``activations`` -- the transient peak of one prefill (or, when training, what backward keeps): an
  estimate from the shapes, documented in :func:`activation_bytes`;
* ``overhead``    -- fixed runtime cost (CUDA context and allocator, or the Python + PyTorch process on
  CPU): a documented default per device, tunable through ``RuntimeSpec.overhead_bytes``;
* ``gradients`` / ``optimizer`` -- training only.
"""
from __future__ import annotations

import math

from .errors import InputError
from .formats import parse_method, weights_bytes
from .specs import MemoryEstimate, ModelSpec, QuantSpec, RuntimeSpec, TrainingSpec

MiB = 2**20
GiB = 2**30

# Fixed runtime overhead per device (defaults; RuntimeSpec.overhead_bytes overrides).
# cuda: what nvidia-smi shows beyond PyTorch's allocator peak: the CUDA context, cuBLAS workspace and the
#       caching allocator's unused reserve. bench/gpu_calculator_check.py measured 890-1170 MiB (NVML process
#       memory minus max_memory_allocated) for Llama-3.1-8B in bf16/nf4/fp4/int8/hqq4 on an H100
#       (torch 2.11, transformers 5.17, 2026-11-23); 960 MiB is the middle of that range.
# cpu:  resident memory of a Python process that has imported torch + transformers (~400 MiB here).
# mps:  the Metal runtime inside the same process.
OVERHEAD_BYTES = {"cuda": 960 * MiB, "cpu": 400 * MiB, "mps": 256 * MiB}

# Bytes per cached K/V element. q8_0 / q4_0 are llama.cpp's block types (34 and 18 bytes per 32 values).
KV_BYTES = {"fp32": (4, 1), "fp16": (2, 1), "bf16": (2, 1), "fp8": (1, 1), "q8_0": (34, 32), "q4_0": (18, 32)}

MAX_CONTEXT = 10_000_000
MAX_BATCH = 100_000
# Calibrated runtime terms (bench/gpu_validate.py on an H200, 2026-11-26; see activation_bytes):
INT8_OUT_BYTES = 4  # LLM.int8's int32 matmul result, per output feature per token
# Hidden-state rows alive at a prefill's peak (in the MLP of a decoder layer after the first): the embeddings (held
# by the model's forward for the whole pass), the layer's input (held by the loop over layers), the residual
# after attention and its normed copy entering the MLP. Seen in the allocator's memory history at the peak of an
# 8B prefill (H200, bench/results/gpu_peak_snapshot_bf16_8b_h200_2026-11-26e.log: 4 x 64 MiB at 8,192 tokens).
HIDDEN_ROWS = 4
# LLM.int8's outlier decomposition (bitsandbytes int8_mixed_scaled_mm) per outlier column and output feature: the
# int8 weight column gathered (1) and dequantized through two fp32 temporaries (4 + 4), all alive at once
# (bench/results/gpu_peak_snapshot_int8_8b_h200_2026-11-26e.log: 45 MiB + 2 x 180 MiB for 11,520 columns of the 8B's
# down projection)
INT8_OUTLIER_BYTES_PER_WEIGHT = 9
LLM_INT8_THRESHOLD = 6.0  # bitsandbytes' default, which transformers' BitsAndBytesConfig keeps
HQQ_DEQUANT_BYTES_PER_WEIGHT = 5  # unpacked uint8 codes (1) + a compute-dtype temporary and result (2 + 2)
# hqq4-fast on CUDA multiplies a prompt on weights dequantized this many bytes of rows at a time (the bf16 buffer
# engine.backends.int4_cuda reads with cuBLAS; the one definition of that chunk size)
FAST_INT4_DEQUANT_BYTES = 32 * MiB


def _check_positive(name: str, v, limit: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        raise InputError(f"{name} must be a whole number, got {v!r}.")
    if v != int(v) or v < 1:
        raise InputError(f"{name} must be a whole number of at least 1, got {v!r}.")
    if v > limit:
        raise InputError(f"{name} {int(v):,} is larger than the calculator accepts ({limit:,}).")
    return int(v)


def kv_elem(kv_dtype: str, q: QuantSpec) -> tuple[int, int]:
    """(bytes, per elements) of one cached value."""
    if kv_dtype == "auto":
        return (4, 1) if q.method == "fp32" else (2, 1)
    try:
        return KV_BYTES[kv_dtype]
    except KeyError:
        raise InputError(f"Unknown KV-cache dtype '{kv_dtype}'. Choose auto, {', '.join(KV_BYTES)}.") from None


def kv_cache_bytes(model: ModelSpec, context: int, batch: int, kv_dtype: str, q: QuantSpec) -> int:
    """Bytes of the K and V caches holding ``context`` tokens for ``batch`` sequences.

    >>> from engine.architectures import build_model_spec
    >>> m = build_model_spec({"model_type": "llama", "vocab_size": 10, "hidden_size": 64,
    ...     "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    >>> kv_cache_bytes(m, 100, 1, "fp16", parse_method("fp16"))  # 2 * 2 layers * 2 heads * 16 dims * 100 * 2 B
    25600
    """
    num, per = kv_elem(kv_dtype, q)
    row = model.num_kv_heads * model.head_dim
    total = 0
    for layer in range(model.num_layers):
        w = model.window(layer)
        tokens = min(context, w - 1) if w else context
        total += 2 * batch * tokens * math.ceil(row * num / per)
    return total


def activation_bytes(model: ModelSpec, q: QuantSpec, context: int, batch: int, training: TrainingSpec,
                     device: str = "cuda", int8_outlier_share: float = 1.0) -> int:
    """Estimated activation memory (an estimate from the shapes, not a measurement).

    Inference: the transient peak of prefilling ``context`` tokens with SDPA attention (no s^2 score
    matrix): :data:`HIDDEN_ROWS` hidden-state rows per token (4H: the embeddings, the layer's input, the residual
    and its normed copy) plus the larger of the attention projections
    (q, k, v and the attention output) and the MLP intermediates (gate, up and their product: 3I, times
    top-k for MoE), in the compute dtype; plus the last position's logits in the compute dtype and fp32
    (``generate`` computes logits for the last token only); plus one dequantized weight for
    bitsandbytes/HQQ, which materialise a 16-bit copy of the layer they multiply during prefill -- except
    HQQ's fast path (``q.fast``), which on CUDA dequantizes :data:`FAST_INT4_DEQUANT_BYTES` of rows at a time and
    on ``device`` cpu none (PyTorch's int4 kernel reads the codes). LLM.int8 (``int8``): with
    ``int8_outlier_share`` (0..1) of each layer's input columns above its outlier threshold (see the comment below).

    Training: what backward keeps. Per layer (Korthikanti et al. 2022 counted for a SwiGLU block):
    inputs of both norms, their outputs, q/k/v, attention output and the four MLP intermediates, in 16-bit:
    ``b*s*(6H + q + 2kv + 4I*k) * 2`` bytes; with gradient checkpointing only each layer's input is kept
    plus one layer recomputed. Plus the full logits in 16-bit, their fp32 copy for the loss and its gradient.
    """
    cb = 2 if q.method != "fp32" else 4
    H, I = model.hidden_size, model.intermediate_size
    k = model.experts_per_token or 1
    q_out = model.num_heads * model.head_dim
    kv_out = model.num_kv_heads * model.head_dim
    bs = batch * context
    if training.mode == "inference":
        attn = q_out + 2 * kv_out + q_out
        mlp = 3 * I * k
        hidden = bs * HIDDEN_ROWS * H * cb  # the hidden-state rows alive at the peak, in every case below
        act = hidden + bs * max(attn, mlp) * cb
        logits = batch * model.vocab_size * (cb + 4)
        if q.method not in ("bnb4", "int8", "hqq"):
            return act + logits
        if q.method == "hqq" and q.fast:
            # Each projection of a prompt on its own (no stacked sibling outputs: int4_cuda._Fused.part; a fused
            # gated MLP's SiLU * up in place in its gate/up output: int4_cuda.silu_mul), so the MLP's 3I peak
            # holds; measured on an H200 (docs/benchmarks.md, issue 8).
            return act + (FAST_INT4_DEQUANT_BYTES if device == "cuda" else 0) + logits
        layers = [t for t in model.tensors if t.linear and t.layer is not None]
        largest = max((t.numel for t in layers), default=0)
        if q.method == "int8":
            # LLM.int8 (bitsandbytes) per linear: the input quantised to int8 (1 byte per input feature), an int8 x
            # int8 matmul into an int32 result (INT8_OUT_BYTES per output feature), rescaled into fp16 (2) and cast
            # to the compute dtype (cb). At long contexts the peak is the MLP's second projection with the first's
            # activated output alive (I x cb). Before that matmul comes the outlier decomposition: the input columns
            # holding a value >= LLM_INT8_THRESHOLD are multiplied in 16-bit by their weight columns, gathered and
            # dequantised (INT8_OUTLIER_BYTES_PER_WEIGHT), beside the layer's input (cb), its int8 copy (1) and the
            # outlier columns of the input (cb). How many columns that is depends on the activations, not the
            # shapes: ``int8_outlier_share`` of every layer's inputs (1.0, every column, is the bound). Both moments
            # read off the allocator's history at the peak of an 8B prefill
            # (H200, bench/results/gpu_peak_snapshot_int8_8b_h200_2026-11-26e.log).
            widest = max(layers, key=lambda t: t.shape[-2], default=None)
            out_f, in_f = (widest.shape[-2], widest.shape[-1]) if widest is not None else (0, 0)
            mlp8 = hidden + bs * (out_f * (cb + INT8_OUT_BYTES + 2 + cb) + in_f)
            outliers = 0
            for out_t, in_t in {(t.shape[-2], t.shape[-1]) for t in layers}:  # each shape once, not each layer's
                n = math.ceil(int8_outlier_share * in_t)  # estimate() checked 0 <= share <= 1
                decomposition = n * (bs * cb + out_t * INT8_OUTLIER_BYTES_PER_WEIGHT)
                outliers = max(outliers, hidden + bs * in_t * (cb + 1) + decomposition)
            return max(act, mlp8, outliers) + logits
        if q.method == "hqq":
            # HQQ dequantises a layer before its matmul: the packed codes unpacked to one byte per weight, then
            # (W - zero) * scale in the compute dtype (a temporary and the result). At short contexts these
            # ~5 bytes per weight of the largest layer, beside only the residual stream, are the peak; at long
            # ones the activations with one dequantised weight are. Fitted on an H200 (docs/benchmarks.md).
            return max(act + largest * cb, hidden + largest * HQQ_DEQUANT_BYTES_PER_WEIGHT) + logits
        return act + largest * cb + logits  # bnb4: one dequantised weight
    per_layer = bs * (6 * H + q_out + 2 * kv_out + 4 * I * k) * 2
    if training.gradient_checkpointing:
        stored = model.num_layers * bs * H * 2 + per_layer
    else:
        stored = model.num_layers * per_layer
    logits = bs * model.vocab_size * (2 + 4 + 4)
    return stored + logits


def lora_trainable_params(model: ModelSpec, rank: int, targets: tuple[str, ...]) -> int:
    """Exact LoRA parameter count: r x (in + out) for each targeted nn.Linear (peft's A and B matrices).

    ``targets`` are module leaf names, or ``("all-linear",)`` for every nn.Linear in the decoder blocks (as
    peft's ``all-linear``; fused MoE experts are not nn.Linear in transformers 5, so they get no adapter).
    """
    if tuple(targets) == ("all-linear",):
        return sum(rank * (t.shape[0] + t.shape[1]) for t in model.tensors
                   if t.linear and t.layer is not None and t.name.endswith(".weight"))
    total = 0
    matched = set()
    for t in model.tensors:
        if not (t.linear and t.name.endswith(".weight")):
            continue
        leaf = t.module.rsplit(".", 1)[-1]
        if leaf in targets:
            matched.add(leaf)
            total += rank * (t.shape[0] + t.shape[1])
    missing = [x for x in targets if x not in matched]
    if missing:
        names = sorted({t.module.rsplit(".", 1)[-1] for t in model.tensors if t.linear})
        raise InputError(f"LoRA target module(s) {', '.join(missing)} do not exist in {model.name}. "
                         f"Its linear modules are: {', '.join(names)}.")
    return total


OPTIMIZERS = ("adamw", "adamw8bit", "sgd")


def _optimizer_bytes_per_param(optimizer: str, state_bytes: int) -> float:
    if optimizer == "adamw":
        return 2 * state_bytes  # exp_avg and exp_avg_sq, in the parameter's dtype
    if optimizer == "adamw8bit":
        return 2 * (1 + 4 / 256)  # bitsandbytes blockwise 8-bit states, one fp32 absmax per 256 values each
    if optimizer == "sgd":
        return state_bytes  # momentum buffer
    raise InputError(f"Unknown optimizer '{optimizer}'. Choose {', '.join(OPTIMIZERS)}.")


def estimate(model: ModelSpec, quant: QuantSpec, runtime: RuntimeSpec = RuntimeSpec(),
             training: TrainingSpec = TrainingSpec()) -> MemoryEstimate:
    """Estimate the memory of running (or training) ``model`` stored as ``quant``.

    Weights and KV cache are exact byte counts; activations and overhead are documented estimates.
    """
    context = _check_positive("Context length", runtime.context, MAX_CONTEXT)
    batch = _check_positive("Batch size", runtime.batch, MAX_BATCH)
    if runtime.device not in OVERHEAD_BYTES:
        raise InputError(f"Unknown device '{runtime.device}'. Choose {', '.join(OVERHEAD_BYTES)}.")
    if runtime.overhead_bytes is not None and (not isinstance(runtime.overhead_bytes, int) or runtime.overhead_bytes < 0):
        raise InputError("Overhead must be a whole number of bytes, 0 or more.")
    notes: list[str] = []
    mode = training.mode
    if mode not in ("inference", "lora", "qlora", "full"):
        raise InputError(f"Unknown mode '{mode}'. Choose inference, lora, qlora or full.")
    if mode == "qlora" and quant.method != "bnb4":
        quant = parse_method("nf4", double_quant=True, dtype=quant.dtype if quant.dtype != "fp32" else "bf16")
        notes.append("QLoRA trains adapters on a bitsandbytes 4-bit base: estimated with NF4 + double quant.")
    if mode in ("lora", "full") and quant.method not in ("fp32", "fp16", "bf16"):
        raise InputError(f"{mode} fine-tuning needs a 16- or 32-bit base model; for a {quant.name} base use "
                         "mode qlora (bitsandbytes 4-bit) instead.")
    if mode == "full" and training.precision not in ("mixed", "bf16", "fp32"):
        raise InputError("Precision must be mixed, bf16 or fp32.")

    w_bytes, by_role, quantized = weights_bytes(quant, model)
    kv = kv_cache_bytes(model, context, batch, runtime.kv_dtype, quant) if mode == "inference" else 0
    share = runtime.int8_outlier_share
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise InputError(f"LLM.int8's outlier share must be a number from 0 to 1 (0% to 100% of a layer's input "
                         f"columns), got {share!r}.")
    act = activation_bytes(model, quant, context, batch, training, runtime.device, share)
    overhead = runtime.overhead_bytes if runtime.overhead_bytes is not None else OVERHEAD_BYTES[runtime.device]
    grads = opt = trainable = 0
    if mode == "full":
        trainable = model.params
        if training.precision in ("mixed", "fp32"):
            # fp32 master weights (AMP keeps parameters in fp32 and casts per op), fp32 gradients.
            w_bytes = model.params * 4
            by_role = {r: n * 4 for r, n in model.params_by_role().items()}
            grads = model.params * 4
            state = 4
        else:
            w_bytes = model.params * 2
            by_role = {r: n * 2 for r, n in model.params_by_role().items()}
            grads = model.params * 2
            state = 2
        opt = math.ceil(trainable * _optimizer_bytes_per_param(training.optimizer, state))
    elif mode in ("lora", "qlora"):
        rank = _check_positive("LoRA rank", training.lora_rank, 4096)
        trainable = lora_trainable_params(model, rank, tuple(training.lora_targets))
        # peft keeps adapter weights in fp32 (autocast_adapter_dtype=True): weights, grads and states fp32.
        lora_w = trainable * 4
        w_bytes += lora_w
        by_role["lora"] = lora_w
        grads = trainable * 4
        opt = math.ceil(trainable * _optimizer_bytes_per_param(training.optimizer, 4))
    if mode == "inference" and quant.method == "int8":
        none = activation_bytes(model, quant, context, batch, training, runtime.device, 0.0)
        if none < act:
            notes.append(
                f"LLM.int8 at {context:,} tokens: its outlier decomposition sets the activations, with "
                f"{share:.0%} of a layer's input columns holding a value of {LLM_INT8_THRESHOLD} or more (those "
                "columns are multiplied in 16-bit by a dequantised copy of their weight columns). That share depends "
                "on the model and the prompt, not on the shapes: 100% is the bound; with none the total would be "
                f"{(act - none) / GiB:.2f} GiB lower. Measured: the trained SmolLM2-135M had 2 such columns in its "
                "attention and gate/up inputs but 21-54% in its MLP down projection's (128-2,048 tokens of text); "
                "random-weight 7-8B models 60-81% at 512 tokens and all from 4,096, a random 1B 3% at 512. Set the "
                "share under 'Training, overhead and LLM.int8'; Side by side shows what an int8 run's prompt had.")
    if model.approximate:
        notes.append(model.note or "Approximate: the shape is not known exactly.")
    return MemoryEstimate(
        model=model.name, method=quant.name, params=model.params, active_params=model.active_params,
        weights_bytes=w_bytes, weights_by_role=by_role, quantized_params=quantized,
        kv_cache_bytes=kv, activations_bytes=act, overhead_bytes=overhead,
        gradients_bytes=grads, optimizer_bytes=opt, trainable_params=trainable,
        approximate=model.approximate, notes=notes,
    )


def naive_bytes(params: int, bits: int) -> int:
    """The textbook estimate params x bits / 8 (what most calculators show)."""
    return params * bits // 8
