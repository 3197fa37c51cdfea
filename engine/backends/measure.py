"""Measure the bytes a loaded PyTorch model holds for its weights, from the objects themselves.

Counted: every parameter, every *persistent* buffer, and the quantization state libraries keep beside the
packed weights:

* bitsandbytes 4-bit: ``Params4bit.quant_state`` (absmax, code, and with double quant the nested state);
* bitsandbytes LLM.int8: ``Int8Params.SCB`` (fp32 row scales); ``CB`` shares the weight's storage;
* HQQ: ``HQQLinear.W_q`` and every tensor of ``HQQLinear.meta`` (scale, zero, nested meta);
* any other tensor attribute of a module from a quantization library (bitsandbytes, hqq, torchao,
  gemlite, bitblas), so that layers patched for a faster kernel are still counted.

Left out: non-persistent buffers (rotary ``inv_freq`` and the like), which are recomputed from the config
and are not weights. Tensors are de-duplicated by storage pointer and counted by storage size, so tied
embeddings and views are counted once. This is the same definition ``tests/test_memory_real.py`` pins the
calculator against, so measured and predicted weights are directly comparable.
"""
from __future__ import annotations

QUANT_LIBS = ("bitsandbytes", "hqq", "torchao", "gemlite", "bitblas")


def _state_tensors(obj, seen: set):
    import torch

    if obj is None:
        return
    if torch.is_tensor(obj):
        yield obj
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _state_tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _state_tensors(v, seen)
    elif type(obj).__module__.split(".")[0] in QUANT_LIBS:
        for v in vars(obj).values():
            yield from _state_tensors(v, seen)


def held_tensors(model) -> list:
    """Every tensor the model holds as weights (see the module docstring)."""
    out: list = []
    seen: set = set()
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            out.append(p)
            for attr in ("CB", "SCB", "quant_state"):  # bnb Int8Params / Params4bit
                out.extend(_state_tensors(getattr(p, attr, None), seen))
        non_persistent = getattr(mod, "_non_persistent_buffers_set", set())
        for name, b in mod.named_buffers(recurse=False):
            if name not in non_persistent:
                out.append(b)
        own = vars(mod)
        for attr in ("quant_state", "state", "meta", "W_q", "bias"):
            if attr in own:
                out.extend(_state_tensors(own[attr], seen))
        if type(mod).__module__.split(".")[0] in QUANT_LIBS:
            for k, v in own.items():
                if k.startswith("_") or k in ("quant_state", "state", "meta", "W_q", "bias"):
                    continue
                out.extend(_state_tensors(v, seen))
    return out


def weight_bytes(model) -> int:
    """Bytes of distinct storages behind :func:`held_tensors` (any device)."""
    storages: dict[tuple[str, int], int] = {}
    for t in held_tensors(model):
        if t.is_meta:
            continue
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        storages[key] = max(storages.get(key, 0), st.nbytes())
    return sum(storages.values())
