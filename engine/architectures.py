"""Turn a ``config.json`` into the list of tensors a model stores (pure Python, no torch).

Each builder mirrors how transformers 5 lays out the architecture's parameters (checked against
meta-device instantiation in ``tests/test_architectures.py``), and tags every tensor with llama.cpp's
GGUF name so the GGUF mixing rules can be applied to it.
"""
from __future__ import annotations

from .errors import ConfigError
from .specs import ModelSpec, TensorSpec

LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "granite", "olmo", "smollm3"}
SUPPORTED = sorted(LLAMA_LIKE | {"gemma", "gemma2", "phi3", "mixtral"})


def _int(cfg: dict, key: str, *fallbacks: str, default=None) -> int:
    for k in (key, *fallbacks):
        v = cfg.get(k)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v <= 0:
                raise ConfigError(f"config field '{k}' must be a positive whole number, got {v!r}.")
            return int(v)
    if default is not None:
        return default
    raise ConfigError(f"config.json is missing the field '{key}', which the memory calculator needs.")


def _layer_windows(cfg: dict, model_type: str, n_layers: int) -> tuple[int, ...]:
    """Sliding-window length per layer (0 = full attention), following each config class of transformers 5."""
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if model_type == "gemma2" and not types:
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    if model_type in ("qwen2", "qwen3") and not types:
        if not cfg.get("use_sliding_window", False):
            window = None
        start = cfg.get("max_window_layers", n_layers)
        types = ["sliding_attention" if window and i >= start else "full_attention" for i in range(n_layers)]
    if types:
        return tuple(int(window or 0) if t == "sliding_attention" else 0 for t in types[:n_layers])
    return tuple(int(window or 0) for _ in range(n_layers))


def build_model_spec(cfg: dict, name: str = "model", source: str = "local") -> ModelSpec:
    """Build a :class:`ModelSpec` from a parsed ``config.json``.

    >>> spec = build_model_spec({"model_type": "llama", "vocab_size": 10, "hidden_size": 8,
    ...     "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2})
    >>> spec.params  # embed 80 + q,k,v,o 4*64 + mlp 3*128 + 2 norms + final norm 8 + lm_head 80
    824
    """
    if not isinstance(cfg, dict):
        raise ConfigError("config.json must be a JSON object.")
    if "text_config" in cfg and "hidden_size" not in cfg:
        raise ConfigError("This is a multimodal config (it nests a text_config); pick the text model instead.")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        raise ConfigError(
            f"Architecture '{model_type}' is not supported by the calculator yet. "
            f"Supported: {', '.join(SUPPORTED)}. You can still enter a bare parameter count (e.g. 7B).")
    V = _int(cfg, "vocab_size")
    H = _int(cfg, "hidden_size")
    L = _int(cfg, "num_hidden_layers")
    nh = _int(cfg, "num_attention_heads")
    nkv = _int(cfg, "num_key_value_heads", default=nh)
    hd = _int(cfg, "head_dim", default=H // nh)
    inter = _int(cfg, "intermediate_size")
    if nh % nkv:
        raise ConfigError(f"num_attention_heads ({nh}) must be a multiple of num_key_value_heads ({nkv}).")
    if L > 100_000 or V > 10_000_000 or H > 1_000_000 or inter > 10_000_000:
        raise ConfigError("config.json values are implausibly large; check the file.")
    default_tie = model_type in ("gemma", "gemma2")
    tied = bool(cfg.get("tie_word_embeddings", default_tie))
    experts = int(cfg.get("num_local_experts") or 0) if model_type == "mixtral" else 0
    top_k = int(cfg.get("num_experts_per_tok") or 0) if experts else 0

    T: list[TensorSpec] = []

    def add(name, role, shape, gguf, layer=None, linear=False):
        T.append(TensorSpec(name, role, tuple(shape), gguf, layer, linear))

    def linear(prefix, role, out_f, in_f, gguf, layer, bias=False):
        add(f"{prefix}.weight", role, (out_f, in_f), gguf, layer, True)
        if bias:
            add(f"{prefix}.bias", role, (out_f,), gguf, layer)

    add("model.embed_tokens.weight", "embedding", (V, H), "token_embd")
    q_out, kv_out = nh * hd, nkv * hd
    attn_bias = bool(cfg.get("attention_bias", False))
    qkv_bias = attn_bias or model_type == "qwen2"
    mlp_bias = bool(cfg.get("mlp_bias", False))
    for i in range(L):
        p = f"model.layers.{i}"
        add(f"{p}.input_layernorm.weight", "norm", (H,), "attn_norm", i)
        if model_type == "phi3":
            linear(f"{p}.self_attn.qkv_proj", "attention", q_out + 2 * kv_out, H, "attn_qkv", i)
        else:
            linear(f"{p}.self_attn.q_proj", "attention", q_out, H, "attn_q", i, qkv_bias)
            linear(f"{p}.self_attn.k_proj", "attention", kv_out, H, "attn_k", i, qkv_bias)
            linear(f"{p}.self_attn.v_proj", "attention", kv_out, H, "attn_v", i, qkv_bias)
        linear(f"{p}.self_attn.o_proj", "attention", H, q_out, "attn_output", i, attn_bias)
        if model_type == "qwen3":
            add(f"{p}.self_attn.q_norm.weight", "norm", (hd,), "attn_q_norm", i)
            add(f"{p}.self_attn.k_norm.weight", "norm", (hd,), "attn_k_norm", i)
        if model_type == "gemma2":
            add(f"{p}.post_attention_layernorm.weight", "norm", (H,), "post_attention_norm", i)
            add(f"{p}.pre_feedforward_layernorm.weight", "norm", (H,), "ffn_norm", i)
            add(f"{p}.post_feedforward_layernorm.weight", "norm", (H,), "post_ffw_norm", i)
        else:
            add(f"{p}.post_attention_layernorm.weight", "norm", (H,), "ffn_norm", i)
        if experts:
            # transformers 5: MixtralTopKRouter holds a bare Parameter and MixtralExperts fuses the
            # experts into 3-D Parameters (gate_up_proj [E, 2I, H], down_proj [E, H, I]): none is an
            # nn.Linear. GGUF stores gate and up as separate 3-D tensors, so we list them separately.
            add(f"{p}.mlp.gate.weight", "router", (experts, H), "ffn_gate_inp", i)
            add(f"{p}.mlp.experts.gate_up_proj", "experts", (experts, inter, H), "ffn_gate_exps", i)
            add(f"{p}.mlp.experts.gate_up_proj", "experts", (experts, inter, H), "ffn_up_exps", i)
            add(f"{p}.mlp.experts.down_proj", "experts", (experts, H, inter), "ffn_down_exps", i)
        elif model_type == "phi3":
            linear(f"{p}.mlp.gate_up_proj", "mlp", 2 * inter, H, "ffn_up", i)
            linear(f"{p}.mlp.down_proj", "mlp", H, inter, "ffn_down", i)
        else:
            linear(f"{p}.mlp.gate_proj", "mlp", inter, H, "ffn_gate", i, mlp_bias)
            linear(f"{p}.mlp.up_proj", "mlp", inter, H, "ffn_up", i, mlp_bias)
            linear(f"{p}.mlp.down_proj", "mlp", H, inter, "ffn_down", i, mlp_bias)
    add("model.norm.weight", "norm", (H,), "output_norm")
    if not tied:
        linear("lm_head", "lm_head", V, H, "output", None)

    return ModelSpec(
        name=name, model_type=model_type, vocab_size=V, hidden_size=H, num_layers=L, num_heads=nh,
        num_kv_heads=nkv, head_dim=hd, intermediate_size=inter, tie_word_embeddings=tied,
        tensors=tuple(T), num_experts=experts, experts_per_token=top_k,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
        sliding_windows=_layer_windows(cfg, model_type, L),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
        source=source,
    )
