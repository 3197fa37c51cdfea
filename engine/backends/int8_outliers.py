"""LLM.int8's outlier columns, counted while a model runs.

bitsandbytes' LLM.int8 multiplies in int8 except the input columns holding a value at or above its threshold (6.0):
those are multiplied in 16-bit by a dequantized copy of their weight columns, and that copy is what sets the
memory peak of a short prompt (``engine.memory.activation_bytes``). How many columns cross the threshold is a
property of the model and the prompt, so the calculator asks for it (``RuntimeSpec.int8_outlier_share``) and a run
measures it here: bitsandbytes keeps a layer's last outlier column indices in ``state.idx``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional


@contextlib.contextmanager
def outlier_columns(model) -> Iterator[dict]:
    """While open, record every multi-token call of each LLM.int8 layer kind (``q_proj``, ``down_proj``, ...):
    ``{tokens: {kind: {"columns", "in", "out"}}}`` with the most outlier columns a call of that length had. Stays
    empty for a model without LLM.int8 layers (or without bitsandbytes). Calls of one token (decode steps) are not
    recorded -- a prompt's peak is its prefill's -- and the first one removes the hooks, so that decoding runs
    without them."""
    found: dict = {}
    try:
        from bitsandbytes.nn import Linear8bitLt
    except ImportError:
        yield found
        return
    kinds = {mod: name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, Linear8bitLt)}

    def after(mod, args, _out):
        x = args[0]
        tokens = x.numel() // x.shape[-1]
        if tokens < 2:
            remove()
            return
        idx = getattr(mod.state, "idx", None)
        n = 0 if idx is None else int(idx.numel())
        per = found.setdefault(tokens, {})
        kind = kinds[mod]
        if n >= per.get(kind, {}).get("columns", -1):
            per[kind] = {"columns": n, "in": mod.in_features, "out": mod.out_features}

    handles = [mod.register_forward_hook(after) for mod in kinds]

    def remove():
        while handles:
            handles.pop().remove()

    try:
        yield found
    finally:
        remove()


def worst(calls: dict) -> Optional[tuple[str, float]]:
    """(layer kind, share of its input columns with an outlier) for the kind whose decomposition dequantizes the
    most weight (out x columns): what ``RuntimeSpec.int8_outlier_share`` means. ``calls`` is one prompt length's
    entry of :func:`outlier_columns`; None if it is empty."""
    if not calls:
        return None
    kind, f = max(calls.items(), key=lambda kv: (kv[1]["out"] * kv[1]["columns"], kv[1]["in"]))
    return kind, f["columns"] / f["in"]
