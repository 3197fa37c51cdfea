"""Model loaders behind one interface (:class:`~engine.backends.base.Backend`).

==============  ==========================  ================================================
backend         methods (``QuantSpec``)     library
==============  ==========================  ================================================
transformers    fp32 fp16 bf16              transformers + torch
bitsandbytes    int8, bnb4 (nf4 / fp4)      transformers ``BitsAndBytesConfig``
hqq             hqq (1-8 bit, group size)   hqq ``AutoHQQHFModel.quantize_model``
llama.cpp       gguf (the file as shipped)  llama-cpp-python
==============  ==========================  ================================================

GPTQ / AWQ need pre-quantized checkpoints and have no loader yet: the calculator models them, the runner
says so. Nothing heavy is imported until a backend is asked whether it is available or to load.
"""
from __future__ import annotations

import dataclasses

from ..errors import BackendUnavailableError, FastPathError, InputError
from ..formats import parse_method
from ..specs import QuantSpec
from .base import Backend, GenerationSettings, LoadedModel, TokenEvent, TokenStream, default_device, locate

__all__ = ["Backend", "GenerationSettings", "LoadedModel", "TokenEvent", "TokenStream", "availability",
           "backend_for", "backend_of", "default_device", "load", "locate", "parse_load_method"]


def _classes() -> list[type[Backend]]:
    from .hqq_backend import HQQBackend
    from .llamacpp_backend import LlamaCppBackend
    from .transformers_backend import BitsAndBytesBackend, TransformersBackend

    return [TransformersBackend, BitsAndBytesBackend, HQQBackend, LlamaCppBackend]


def availability() -> dict[str, tuple[bool, str]]:
    """``{backend name: (available, reason if not)}`` for the UI to enable or explain each format."""
    return {cls.name: cls.available() for cls in _classes()}


FAST_METHODS = ("bf16", "fp16", "hqq4")
FAST_SUFFIXES = ("-fast", "+fast", " fast")


def parse_load_method(name: str, group_size: int | None = None, double_quant: bool = False,
                      dtype: str = "bf16") -> QuantSpec:
    """:func:`engine.formats.parse_method` plus ``gguf`` alone (the GGUF file as shipped, type read at load) and
    the fast decode path: ``bf16-fast``, ``fp16-fast``, ``hqq4-fast`` (also written ``hqq4 fast``)."""
    if isinstance(name, str) and name.strip().lower() == "gguf":
        return QuantSpec(method="gguf", dtype="fp16", label="gguf")
    if isinstance(name, str):
        key = name.strip().lower()
        for suffix in FAST_SUFFIXES:
            if key.endswith(suffix):
                base = key[: -len(suffix)].strip()
                if base not in FAST_METHODS:
                    raise FastPathError(f"The fast decode path is for {', '.join(FAST_METHODS)}; not for '{base}'. "
                                     f"Drop '{suffix.strip()}' to run {base} on the plain path.")
                q = parse_method(base, group_size=group_size, double_quant=double_quant, dtype=dtype)
                if q.method == "hqq" and q.dtype != "bf16":
                    raise FastPathError("hqq4-fast runs on PyTorch's int4 kernel, which computes in bf16; "
                                     "use compute dtype bf16 (or plain hqq4 for fp16).")
                return dataclasses.replace(q, fast=True, label=f"{q.label} fast")
    return parse_method(name, group_size=group_size, double_quant=double_quant, dtype=dtype)


def backend_for(quant: QuantSpec) -> Backend:
    """An instance of the backend that loads ``quant``; raises with the reason when it cannot run here."""
    if quant.method in ("gptq", "awq"):
        raise BackendUnavailableError(f"{quant.name} needs a pre-quantized {quant.method.upper()} checkpoint; "
                                      "loading those is not supported yet (the calculator still estimates them).")
    for cls in _classes():
        if cls.serves(quant):
            ok, why = cls.available()
            if not ok:
                raise BackendUnavailableError(f"{quant.name} needs {cls.label}, which cannot run here: {why}.")
            return cls()
    raise InputError(f"No backend loads method {quant.name}.")


def load(ref: str, method: str | QuantSpec, device: str | None = None) -> LoadedModel:
    """Load ``ref`` in ``method`` (a name such as ``nf4`` / ``hqq4`` / ``gguf``, or a QuantSpec)."""
    quant = method if isinstance(method, QuantSpec) else parse_load_method(method)
    return backend_for(quant).load(ref, quant, device)


def backend_of(loaded: LoadedModel) -> Backend:
    """The backend instance that serves a loaded model (for stream / unload / runtime_spec)."""
    for cls in _classes():
        if cls.name == loaded.backend:
            return cls()
    raise InputError(f"Unknown backend {loaded.backend!r}.")
