"""Config builder (engine/codegen.py): every emitted snippet that can run on a CPU is executed in a fresh
Python process against the embedded model, offline; GPTQ/AWQ snippets construct their config objects; each
invalid combination is explained; the CLI prints the same snippet."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest

from engine.codegen import ConfigChoice, build
from engine.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def embedded_paths():
    from engine import embedded

    return str(embedded.hf_path()), str(embedded.gguf_path())


def run_snippet(code: str, tmp_path, timeout=600) -> str:
    f = tmp_path / "snippet.py"
    f.write_text(code)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
               HF_HUB_DISABLE_PROGRESS_BARS="1", TQDM_DISABLE="1")
    out = subprocess.run([sys.executable, str(f)], cwd=tmp_path, capture_output=True, text=True, timeout=timeout,
                         env=env)
    assert out.returncode == 0, f"snippet failed:\n{code}\n--- stderr ---\n{out.stderr[-3000:]}"
    return out.stdout


CPU_CASES = {
    "bf16": dict(method="bf16"),
    "bnb4-nf4-dq": dict(method="bnb4", quant_type="nf4", double_quant=True),
    "bnb4-nf4": dict(method="bnb4", quant_type="nf4", double_quant=False),
    "bnb4-fp4-dq": dict(method="bnb4", quant_type="fp4", double_quant=True),
    "bnb4-fp4-skip": dict(method="bnb4", quant_type="fp4", double_quant=False, skip_modules=("lm_head", "o_proj")),
    "bnb8": dict(method="bnb8", double_quant=False, threshold=6.0),
    "hqq4": dict(method="hqq", bits=4, group_size=64),
}


@pytest.mark.parametrize("case", list(CPU_CASES))
def test_snippet_runs_on_the_embedded_model(case, embedded_paths, tmp_path):
    hf, _ = embedded_paths
    b = build(ConfigChoice(model=hf, device="cpu", **CPU_CASES[case]))
    out = run_snippet(b.python, tmp_path)
    answer = out.strip().splitlines()[-1]
    assert answer.strip(), out
    if case == "bf16":
        assert "Paris" in answer, out
    if case.startswith("bnb"):
        assert "weights:" in out and "GiB" in out
    assert b.pip.startswith("pip install ") and ("bitsandbytes" in b.pip) == case.startswith("bnb")


def test_gguf_snippet_runs_with_the_shipped_file(embedded_paths, tmp_path):
    pytest.importorskip("llama_cpp")
    _, gguf = embedded_paths
    b = build(ConfigChoice(method="gguf", model="embedded", gguf_file=gguf, gguf_type="Q4_1", device="cpu",
                           n_ctx=1024))
    out = run_snippet(b.python, tmp_path)
    assert out.strip() and b.config_json == {"gguf_type": "Q4_1", "n_gpu_layers": 0, "n_ctx": 1024}
    assert b.pip == "pip install llama-cpp-python"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_lora_snippets_train_only_lora_weights(method, embedded_paths, tmp_path):
    hf, _ = embedded_paths
    b = build(ConfigChoice(method=method, model=hf, device="cpu", lora_r=8, lora_alpha=16))
    out = run_snippet(b.python, tmp_path)
    assert "trainable params" in out and "all LoRA: True" in out, out
    assert b.config_json["lora"]["r"] == 8
    if method == "qlora":
        assert b.config_json["quantization_config"]["bnb_4bit_use_double_quant"]
        assert "prepare_model_for_kbit_training" in b.python
    else:
        assert "BitsAndBytesConfig" not in b.python


@pytest.mark.parametrize("method,cls", [("gptq", "GPTQConfig"), ("awq", "AwqConfig")])
def test_gptq_awq_snippets_parse_and_build_their_config(method, cls, embedded_paths):
    import ast

    import transformers

    hf, _ = embedded_paths
    b = build(ConfigChoice(method=method, model=hf, device="cuda", group_size=64, bits=4))
    ast.parse(b.python)
    ns = {"__name__": "not_main"}  # the snippet quantizes under `if __name__ == "__main__"` only (GPU work)
    exec(compile(b.python, f"<{method} snippet>", "exec"), ns)
    qc = ns["quant_config"]
    assert isinstance(qc, getattr(transformers, cls)) and qc.bits == 4 and qc.group_size == 64
    for k, v in b.config_json.items():
        if k != "quant_method":
            assert qc.to_dict()[k] == v, (k, qc.to_dict()[k], v)


@pytest.mark.parametrize("kw,words", [
    (dict(method="bnb8", double_quant=True), "Double quantization applies to bitsandbytes 4-bit only"),
    (dict(method="bnb4", device="cpu", compute_dtype="float16"), "fp16 compute on a CPU"),
    (dict(method="gptq", bits=5, device="cuda"), "GPTQ bits are 2, 3, 4 or 8"),
    (dict(method="gptq", group_size=100, device="cuda"), "power of two"),
    (dict(method="gptq", device="cpu"), "cannot quantize on a CPU"),
    (dict(method="awq", bits=3, device="cuda"), "AWQ kernels are 4-bit"),
    (dict(method="hqq", bits=9), "HQQ bits are 1 to 8"),
    (dict(method="hqq", axis=2), "axis is 0 or 1"),
    (dict(method="gguf", gguf_type="Q9_Z"), "Unknown GGUF type"),
    (dict(method="bnb4", quant_type="int4"), "nf4 or fp4"),
    (dict(method="qlora", target_modules=()), "target module"),
    (dict(method="bnb8", double_quant=False, cpu_offload=True, device="cpu"), "nothing to offload"),
    (dict(method="nope"), "Unknown method"),
    (dict(method="bnb4", model="  "), "Give a model"),
])
def test_invalid_combinations_are_explained_not_emitted(kw, words):
    with pytest.raises(InputError, match=words):
        build(replace(ConfigChoice(), **kw))


def test_today_s_forms_not_the_reference_texts_old_ones():
    b8 = build(ConfigChoice(method="bnb8", double_quant=False))
    assert "BitsAndBytesConfig(" in b8.python and "from_pretrained(MODEL, load_in_8bit" not in b8.python
    hqq = build(ConfigChoice(method="hqq", group_size=64))
    assert "AutoHQQHFModel.quantize_model" in hqq.python and "HqqConfig(" not in hqq.python
    assert "torch_dtype" not in build(ConfigChoice(method="bf16")).python
    assert "format='gemm'" in build(ConfigChoice(method="awq", device="cuda")).python


def test_side_by_side_link_for_formats_the_engine_runs():
    assert build(ConfigChoice(method="bnb4", double_quant=True)).engine_method == "nf4 + double quant"
    assert build(ConfigChoice(method="bnb8", double_quant=False)).engine_method == "int8"
    assert build(ConfigChoice(method="hqq", bits=3, group_size=64)).engine_method == "hqq3"
    assert build(ConfigChoice(method="gptq", device="cuda")).engine_method is None


def test_cli_prints_the_same_snippet_and_json():
    b = build(ConfigChoice(method="hqq", bits=3, group_size=64, model="Qwen/Qwen2.5-0.5B-Instruct"))
    out = subprocess.run([sys.executable, "-m", "engine", "config", "--method", "hqq", "--bits", "3",
                          "--model", "Qwen/Qwen2.5-0.5B-Instruct"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b.python
    js = subprocess.run([sys.executable, "-m", "engine", "config", "--method", "hqq", "--bits", "3", "--format",
                         "json", "--model", "Qwen/Qwen2.5-0.5B-Instruct"], cwd=REPO, capture_output=True,
                        text=True, timeout=60)
    import json

    assert json.loads(js.stdout) == b.config_json
    bad = subprocess.run([sys.executable, "-m", "engine", "config", "--method", "bnb8", "--double-quant", "true"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Double quantization" in bad.stderr and "Traceback" not in bad.stderr
