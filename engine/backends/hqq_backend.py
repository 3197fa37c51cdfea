"""HQQ backend: half-quadratic quantization of every decoder-block ``nn.Linear``, done at load time.

The model is loaded in its 16-bit compute dtype on the CPU, then ``AutoHQQHFModel.quantize_model`` replaces
the linear layers by ``HQQLinear`` (``BaseQuantizeConfig(nbits, group_size)``) on the target device.

Inference kernel ("hqq backend"): on CPU the default PyTorch path (dequantize, then matmul) is the only
one. On CUDA the faster options are tried in order -- ``prepare_for_inference(backend=...)`` with gemlite,
torchao int4 (4-bit, bf16 only) or bitblas, whichever is installed -- each verified with a two-token forward;
a candidate that is missing or fails is recorded with its reason in ``info["hqq_backend_notes"]`` and the
model is re-quantized before the next one (a failed patch can leave it half converted). The last resort is
``HQQBackend.PYTORCH``. ``HQQLinear.set_backend`` is class-wide in hqq: it affects every HQQ model in the
process.

The fast format (``hqq4-fast``) converts the 4-bit layers to int4 kernels instead (:mod:`engine.backends.int4`:
same codes, scales and zeros; on CUDA our own GEMV where it can be built and takes the layer, else PyTorch's
own int4 kernel, as on CPU; gemlite is not used there, it was not faster on an H200) and decodes on the fast
path (:mod:`engine.backends.runners`).
"""
from __future__ import annotations

import time

from ..errors import InputError
from .base import compact_tensors, release_memory, torch_dtype
from .transformers_backend import HFBackend, _import_error

CUDA_CANDIDATES = ("gemlite", "torchao_int4", "bitblas")


class HQQBackend(HFBackend):
    name = "hqq"
    label = "HQQ"
    methods = ("hqq",)

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, why = super().available()
        if not ok:
            return ok, why
        why = _import_error("hqq")
        return (False, why) if why else (True, "")

    def _quantize(self, path, quant, device):
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        dtype = torch_dtype(quant.dtype)
        model = self._from_pretrained(path, dtype=dtype, device_map={"": "cpu"})
        for name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if type(mod).__name__ == "Linear" and ".layers." in f".{name}." and w is not None \
                    and w.numel() % quant.group_size:
                raise InputError(f"HQQ group size {quant.group_size} does not divide the {w.numel():,} values of "
                                 f"{name}; pick a group size that divides it (e.g. 64).")
        t = time.perf_counter()
        AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=quant.bits,
                                                                             group_size=quant.group_size),
                                      compute_dtype=dtype, device=device)
        return model, time.perf_counter() - t

    def _smoke(self, model, device):
        import torch

        with torch.inference_mode():
            model(input_ids=torch.tensor([[1, 2]], device=device))

    def _patched(self, model, q_s, cand, path, quant, device, notes):
        """``prepare_for_inference(backend=cand)`` checked with a two-token forward: (model, seconds including the
        patch, True), or on failure the reason in ``notes`` and a freshly quantized model (a failed patch can leave
        it half converted): (model, its quantize seconds, False)."""
        from hqq.utils.patching import prepare_for_inference

        t = time.perf_counter()
        try:
            prepare_for_inference(model, backend=cand)
            self._smoke(model, device)
        except Exception as e:  # noqa: BLE001 - the caller falls back to the next kernel
            notes.append(f"{cand}: failed ({e.__class__.__name__}: {e})")
            del model
            model, q_s = self._quantize(path, quant, device)
            return model, q_s, False
        return model, q_s + time.perf_counter() - t, True

    def _build(self, path, quant, device):
        from hqq.core.quantize import HQQBackend as Kernel, HQQLinear

        model, q_s = self._quantize(path, quant, device)
        notes: list[str] = []
        if quant.fast:
            from . import int4

            t = time.perf_counter()
            conv = int4.convert(model, device)
            # the HQQ layers' codes and the conversion's temporaries back to the driver; on a GPU also the holes
            # they left between the weights that stay (compact_tensors releases the memory itself)
            if device.startswith("cuda"):
                compact_tensors(model, device)
            else:
                release_memory(device)
            if not conv.done:
                raise InputError(f"{quant.name}: no layer can run on an int4 kernel ({'; '.join(conv.left)}). "
                                 f"Use plain hqq{quant.bits}.")
            if conv.left and HQQLinear.backend not in (Kernel.PYTORCH, Kernel.PYTORCH_FORWARD):
                HQQLinear.set_backend(Kernel.PYTORCH)
            self._smoke(model, device)
            kernel = "QuantScope int4 GEMV" if conv.ours else "int4 kernel"
            return model, q_s + time.perf_counter() - t, {
                "hqq_backend": kernel + (" (some layers on HQQ's path)" if conv.left else ""),
                "hqq_backend_notes": conv.notes + conv.left}
        if not device.startswith("cuda"):
            if HQQLinear.backend not in (Kernel.PYTORCH, Kernel.PYTORCH_FORWARD):
                HQQLinear.set_backend(Kernel.PYTORCH)
            return model, q_s, {"hqq_backend": "pytorch", "hqq_backend_notes":
                                ["CPU: HQQ's PyTorch path (dequantize then matmul) is its only CPU kernel"]}
        for cand in CUDA_CANDIDATES:
            lib = {"gemlite": "gemlite", "torchao_int4": "torchao", "bitblas": "bitblas"}[cand]
            why = _import_error(lib)
            if why is None and cand == "torchao_int4" and (quant.bits != 4 or quant.dtype not in ("bf16", "bfloat16")):
                why = "torchao int4 needs 4-bit weights and bf16 compute"
            if why:
                notes.append(f"{cand}: {why}")
                continue
            model, q_s, ok = self._patched(model, q_s, cand, path, quant, device, notes)
            if ok:
                return model, q_s, {"hqq_backend": cand, "hqq_backend_notes": notes}
        HQQLinear.set_backend(Kernel.PYTORCH)
        notes.append("pytorch: HQQ's default dequantize-then-matmul path")
        return model, q_s, {"hqq_backend": "pytorch", "hqq_backend_notes": notes}
