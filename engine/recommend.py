"""Which method for my goal, hardware and priority? The reference texts' decision trees, checked by the calculator.

Rules (each one cites where it comes from; tests/test_recommend.py triggers every rule):

* Fine-tuning on a GPU — the lesson's table (T4 -> 4-bit NF4, A10 -> NF4 or INT8, A100 -> FP16/BF16, "no need to
  quantize"): LoRA on the 16-bit model when the calculator says it uses at most :data:`TRAINING_HEADROOM` of the
  GPU, else QLoRA (NF4 + double quantization). With Llama-3.1-8B at 2,048 tokens the calculator gives 16-bit
  LoRA 132% of a T4, 88% of an A10G and 50% of an A100 40GB: the 60% line reproduces the lesson's table.
* Inference on a GPU, by priority — the guide's decision tree: *quality*: the 16-bit model when it fits with
  margin, else INT8 ("inference only and quality critical -> INT8", the lesson), else NF4; *memory*: NF4 +
  double quantization (the guide's smallest bitsandbytes form), or HQQ 3/2-bit when even that does not fit
  ("extreme compression"); *speed*: a pre-quantized AWQ checkpoint ("fastest inference -> GPTQ or AWQ"); *ease*:
  bitsandbytes 8-bit ("easiest setup"), NF4 when 8-bit does not fit.
* CPU or Apple Silicon — "CPU-only deployment -> GGUF": Q4_K_M; Q8_0 for quality, Q4_0 / Q3_K_M for memory.
  Fine-tuning there: QLoRA runs on a CPU with bitsandbytes' CPU kernels, but slowly — said so.

Every recommendation carries the calculator's verdict for exactly that configuration; a choice that does not
fit moves down its fallback list, and the reasons say so.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from .codegen import ConfigChoice, build, calculator_method
from .errors import InputError

GOALS = ("inference", "finetune")
PRIORITIES = ("quality", "speed", "memory", "ease")
TRAINING_HEADROOM = 0.60  # 16-bit LoRA only when it leaves >= 40% of the GPU (see the module docstring)
INFERENCE_MARGIN = 0.80  # 16-bit inference "fits with margin"


@dataclass
class Recommendation:
    choice: ConfigChoice
    title: str
    reasons: list
    status: str  # fits | tight | does not fit | unknown
    used_fraction: Optional[float]
    verdict: str
    tried: list = field(default_factory=list)  # (method label, status) of the fallbacks looked at


def _report(c: ConfigChoice, hardware: str, context: int, mode: str) -> tuple:
    from .report import Selection, build as report

    method = calculator_method(c)
    gs = c.group_size if c.method in ("hqq", "gptq", "awq") else None
    r = report(Selection(model=c.model, method=method, group_size=gs,
                         double_quant=c.double_quant if c.method in ("bnb4", "qlora") else False,
                         context=context, mode=mode, hardware=hardware, lora_rank=c.lora_r), compare=False)
    return r.verdict.status, r.verdict.used_fraction, r.verdict.message


def _label(c: ConfigChoice, finetune: bool) -> str:
    m = c.method
    if m == "bnb4":
        return f"bitsandbytes 4-bit {c.quant_type.upper()}" + (" + double quant" if c.double_quant else "")
    if m == "qlora":
        return "QLoRA (NF4 + double quant base, LoRA adapters)"
    if m == "bnb8":
        return "bitsandbytes 8-bit (LLM.int8)"
    if m == "hqq":
        return f"HQQ {c.bits}-bit (group {c.group_size})"
    if m == "gguf":
        return f"GGUF {c.gguf_type} (llama.cpp)"
    if m == "awq":
        return "AWQ 4-bit (pre-quantized checkpoint)"
    if m == "lora":
        return "LoRA on the 16-bit (bf16) model"
    if m in ("bf16", "fp16"):
        return f"16-bit {m} (no quantization)"
    return m


def recommend(goal: str = "inference", hardware: str = "nvidia-t4", priority: str = "quality",
              model: str = "meta-llama/Llama-3.1-8B-Instruct", context: int = 2048) -> Recommendation:
    if goal not in GOALS:
        raise InputError(f"Goal is inference or finetune, got {goal!r}.")
    if priority not in PRIORITIES:
        raise InputError(f"Priority is one of {', '.join(PRIORITIES)}, got {priority!r}.")
    from .hardware import get_hardware

    hw = get_hardware(hardware)  # raises a clear error for an unknown key
    kind = "cpu" if hardware == "cpu" else ("apple" if hardware.startswith("apple") else "gpu")
    base = ConfigChoice(model=model, device="cpu" if kind == "cpu" else ("auto" if kind == "apple" else "cuda"))
    finetune = goal == "finetune"
    reasons: list = []

    if finetune:
        lora16 = replace(base, method="lora")
        qlora = replace(base, method="qlora", quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
        if kind != "gpu":
            reasons.append(f"{hw.name} has no CUDA GPU: QLoRA still runs (bitsandbytes has CPU kernels) but training "
                           "is very slow there; use a cloud GPU (a T4 is enough for an 8B model with QLoRA).")
            return _finish(qlora, [qlora], hardware, context, reasons, finetune)
        st, used, _ = _report(lora16, hardware, context, "lora")
        if st != "does not fit" and used <= TRAINING_HEADROOM:
            reasons.append(f"16-bit LoRA uses {used:.0%} of the {hw.name}: enough room to train without "
                           "quantizing, at full quality (the lesson: 'IF training AND memory available -> FP16 or "
                           "BF16').")
            return _finish(lora16, [lora16], hardware, context, reasons, finetune, mode="lora")
        why = "does not fit" if st == "does not fit" else f"would use {used:.0%} (over {TRAINING_HEADROOM:.0%})"
        reasons.append(f"16-bit LoRA {why} on the {hw.name}, so the base model is loaded in 4-bit: QLoRA with NF4 "
                       "and double quantization (the lesson: 'IF training AND memory constrained -> 4-bit NF4 with "
                       "double quantization').")
        return _finish(qlora, [qlora], hardware, context, reasons, finetune)

    if kind != "gpu":
        t = {"quality": "Q8_0", "memory": "Q4_0", "speed": "Q4_K_M", "ease": "Q4_K_M"}[priority]
        chain = [replace(base, method="gguf", gguf_type=x, n_gpu_layers=-1 if kind == "apple" else 0)
                 for x in dict.fromkeys([t, "Q4_K_M", "Q3_K_M", "Q2_K"])]
        reasons.append(f"{hw.name}: 'CPU-only deployment -> GGUF' (the guide). llama.cpp runs GGUF files on CPUs "
                       + ("and on Apple's GPU through Metal (n_gpu_layers=-1)" if kind == "apple" else
                          "with its own optimized kernels") + f"; {t} for {priority}.")
        return _finish(chain[0], chain, hardware, context, reasons, finetune)

    b16 = replace(base, method="bf16")
    int8 = replace(base, method="bnb8", double_quant=False)
    nf4dq = replace(base, method="bnb4", quant_type="nf4", double_quant=True)
    hqq3 = replace(base, method="hqq", bits=3, group_size=64)
    hqq2 = replace(base, method="hqq", bits=2, group_size=16)
    if priority == "quality":
        st, used, _ = _report(b16, hardware, context, "inference")
        if st != "does not fit" and used <= INFERENCE_MARGIN:
            reasons.append(f"The 16-bit model fits the {hw.name} with margin ({used:.0%}): nothing to lose by "
                           "quantizing.")
            return _finish(b16, [b16], hardware, context, reasons, finetune)
        reasons.append(f"16-bit {'does not fit' if st == 'does not fit' else f'uses {used:.0%}'} of the {hw.name}; "
                       "for quality-critical inference the lesson picks INT8 ('best quality/memory balance').")
        return _finish(int8, [int8, nf4dq, hqq3, hqq2], hardware, context, reasons, finetune)
    if priority == "memory":
        reasons.append("Smallest of the easy formats: NF4 with double quantization (~0.21x of fp16, the guide); "
                       "HQQ 3/2-bit if even that does not fit ('extreme compression').")
        return _finish(nf4dq, [nf4dq, hqq3, hqq2], hardware, context, reasons, finetune)
    if priority == "speed":
        awq = replace(base, method="awq", bits=4, group_size=128)
        reasons.append("'Need fastest inference? -> GPTQ or AWQ (use pre-quantized models)' (the guide): their fused "
                       "4-bit kernels beat bitsandbytes' at batch 1. Look for an -AWQ repo of your model.")
        return _finish(awq, [awq, nf4dq], hardware, context, reasons, finetune)
    reasons.append("'Want easiest setup? -> bitsandbytes 8-bit' (the guide): one config object, no calibration.")
    return _finish(int8, [int8, nf4dq, hqq3], hardware, context, reasons, finetune)


def _finish(first: ConfigChoice, chain: list, hardware: str, context: int, reasons: list, finetune: bool,
            mode: Optional[str] = None) -> Recommendation:
    tried = []
    pick = None
    for c in chain:
        m = mode or {"qlora": "qlora", "lora": "lora"}.get(c.method, "inference")
        try:
            st, used, msg = _report(c, hardware, context, m)
        except InputError as e:
            st, used, msg = "unknown", None, str(e)
        tried.append((_label(c, finetune), st))
        if st != "does not fit":
            pick = (c, st, used, msg)
            break
    if pick is None:
        c = chain[-1]
        st, used, msg = "does not fit", None, ("None of these fits this hardware at this context: "
                                               + ", ".join(f"{lbl} ({s})" for lbl, s in tried)
                                               + ". Try a smaller model, a shorter context, or more GPUs.")
        pick = (c, st, used, msg)
    c, st, used, msg = pick
    if c is not first:
        reasons.append(f"{_label(first, finetune)} does not fit here; the next one down that does: "
                       f"{_label(c, finetune)}.")
    build(c)  # the recommendation must be emittable
    return Recommendation(choice=c, title=_label(c, finetune), reasons=reasons, status=st, used_fraction=used,
                          verdict=msg, tried=tried)
