"""Config builder: a quantization choice -> a Python snippet that runs today, its config as JSON, the pip line,
and the calculator's estimate of exactly that configuration.

The snippets use the working forms of the pinned library versions, not the 2024-25 ones of the reference
texts: a ``BitsAndBytesConfig`` object (``load_in_8bit=True`` straight to ``from_pretrained`` is gone in
transformers 5), hqq's own ``AutoHQQHFModel.quantize_model`` (transformers' ``HqqConfig`` no longer quantizes on
load), ``dtype=`` (not ``torch_dtype=``), and for AWQ ``format=`` where older code said ``version=``.
Invalid combinations raise :class:`~engine.errors.InputError` with the reason instead of emitting code.

Pure string work: no torch import. tests/test_codegen.py executes every snippet that can run on a CPU.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

from .errors import InputError
from .memory import LLM_INT8_THRESHOLD

METHODS = ("bf16", "fp16", "bnb4", "bnb8", "gptq", "awq", "hqq", "gguf", "qlora", "lora")
LABELS = {"bf16": "16-bit (bf16, no quantization)", "fp16": "16-bit (fp16, no quantization)",
          "bnb4": "bitsandbytes 4-bit (NF4 / FP4)", "bnb8": "bitsandbytes 8-bit (LLM.int8)",
          "gptq": "GPTQ (calibrated, GPU)", "awq": "AWQ (activation-aware, GPU)", "hqq": "HQQ (calibration-free)",
          "gguf": "GGUF (llama.cpp)", "qlora": "QLoRA fine-tuning (4-bit base + LoRA)",
          "lora": "LoRA fine-tuning on the 16-bit model"}
DTYPES = ("bfloat16", "float16", "float32")
STORAGE = ("uint8", "bfloat16", "float16", "float32")
GGUF_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "Q4_1", "Q3_K_L", "Q3_K_M", "Q3_K_S",
              "Q2_K", "IQ4_XS", "IQ3_M", "IQ2_XS", "F16", "BF16")
AWQ_FORMATS = ("gemm", "gemv")
PROMPT = "What is the capital of France?"


@dataclass(frozen=True)
class ConfigChoice:
    """Everything the builder's forms set (one flat record; each method reads its own fields)."""

    method: str = "bnb4"
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    device: str = "auto"  # auto | cuda | cpu
    # bitsandbytes 4-bit (and QLoRA's base)
    quant_type: str = "nf4"
    compute_dtype: str = "bfloat16"
    double_quant: bool = True
    quant_storage: str = "uint8"
    skip_modules: tuple = ()
    # bitsandbytes 8-bit
    threshold: float = LLM_INT8_THRESHOLD
    cpu_offload: bool = False
    # GPTQ / AWQ / HQQ
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    damp: float = 0.1
    dataset: str = "c4"
    zero_point: bool = True
    awq_format: str = "gemm"
    axis: int = 1
    # GGUF
    gguf_type: str = "Q4_K_M"
    gguf_file: Optional[str] = None  # a local .gguf; else the Hub repo `model` is searched for the type
    n_gpu_layers: int = -1
    n_ctx: int = 4096
    # QLoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple = ("q_proj", "k_proj", "v_proj", "o_proj")
    max_new_tokens: int = 32


@dataclass
class BuiltConfig:
    choice: ConfigChoice
    python: str
    config_json: Optional[dict]
    pip: str
    engine_method: Optional[str]  # the engine's method name to open this in the side-by-side tab
    calculator_method: str  # what engine.report / the calculator calls this format
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["choice"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.choice).items()}
        return d


# ---------------------------------------------------------------------------------------------
# Validation: explain, do not emit
# ---------------------------------------------------------------------------------------------
def validate(c: ConfigChoice) -> ConfigChoice:
    if c.method not in METHODS:
        raise InputError(f"Unknown method {c.method!r}. Choose one of: {', '.join(METHODS)}.")
    if c.device not in ("auto", "cuda", "cpu"):
        raise InputError(f"Device must be auto, cuda or cpu, got {c.device!r}.")
    if not isinstance(c.model, str) or not c.model.strip():
        raise InputError("Give a model: a Hub id like meta-llama/Llama-3.1-8B-Instruct or a local folder.")
    if c.double_quant and c.method == "bnb8":
        raise InputError("Double quantization applies to bitsandbytes 4-bit only (it quantizes the 4-bit absmax "
                         "constants); LLM.int8 has no such constants. Turn it off or choose 4-bit.")
    if c.method in ("bnb4", "qlora"):
        if c.quant_type not in ("nf4", "fp4"):
            raise InputError(f"bitsandbytes 4-bit quant type is nf4 or fp4, got {c.quant_type!r}.")
        if c.compute_dtype not in DTYPES:
            raise InputError(f"Compute dtype must be one of {', '.join(DTYPES)}, got {c.compute_dtype!r}.")
        if c.quant_storage not in STORAGE:
            raise InputError(f"Storage dtype must be one of {', '.join(STORAGE)}, got {c.quant_storage!r}.")
        if c.device == "cpu" and c.compute_dtype == "float16":
            raise InputError("fp16 compute on a CPU: bitsandbytes' CPU kernels compute in bfloat16 or float32, and "
                             "fp16 matmuls are slow or unsupported there. Use bfloat16 (or float32).")
    if c.method == "bnb8" and not (0 < float(c.threshold) <= 100):
        raise InputError(f"The LLM.int8 outlier threshold must be above 0 (6.0 is the paper's), got {c.threshold}.")
    if c.method == "bnb8" and c.cpu_offload and c.device == "cpu":
        raise InputError("CPU offload moves layers that do not fit on the GPU to the CPU in fp32; on a CPU-only "
                         "machine there is nothing to offload from. Turn it off or choose cuda.")
    if c.method == "gptq":
        if c.bits not in (2, 3, 4, 8):
            raise InputError(f"GPTQ bits are 2, 3, 4 or 8, got {c.bits}.")
        if c.group_size != -1 and (c.group_size <= 0 or c.group_size & (c.group_size - 1)):
            raise InputError(f"GPTQ group size is a power of two (e.g. 32, 64, 128) or -1 (one group per column), "
                             f"got {c.group_size}.")
        if not 0 < float(c.damp) < 1:
            raise InputError(f"GPTQ dampening is a fraction between 0 and 1 (0.1 is usual), got {c.damp}.")
        if c.device == "cpu":
            raise InputError("GPTQ quantization runs on a CUDA GPU (gptqmodel); it cannot quantize on a CPU. "
                             "Use HQQ or bitsandbytes here, or a pre-quantized GPTQ checkpoint on a GPU.")
    if c.method == "awq":
        if c.bits != 4:
            raise InputError(f"AWQ kernels are 4-bit, got {c.bits}.")
        if c.group_size not in (32, 64, 128):
            raise InputError(f"AWQ group size is 32, 64 or 128, got {c.group_size}.")
        if c.awq_format not in AWQ_FORMATS:
            raise InputError(f"AWQ format is gemm or gemv, got {c.awq_format!r}.")
        if c.device == "cpu":
            raise InputError("AWQ quantization needs a CUDA GPU (AutoAWQ / llm-compressor); use HQQ or "
                             "bitsandbytes on a CPU.")
    if c.method == "hqq":
        if not 1 <= c.bits <= 8:
            raise InputError(f"HQQ bits are 1 to 8, got {c.bits}.")
        if c.group_size <= 0:
            raise InputError(f"HQQ group size must be positive (64 is usual), got {c.group_size}.")
        if c.axis not in (0, 1):
            raise InputError(f"HQQ axis is 0 or 1 (1 is what the fast kernels need), got {c.axis}.")
    if c.method == "gguf":
        if c.gguf_type.upper() not in GGUF_TYPES:
            raise InputError(f"Unknown GGUF type {c.gguf_type!r}. Choose one of: {', '.join(GGUF_TYPES)}.")
        if c.n_ctx < 1:
            raise InputError(f"n_ctx must be at least 1, got {c.n_ctx}.")
    if c.method in ("qlora", "lora"):
        if c.lora_r < 1 or c.lora_alpha < 1:
            raise InputError(f"LoRA r and alpha must be positive, got r={c.lora_r}, alpha={c.lora_alpha}.")
        if not 0 <= float(c.lora_dropout) < 1:
            raise InputError(f"LoRA dropout is between 0 and 1, got {c.lora_dropout}.")
        if not c.target_modules:
            raise InputError("Name at least one target module for LoRA (e.g. q_proj, v_proj).")
    if not 1 <= c.max_new_tokens <= 4096:
        raise InputError(f"max_new_tokens must be 1 to 4096, got {c.max_new_tokens}.")
    return c


# ---------------------------------------------------------------------------------------------
# Code
# ---------------------------------------------------------------------------------------------
def _device_map(c: ConfigChoice) -> str:
    return {"auto": '"auto"', "cuda": '{"": "cuda"}', "cpu": '{"": "cpu"}'}[c.device]


def _hf_head(c: ConfigChoice, extra_imports: str = "", more: tuple = ()) -> list:
    lines = ["import torch", "from transformers import AutoModelForCausalLM, AutoTokenizer" + extra_imports, *more,
             "", f"MODEL = {json.dumps(c.model)}", "tokenizer = AutoTokenizer.from_pretrained(MODEL)"]
    return lines


def _hf_generate(c: ConfigChoice) -> list:
    return ["", f"messages = [{{\"role\": \"user\", \"content\": {json.dumps(PROMPT)}}}]",
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
            "                                       return_dict=True).to(model.device)",
            "with torch.inference_mode():",
            f"    out = model.generate(**inputs, max_new_tokens={c.max_new_tokens}, do_sample=False)",
            "print(tokenizer.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))"]


def _bnb4_config(c: ConfigChoice, name: str = "quant_config") -> tuple:
    args = ["load_in_4bit=True", f"bnb_4bit_quant_type={c.quant_type!r}",
            f"bnb_4bit_compute_dtype=torch.{c.compute_dtype}", f"bnb_4bit_use_double_quant={c.double_quant}",
            f"bnb_4bit_quant_storage=torch.{c.quant_storage}"]
    js = {"load_in_4bit": True, "bnb_4bit_quant_type": c.quant_type, "bnb_4bit_compute_dtype": c.compute_dtype,
          "bnb_4bit_use_double_quant": c.double_quant, "bnb_4bit_quant_storage": c.quant_storage}
    if c.skip_modules:
        args.append(f"llm_int8_skip_modules={list(c.skip_modules)!r}")  # the name covers 4-bit too
        js["llm_int8_skip_modules"] = list(c.skip_modules)
    return [f"{name} = BitsAndBytesConfig(", *[f"    {a}," for a in args], ")"], {"quant_method": "bitsandbytes", **js}


def _code(c: ConfigChoice) -> tuple:
    """(python lines, quantization_config JSON or None, pip packages, notes)."""
    m = c.method
    notes: list = []
    if m in ("bf16", "fp16"):
        dt = "bfloat16" if m == "bf16" else "float16"
        lines = _hf_head(c) + [f"model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.{dt}, "
                               f"device_map={_device_map(c)})"] + _hf_generate(c)
        if m == "fp16" and c.device == "cpu":
            notes.append("fp16 on a CPU works but is slow; bf16 is the CPU-friendly 16-bit type.")
        return lines, None, ["torch", "transformers", "accelerate"], notes
    if m == "bnb4":
        cfg, js = _bnb4_config(c)
        lines = _hf_head(c, ", BitsAndBytesConfig") + [""] + cfg + [
            "model = AutoModelForCausalLM.from_pretrained(",
            f"    MODEL, quantization_config=quant_config, dtype=torch.{c.compute_dtype}, device_map={_device_map(c)})",
            "print(f\"weights: {model.get_memory_footprint() / 2**30:.2f} GiB\")"] + _hf_generate(c)
        return lines, js, ["torch", "transformers", "accelerate", "bitsandbytes"], notes
    if m == "bnb8":
        args = ["load_in_8bit=True", f"llm_int8_threshold={float(c.threshold)}"]
        js = {"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": float(c.threshold)}
        if c.skip_modules:
            args.append(f"llm_int8_skip_modules={list(c.skip_modules)!r}")
            js["llm_int8_skip_modules"] = list(c.skip_modules)
        if c.cpu_offload:
            args.append("llm_int8_enable_fp32_cpu_offload=True")
            js["llm_int8_enable_fp32_cpu_offload"] = True
            notes.append("CPU offload: layers that do not fit on the GPU stay on the CPU in fp32 (slow); give "
                         "from_pretrained a max_memory or a device_map that names them.")
        lines = _hf_head(c, ", BitsAndBytesConfig") + ["", "quant_config = BitsAndBytesConfig(",
                                                       *[f"    {a}," for a in args], ")",
                                                       "model = AutoModelForCausalLM.from_pretrained(",
                                                       f"    MODEL, quantization_config=quant_config, "
                                                       f"device_map={_device_map(c)})",
                                                       "print(f\"weights: {model.get_memory_footprint() / 2**30:.2f} GiB\")"
                                                       ] + _hf_generate(c)
        notes.append("transformers 5 no longer takes load_in_8bit=True directly in from_pretrained; it goes "
                     "in a BitsAndBytesConfig, as here.")
        return lines, js, ["torch", "transformers", "accelerate", "bitsandbytes"], notes
    if m == "gptq":
        js = {"quant_method": "gptq", "bits": c.bits, "group_size": c.group_size, "desc_act": c.desc_act,
              "sym": c.sym, "damp_percent": float(c.damp), "dataset": c.dataset}
        lines = _hf_head(c, ", GPTQConfig") + [
            "", "# Quantizes while loading: runs the calibration set through the model on a CUDA GPU (gptqmodel).",
            "quant_config = GPTQConfig(",
            f"    bits={c.bits}, group_size={c.group_size}, desc_act={c.desc_act}, sym={c.sym},",
            f"    damp_percent={float(c.damp)}, dataset={c.dataset!r}, tokenizer=tokenizer,", ")",
            "if __name__ == \"__main__\":",
            "    model = AutoModelForCausalLM.from_pretrained(MODEL, quantization_config=quant_config, "
            "device_map=\"auto\")",
            f"    model.save_pretrained(MODEL.split(\"/\")[-1] + \"-GPTQ-{c.bits}bit\")"]
        notes.append("Needs gptqmodel and optimum and a CUDA GPU to quantize (not installed in this app); a "
                     "pre-quantized GPTQ checkpoint loads with a plain from_pretrained.")
        return lines, js, ["torch", "transformers", "accelerate", "optimum", "gptqmodel"], notes
    if m == "awq":
        js = {"quant_method": "awq", "bits": c.bits, "group_size": c.group_size, "zero_point": c.zero_point,
              "format": c.awq_format}
        lines = _hf_head(c, ", AwqConfig") + [
            "", "# transformers loads AWQ checkpoints; quantizing one is done with AutoAWQ / llm-compressor on a GPU.",
            "# `format` is what older code called `version` (gemm: batches, gemv: batch 1).",
            f"quant_config = AwqConfig(bits={c.bits}, group_size={c.group_size}, zero_point={c.zero_point}, "
            f"format={c.awq_format!r})",
            "if __name__ == \"__main__\":",
            "    model = AutoModelForCausalLM.from_pretrained(MODEL, quantization_config=quant_config, "
            "device_map=\"auto\")"]
        notes.append("Needs a pre-quantized AWQ checkpoint (or AutoAWQ to make one) and a CUDA GPU; not "
                     "runnable in this app.")
        return lines, js, ["torch", "transformers", "accelerate", "autoawq"], notes
    if m == "hqq":
        dev = {"auto": '"cuda" if torch.cuda.is_available() else "cpu"', "cuda": '"cuda"', "cpu": '"cpu"'}[c.device]
        js = {"quant_method": "hqq", "nbits": c.bits, "group_size": c.group_size, "axis": c.axis}
        lines = _hf_head(c, more=("from hqq.core.quantize import BaseQuantizeConfig",
                                  "from hqq.models.hf.base import AutoHQQHFModel")) + [
            f"DEVICE = {dev}",
            "model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16)",
            "# transformers' HqqConfig no longer quantizes on load: quantize with hqq's own API (no calibration data).",
            f"quant_config = BaseQuantizeConfig(nbits={c.bits}, group_size={c.group_size}, axis={c.axis})",
            "AutoHQQHFModel.quantize_model(model, quant_config=quant_config, compute_dtype=torch.bfloat16, "
            "device=DEVICE)",
            "if DEVICE == \"cuda\":  # optional: a fused kernel (needs the torchao or gemlite package)",
            "    try:",
            "        from hqq.utils.patching import prepare_for_inference",
            "        prepare_for_inference(model, backend=\"torchao_int4\")",
            "    except Exception as e:",
            "        print(\"staying on HQQ's PyTorch path:\", e)"] + _hf_generate(c)
        if c.axis == 0:
            notes.append("axis=0 quantizes along the other dimension; the fast int4 kernels need axis=1.")
        return lines, js, ["torch", "transformers", "accelerate", "hqq"], notes
    if m == "gguf":
        t = c.gguf_type.upper()
        layers = 0 if c.device == "cpu" else c.n_gpu_layers
        if c.gguf_file:
            load = [f"llm = Llama(model_path={json.dumps(c.gguf_file)}, n_gpu_layers={layers}, n_ctx={c.n_ctx}, verbose=False)"]
        else:
            load = ["# a Hub repo that holds GGUF files (e.g. bartowski/...-GGUF); the file name pattern picks the type",
                    f"llm = Llama.from_pretrained(repo_id={json.dumps(c.model)}, filename=\"*{t}.gguf\", n_gpu_layers={layers},",
                    f"                            n_ctx={c.n_ctx}, verbose=False)"]
        lines = ["from llama_cpp import Llama", ""] + load + [
            f"out = llm.create_chat_completion(messages=[{{\"role\": \"user\", \"content\": {json.dumps(PROMPT)}}}],",
            f"                                 max_tokens={c.max_new_tokens}, temperature=0.0)",
            "print(out[\"choices\"][0][\"message\"][\"content\"])",
            "",
            f"# To make a {t} file yourself with llama.cpp's tools:",
            "#   python convert_hf_to_gguf.py MODEL_DIR --outtype f16 --outfile model-f16.gguf",
            f"#   llama-quantize model-f16.gguf model-{t}.gguf {t}"]
        notes.append("n_gpu_layers=-1 puts every layer on the GPU when llama-cpp-python was built with CUDA "
                     "(CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install llama-cpp-python); a CPU build ignores it.")
        js = {"gguf_type": t, "n_gpu_layers": layers, "n_ctx": c.n_ctx}
        return lines, js, ["llama-cpp-python"] + ([] if c.gguf_file else ["huggingface_hub"]), notes
    if m == "lora":
        lines = _hf_head(c, more=("from peft import LoraConfig, get_peft_model",)) + [
            "model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.bfloat16, "
            f"device_map={_device_map(c)})",
            "model.gradient_checkpointing_enable()",
            "model.enable_input_require_grads()"] + _lora_tail(c)
        js = {"lora": _lora_json(c)}
        return lines, js, ["torch", "transformers", "accelerate", "peft"], notes
    # qlora
    cfg, js = _bnb4_config(c, "bnb_config")
    lines = _hf_head(c, ", BitsAndBytesConfig",
                     ("from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training",)) + [""] + cfg + [
        "model = AutoModelForCausalLM.from_pretrained(",
        f"    MODEL, quantization_config=bnb_config, dtype=torch.{c.compute_dtype}, device_map={_device_map(c)})",
        "model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)"] + _lora_tail(c)
    js = {"quantization_config": js, "lora": _lora_json(c)}
    return lines, js, ["torch", "transformers", "accelerate", "bitsandbytes", "peft"], notes


def _lora_json(c: ConfigChoice) -> dict:
    return {"r": c.lora_r, "lora_alpha": c.lora_alpha, "lora_dropout": float(c.lora_dropout),
            "target_modules": list(c.target_modules), "task_type": "CAUSAL_LM"}


def _lora_tail(c: ConfigChoice) -> list:
    return [
        "lora_config = LoraConfig(",
        f"    r={c.lora_r}, lora_alpha={c.lora_alpha}, lora_dropout={float(c.lora_dropout)},",
        f"    target_modules={list(c.target_modules)!r}, task_type=\"CAUSAL_LM\",", ")",
        "model = get_peft_model(model, lora_config)",
        "model.print_trainable_parameters()",
        "",
        "# one training step, to see that gradients reach the LoRA weights only",
        "batch = tokenizer([\"Quantization keeps the base model small; LoRA learns the update.\"], return_tensors=\"pt\")",
        "batch = {k: v.to(model.device) for k, v in batch.items()}",
        "loss = model(**batch, labels=batch[\"input_ids\"]).loss",
        "loss.backward()",
        "trained = [n for n, p in model.named_parameters() if p.grad is not None]",
        "print(f\"loss {loss.item():.3f}; {len(trained)} tensors got gradients, all LoRA: \"",
        "      f\"{all('lora_' in n for n in trained)}\")"]


def calculator_method(c: ConfigChoice) -> str:
    m = c.method
    if m in ("bf16", "fp16"):
        return m
    if m == "lora":
        return "bf16"
    if m in ("bnb4", "qlora"):
        return c.quant_type
    if m == "bnb8":
        return "int8"
    if m == "gptq":
        return f"gptq{c.bits}"
    if m == "awq":
        return "awq4"
    if m == "hqq":
        return f"hqq{c.bits}"
    return c.gguf_type.lower()


def engine_method(c: ConfigChoice) -> Optional[str]:
    """The side-by-side pane format that runs this configuration, when the engine has one."""
    m = c.method
    if m in ("bf16", "fp16"):
        return m
    if m == "lora":
        return "bf16"
    if m == "bnb4":
        return c.quant_type + (" + double quant" if c.double_quant else "")
    if m == "bnb8":
        return "int8"
    if m == "hqq" and c.bits in (8, 4, 3, 2):
        return f"hqq{c.bits}"
    return None


def build(choice: ConfigChoice) -> BuiltConfig:
    c = validate(choice)
    lines, js, pkgs, notes = _code(c)
    return BuiltConfig(choice=c, python="\n".join(lines) + "\n", config_json=js,
                       pip="pip install " + " ".join(pkgs), engine_method=engine_method(c),
                       calculator_method=calculator_method(c), notes=notes)


def as_json(built: BuiltConfig) -> str:
    return json.dumps(built.config_json, indent=2)


def with_model(choice: ConfigChoice, model: str, **kw) -> ConfigChoice:
    return replace(choice, model=model, **kw)
