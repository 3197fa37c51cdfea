"""Storage rules of every weight format, as data plus small pure functions.

Each rule says, for one tensor of a model, how many bytes it holds once loaded in that format:
packed weights *and* everything stored beside them (scales, zero points, absmax, index tensors).
Sources are cited next to each rule; where a rule was measured rather than read, the test that pins it
is named.
"""
from __future__ import annotations

import math
import re

from . import gguf_rules
from .errors import InputError
from .specs import ModelSpec, QuantSpec, TensorSpec

DTYPE_BYTES = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}

# bitsandbytes 4-bit (bitsandbytes/functional.py quantize_4bit, QuantState): weights packed two per
# byte, one fp32 absmax per block of 64 (transformers' BitsAndBytesConfig default blocksize), the 16-entry
# fp32 code book (quant_map). Double quantization (compress_statistics) stores the absmax as uint8 in
# nested blocks of 256 with an fp32 absmax per nested block, the 256-entry fp32 nested code book and an
# fp32 offset. Measured on CPU in tests/test_memory_real.py.
BNB4_BLOCK = 64
BNB4_NESTED_BLOCK = 256
BNB4_CODE_BYTES = 16 * 4
BNB4_NESTED_CODE_BYTES = 256 * 4

# HQQ (hqq/core/quantize.py, Quantizer.bit_to_packing and BitPack): the weight is viewed as
# (numel / group_size) rows of group_size values, one scale and one zero per row in the compute dtype.
# Rows are packed: 8-bit one per uint8; 4-bit two per uint8; 3-bit ten per int32; 2-bit four per uint8;
# 1-bit eight per uint8. hqq 0.2.8 stores 5- and 6-bit in 8-bit storage ("todo: bitpacking") and
# 1.58-bit in 2-bit storage; 7-bit is not supported.
HQQ_BITS = (1, 2, 3, 4, 5, 6, 8)
HQQ_ROWS_PER_WORD = {8: (1, 1), 6: (1, 1), 5: (1, 1), 4: (2, 1), 3: (10, 4), 2: (4, 1), 1: (8, 1)}

GPTQ_BITS = (2, 3, 4, 8)


def _method_pattern() -> str:
    return ("fp32 fp16 bf16 int8 nf4 fp4 nf4-dq fp4-dq hqq1..hqq8 (not 7) gptq2 gptq3 gptq4 gptq8 awq4 "
            "and GGUF types such as q4_k_m, q8_0, iq4_xs (gguf-f16 / gguf-bf16 for 16-bit GGUF)")


def parse_method(name: str, group_size: int | None = None, double_quant: bool = False,
                 dtype: str = "bf16") -> QuantSpec:
    """Parse a method name as the CLI and UI accept it.

    >>> parse_method("nf4", double_quant=True).label
    'nf4+dq'
    >>> parse_method("hqq3").group_size
    64
    >>> parse_method("q4_k_m").quant_type
    'Q4_K_M'
    """
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"No method given. Choose one of: {_method_pattern()}.")
    raw = name.strip()
    key = raw.lower().replace(" ", "")
    if dtype not in ("bf16", "fp16", "fp32", "bfloat16", "float16", "float32"):
        raise InputError(f"Unknown compute dtype '{dtype}'. Use bf16, fp16 or fp32.")
    dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
            raise InputError(f"Group size must be a positive whole number (or -1 for GPTQ per-channel), got {group_size!r}.")
        if group_size > 1_000_000:
            raise InputError(f"Group size {group_size} is implausibly large.")
    if key in ("fp32", "fp16", "bf16"):
        return QuantSpec(method=key, dtype=key, label=key)
    if key in ("int8", "llm.int8", "bnb-int8", "bnb8"):
        return QuantSpec(method="int8", bits=8, dtype=dtype, label="int8")
    m = re.fullmatch(r"(nf4|fp4)(?:[-+]?(dq))?", key)
    if m:
        dq = double_quant or bool(m.group(2))
        return QuantSpec(method="bnb4", bits=4, quant_type=m.group(1), double_quant=dq, group_size=BNB4_BLOCK,
                         dtype=dtype, label=m.group(1) + ("+dq" if dq else ""))
    m = re.fullmatch(r"hqq(\d)", key)
    if m:
        bits = int(m.group(1))
        if bits not in HQQ_BITS:
            raise InputError(f"HQQ supports {', '.join(map(str, HQQ_BITS))} bits; {bits} is not one of them.")
        gs = group_size or 64
        if gs == -1:
            raise InputError("HQQ needs a positive group size (e.g. 64).")
        return QuantSpec(method="hqq", bits=bits, group_size=gs, dtype=dtype if dtype != "fp32" else "fp16",
                         label=f"hqq{bits}/g{gs}")
    m = re.fullmatch(r"gptq(\d)", key)
    if m:
        bits = int(m.group(1))
        if bits not in GPTQ_BITS:
            raise InputError(f"GPTQ supports {', '.join(map(str, GPTQ_BITS))} bits; {bits} is not one of them.")
        gs = group_size or 128
        return QuantSpec(method="gptq", bits=bits, group_size=gs, dtype="fp16", label=f"gptq{bits}/g{gs}")
    m = re.fullmatch(r"awq(\d)", key)
    if m:
        if int(m.group(1)) != 4:
            raise InputError("AWQ is 4-bit only.")
        gs = group_size or 128
        if gs == -1:
            raise InputError("AWQ needs a positive group size (e.g. 128).")
        return QuantSpec(method="awq", bits=4, group_size=gs, dtype="fp16", label=f"awq4/g{gs}")
    g = key.upper().removeprefix("GGUF-").removeprefix("GGUF_").replace("-", "_")
    g = gguf_rules.FILE_TYPE_ALIASES.get(g, g)
    if g in gguf_rules.FILE_TYPES and (key.startswith("gguf") or g not in ("F32", "F16", "BF16")):
        return QuantSpec(method="gguf", quant_type=g, dtype="fp16", label=g)
    raise InputError(f"Unknown method '{raw}'. Choose one of: {_method_pattern()}.")


def dtype_bytes(dtype: str) -> int:
    return DTYPE_BYTES[dtype]


def is_quantized(q: QuantSpec, t: TensorSpec, model: ModelSpec) -> bool:
    """Whether the method replaces this tensor by a quantized one (GGUF is decided per type instead)."""
    if q.method in ("fp32", "fp16", "bf16"):
        return False
    if any(t.module == s or t.module.endswith("." + s) for s in q.skip_modules):
        return False
    if q.method in ("int8", "bnb4"):
        # transformers 5 replace_with_bnb_linear: every `type(module) is nn.Linear` except the output
        # embedding / tied weights / last module (quantizers/base.py get_keys_to_not_convert). Fused MoE
        # experts (3-D Parameters in transformers 5) are not nn.Linear and stay 16-bit.
        return t.linear and t.role != "lm_head" and t.name.endswith(".weight")
    if q.method == "hqq":
        # hqq.models.hf.base.AutoHQQHFModel patches the nn.Linear layers inside the decoder blocks.
        return t.linear and t.layer is not None and t.name.endswith(".weight")
    if q.method in ("gptq", "awq"):
        # GPTQ/AWQ checkpoints quantize the linear layers of the decoder blocks, experts included
        # (one Linear per expert in those checkpoints); embeddings and lm_head stay fp16.
        return (t.linear or t.role == "experts") and t.layer is not None
    return False


def _bnb4_bytes(n: int, dq: bool) -> int:
    blocks = math.ceil(n / BNB4_BLOCK)
    packed = math.ceil(n / 2)
    if not dq:
        return packed + blocks * 4 + BNB4_CODE_BYTES
    nested = math.ceil(blocks / BNB4_NESTED_BLOCK)
    return packed + blocks + nested * 4 + BNB4_NESTED_CODE_BYTES + BNB4_CODE_BYTES + 4


def _hqq_bytes(n: int, bits: int, gs: int, scale_bytes: int) -> int:
    rows = math.ceil(n / gs)
    per, word = HQQ_ROWS_PER_WORD[bits]
    return math.ceil(rows / per) * gs * word + 2 * rows * scale_bytes


def _gptq_bytes(out_f: int, in_f: int, bits: int, gs: int) -> int:
    # AutoGPTQ / GPTQModel QuantLinear buffers: qweight int32 [in*bits/32, out], qzeros int32
    # [groups, out*bits/32], scales fp16 [groups, out], g_idx int32 [in].
    groups = 1 if gs == -1 else math.ceil(in_f / gs)
    return (math.ceil(in_f * bits / 32) * out_f * 4 + groups * math.ceil(out_f * bits / 32) * 4
            + groups * out_f * 2 + in_f * 4)


def _awq_bytes(out_f: int, in_f: int, gs: int) -> int:
    # AutoAWQ WQLinear_GEMM buffers: qweight int32 [in, out/8], qzeros int32 [in/gs, out/8], scales fp16 [in/gs, out].
    groups = math.ceil(in_f / gs)
    return in_f * math.ceil(out_f / 8) * 4 + groups * math.ceil(out_f / 8) * 4 + groups * out_f * 2


def tensor_bytes(q: QuantSpec, t: TensorSpec, model: ModelSpec) -> int:
    """Bytes one tensor holds in format ``q`` (not for GGUF: see :func:`weights_bytes`)."""
    n = t.numel
    plain = n * dtype_bytes(q.dtype)
    if not is_quantized(q, t, model):
        return plain
    out_f, in_f = t.shape[-2], t.shape[-1]
    mats = n // (out_f * in_f)  # experts stack several matrices
    if q.method == "int8":
        # bitsandbytes Int8Params: int8 weight + fp32 row scales (SCB), one per output row.
        return n + mats * out_f * 4
    if q.method == "bnb4":
        return _bnb4_bytes(n, q.double_quant)
    if q.method == "hqq":
        if n % q.group_size:
            # hqq 0.2.8 Quantizer.quantize asserts numel % group_size == 0 (pinned in tests/test_memory_real.py).
            raise InputError(f"HQQ cannot quantize {t.name} ({n:,} values) with group size {q.group_size}: "
                             "the size must be a multiple of the group size. Pick a group size that divides it.")
        return _hqq_bytes(n, q.bits, q.group_size, dtype_bytes(q.dtype))
    if q.method == "gptq":
        return mats * _gptq_bytes(out_f, in_f, q.bits, q.group_size)
    if q.method == "awq":
        return mats * _awq_bytes(out_f, in_f, q.group_size)
    raise AssertionError(q.method)


_WEIGHTS_CACHE: dict[tuple[int, QuantSpec], tuple[ModelSpec, tuple[int, dict[str, int], int]]] = {}


def weights_bytes(q: QuantSpec, model: ModelSpec) -> tuple[int, dict[str, int], int]:
    """Total weight bytes, bytes per role, and the number of parameters stored quantized.

    Weights do not depend on the runtime, so the result is memoised per (model object, format): the
    calculator asks again for every context of its max-context search.
    """
    key = (id(model), q)
    hit = _WEIGHTS_CACHE.get(key)
    if hit is not None and hit[0] is model:
        total, by_role, quantized = hit[1]
        return total, dict(by_role), quantized
    result = _weights_bytes(q, model)
    if len(_WEIGHTS_CACHE) > 512:
        _WEIGHTS_CACHE.clear()
    _WEIGHTS_CACHE[key] = (model, result)
    return result[0], dict(result[1]), result[2]


def _weights_bytes(q: QuantSpec, model: ModelSpec) -> tuple[int, dict[str, int], int]:
    by_role: dict[str, int] = {}
    quantized = 0
    total = 0
    if q.method == "gguf":
        try:
            pairs = gguf_rules.tensor_types(q.quant_type, model)
        except ValueError as e:
            raise InputError(f"{q.quant_type} cannot store this model: {e}.") from None
        for t, typ in pairs:
            b = gguf_rules.tensor_bytes(typ, t.shape)
            total += b
            by_role[t.role] = by_role.get(t.role, 0) + b
            if gguf_rules.is_quantized(typ):
                quantized += t.numel
        return total, by_role, quantized
    for t in model.tensors:
        b = tensor_bytes(q, t, model)
        total += b
        by_role[t.role] = by_role.get(t.role, 0) + b
        if is_quantized(q, t, model):
            quantized += t.numel
    return total, by_role, quantized
