"""Command line: ``python -m engine <verb>``. Verbs: estimate, generate, embedded-path, monitor, config."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .cliutil import whole_number
from .errors import QuantScopeError
from .units import fmt_bytes


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # exit 2 with one clear line, no usage dump
        # prog: "python -m engine" (unknown options land here too) or "python -m engine estimate"
        self.exit(2, f"error: {message}\nRun '{self.prog} --help' for the options.\n")


def _estimate(args) -> int:
    from .report import Selection, build, explain

    sel = Selection(model=args.model, method=args.method, group_size=args.group_size, double_quant=args.double_quant,
                    context=args.context, batch=args.batch, kv_dtype=args.kv_dtype, mode=args.mode,
                    hardware=args.hardware, lora_rank=args.lora_rank, optimizer=args.optimizer,
                    gradient_checkpointing=not args.no_gradient_checkpointing, overhead_mib=args.overhead_mib,
                    int8_outlier_pct=args.int8_outlier_pct)
    r = build(sel, compare=False)
    e = r.estimate
    if args.json:
        out = e.to_dict()
        out.update(model=r.model.name, method=r.quant.name, hardware=r.hardware.name, verdict=r.verdict.status,
                   max_context=r.verdict.max_context, gpus_needed=r.verdict.gpus_needed,
                   params_by_role=r.model.params_by_role())
        print(json.dumps(out, indent=2))
    else:
        print(explain(r).replace("**", ""))
        print()
        for k in ("weights_bytes", "kv_cache_bytes", "activations_bytes", "overhead_bytes", "gradients_bytes",
                  "optimizer_bytes"):
            if getattr(e, k):
                print(f"{k[:-6]:>12}: {fmt_bytes(getattr(e, k)):>12}")
        print(f"{'total':>12}: {fmt_bytes(e.total_bytes):>12}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    p = _Parser(prog="python -m engine", description="QuantScope engine")
    sub = p.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    e = sub.add_parser("estimate", help="memory needed by a model in a format")
    e.add_argument("model", nargs="?", default=None,
                   help="preset (e.g. meta-llama/Llama-3.1-8B-Instruct), 'embedded', local config.json/folder, "
                        "local .gguf file, Hub id, or a parameter count like 7B")
    e.add_argument("--method", default="bf16", help="fp32 fp16 bf16 int8 nf4 fp4 hqq1-8 gptq2/3/4/8 awq4, or a GGUF "
                                                    "type like q4_k_m")
    e.add_argument("--group-size", type=whole_number("--group-size"), default=None)
    e.add_argument("--double-quant", action="store_true", help="bitsandbytes 4-bit double quantization")
    e.add_argument("--context", type=whole_number("--context"), default=4096)
    e.add_argument("--batch", type=whole_number("--batch"), default=1)
    e.add_argument("--kv-dtype", default="auto", help="auto fp32 fp16 bf16 fp8 q8_0 q4_0")
    e.add_argument("--mode", default="inference", choices=["inference", "lora", "qlora", "full"])
    e.add_argument("--hardware", default="nvidia-t4", help="GPU preset id (see assets/gpus.json) or cpu")
    e.add_argument("--lora-rank", type=whole_number("--lora-rank"), default=16)
    e.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "sgd"])
    e.add_argument("--no-gradient-checkpointing", action="store_true")
    e.add_argument("--overhead-mib", type=float, default=None, help="fixed runtime overhead (default per device)")
    e.add_argument("--int8-outlier-pct", type=float, default=100,
                   help="LLM.int8: %% of a layer's input columns holding a value >= 6.0 (default 100, the bound)")
    e.add_argument("--json", action="store_true", help="print one JSON object (integer bytes)")
    e.set_defaults(func=_estimate)
    from . import cli_generate  # generate, embedded-path
    cli_generate.add_parser(sub)
    from . import cli_monitor  # monitor
    cli_monitor.add_parser(sub)
    from . import cli_config  # config
    cli_config.add_parser(sub)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except QuantScopeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
