"""HQQ 4-bit layers on PyTorch's own int4 matmul kernel ("tinygemm"): the fused 4-bit path.

PyTorch ships a weight-only int4 matmul that reads packed 4-bit codes plus one (scale, zero) pair per group and
computes ``x @ dequant(W).T`` in one kernel, without a 16-bit copy of the weight: on CUDA
``aten._weight_int4pack_mm`` (bf16 activations, Ampere or newer), on CPU ``aten._weight_int4pack_mm_for_cpu``.
HQQ's default path instead dequantizes the whole weight to 16 bits and then multiplies, every token.

Conversion keeps HQQ's codes exactly: tinygemm dequantizes ``w = (q - 8) * scale + zero`` and HQQ ``w = (q - z) * s``,
so ``scale = s`` and ``zero = (8 - z) * s`` (computed in fp32, stored bf16). Memory is unchanged: the codes
stay 4 bits each (two per byte) and one bf16 scale and zero per group, as HQQ stores them.

hqq's own patch to this kernel (``prepare_for_inference(backend="torchao_int4")``) packs with the CUDA-only op,
so it cannot run on CPU, and it picks the packed layout from ``float(torch.__version__[:3])`` (2.1 for 2.13);
this conversion serves both devices and is tested against HQQ's dequantization (tests/test_fast.py).

Measured on an H200 (bench/gpu_int4_kernels.py, docs/benchmarks.md) this kernel reads 4-bit weights at 32-44% of
the copy bandwidth per layer at batch 1; gemlite (HQQ's Triton kernels) was not faster on the whole model, nor
were Triton GEMVs of our own (bench/int4_triton.py). On CUDA, :func:`convert` therefore puts every layer it can on
our own tensor-core int4 kernel (:mod:`engine.backends.int4_cuda`, 38-60%) and keeps this one for the rest (and on CPU);
``QUANTSCOPE_INT4_KERNEL=tinygemm`` keeps this kernel everywhere.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch  # this module is imported only where a model is being loaded (engine.backends.hqq_backend)

GROUP_SIZES = (32, 64, 128, 256)


def why_not(layer, device: str) -> Optional[str]:
    """None when ``layer`` (an ``HQQLinear``) can run on the int4 kernel on ``device``, else the reason."""
    meta = getattr(layer, "meta", None) or {}
    if meta.get("nbits") != 4:
        return f"the kernel is 4-bit only (this layer is {meta.get('nbits')}-bit)"
    if meta.get("axis") != 1:
        return "the kernel needs HQQ's axis=1 grouping"
    if meta.get("group_size") not in GROUP_SIZES:
        return f"the kernel takes group sizes {', '.join(map(str, GROUP_SIZES))}, not {meta.get('group_size')}"
    if meta.get("quant_scale") or meta.get("quant_zero") or meta.get("view_as_float"):
        return "the kernel needs HQQ's plain (unquantized) scales and zeros"
    if meta.get("compute_dtype") is not torch.bfloat16:
        return "the kernel computes in bf16; load HQQ with compute dtype bf16"
    out_f, in_f = meta["shape"]
    if in_f % meta["group_size"]:
        return f"the kernel needs groups within a row: {in_f} input features are not a multiple of {meta['group_size']}"
    if out_f % 8:
        return f"the kernel needs a multiple of 8 output features, not {out_f}"
    if device.startswith("cuda") and torch.cuda.get_device_capability(torch.device(device))[0] < 8:
        return "the CUDA kernel needs an Ampere or newer GPU (compute capability 8.0+)"
    return None


def _inner_k_tiles(in_features: int) -> int:
    """The widest tiling the kernel accepts for this many input features (it needs k % (16 * tiles) == 0; a
    multiple of a group size, which is a multiple of 32, always allows 2)."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


class Int4Linear(torch.nn.Module):
    """``y = x @ W.T + b`` with W as 4-bit codes in the kernel's packed layout (see the module docstring)."""

    def __init__(self, packed, scales_zeros, in_features: int, out_features: int, group_size: int, bias):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        self.bias = bias
        self.on_cuda = packed.is_cuda

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if self.on_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def codes(layer):
    """(q [N, K] uint8 codes, s, z [N, K / group size] fp32, bias or None) of the ``HQQLinear`` ``layer``."""
    from hqq.core.quantize import Quantizer

    meta = layer.meta
    out_f, in_f = (int(d) for d in meta["shape"])
    gs = int(meta["group_size"])
    groups = out_f * in_f // gs
    q = Quantizer.unpack[meta["packing"]](layer.W_q)[:groups].reshape(out_f, in_f)  # groups run along k
    s = meta["scale"].reshape(out_f, in_f // gs).float()
    z = meta["zero"].reshape(out_f, in_f // gs).float()
    bias = layer.bias
    if bias is not None:
        bias = torch.nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
    return q, s, z, bias


def from_hqq(layer):
    """An ``Int4Linear`` holding the same 4-bit codes, scales and zeros as the ``HQQLinear`` ``layer``."""
    q, s, z, bias = codes(layer)
    return from_codes(q, s, z, int(layer.meta["group_size"]), bias)


def from_codes(q, s, z, gs: int, bias=None):
    """An ``Int4Linear`` from codes ``q`` [N, K] (0..15), HQQ's scales and zeros [N, K / gs]."""
    out_f, in_f = q.shape
    scales_zeros = torch.stack([s, (8 - z) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    tiles = _inner_k_tiles(in_f)
    if q.is_cuda:
        packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), tiles)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), tiles)
    return Int4Linear(packed, scales_zeros, in_f, out_f, gs, bias)


class Conversion(NamedTuple):
    done: int  # layers converted
    ours: int  # of which on our CUDA GEMV (engine.backends.int4_cuda)
    notes: list  # one line per kernel used
    left: list  # one line per distinct reason a layer stayed on HQQ's path


def convert(model, device: str) -> Conversion:
    """Replace every convertible ``HQQLinear`` of ``model`` in place: on CUDA by our own GEMV
    (:mod:`engine.backends.int4_cuda`) where it can be built and takes the layer's shape -- sibling projections
    (q/k/v, gate/up) stacked into one call each; Llama-style MLPs and decoder layers with their small kernels
    folded in (:mod:`engine.backends.int4_fusion`) -- else by an ``Int4Linear`` (tinygemm).

    Returns a :class:`Conversion`."""
    from hqq.core.quantize import HQQLinear

    ours = None
    if device.startswith("cuda") and os.environ.get("QUANTSCOPE_INT4_KERNEL", "ours") != "tinygemm":
        from . import int4_cuda

        ours = int4_cuda
    done, fused, reasons, kernels, why_tiny, roped = 0, 0, {}, {"ours": 0, "tinygemm": 0}, {}, 0

    def why_ours(layer) -> Optional[str]:
        out_f, in_f = (int(d) for d in layer.meta["shape"])
        return ours.why_not(out_f, in_f, int(layer.meta["group_size"]))

    def all_ours(layers) -> bool:
        return all(isinstance(x, HQQLinear) and why_not(x, device) is None and why_ours(x) is None for x in layers)

    fusion = None
    if ours:
        from . import int4_fusion

        fusion = int4_fusion if int4_fusion.wanted() else None
    for parent in list(model.modules()) if fusion else ():
        for name, mlp in list(parent.named_children()):
            projs = [getattr(mlp, nm, None) for nm in ("gate_proj", "up_proj", "down_proj")]
            if (fusion.mlp_fusable(mlp) and all_ours(projs) and all(x.bias is None for x in projs)
                    and projs[0].meta["shape"] == projs[1].meta["shape"]):
                setattr(parent, name, fusion.gated_mlp(*(codes(x) for x in projs)))
                done, fused, kernels["ours"] = done + 3, fused + 1, kernels["ours"] + 3
    for parent in list(model.modules()):
        for names in ours.SIBLINGS if ours else ():
            layers = [getattr(parent, nm, None) for nm in names]
            if not all_ours(layers):
                continue
            if len({int(x.meta["shape"][1]) for x in layers}) != 1 or len({x.bias is None for x in layers}) != 1:
                continue
            sizes = [int(x.meta["shape"][0]) for x in layers]
            rope = fusion.rope_head_dim(parent, sizes, layers[0].bias is not None) if fusion else None
            ours.fuse_codes(parent, names, sizes, (codes(x) for x in layers), rope_head_dim=rope)
            roped += bool(rope)
            done, fused, kernels["ours"] = done + len(layers), fused + 1, kernels["ours"] + len(layers)
        for name, child in list(parent.named_children()):
            if not isinstance(child, HQQLinear):
                continue
            why = why_not(child, device)
            if why:
                reasons.setdefault(why, 0)
                reasons[why] += 1
                continue
            why_o = why_ours(child) if ours else None
            if ours and why_o is None:
                q, s, z, bias = codes(child)
                setattr(parent, name, ours.from_codes(q, s, z, bias))
                kernels["ours"] += 1
            else:
                if why_o:
                    why_tiny[why_o] = why_tiny.get(why_o, 0) + 1
                setattr(parent, name, from_hqq(child))
                kernels["tinygemm"] += 1
            done += 1
    notes = []
    if kernels["ours"]:
        notes.append(f"{kernels['ours']} layers on QuantScope's int4 GEMV (CUDA; {fused} q/k/v and gate/up groups "
                     f"fused)")
    if fusion:
        layers, left = fusion.fuse_decoder_layers(model)
        if layers:
            notes.append(f"{layers} decoder layers with their RMSNorms, residual adds and SiLU * up inside the GEMVs"
                         + (f"; in {roped}, RoPE and the cache writes too (the compiled decode step)" if roped else ""))
        notes += [f"{n} decoder layer(s) not fused: {why}" for why, n in left.items()]
    if kernels["tinygemm"]:
        notes.append(f"{kernels['tinygemm']} layers on PyTorch's int4 kernel (tinygemm)" +
                     "".join(f"; not on ours: {w} ({n})" for w, n in why_tiny.items()))
    return Conversion(done, kernels["ours"], notes,
                      [f"{n} layer(s) stay on HQQ's path: {why}" for why, n in reasons.items()])
