"""Pin the calculator's weight and KV-cache bytes against real loaded models (CPU, no network, no mocks).

Tiny random-weight models of several architectures are saved with ``save_pretrained`` (bf16), then
loaded for real in every format the calculator models for transformers:

* bf16 / fp32 (``from_pretrained(dtype=...)``);
* bitsandbytes LLM.int8, NF4, NF4 + double quant, FP4 (``BitsAndBytesConfig``, ``device_map="cpu"``);
* HQQ 8/4/3/2/1-bit, group 64 (bf16 load, then ``AutoHQQHFModel.quantize_model`` on CPU).

What counts as "weights" (what :func:`engine.formats.weights_bytes` predicts)
------------------------------------------------------------------------------
Every byte a loaded model holds for its weights: all parameters and *persistent* buffers, plus the
quantization state stored beside the packed weights:

* bitsandbytes 4-bit: ``Params4bit.quant_state`` -- absmax, code (quant_map), and with double quant the
  uint8 absmax, fp32 ``offset`` and the nested ``state2`` (absmax, 256-entry code);
* bitsandbytes int8: ``Int8Params.SCB`` (fp32 row scales); ``CB`` shares the weight's storage;
* HQQ: ``HQQLinear.W_q`` and every tensor in ``HQQLinear.meta`` (scale, zero, and any nested state).

Left out: non-persistent buffers, which are not weights but values recomputed from the config and never
stored in a checkpoint -- the rotary ``inv_freq`` / ``original_inv_freq`` (head_dim/2 floats) and gemma's
``embed_scale`` scalar. The test asserts no *other* non-persistent buffer exists, so nothing slips out.

Tensors are de-duplicated by ``untyped_storage().data_ptr()`` and counted by the storage's size (tied
embeddings share one storage, as do int8 ``CB`` and the weight), so the count is what is really held.

KV cache: a forward pass with ``use_cache=True`` on batch 2 x 37 tokens (longer than the 16-token sliding
window of gemma2, mistral and phi3 here), then one decode step; the bytes of every key/value tensor in
the returned ``Cache`` must equal :func:`engine.memory.kv_cache_bytes` exactly.
"""
from __future__ import annotations

import gc
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine.architectures import build_model_spec  # noqa: E402
from engine.formats import parse_method, weights_bytes  # noqa: E402
from engine.memory import kv_cache_bytes  # noqa: E402

COMMON = dict(num_hidden_layers=2, vocab_size=1000, max_position_embeddings=256)

# Tiny configs. Sizes are multiples of 64 where possible so the group math is exact; the exceptions are
# deliberate: phi3 has in_features 96 (HQQ groups of 64 straddle rows) and llama-odd has tensors whose
# element count is odd and not a multiple of bitsandbytes' 64-value block.
ARCHS: dict[str, dict] = {
    "llama-tied-gqa": dict(model_type="llama", hidden_size=128, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama-untied-mha": dict(model_type="llama", hidden_size=128, intermediate_size=256,
                             num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "llama-odd": dict(model_type="llama", hidden_size=105, intermediate_size=201, head_dim=32,
                      num_attention_heads=5, num_key_value_heads=1, tie_word_embeddings=False),
    "qwen2-bias": dict(model_type="qwen2", hidden_size=128, intermediate_size=320,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen3-qknorm": dict(model_type="qwen3", hidden_size=128, intermediate_size=256, head_dim=32,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "gemma2-sw16": dict(model_type="gemma2", hidden_size=128, intermediate_size=256, head_dim=48,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=16),
    "mistral-sw16": dict(model_type="mistral", hidden_size=128, intermediate_size=256,
                         num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                         tie_word_embeddings=False),
    "phi3-fused-sw16": dict(model_type="phi3", hidden_size=96, intermediate_size=192,
                            num_attention_heads=3, num_key_value_heads=3, sliding_window=16,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    "mixtral-4x": dict(model_type="mixtral", hidden_size=128, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                       num_experts_per_tok=2, tie_word_embeddings=False),
}

BNB = {
    "int8": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
}
HQQ = {f"hqq{n}": n for n in (8, 4, 3, 2, 1)}
FORMATS = ["bf16", "fp32", *BNB, *HQQ]

# Non-persistent buffers: derived from the config, never in a checkpoint, not weights (see module doc).
NOT_WEIGHTS = {"inv_freq", "original_inv_freq", "embed_scale"}

TOLERANCE = 0.005  # 0.5 %: the documented accuracy bound of the weights term
# On the pinned versions (transformers 5.23, bitsandbytes 0.50.2, hqq 0.2.8) every case matches to the
# byte, so the test also asserts equality. If an upgrade moves a case off by a few bytes but stays within
# TOLERANCE, find out why, then set this to False rather than widening the tolerance.
EXACT = True


def full_config(arch: str) -> dict:
    return {**COMMON, **ARCHS[arch]}


def _hf_config(cfg: dict):
    rest = {k: v for k, v in cfg.items() if k != "model_type"}
    return transformers.AutoConfig.for_model(cfg["model_type"], **rest)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> folder holding the tiny model saved in bf16 (built on first use, once per module)."""
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(_hf_config(full_config(arch)),
                                                                  dtype=torch.bfloat16)
            path = tmp_path_factory.mktemp(arch)
            model.save_pretrained(path)
            cache[arch] = str(path)
        return cache[arch]

    return get


def load(path: str, fmt: str):
    """Load the saved model as ``fmt`` on CPU, the way a user of the calculator would."""
    if fmt in ("bf16", "fp32"):
        dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cpu")
    if fmt in BNB:
        qc = transformers.BitsAndBytesConfig(**BNB[fmt])
        return transformers.AutoModelForCausalLM.from_pretrained(
            path, quantization_config=qc, device_map="cpu", dtype=torch.bfloat16)
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu")
    AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=HQQ[fmt], group_size=64),
                                  compute_dtype=torch.bfloat16, device="cpu")
    return model


# ------------------------------------------------------------------------------------------------
# Measuring what a loaded model holds
# ------------------------------------------------------------------------------------------------
def _state_tensors(obj, path: str, seen: set):
    """(path, tensor) for every tensor reachable from a quantization-state object (QuantState, the
    MatmulLtState of int8 layers, HQQ's meta dict with its nested meta_scale/meta_zero, ...)."""
    if obj is None:
        return
    if torch.is_tensor(obj):
        yield path, obj
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _state_tensors(v, f"{path}[{k}]", seen)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _state_tensors(v, f"{path}[{i}]", seen)
    elif type(obj).__module__.split(".")[0] in ("bitsandbytes", "hqq"):
        for k, v in vars(obj).items():
            yield from _state_tensors(v, f"{path}.{k}", seen)


def held_tensors(model) -> list[tuple[str, "torch.Tensor"]]:
    """Every tensor the model holds as weights: parameters, persistent buffers, quantization state."""
    out: list = []
    seen: set = set()
    for mname, mod in model.named_modules():
        for n, p in mod.named_parameters(prefix=mname, recurse=False):
            out.append((n, p))
            for attr in ("CB", "SCB", "quant_state"):  # bnb Int8Params / Params4bit
                out.extend(_state_tensors(getattr(p, attr, None), f"{n}.{attr}", seen))
        for n, b in mod.named_buffers(prefix=mname, recurse=False):
            leaf = n.rsplit(".", 1)[-1]
            if leaf in mod._non_persistent_buffers_set:
                assert leaf in NOT_WEIGHTS, f"unexpected non-persistent buffer {n}: decide whether it is a weight"
                continue
            out.append((n, b))
        # Module-level state: bnb Linear4bit.quant_state / Linear8bitLt.state; HQQLinear.meta (and W_q, bias
        # in case a version stores them as plain attributes rather than Parameters).
        for attr in ("quant_state", "state", "meta", "W_q", "bias"):
            if attr in vars(mod):
                out.extend(_state_tensors(vars(mod)[attr], f"{mname}.{attr}", seen))
    return out


def measured_bytes(model) -> int:
    storages: dict[int, int] = {}
    for name, t in held_tensors(model):
        assert t.device.type == "cpu", name
        st = t.untyped_storage()
        storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
    return sum(storages.values())


def measured_quantized_params(model) -> int:
    """Parameters stored quantized: bnb Int8Params / Params4bit and HQQLinear weights (original numel)."""
    from bitsandbytes.nn import Int8Params, Params4bit
    from hqq.core.quantize import HQQLinear

    n = 0
    for mod in model.modules():
        if isinstance(mod, HQQLinear):
            n += math.prod(mod.meta["shape"])
        for p in mod.parameters(recurse=False):
            if isinstance(p, Params4bit):
                n += math.prod(p.quant_state.shape)
            elif isinstance(p, Int8Params):
                n += p.numel()
    return n


def _free(model):
    del model
    gc.collect()


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------
CASES = [(a, f) for a in ARCHS for f in FORMATS if not (a == "llama-odd" and f in HQQ)]


@pytest.mark.parametrize("arch,fmt", CASES, ids=[f"{a}-{f}" for a, f in CASES])
def test_weights_bytes_match_loaded_model(saved, arch, fmt):
    spec = build_model_spec(full_config(arch), arch)
    model = load(saved(arch), fmt)
    got = measured_bytes(model)
    want, _by_role, quantized = weights_bytes(parse_method(fmt), spec)
    assert abs(want - got) <= TOLERANCE * got, (
        f"{arch} {fmt}: predicted {want:,} B, loaded model holds {got:,} B ({(want - got) / got:+.3%})")
    if EXACT:
        assert want == got, f"{arch} {fmt}: predicted {want:,} B, measured {got:,} B ({want - got:+,} B)"
    assert quantized == measured_quantized_params(model)
    if fmt in ("bf16", "fp32"):
        assert quantized == 0
    _free(model)


def test_hqq_refuses_group_size_not_dividing_numel(saved):
    """HQQ 0.2.8 asserts numel % group_size == 0, so llama-odd (k_proj 32x105) cannot be HQQ-quantized;
    the calculator's ceil(numel / group) is never exercised by real HQQ models."""
    with pytest.raises(AssertionError, match="group_size"):
        load(saved("llama-odd"), "hqq4")


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_bnb_leaves_mixtral_experts_and_lm_head_16bit(saved, fmt):
    """transformers 5 fuses Mixtral's experts into 3-D Parameters (MixtralExperts), which bitsandbytes
    does not replace (it only swaps nn.Linear): they stay bf16, as does the router and lm_head."""
    from bitsandbytes.nn import Linear4bit, Linear8bitLt

    model = load(saved("mixtral-4x"), fmt)
    qcls = Linear4bit if fmt == "nf4" else Linear8bitLt
    for layer in model.model.layers:
        experts = layer.mlp.experts
        assert type(experts).__name__ == "MixtralExperts"
        assert experts.gate_up_proj.dtype == torch.bfloat16 and experts.gate_up_proj.dim() == 3
        assert experts.down_proj.dtype == torch.bfloat16 and experts.down_proj.dim() == 3
        assert type(experts.gate_up_proj) is torch.nn.Parameter
        assert layer.mlp.gate.weight.dtype == torch.bfloat16  # router: a bare Parameter, not nn.Linear
        assert isinstance(layer.self_attn.q_proj, qcls)
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight.dtype == torch.bfloat16
    _free(model)


@pytest.mark.parametrize("arch", ["llama-tied-gqa", "llama-untied-mha"])
def test_bnb_lm_head_stays_16bit(saved, arch):
    model = load(saved(arch), "nf4")
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight.dtype == torch.bfloat16
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == ARCHS[arch]["tie_word_embeddings"]
    _free(model)


# ------------------------------------------------------------------------------------------------
# KV cache
# ------------------------------------------------------------------------------------------------
def cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None and t.numel():
                total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("arch", list(ARCHS))
def test_kv_cache_bytes_match_real_cache(saved, arch):
    batch, seq = 2, 37
    cfg = full_config(arch)
    spec = build_model_spec(cfg, arch)
    if cfg.get("sliding_window"):
        assert any(spec.sliding_windows) and seq > cfg["sliding_window"]
    model = load(saved(arch), "bf16")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg["vocab_size"], (batch, seq), generator=gen)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        assert len(cache.layers) == spec.num_layers
        assert cache_bytes(cache) == kv_cache_bytes(spec, seq, batch, "auto", parse_method("bf16"))
        # One decode step: full layers grow by one token, sliding layers stay at window - 1.
        nxt = out.logits[:, -1:].argmax(-1)
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        assert cache_bytes(out.past_key_values) == kv_cache_bytes(spec, seq + 1, batch, "auto",
                                                                  parse_method("bf16"))
    _free(model)


def test_kv_cache_fp32_model(saved):
    """kv_dtype "auto" follows the compute dtype: 4 bytes per value for an fp32 model."""
    arch = "llama-tied-gqa"
    spec = build_model_spec(full_config(arch), arch)
    model = load(saved(arch), "fp32")
    with torch.no_grad():
        out = model(input_ids=torch.arange(3, 3 + 2 * 37).reshape(2, 37), use_cache=True)
    assert cache_bytes(out.past_key_values) == kv_cache_bytes(spec, 37, 2, "auto", parse_method("fp32"))
    _free(model)
