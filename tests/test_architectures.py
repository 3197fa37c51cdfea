"""Pin engine.architectures against transformers itself, for every bundled preset.

For each ``config.json`` copy in ``assets/presets`` the model is instantiated on PyTorch's meta device
(``AutoConfig.for_model`` + ``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``: shapes
only, no memory, Llama-2-70B included takes milliseconds) and compared with ``build_model_spec``:

* the parameter count (unique parameters: a tied lm_head is the embedding, counted once);
* the exact set of ``(name, shape)`` of the stored tensors;
* the sliding window of every layer, as transformers' own ``DynamicCache(config=...)`` lays out its layers.

No network, no Hub: the configs are the repository's copies.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine.architectures import build_model_spec  # noqa: E402

PRESETS = Path(__file__).resolve().parent.parent / "assets" / "presets"
INDEX = json.loads((PRESETS / "index.json").read_text())


def _config(entry: dict) -> dict:
    return json.loads((PRESETS / entry["file"]).read_text())


def _hf_config(cfg: dict):
    rest = {k: v for k, v in cfg.items() if k != "model_type"}
    return transformers.AutoConfig.for_model(cfg["model_type"], **rest)


def _meta_model(cfg: dict):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(_hf_config(cfg))


def _spec_tensors(spec) -> Counter:
    """(name, shape) of the spec's tensors, as the model stores them.

    Mixtral is the one deliberate difference: transformers 5 fuses gate and up of all experts into one
    3-D Parameter ``mlp.experts.gate_up_proj`` of shape [E, 2I, H], while the spec lists it twice as two
    [E, I, H] halves (GGUF stores ffn_gate_exps and ffn_up_exps separately). Merge those pairs back.
    """
    out: Counter = Counter()
    halves: dict[str, list[tuple[int, ...]]] = {}
    for t in spec.tensors:
        if t.name.endswith("mlp.experts.gate_up_proj"):
            halves.setdefault(t.name, []).append(t.shape)
        else:
            out[(t.name, t.shape)] += 1
    for name, shapes in halves.items():
        assert len(shapes) == 2 and shapes[0] == shapes[1], (name, shapes)
        e, i, h = shapes[0]
        out[(name, (e, 2 * i, h))] += 1
    return out


def test_index_lists_every_preset_file():
    files = {p.name for p in PRESETS.glob("*.json")} - {"index.json"}
    assert {e["file"] for e in INDEX} == files
    assert len(INDEX) >= 15


@pytest.mark.parametrize("entry", INDEX, ids=[e["id"] for e in INDEX])
def test_spec_matches_meta_model(entry):
    cfg = _config(entry)
    spec = build_model_spec(cfg, entry["id"], "preset")
    model = _meta_model(cfg)

    # named_parameters() de-duplicates shared Parameters (a tied lm_head appears once, as the embedding).
    params = dict(model.named_parameters())
    unique = {id(p): p for p in model.parameters()}
    n_model = sum(p.numel() for p in unique.values())
    assert len(params) == len(unique)
    assert spec.params == n_model, f"{entry['id']}: spec {spec.params:,} vs transformers {n_model:,}"

    want = Counter((name, tuple(p.shape)) for name, p in params.items())
    got = _spec_tensors(spec)
    assert got == want, (f"{entry['id']}: only in spec {sorted(got - want)[:5]}, "
                         f"only in model {sorted(want - got)[:5]}")

    # Tying: the spec has an lm_head tensor exactly when the model's lm_head is a separate Parameter.
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert spec.tie_word_embeddings == tied
    assert ("lm_head.weight" in params) == (not tied)

    # `linear` marks exactly the weights of nn.Linear modules (what bitsandbytes / HQQ replace).
    modules = dict(model.named_modules())
    for t in spec.tensors:
        owner = modules[t.module]
        is_linear = type(owner) is torch.nn.Linear and t.name.endswith(".weight")
        assert t.linear == is_linear, t.name

    # Summary fields the KV cache and activations use.
    c = model.config
    assert spec.num_layers == c.num_hidden_layers
    assert spec.num_kv_heads == c.num_key_value_heads
    k_proj = modules["model.layers.0.self_attn.k_proj"] if "model.layers.0.self_attn.k_proj" in modules else None
    if k_proj is not None:
        assert k_proj.out_features == spec.num_kv_heads * spec.head_dim
    assert model.model.layers[0].self_attn.head_dim == spec.head_dim
    if spec.is_moe:
        assert spec.num_experts == c.num_local_experts
        assert spec.experts_per_token == c.num_experts_per_tok


@pytest.mark.parametrize("entry", INDEX, ids=[e["id"] for e in INDEX])
def test_sliding_windows_match_transformers_cache(entry):
    """Per-layer windows equal the layer types transformers' DynamicCache builds from the config."""
    cfg = _config(entry)
    spec = build_model_spec(cfg, entry["id"], "preset")
    cache = transformers.DynamicCache(config=_hf_config(cfg))
    assert len(cache.layers) == spec.num_layers
    windows = tuple(int(getattr(layer, "sliding_window", 0) or 0) for layer in cache.layers)
    assert spec.sliding_windows == windows
