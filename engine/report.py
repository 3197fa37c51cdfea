"""Everything the calculator tab and CLI show, computed without any UI: one call per update."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InputError, QuantScopeError
from .formats import parse_method
from .hardware import Verdict, device_of, get_hardware, verdict
from .memory import estimate, naive_bytes
from .sources import resolve
from .specs import HardwareSpec, MemoryEstimate, ModelSpec, QuantSpec, RuntimeSpec, TrainingSpec
from .units import GiB

# The formats compared side by side in the chart, smallest-first within families.
COMPARE_METHODS = ("fp32", "bf16", "int8", "nf4", "nf4-dq", "fp4", "hqq8", "hqq4", "hqq3", "hqq2",
                   "gptq8", "gptq4", "awq4", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k", "iq2_xs")


@dataclass
class Selection:
    """Everything the user chose; the tab's state and the shareable JSON."""

    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    method: str = "nf4"
    group_size: int | None = None
    double_quant: bool = False
    context: int = 4096
    batch: int = 1
    kv_dtype: str = "auto"
    mode: str = "inference"
    hardware: str = "nvidia-t4"
    lora_rank: int = 16
    optimizer: str = "adamw"
    gradient_checkpointing: bool = True
    overhead_mib: int | None = None
    # LLM.int8: % of a layer's input columns above its outlier threshold (RuntimeSpec.int8_outlier_share x 100)
    int8_outlier_pct: float = 100


@dataclass
class Report:
    selection: Selection
    model: ModelSpec
    quant: QuantSpec
    hardware: HardwareSpec
    estimate: MemoryEstimate
    verdict: Verdict
    comparison: list[MemoryEstimate] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def build(sel: Selection, compare: bool = True) -> Report:
    """Resolve the selection and compute the estimate, verdict and (optionally) every format for the chart."""
    model = resolve(sel.model)
    hw = get_hardware(sel.hardware)
    quant = parse_method(sel.method, sel.group_size, sel.double_quant)
    overhead = None
    if sel.overhead_mib is not None:
        if (not isinstance(sel.overhead_mib, (int, float)) or not math.isfinite(sel.overhead_mib)
                or sel.overhead_mib < 0 or sel.overhead_mib > 2**30):
            raise InputError("Overhead must be a finite number of MiB, 0 or more.")
        overhead = int(sel.overhead_mib * 2**20)
    pct = sel.int8_outlier_pct
    if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0 <= pct <= 100:
        raise InputError(f"LLM.int8 outlier columns must be a percentage from 0 to 100, got {pct!r}. 100 is the "
                         "bound (every column); a run of an int8 model in Side by side shows what its prompt had.")
    runtime = RuntimeSpec(context=sel.context, batch=sel.batch, kv_dtype=sel.kv_dtype, device=device_of(hw),
                          overhead_bytes=overhead, int8_outlier_share=pct / 100)
    training = TrainingSpec(mode=sel.mode, optimizer=sel.optimizer, lora_rank=sel.lora_rank,
                            gradient_checkpointing=sel.gradient_checkpointing)
    est = estimate(model, quant, runtime, training)
    v = verdict(est, hw, model, quant, runtime, training)
    comparison: list[MemoryEstimate] = []
    skipped: dict[str, str] = {}
    if compare:
        for name in COMPARE_METHODS:
            try:
                q = parse_method(name)
                if sel.mode in ("lora", "full") and q.method not in ("fp32", "fp16", "bf16"):
                    continue
                if sel.mode == "qlora" and q.method != "bnb4":
                    continue
                comparison.append(estimate(model, q, runtime, training))
            except QuantScopeError as e:
                skipped[name] = str(e)
    return Report(sel, model, quant, hw, est, v, comparison, skipped)


def _g(n: int) -> str:
    return f"{n / GiB:.2f}"


def explain(r: Report) -> str:
    """The lesson's arithmetic with this selection's numbers, then what the real format adds (Markdown)."""
    m, e, q = r.model, r.estimate, r.quant
    P = m.params
    lines = [f"**{m.name}** has **{P:,}** parameters"
             + (f" ({m.active_params:,} active per token: {m.experts_per_token} of {m.num_experts} experts)"
                if m.is_moe else "") + (" — *approximate*" if m.approximate else "") + "."]
    lines.append("")
    lines.append("Textbook memory = parameters × bits ÷ 8 (GiB = 2³⁰ bytes):")
    lines.append("")
    for bits, label in ((32, "FP32"), (16, "FP16"), (8, "INT8"), (4, "INT4")):
        lines.append(f"- {label}: {P:,} × {bits} ÷ 8 = {naive_bytes(P, bits):,} bytes = **{_g(naive_bytes(P, bits))} GiB**")
    lines.append("")
    bpp = e.bits_per_param
    lines.append(f"**{q.name}** really holds **{_g(e.weights_bytes)} GiB** of weights: "
                 f"{bpp:.2f} bits per parameter on average.")
    unq = P - e.quantized_params
    if q.method not in ("fp32", "fp16", "bf16"):
        if q.method == "gguf":
            from .gguf_rules import file_tensor_bytes
            mix = file_tensor_bytes(q.quant_type, m)
            parts = ", ".join(f"{n} × {typ} ({_g(mix['bytes_by_type'][typ])} GiB)"
                              for typ, n in sorted(mix["count_by_type"].items(), key=lambda kv: -mix["bytes_by_type"][kv[0]]))
            lines.append(f"- llama.cpp's {q.quant_type} mixes tensor types (its per-tensor rules): {parts}.")
            lines.append(f"- {unq:,} parameters (norms and other 1-D tensors) stay F32.")
        else:
            lines.append(f"- {unq:,} parameters ({unq / P:.0%}) stay in 16-bit: embeddings, norms"
                         + (", lm_head" if not m.tie_word_embeddings else "")
                         + (", and the fused MoE experts (transformers 5 keeps them as 3-D parameters, "
                            "which bitsandbytes and HQQ do not replace)" if m.is_moe and q.method in ("bnb4", "int8", "hqq") else "")
                         + ".")
        if q.method == "bnb4":
            extra = "1 byte (uint8) + a nested fp32 absmax per 256 blocks" if q.double_quant else "4 bytes (fp32)"
            lines.append(f"- Every block of 64 weights stores its absmax in {extra}: "
                         + ("~4.13" if q.double_quant else "4.5") + " bits per quantized weight instead of 4.")
        elif q.method == "int8":
            lines.append("- Each output row keeps an fp32 scale (SCB): 8 bits plus 32 bits per row.")
        elif q.method == "hqq":
            lines.append(f"- Every group of {q.group_size} weights stores a 16-bit scale and zero: "
                         f"+{32 / q.group_size:.2f} bits per weight"
                         + ("; hqq 0.2.8 stores 5/6-bit values in 8-bit containers." if q.bits in (5, 6) else "")
                         + ("; 3-bit values are packed ten per int32 (3.2 bits)." if q.bits == 3 else "."))
        elif q.method in ("gptq", "awq"):
            lines.append(f"- Groups of {q.group_size} inputs store fp16 scales and packed zero points"
                         + (", plus a g_idx int32 per input column" if q.method == "gptq" else "") + ".")
    lines.append("")
    ctx = r.selection.context
    lines.append(f"KV cache = 2 × {m.num_layers} layers × {m.num_kv_heads} KV heads × {m.head_dim} dims × "
                 f"{ctx:,} tokens × batch {r.selection.batch} × bytes per value = **{_g(e.kv_cache_bytes)} GiB**"
                 + (f" (grouped-query attention: {m.num_kv_heads} KV heads serve {m.num_heads} query heads)"
                    if m.num_kv_heads < m.num_heads else "")
                 + (" (sliding-window layers keep only the window)" if any(m.sliding_windows) else "") + ".")
    lines.append(f"Activations (estimate) **{_g(e.activations_bytes)} GiB**, runtime overhead **{_g(e.overhead_bytes)} GiB**"
                 + (f", gradients **{_g(e.gradients_bytes)} GiB**, optimizer **{_g(e.optimizer_bytes)} GiB** "
                    f"for {e.trainable_params:,} trainable parameters" if e.trainable_params else "") + ".")
    lines.append(f"**Total {_g(e.total_bytes)} GiB** on {r.hardware.name}: {r.verdict.message}")
    if r.verdict.max_context:
        lines.append(f"Longest context that fits (at ≤90% of memory): **{r.verdict.max_context:,} tokens**.")
    else:
        lines.append("Not even a one-token context fits.")
    for n in e.notes:
        lines.append(f"> {n}")
    return "\n".join(lines)
