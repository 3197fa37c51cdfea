"""Run a Python script with transformers' remote code switched off, whatever the script asks for.

    python bench/no_remote_code.py SCRIPT [ARGS...]

llama.cpp's converter (``convert_hf_to_gguf.py``, used by ``bench/gpu_llama_cpp.sh``) asks transformers to run a
model repository's own code when loading tokenizers and configs. QuantScope never runs a model's own code, so this
runs the script with ``transformers.dynamic_module_utils.resolve_trust_remote_code`` (the one place where every
auto class decides) answering "no" to every request: a checkpoint that needs its own code is refused with
transformers' own error, one that needs none (every checkpoint QuantScope converts) loads as usual. The script's
source is not modified.
"""
from __future__ import annotations

import os
import runpy
import sys

import transformers.dynamic_module_utils as dynamic

_resolve = dynamic.resolve_trust_remote_code


def never(trust_remote_code, *args, **kwargs):
    """transformers' answer when the caller did not opt in: False, or its error where the code is needed."""
    return _resolve(False, *args, **kwargs)


def install() -> None:
    """Switch remote code off in transformers and in every module that already bound the function by name (the
    auto classes import it; modules imported later bind the replacement)."""
    dynamic.resolve_trust_remote_code = never
    for module in list(sys.modules.values()):
        if getattr(module, "resolve_trust_remote_code", None) is _resolve:
            module.resolve_trust_remote_code = never


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python bench/no_remote_code.py SCRIPT [ARGS...]")
    install()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
