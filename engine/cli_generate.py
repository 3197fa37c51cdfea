"""CLI verbs ``generate`` and ``embedded-path`` (registered by :mod:`engine.__main__` through :func:`add_parser`).

``python -m engine generate --model embedded --method nf4 --prompt "..." [--json]`` loads the model, streams
the answer to stdout (or prints one JSON object with the text and every metric), and exits 2 with one line
on a domain error. ``python -m engine embedded-path`` prints the embedded model's 16-bit folder.
"""
from __future__ import annotations

import json
import os
import sys

from .cliutil import whole_number

DEFAULT_PROMPT = "What is the capital of France?"


def _quiet_libraries() -> None:
    import logging

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "no CPU kernel from kernels-community", ...
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass


def _generate(args) -> int:
    from .backends import backend_of, load, parse_load_method
    from .backends.base import GenerationSettings, to_messages
    from .generation import RunMetrics, run
    from .units import fmt_bytes

    quant = parse_load_method(args.method, group_size=args.group_size, double_quant=args.double_quant)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed, system=args.system)
    to_messages(args.prompt, settings)  # reject a bad prompt before a slow load
    _quiet_libraries()
    loaded = load(args.model, quant, device=args.device)
    metrics = None
    try:
        for ev in run(loaded, args.prompt, settings):
            if isinstance(ev, RunMetrics):
                metrics = ev
            elif not args.json:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
    finally:
        backend_of(loaded).unload(loaded)
    d = metrics.to_dict()
    d.update(model=loaded.ref, hqq_backend=loaded.info.get("hqq_backend"))
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print("\n")
    tps = f"{metrics.tokens_per_s:.1f} tok/s" if metrics.tokens_per_s else "n/a"
    ttft = f"{metrics.ttft_s:.3f} s" if metrics.ttft_s is not None else "n/a"
    lines = [f"{metrics.backend} {metrics.method} on {metrics.device}: {metrics.tokens} tokens "
             f"({metrics.finish_reason}), load {metrics.load_s:.2f} s, TTFT {ttft}, decode {tps}",
             f"weights {fmt_bytes(metrics.weights_bytes, 'MiB', 1)} measured"
             + (f", {fmt_bytes(metrics.predicted_weights_bytes, 'MiB', 1)} predicted" if metrics.predicted_weights_bytes else ""),
             f"peak {fmt_bytes(metrics.peak_bytes, 'MiB', 1) if metrics.peak_bytes else 'n/a'} ({metrics.peak_kind})"
             + (f", {fmt_bytes(metrics.predicted_bytes, 'MiB', 1)} predicted" if metrics.predicted_bytes else "")]
    if metrics.int8_outliers is not None:
        kind, share = metrics.int8_outliers
        lines.append(f"LLM.int8 outlier columns in this prompt: {share:.0%} of {kind}'s inputs "
                     "(the prediction uses it)")
    print("\n".join(lines), file=sys.stderr)
    return 0


def _embedded_path(args) -> int:
    from . import embedded

    print(embedded.gguf_path() if args.gguf else embedded.hf_path())
    return 0


def add_parser(sub) -> None:
    """Register ``generate`` and ``embedded-path`` on the ``python -m engine`` subparsers."""
    g = sub.add_parser("generate", help="load a model in a format, stream an answer, print what was measured")
    g.add_argument("--model", default="embedded",
                   help="'embedded' (bundled SmolLM2-135M-Instruct), a local model folder, or a .gguf file")
    g.add_argument("--method", default="bf16",
                   help="fp32 fp16 bf16 int8 nf4 fp4 nf4-dq hqq1-8, or gguf (the GGUF file as shipped)")
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--system", default=None, help="optional system message")
    g.add_argument("--max-new-tokens", type=whole_number("--max-new-tokens"), default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=whole_number("--seed"), default=None)
    g.add_argument("--group-size", type=whole_number("--group-size"), default=None, help="HQQ group size (default 64)")
    g.add_argument("--double-quant", action="store_true", help="bitsandbytes 4-bit double quantization")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    g.add_argument("--json", action="store_true", help="print one JSON object (integer bytes, seconds)")
    g.set_defaults(func=_generate)
    e = sub.add_parser("embedded-path", help="print the embedded model's 16-bit folder (built on first use)")
    e.add_argument("--gguf", action="store_true", help="print the shipped .gguf file instead")
    e.set_defaults(func=_embedded_path)
