"""``python -m engine config --method M [options] --model REF [--format python|json|pip|all]``."""
from __future__ import annotations

import json

from .cliutil import whole_number


def _bool(v: str) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {v!r}")


def _int(v: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"expected a whole number, got {v!r}") from None


def add_parser(sub) -> None:
    from .codegen import METHODS, ConfigChoice

    d = ConfigChoice()
    c = sub.add_parser("config", help="emit a runnable quantization snippet / config JSON")
    c.add_argument("--method", required=True, choices=METHODS)
    c.add_argument("--model", default=d.model, help="Hub id or local folder (default %(default)s)")
    c.add_argument("--device", default=d.device, choices=("auto", "cuda", "cpu"))
    c.add_argument("--format", default="python", choices=("python", "json", "pip", "all"))
    g = c.add_argument_group("bitsandbytes / QLoRA")
    g.add_argument("--quant-type", default=d.quant_type)
    g.add_argument("--compute-dtype", default=d.compute_dtype)
    g.add_argument("--double-quant", type=_bool, default=None, help="true/false (default: true for 4-bit)")
    g.add_argument("--quant-storage", default=d.quant_storage)
    g.add_argument("--skip-modules", default="", help="comma-separated module names left unquantized")
    g.add_argument("--threshold", type=float, default=d.threshold)
    g.add_argument("--cpu-offload", type=_bool, default=d.cpu_offload)
    g = c.add_argument_group("GPTQ / AWQ / HQQ")
    g.add_argument("--bits", type=_int, default=None)
    g.add_argument("--group-size", type=_int, default=None)
    g.add_argument("--desc-act", type=_bool, default=d.desc_act)
    g.add_argument("--sym", type=_bool, default=d.sym)
    g.add_argument("--damp", type=float, default=d.damp)
    g.add_argument("--dataset", default=d.dataset)
    g.add_argument("--zero-point", type=_bool, default=d.zero_point)
    g.add_argument("--awq-format", default=d.awq_format)
    g.add_argument("--axis", type=_int, default=d.axis)
    g = c.add_argument_group("GGUF")
    g.add_argument("--gguf-type", default=d.gguf_type)
    g.add_argument("--gguf-file", default=None)
    g.add_argument("--n-gpu-layers", type=_int, default=d.n_gpu_layers)
    g.add_argument("--n-ctx", type=whole_number, default=d.n_ctx)
    g = c.add_argument_group("QLoRA")
    g.add_argument("--lora-r", type=_int, default=d.lora_r)
    g.add_argument("--lora-alpha", type=_int, default=d.lora_alpha)
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    g.add_argument("--target-modules", default=",".join(d.target_modules))
    g.add_argument("--max-new-tokens", type=_int, default=d.max_new_tokens)
    c.set_defaults(func=run)


def choice_from_args(a):
    from .codegen import ConfigChoice

    d = ConfigChoice()
    bits = a.bits if a.bits is not None else d.bits
    group = a.group_size if a.group_size is not None else (64 if a.method == "hqq" else d.group_size)
    dq = a.double_quant if a.double_quant is not None else a.method in ("bnb4", "qlora")
    return ConfigChoice(
        method=a.method, model=a.model, device=a.device, quant_type=a.quant_type, compute_dtype=a.compute_dtype,
        double_quant=dq, quant_storage=a.quant_storage,
        skip_modules=tuple(s.strip() for s in a.skip_modules.split(",") if s.strip()), threshold=a.threshold,
        cpu_offload=a.cpu_offload, bits=bits, group_size=group, desc_act=a.desc_act, sym=a.sym, damp=a.damp,
        dataset=a.dataset, zero_point=a.zero_point, awq_format=a.awq_format, axis=a.axis, gguf_type=a.gguf_type,
        gguf_file=a.gguf_file, n_gpu_layers=a.n_gpu_layers, n_ctx=a.n_ctx, lora_r=a.lora_r, lora_alpha=a.lora_alpha,
        lora_dropout=a.lora_dropout, target_modules=tuple(s.strip() for s in a.target_modules.split(",") if s.strip()),
        max_new_tokens=a.max_new_tokens)


def run(a) -> int:
    from .codegen import build

    b = build(choice_from_args(a))
    if a.format == "python":
        print(b.python, end="")
    elif a.format == "json":
        print(json.dumps(b.config_json, indent=2))
    elif a.format == "pip":
        print(b.pip)
    else:
        print(json.dumps(b.to_dict(), indent=2))
    return 0
