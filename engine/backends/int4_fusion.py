"""Decoder layers whose small kernels are folded into our int4 GEMV (``hqq4-fast`` on CUDA, Llama-style layers).

At batch 1 a decoder layer's four matmuls read ~98% of its bytes, but the step also launches, per layer, two
RMSNorm kernels (each fused by the compiler with the residual add before it) and one SiLU(gate) * up kernel:
~2.6 + 2.6 + 1.2 µs plus the gaps between launches, for a few kilobytes of data (an 8B on an H200). Here they
move into the GEMVs' epilogues (:mod:`engine.backends.int4_cuda`, ``mma_int4``), where the data already is:

- o and down add the residual stream to their output (``res + bf16(sum)``, rounded as the separate add rounds)
  and write, for the norm that follows, the stream times the norm's weight and each 16 features' sum of squares;
- q/k/v and gate/up read that weighted input as they would any input (no extra work per weight) and scale each
  token's sums by ``rsqrt(mean(x^2) + eps)`` from the partial sums (a per-token factor commutes with the
  product). Normalizing inside the loop instead (the weight multiplied and the squares summed per group, in each
  of the ~2,000 blocks) cost more than it saved: gate+up 25.9 -> 34.1 µs (H200, docs/benchmarks.md);
- gate/up's rows are stored interleaved 8 by 8 (a 16-row tile = 8 gate rows + the matching 8 up rows), so the
  kernel writes ``SiLU(gate) * up`` directly (rounded as the separate ops round).

In the fast path's compiled one-token step, the attention goes through :func:`folded_attention`: RoPE of q and k
and the writes of k and v into the static cache happen in the q+k+v GEMV's epilogue (one kernel per layer less:
inductor's RoPE + cache-write kernel), then our attention kernel and o_proj. q and k rows are stored for it at
load (``int4_cuda.rope_order``; their eager outputs are put back in the heads' order, so a prompt and the plain
path see transformers' layout). ``QUANTSCOPE_ROPE_FOLD=0`` turns this off.

The first layer's input (the embeddings) gets its weighted copy and sums from PyTorch's ops. A prompt (32 tokens
or more) runs the same steps with PyTorch's ops around cuBLAS. What differs from the plain layer is rounding: the
norm's output is not rounded to bf16 before the product (``x * weight`` is, once).

Only layers whose code is Llama's (transformers' Llama, Mistral and Qwen2 decoder layers, MLPs and RMSNorms have
the same ``forward``; tests/test_fast.py pins that for the installed transformers) are fused; others keep the
separate kernels. ``QUANTSCOPE_INT4_FUSE=0`` turns this off (for comparisons).
"""
from __future__ import annotations

import functools
import os

import torch

from . import decode_attention, int4_cuda

LAYERS = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
ATTENTIONS = ("LlamaAttention", "MistralAttention", "Qwen2Attention")
MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
SILU = ("SiLU", "SiLUActivation")


def wanted() -> bool:
    return os.environ.get("QUANTSCOPE_INT4_FUSE", "1") != "0"


def rope_head_dim(attn, sizes, biased: bool):
    """The head dimension when ``attn``'s q/k/v (``sizes`` rows, with biases or not) are to be stored for the RoPE
    fold (:func:`folded_attention`), else None. ``QUANTSCOPE_ROPE_FOLD=0`` turns the fold off (for comparisons)."""
    if not wanted() or os.environ.get("QUANTSCOPE_ROPE_FOLD", "1") == "0" or biased:
        return None
    if type(attn).__name__ not in ATTENTIONS:
        return None
    hd, cfg = getattr(attn, "head_dim", None), getattr(attn, "config", None)
    if hd not in decode_attention.HEAD_DIMS or getattr(cfg, "partial_rotary_factor", 1.0) != 1.0:
        return None
    if getattr(cfg, "sliding_window", None) is not None or not int4_cuda.rope_fits(sizes, hd):
        return None
    return hd


def folded_attention(attn, xn, kwargs):
    """A fused layer's attention for one token in the fast path's compiled step, with RoPE and the cache writes
    inside the q+k+v GEMV (:func:`int4_cuda.qkv_rope`) and our attention kernel
    (:mod:`engine.backends.decode_attention`) on the step's bucket of positions: the combined RoPE + cache-write
    kernel inductor made per layer (1.4 µs plus a launch gap, H200) is gone. transformers' ``forward`` does the same
    with separate kernels: q/k/v, RoPE, ``cache.update``, attention (``runners.gqa_attention``), o_proj. None (and
    nothing done) where the fold does not apply: not one token, q/k/v not stored for it, no bucket of positions
    (only the runner's compiled step passes one), not our attention kernel, not the runner's one-counter static
    cache."""
    fused = getattr(attn, "fused_q_k_v", None)
    if fused is None or fused.rope is None or tuple(xn.shape[:2]) != (1, 1):
        return None
    bucket = kwargs.get("kv_bucket")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    rope = kwargs.get("position_embeddings")
    if getattr(attn, decode_attention.COUNTERS, None) is None or bucket is None or cache is None or rope is None:
        return None
    layer = cache.layers[attn.layer_idx]
    if not getattr(layer, "quantscope_one_counter", False) or not layer.is_initialized:
        return None
    n = bucket.shape[0]
    mask = kwargs.get("attention_mask")
    mask = None if mask is None else mask[..., :n]
    if layer.keys.dtype != torch.bfloat16 or not decode_attention.usable_cache(layer.keys, layer.values, mask):
        return None
    head_dim, q_rows = fused.rope
    q = int4_cuda.qkv_rope(fused, xn, rope[0], rope[1], layer.keys, layer.values, layer.cumulative_length)
    key, value = layer.keys[:, :, :n], layer.values[:, :, :n]  # read after the write above
    query = q.view(1, 1, q_rows // head_dim, head_dim).transpose(1, 2)
    return attn.o_proj(decode_attention.attend_for(attn, query, key, value, mask, attn.scaling).reshape(1, 1, q_rows))


class GatedMLP(torch.nn.Module):
    """``down(SiLU(gate(x)) * up(x))`` in two kernel calls: gate and up interleaved, writing the product
    (:func:`int4_cuda.gate_up_from_codes`), then down. In a fused decoder layer gate/up also take the
    post-attention norm (``norm``: partial sums, eps) and down adds ``residual`` (and with ``next_w`` returns the
    next norm's input too)."""

    def __init__(self, gate_up: int4_cuda.GemvInt4Linear, down_proj: int4_cuda.GemvInt4Linear):
        super().__init__()
        self.gate_up, self.down_proj = gate_up, down_proj

    @property
    def hidden_size(self) -> int:
        return self.gate_up.in_features

    @property
    def intermediate_size(self) -> int:
        return self.gate_up.out_features

    def forward(self, x, residual=None, norm=None, next_w=None):
        return self.down_proj(self.gate_up(x, norm), residual=residual, next_w=next_w)


def mlp_fusable(mlp) -> bool:
    """Whether ``mlp`` is a Llama-style gated MLP with SiLU (the projections are checked by the caller)."""
    return type(mlp).__name__ in MLPS and type(getattr(mlp, "act_fn", None)).__name__ in SILU


def gated_mlp(gate, up, down) -> GatedMLP:
    """A :class:`GatedMLP` from each projection's (codes, scales, zeros, bias) (see ``int4.codes``)."""
    return GatedMLP(int4_cuda.gate_up_from_codes(gate, up), int4_cuda.from_codes(*down))


class AddsResidual(torch.nn.Module):
    """A fused decoder layer's o_proj: adds the residual stream the layer hands it (``int4_cuda.put``
    "pending": (residual, the post-attention norm's weight), taken once) to its output, and hands back that norm's
    input ("extra"). transformers' attention calls ``o_proj(attn_output)`` and returns one tensor, hence the
    hand-over."""

    def __init__(self, linear: int4_cuda.GemvInt4Linear):
        super().__init__()
        self.linear = linear
        self.pending = self.extra = None  # the compiled step's hand-over (int4_cuda.put)

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def forward(self, x):
        pending = int4_cuda.take(self, "pending")
        if pending is None:  # called on its own: the plain projection
            return self.linear(x)
        residual, next_w = pending
        y, xn, part = self.linear(x, residual=residual, next_w=next_w)
        int4_cuda.put(self, "extra", (xn, part))
        return y


def _fused_forward(self, hidden_states, **kwargs):
    """A Llama decoder layer with its norms, residual adds and SiLU * up inside the GEMVs: same inputs, same
    output as transformers' ``LlamaDecoderLayer.forward`` (up to rounding, see the module docstring). The norm's
    input for this layer comes from the previous fused layer's down projection (``pending_input``), else (the
    first layer) from PyTorch's ops. Per-call data goes through ``int4_cuda.put``/``take``: this thread's own
    (two eager runs of a model may run at once), module attributes inside the compiled step."""
    attn, ln1, ln2 = self.self_attn, self.input_layernorm, self.post_attention_layernorm
    put, take = int4_cuda.put, int4_cuda.take
    pending = take(self, "pending_input")
    if pending is not None and pending[0] is hidden_states:
        xn, part = pending[1], pending[2]
    else:
        xn, part = int4_cuda.norm_input(hidden_states, ln1.weight)
    put(attn.fused_q_k_v, "norm", (part, float(ln1.variance_epsilon)))
    put(attn.o_proj, "pending", (hidden_states, ln2.weight))
    # q/k/v normalize; o_proj adds the residual, prepares the next norm
    folded = folded_attention(attn, xn, kwargs)
    hidden_states = folded if folded is not None else attn(xn, **kwargs)[0]
    put(attn.fused_q_k_v, "norm", None)
    xn, part = take(attn.o_proj, "extra")
    nxt = self._next_fused
    out = self.mlp(xn, residual=hidden_states, norm=(part, float(ln2.variance_epsilon)),
                   next_w=None if nxt is None else nxt.input_layernorm.weight)
    if nxt is None:
        return out
    put(nxt, "pending_input", out)  # (hidden states, the next norm's input, its partial sums)
    return out[0]


@functools.lru_cache(maxsize=None)
def _fused_class(cls):
    return type("Fused" + cls.__name__, (cls,), {"forward": _fused_forward, "__module__": __name__})


def why_not_layer(layer):
    """None when ``layer`` can be fused, else why not."""
    name = type(layer).__name__
    if name not in LAYERS:
        return f"{name} is not a Llama-style decoder layer"
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    for norm in (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)):
        if type(norm).__name__ not in NORMS or getattr(norm, "weight", None) is None:
            return "its norms are not Llama's RMSNorm"
        if norm.weight.dtype != torch.bfloat16:
            return "its norms are not bf16"
    fused = getattr(attn, "fused_q_k_v", None)
    if not isinstance(fused, int4_cuda._Fused):
        return "q/k/v are not one int4 GEMV"
    if not isinstance(getattr(attn, "o_proj", None), int4_cuda.GemvInt4Linear) or attn.o_proj.bias is not None:
        return "o_proj is not an int4 GEMV without bias"
    if not isinstance(mlp, GatedMLP) or mlp.down_proj.bias is not None:
        return "the MLP is not a fused gated MLP"
    return None


def fuse_decoder_layer(layer, next_layer=None) -> None:
    """Fold ``layer``'s norms and residual adds into its GEMVs (:func:`why_not_layer` must be None); with
    ``next_layer`` (fused too, next in the model) its down projection prepares that layer's first norm."""
    attn, mlp = layer.self_attn, layer.mlp
    attn.fused_q_k_v.linear.set_mode("norm")
    attn.o_proj.set_mode("residual")
    attn.o_proj = AddsResidual(attn.o_proj)
    mlp.gate_up.set_mode("norm+act")
    mlp.down_proj.set_mode("residual")
    layer.pending_input = None  # the compiled step's hand-over (int4_cuda.put)
    object.__setattr__(layer, "_next_fused", next_layer)  # not a submodule: the model owns it
    layer.__class__ = _fused_class(type(layer))


def fuse_decoder_layers(model) -> tuple[int, dict]:
    """Fuse every decoder layer of ``model`` that can be (each hands the next its norm's input when that one is
    fused too and follows it in the model's list of layers): (layers fused, {reason: layers left})."""
    left, todo = {}, []
    for module in model.modules():
        if type(module).__name__ not in LAYERS:
            continue
        why = why_not_layer(module)
        if why:
            left[why] = left.get(why, 0) + 1
        else:
            todo.append(module)
    fusing = {id(m) for m in todo}
    following = {id(a): b for layers in model.modules() if isinstance(layers, torch.nn.ModuleList)
                 for a, b in zip(layers, layers[1:]) if id(b) in fusing}
    for layer in todo:
        fuse_decoder_layer(layer, following.get(id(layer)))
    return len(todo), left
