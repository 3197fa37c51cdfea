"""Which ggml type llama.cpp's quantizer gives each tensor of a model, and how many bytes that takes.

A Python port of the tensor-type selection of ``llama-quantize``, taken from llama.cpp
(https://github.com/ggml-org/llama.cpp), version of ``src/llama-quant.cpp`` at commit
``007dbbf3fd17eefe9b47fee45f48f7ba5e62b714`` (2026, the version with Q1_0/Q2_0/NVFP4, the
``tensor_category`` enum and ``tensor_type_fallback``):

* :func:`tensor_type` ports ``llama_tensor_get_type`` (the outer wrapper),
  ``tensor_allows_quantization``, ``llama_tensor_get_type_impl`` (the mixing rules),
  ``tensor_type_fallback`` (rows not divisible by the block size), ``tensor_get_category`` and
  ``init_quantize_state_counters`` (the ``n_attention_wv``/``i_*`` counters and tied embeddings);
* :data:`FILE_TYPES` is ``llama_ftype_get_default_type`` (the ``default_type`` of
  ``llama_model_quantize_impl``), keyed by the names of ``QUANT_OPTIONS`` in
  ``tools/quantize/quantize.cpp``; :data:`FTYPE_IDS` is ``enum llama_ftype`` of ``include/llama.h``;
* :data:`GGML_TYPES` is ggml's ``type_traits`` table (``ggml/src/ggml.c``) with the block structs of
  ``ggml/src/ggml-common.h``.

Not modelled: the command-line overrides (``--pure``, ``--tensor-type``, ``--output-tensor-type``,
``--token-embedding-type``, ``--leave-output-tensor``, ``--prune-layers``) and the architecture
special cases other than Falcon, LLaMA-70B and the MXFP4_MOE expert test. An importance matrix
changes a few rules; pass ``imatrix=True`` to get them (files of IQ1/IQ2/IQ3_XXS types always
have one: llama.cpp refuses to write them without).

Pure Python: no torch, no numpy.
"""
from __future__ import annotations

import functools
import re
from typing import Iterable, Optional

from engine.specs import ModelSpec, TensorSpec

# --------------------------------------------------------------------------------------------
# ggml tensor types: name -> (block size in elements, bytes per block).
# Source: ggml/src/ggml.c ``type_traits[GGML_TYPE_COUNT]`` (.blck_size, .type_size = sizeof(block_*))
# and the block structs of ggml/src/ggml-common.h (QK_K = 256, ggml_half = 2 bytes).
# Enum ids (ggml/include/ggml.h ``enum ggml_type``) are given in the comments.
# --------------------------------------------------------------------------------------------
_QK_K = 256
GGML_TYPES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),                                         # 0
    "F16": (1, 2),                                         # 1
    "Q4_0": (32, 2 + 16),                                  # 2  block_q4_0: d, qs[16]
    "Q4_1": (32, 2 * 2 + 16),                              # 3  block_q4_1: d, m, qs[16]
    "Q5_0": (32, 2 + 4 + 16),                              # 6  block_q5_0: d, qh[4], qs[16]
    "Q5_1": (32, 2 * 2 + 4 + 16),                          # 7  block_q5_1: d, m, qh[4], qs[16]
    "Q8_0": (32, 2 + 32),                                  # 8  block_q8_0: d, qs[32]
    "Q8_1": (32, 2 * 2 + 32),                              # 9  block_q8_1: d, s (halves), qs[32]
    "Q2_K": (_QK_K, 2 * 2 + _QK_K // 16 + _QK_K // 4),     # 10 84
    "Q3_K": (_QK_K, 2 + _QK_K // 4 + _QK_K // 8 + 12),     # 11 110
    "Q4_K": (_QK_K, 2 * 2 + 12 + _QK_K // 2),              # 12 144
    "Q5_K": (_QK_K, 2 * 2 + 12 + _QK_K // 2 + _QK_K // 8),  # 13 176
    "Q6_K": (_QK_K, 2 + _QK_K // 16 + 3 * _QK_K // 4),     # 14 210
    "Q8_K": (_QK_K, 4 + _QK_K + _QK_K // 16 * 2),          # 15 292 (float d, qs, int16 bsums)
    "IQ2_XXS": (_QK_K, 2 + _QK_K // 8 * 2),                # 16 66
    "IQ2_XS": (_QK_K, 2 + _QK_K // 8 * 2 + _QK_K // 32),   # 17 74
    "IQ3_XXS": (_QK_K, 2 + 3 * (_QK_K // 8)),              # 18 98
    "IQ1_S": (_QK_K, 2 + _QK_K // 8 + _QK_K // 16),        # 19 50
    "IQ4_NL": (32, 2 + 16),                                # 20 18
    "IQ3_S": (_QK_K, 2 + 13 * (_QK_K // 32) + _QK_K // 64),  # 21 110
    "IQ2_S": (_QK_K, 2 + _QK_K // 4 + _QK_K // 16),        # 22 82
    "IQ4_XS": (_QK_K, 2 + 2 + _QK_K // 64 + _QK_K // 2),   # 23 136
    "I8": (1, 1),                                          # 24
    "I16": (1, 2),                                         # 25
    "I32": (1, 4),                                         # 26
    "I64": (1, 8),                                         # 27
    "F64": (1, 8),                                         # 28
    "IQ1_M": (_QK_K, _QK_K // 8 + _QK_K // 16 + _QK_K // 32),  # 29 56
    "BF16": (1, 2),                                        # 30
    "TQ1_0": (_QK_K, 2 + _QK_K // 64 + (_QK_K - 4 * _QK_K // 64) // 5),  # 34 54
    "TQ2_0": (_QK_K, 2 + _QK_K // 4),                      # 35 66
    "MXFP4": (32, 1 + 16),                                 # 39 block_mxfp4: e (E8M0), qs[16]
    "NVFP4": (64, 64 // 16 + 64 // 2),                     # 40 block_nvfp4: d[4] (UE4M3), qs[32]
    "Q1_0": (128, 2 + 128 // 8),                           # 41 block_q1_0: d, qs[16]
    "Q2_0": (64, 2 + 64 // 4),                             # 42 block_q2_0: d, qs[16]
}


def is_quantized(ggml_type: str) -> bool:
    """``ggml_is_quantized``: true for the block types (all but F32/F16/BF16/F64/I*)."""
    return GGML_TYPES[ggml_type][0] > 1


# --------------------------------------------------------------------------------------------
# llama.cpp file types (``llama-quantize`` names, tools/quantize/quantize.cpp QUANT_OPTIONS)
# -> default tensor type (``llama_ftype_get_default_type`` in src/llama-quant.cpp).
# --------------------------------------------------------------------------------------------
FILE_TYPES: dict[str, str] = {
    "F32": "F32",
    "F16": "F16",
    "BF16": "BF16",
    "Q4_0": "Q4_0",
    "Q4_1": "Q4_1",
    "Q5_0": "Q5_0",
    "Q5_1": "Q5_1",
    "Q8_0": "Q8_0",
    "Q1_0": "Q1_0",
    "Q2_0": "Q2_0",
    "MXFP4_MOE": "MXFP4",
    "NVFP4": "NVFP4",  # in enum llama_ftype and the default-type switch, not (yet) in QUANT_OPTIONS
    "Q2_K": "Q2_K",
    "Q2_K_S": "Q2_K",
    "Q3_K_S": "Q3_K",
    "Q3_K_M": "Q3_K",
    "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K",
    "Q4_K_M": "Q4_K",
    "Q5_K_S": "Q5_K",
    "Q5_K_M": "Q5_K",
    "Q6_K": "Q6_K",
    "TQ1_0": "TQ1_0",
    "TQ2_0": "TQ2_0",
    "IQ1_S": "IQ1_S",
    "IQ1_M": "IQ1_M",
    "IQ2_XXS": "IQ2_XXS",
    "IQ2_XS": "IQ2_XS",
    "IQ2_S": "IQ2_XS",
    "IQ2_M": "IQ2_S",
    "IQ3_XXS": "IQ3_XXS",
    "IQ3_XS": "IQ3_S",
    "IQ3_S": "IQ3_S",
    "IQ3_M": "IQ3_S",
    "IQ4_NL": "IQ4_NL",
    "IQ4_XS": "IQ4_XS",
}

# Aliases accepted by llama-quantize (QUANT_OPTIONS).
FILE_TYPE_ALIASES: dict[str, str] = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# ``enum llama_ftype`` (include/llama.h): the value stored as ``general.file_type``.
FTYPE_IDS: dict[str, int] = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
    "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19, "IQ2_XS": 20, "Q2_K_S": 21,
    "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26, "IQ3_M": 27,
    "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "TQ1_0": 36, "TQ2_0": 37,
    "MXFP4_MOE": 38, "NVFP4": 39, "Q1_0": 40, "Q2_0": 41,
}
FTYPE_NAMES: dict[int, str] = {v: k for k, v in FTYPE_IDS.items()}


def _norm_ftype(ftype: str) -> str:
    f = ftype.upper()
    f = FILE_TYPE_ALIASES.get(f, f)
    if f not in FILE_TYPES:
        raise ValueError(f"unknown llama.cpp file type {ftype!r}")
    return f


# --------------------------------------------------------------------------------------------
# Tensor names and categories (src/llama-quant.cpp: tensor_get_category, tensor_allows_quantization)
# --------------------------------------------------------------------------------------------
TOKEN_EMBD, ATTN_Q, ATTN_V, ATTN_K, ATTN_QKV, ATTN_KV_B, ATTN_OUTPUT = (
    "token_embd", "attn_q", "attn_v", "attn_k", "attn_qkv", "attn_kv_b", "attn_output")
FFN_UP, FFN_GATE, FFN_DOWN, OUTPUT, OTHER = "ffn_up", "ffn_gate", "ffn_down", "output", "other"
_ATTN_V_LIKE = (ATTN_V, ATTN_QKV, ATTN_KV_B)  # category_is_attn_v


def gguf_name(t: TensorSpec) -> str:
    """The GGUF tensor name llama.cpp gives ``t``: ``blk.3.attn_v.weight``, ``output_norm.weight``."""
    suffix = "bias" if t.name.endswith(".bias") else "weight"
    return f"{t.gguf}.{suffix}" if t.layer is None else f"blk.{t.layer}.{t.gguf}.{suffix}"


_BLK = re.compile(r"^blk\.\d+\.")


def _category(name: str) -> str:
    """``tensor_get_category``: substring tests, in llama.cpp's order (memoised per name less ``blk.N.``)."""
    return _category_of_base(_BLK.sub("", name))


@functools.lru_cache(maxsize=1024)
def _category_of_base(name: str) -> str:
    if name == "output.weight":
        return OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return TOKEN_EMBD
    for key, cat in (("attn_qkv.weight", ATTN_QKV), ("attn_kv_b.weight", ATTN_KV_B),
                     ("attn_v.weight", ATTN_V), ("attn_k.weight", ATTN_K), ("attn_q.weight", ATTN_Q),
                     ("attn_output.weight", ATTN_OUTPUT), ("ffn_up", FFN_UP), ("ffn_gate", FFN_GATE),
                     ("ffn_down", FFN_DOWN)):
        if key in name:
            return cat
    return OTHER


# Substrings whose tensors are never quantized (tensor_allows_quantization).
_NO_QUANT_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight",
    "time_mix_w2.weight", "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight",
    "time_mix_g2.weight", "time_mix_decay_w1.weight", "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)


def _allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """``tensor_allows_quantization`` with default params (quantize_output_tensor, no only_copy)."""
    return _allows_base(_BLK.sub("", name), len(shape))


@functools.lru_cache(maxsize=1024)
def _allows_base(name: str, ndims: int) -> bool:
    if ndims < 2:  # ggml_n_dims < 2: 1-D tensors (norms, biases) are never quantized
        return False
    if not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):  # LLM_TENSOR_POS_EMBD / TOKEN_TYPES
        return False
    return not any(s in name for s in _NO_QUANT_SUBSTRINGS)


def _sort_key(name: str) -> tuple[int, str]:
    """``llama_model_loader::weight_name_comparer``: block number first (-1 outside blocks), then name.

    The quantizer walks ``weights_map`` in this order, so it is the order the counters advance in.
    """
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


# --------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------
class _Model:
    """What ``llama_tensor_get_type_impl`` reads from ``qs.model`` and the quantize state."""

    def __init__(self, model: ModelSpec):
        self.n_layer = model.num_layers  # hparams.n_layer_all
        self.n_expert = model.num_experts  # hparams.n_expert
        # hparams.n_gqa(): integer n_head / n_head_kv, 0 without kv heads
        self.n_gqa = model.num_heads // model.num_kv_heads if model.num_kv_heads else 0
        mt = (model.model_type or "").lower()
        self.falcon = mt == "falcon"  # LLM_ARCH_FALCON
        # LLM_TYPE_70B: LLM_ARCH_LLAMA (HF llama/mistral/mixtral convert to it) with 80 layers and GQA
        self.is_70b = (mt in ("llama", "mistral", "mixtral") and model.num_layers == 80
                       and model.num_heads != model.num_kv_heads)
        names = [gguf_name(t) for t in model.tensors]
        # init_quantize_state_counters
        self.has_tied_embeddings = "output.weight" not in names
        self.n_attention_wv = sum(1 for n in names if _category(n) in _ATTN_V_LIKE)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _layer_info(m: _Model, counter: int, name: str) -> tuple[int, int]:
    """``layer_info``: the counter for dense models, the block number parsed from the name for MoE."""
    i_layer = counter
    if max(1, m.n_expert) > 1:
        mm = re.match(r"blk\.(-?\d+)\.", name)
        if not mm:
            raise ValueError(f"Failed to determine layer for tensor {name}")
        i_layer = int(mm.group(1))
        if i_layer < 0 or i_layer >= m.n_layer:
            raise ValueError(f"Bad layer {i_layer} for tensor {name}. Must be in [0, {m.n_layer})")
    return i_layer, m.n_layer


_IQ_LOW = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")


def _get_type_impl(m: _Model, new_type: str, name: str, shape: tuple[int, ...], ftype: str, cat: str,
                   counters: dict[str, int], imatrix: bool) -> str:
    """``llama_tensor_get_type_impl`` (src/llama-quant.cpp), branch for branch."""
    n_expert = m.n_expert
    n_gqa = m.n_gqa
    ne0 = shape[-1]
    ne2 = shape[-3] if len(shape) >= 3 else 1
    i_wv, n_wv = counters["wv"], m.n_attention_wv

    if cat == OUTPUT or (m.has_tied_embeddings and cat == TOKEN_EMBD):
        qk_k = GGML_TYPES[new_type][0]
        if ftype == "MXFP4_MOE":
            new_type = "Q8_0"
        elif m.falcon or ne0 % qk_k != 0:
            new_type = "Q8_0"
        elif ftype in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            new_type = "Q5_K"
        elif new_type != "Q8_0":
            new_type = "Q6_K"
    elif ftype == "MXFP4_MOE":
        # MoE tensors -> MXFP4, others -> Q8_0 (the BAILINGMOE3 exception is not modelled)
        new_type = "MXFP4" if ne2 > 1 else "Q8_0"
    elif cat == TOKEN_EMBD:
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            new_type = "Q2_K"
        elif ftype in ("IQ2_S", "IQ2_M"):
            new_type = "IQ3_S"
        elif ftype == "IQ3_XXS":
            new_type = "IQ3_S"
        elif ftype in ("TQ1_0", "TQ2_0", "Q2_0"):
            new_type = "Q4_K"
    elif ftype in _IQ_LOW:
        if cat in _ATTN_V_LIKE:
            if n_gqa >= 4 or n_expert >= 4:
                new_type = "Q4_K"
            else:
                new_type = "IQ3_S" if ftype in ("IQ2_S", "IQ2_M") else "Q2_K"
        elif n_expert == 8 and cat == ATTN_K:
            new_type = "Q4_K"
        elif cat == FFN_DOWN:
            if counters["down"] < m.n_layer // 8:  # qs.i_ffn_down < qs.n_ffn_down/8 (counter, no layer_info)
                new_type = "IQ3_S" if ftype in ("IQ2_S", "IQ2_M") else "Q2_K"
        elif cat == ATTN_OUTPUT:
            if n_expert == 8:
                new_type = "Q5_K"
            elif ftype in ("IQ1_S", "IQ1_M"):
                new_type = "IQ2_XXS"
            elif ftype in ("IQ2_S", "IQ2_M"):
                new_type = "IQ3_S"
    elif cat in _ATTN_V_LIKE:
        if ftype == "Q2_K":
            new_type = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif ftype == "Q2_K_S" and n_gqa >= 4:
            new_type = "Q4_K"
        elif ftype == "IQ3_XXS":
            new_type = "Q4_K" if n_gqa >= 4 else ("IQ3_S" if not imatrix else "IQ3_XXS")
        elif ftype in ("IQ3_XS", "IQ3_S") and n_gqa >= 4:
            new_type = "Q4_K"
        elif ftype == "IQ3_M":
            new_type = "Q4_K"
        elif ftype == "Q3_K_M":
            new_type = "Q5_K" if i_wv < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            new_type = "Q5_K"
        elif ftype in ("IQ4_NL", "IQ4_XS") and n_gqa >= 4:
            new_type = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_wv, n_wv):
            new_type = "Q6_K"
        elif ftype == "Q4_K_S" and i_wv < 4:
            new_type = "Q5_K"
        if m.is_70b and new_type in ("Q3_K", "Q4_K"):
            new_type = "Q5_K"
        if n_expert == 8:
            new_type = "Q8_0"
    elif cat == ATTN_K:
        if n_expert == 8:
            new_type = "Q8_0"
        elif ftype == "IQ3_XS":
            new_type = "IQ3_XXS"
        elif ftype == "IQ3_XXS":
            new_type = "IQ2_S"
    elif cat == ATTN_Q:
        if ftype == "IQ3_XS":
            new_type = "IQ3_XXS"
        elif ftype == "IQ3_XXS":
            new_type = "IQ2_S"
    elif cat == FFN_DOWN:
        i_layer, n_layer = _layer_info(m, counters["down"], name)
        if ftype == "Q2_K":
            new_type = "Q3_K"
        elif ftype == "Q2_K_S":
            if i_layer < n_layer // 8:
                new_type = "Q4_K"
        elif ftype == "IQ3_XXS" and not imatrix:
            new_type = "Q4_K" if i_layer < n_layer // 8 else "Q3_K"
        elif ftype == "Q3_K_M":
            new_type = ("Q5_K" if i_layer < n_layer // 16
                        else "Q4_K" if (not m.falcon or _use_more_bits(i_layer, n_layer)) else "Q3_K")
        elif ftype == "IQ3_M" and (i_layer < n_layer // 8 or (n_expert == 8 and _use_more_bits(i_layer, n_layer))):
            new_type = "Q4_K"
        elif ftype == "Q3_K_L":
            new_type = "Q4_K" if m.falcon else "Q5_K"
        elif ftype == "Q4_K_M":
            if m.falcon:
                new_type = ("Q6_K" if i_layer < n_layer // 16
                            else "Q5_K" if _use_more_bits(i_layer, n_layer) else "Q4_K")
            elif _use_more_bits(i_layer, n_layer):
                new_type = "Q6_K"
        elif i_layer < n_layer // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not imatrix:
            new_type = "Q5_K"
        elif ftype == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
            new_type = "Q6_K"
        elif ftype == "Q4_K_S" and not m.falcon and i_layer < n_layer // 8:
            new_type = "Q5_K"
        elif ftype in ("Q4_0", "Q5_0") and imatrix and i_layer < n_layer // 8:
            new_type = "Q4_1" if ftype == "Q4_0" else "Q5_1"
    elif cat == ATTN_OUTPUT:
        if not m.falcon:
            if n_expert == 8:
                if ftype in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M",
                             "IQ3_S", "IQ3_M", "IQ4_XS"):
                    new_type = "Q5_K"
            else:
                if ftype == "Q2_K":
                    new_type = "Q3_K"
                elif ftype == "IQ3_XXS":
                    new_type = "IQ3_S"
                elif ftype == "Q3_K_M":
                    new_type = "Q4_K"
                elif ftype == "Q3_K_L":
                    new_type = "Q5_K"
                elif ftype == "IQ3_M":
                    new_type = "Q4_K"
        elif ftype == "Q3_K_L":
            new_type = "Q4_K"
    elif cat == ATTN_QKV:
        # Unreachable in this llama.cpp version (ATTN_QKV is caught by category_is_attn_v above);
        # kept so the port stays branch-for-branch.
        if ftype in ("Q3_K_M", "Q3_K_L", "IQ3_M"):
            new_type = "Q4_K"
        elif ftype == "Q4_K_M":
            new_type = "Q5_K"
        elif ftype == "Q5_K_M":
            new_type = "Q6_K"
    elif cat in (FFN_GATE, FFN_UP):
        i_layer, n_layer = _layer_info(m, counters["gate" if cat == FFN_GATE else "up"], name)
        if ftype == "IQ3_XS" and n_layer // 8 <= i_layer < 7 * n_layer // 8:
            new_type = "IQ3_XXS"
    return new_type


# tensor_type_fallback: the switch, for rows (ne0) not divisible by the chosen type's block size.
_FALLBACK = {
    **{t: "IQ4_NL" for t in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")},
    **{t: "Q4_0" for t in ("Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0")},
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}


def fallback_type(target: str, ne0: int) -> str:
    """``tensor_type_fallback``: the type used when ``ne0`` is not a multiple of ``target``'s block.

    The switch gives a 32-block type; if that does not divide ``ne0`` either, F16. Types with no
    entry in the switch (the 32-block Q4_0..Q8_0, IQ4_NL, MXFP4, Q1_0, NVFP4) make llama.cpp throw
    "no tensor type fallback is defined": a ValueError here.
    """
    if ne0 % GGML_TYPES[target][0] == 0:
        return target
    if target not in _FALLBACK:
        raise ValueError(f"no tensor type fallback is defined for type {target} (ne0={ne0})")
    ret = _FALLBACK[target]
    if ne0 % GGML_TYPES[ret][0] != 0:
        ret = "F16"
    return ret


def _get_type(m: _Model, default_type: str, t: TensorSpec, name: str, ftype: str,
              counters: dict[str, int], imatrix: bool) -> str:
    """``llama_tensor_get_type``: the outer wrapper (default params: no overrides, not pure)."""
    shape = tuple(t.shape) or (1,)
    if not _allows_quantization(name, shape):
        # kept as stored in the input file; convert_hf_to_gguf.py writes these as F32
        return "F32"
    new_type = default_type
    if is_quantized(default_type):
        new_type = _get_type_impl(m, new_type, name, shape, ftype, _category(name), counters, imatrix)
        new_type = fallback_type(new_type, shape[-1])
    return new_type


def _counts_quantizable(t: TensorSpec, name: str) -> bool:
    return _allows_quantization(name, tuple(t.shape) or (1,))


_COUNTER = {ATTN_V: "wv", ATTN_QKV: "wv", ATTN_KV_B: "wv", FFN_DOWN: "down", FFN_GATE: "gate", FFN_UP: "up"}


def tensor_type(ftype: str, t: TensorSpec, model: ModelSpec, *, imatrix: bool = False) -> str:
    """The ggml type ``llama-quantize <ftype>`` gives tensor ``t`` of ``model``.

    Ports ``llama_tensor_get_type`` / ``llama_tensor_get_type_impl`` / ``tensor_type_fallback`` of
    src/llama-quant.cpp. The counters ``i_attention_wv``, ``i_ffn_down``, ``i_ffn_gate``, ``i_ffn_up``
    are, as in llama.cpp, the number of tensors of that category quantized before ``t`` in the
    loader's order (block number, then name); ``n_attention_wv`` counts attn_v/attn_qkv/attn_kv_b
    weights; ``n_ffn_*`` is the layer count. For MoE models (``num_experts > 1``) the ffn rules use the
    block number instead. ``t`` need not be one of ``model.tensors``.
    Raises ValueError where llama.cpp would refuse (no fallback type for the row length).
    """
    ftype = _norm_ftype(ftype)
    m = _Model(model)
    name = gguf_name(t)
    key = _sort_key(name)
    counters = {"wv": 0, "down": 0, "gate": 0, "up": 0}
    for u in model.tensors:
        un = gguf_name(u)
        c = _COUNTER.get(_category(un))
        if c and _sort_key(un) < key and _counts_quantizable(u, un):
            counters[c] += 1
    return _get_type(m, FILE_TYPES[ftype], t, name, ftype, counters, imatrix)


def tensor_types(ftype: str, model: ModelSpec, *, imatrix: bool = False) -> list[tuple[TensorSpec, str]]:
    """``tensor_type`` for every tensor of ``model`` in one pass (llama.cpp's loop), in model order."""
    ftype = _norm_ftype(ftype)
    m = _Model(model)
    default_type = FILE_TYPES[ftype]
    named = [(gguf_name(t), i, t) for i, t in enumerate(model.tensors)]
    named.sort(key=lambda x: (_sort_key(x[0]), x[1]))
    counters = {"wv": 0, "down": 0, "gate": 0, "up": 0}
    out: list[Optional[str]] = [None] * len(named)
    for name, i, t in named:
        out[i] = _get_type(m, default_type, t, name, ftype, counters, imatrix)
        c = _COUNTER.get(_category(name))
        if c and _counts_quantizable(t, name):
            counters[c] += 1
    return [(t, typ) for t, typ in zip(model.tensors, out)]


def tensor_bytes(ggml_type: str, shape: Iterable[int]) -> int:
    """Bytes of a tensor's data: ``rows * ne0 / block * type_size`` (``ggml_row_size`` x rows).

    ``shape`` is in PyTorch order, so the row length ne0 is ``shape[-1]``.
    """
    shape = tuple(shape) or (1,)
    block, size = GGML_TYPES[ggml_type]
    ne0 = shape[-1]
    if ne0 % block:
        raise ValueError(f"row length {ne0} is not a multiple of the {ggml_type} block size {block}")
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * (ne0 // block) * size


def file_tensor_bytes(ftype: str, model: ModelSpec, *, imatrix: bool = False) -> dict:
    """Tensor data of a ``<ftype>`` GGUF of ``model`` (no metadata, no alignment padding).

    Returns ``{"total_bytes", "bytes_by_type", "count_by_type", "bytes_by_role"}``.
    """
    by_type: dict[str, int] = {}
    count: dict[str, int] = {}
    by_role: dict[str, int] = {}
    total = 0
    for t, typ in tensor_types(ftype, model, imatrix=imatrix):
        b = tensor_bytes(typ, t.shape)
        total += b
        by_type[typ] = by_type.get(typ, 0) + b
        count[typ] = count.get(typ, 0) + 1
        by_role[t.role] = by_role.get(t.role, 0) + b
    return {"total_bytes": total, "bytes_by_type": by_type, "count_by_type": count, "bytes_by_role": by_role}
