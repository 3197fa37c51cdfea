"""An experiment, not used by the engine: HQQ 4-bit matmuls on Triton kernels of our own (CUDA).

Measured against PyTorch's int4 kernel (tinygemm) and our int4 kernel (``engine/backends/int4_cuda.py``, what
``hqq4-fast`` uses on CUDA) by ``bench/gpu_int4_kernels.py`` on an H200 with Llama-3.1-8B's layer shapes at batch 1:
a first version of the GEMV here, converting every code, read the weights at 26-37% of the copy bandwidth; this one
(codes read as subnormal floats, no conversion instruction; ``QUANTSCOPE_INT4_GEMV=magic`` tries the exponent
trick instead) at 25-33% with the weights read from HBM, tinygemm at 32-44% (docs/benchmarks.md). Kept so the comparison
can be re-run.

Layout ("planar per group"): each row's codes are int32 words, eight 4-bit codes per word; within each
quantization group of ``G`` input features (``G/8`` words), word ``i`` nibble ``j`` holds feature ``j * G/8 + i``.
Scales and zeros are [out_features, groups], as HQQ keeps them. A kernel loads a wide tile of words per row
(several groups) in one go; nibble ``j`` of the tile is then a [rows, words] block of codes whose features are a
fixed permutation of the tile's features, so the input is gathered in the same order and no codes move.
HQQ dequantizes ``w = (q - z) * s``; per group the kernels compute ``s * (sum q x - z * sum x)`` in fp32.

- :func:`_gemv_kernel` (one token, decode): each program streams ``BN`` rows once, accumulating ``q * x`` per word
  column over the 8 nibbles and applying the group's scale and zero once per word column. At batch 1 every weight
  is read once per token, so this kernel sets the tokens per second.
- :func:`_gemm_kernel` (a prompt): the same tiles, dequantized nibble by nibble into a tensor-core ``tl.dot``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _gemv_configs():
    import os

    if os.environ.get("QUANTSCOPE_INT4_TUNE") == "mid":
        return [triton.Config({"BN": bn, "BW": bw}, num_warps=w, num_stages=st)
                for bn in (2, 4, 8, 16) for bw in (128, 256, 512) for w in (4, 8) for st in (2, 3)]
    if os.environ.get("QUANTSCOPE_INT4_TUNE") == "wide":  # gpu_int4_kernels.py --wide
        return [triton.Config({"BN": bn, "BW": bw}, num_warps=w, num_stages=st)
                for bn in (1, 2, 4, 8) for bw in (128, 256, 512) for w in (2, 4, 8) for st in (2, 3, 4)]
    return [triton.Config({"BN": bn, "BW": bw}, num_warps=w, num_stages=st)
            for bn in (2, 4) for bw in (256, 512) for w in (4, 8) for st in (2, 3)]


# Codes to floats without an int->float conversion. A code ``q`` at bits ``c .. c+3`` of a word,
# masked out and read as an fp32 bit pattern, IS the number ``q * 2**(c - 149)``: every pattern below 2**24 is a
# subnormal or the smallest normal binade, where a pattern's integer value times 2**-149 is its value, exactly.
# Nibbles 0-5 sit below bit 24 as they are; nibbles 6 and 7 are read after one shift right by 8 (bits 16-23).
# So each code costs one AND and one FMA (``acc += f * x'``), with the input pre-scaled per nibble by
# ``2**(E - c)`` so that products land at ``q * x * 2**(E - 149)``, far inside fp32's normal range, and the group
# sum is scaled back by ``2**(149 - E)`` with the group's scale. The conversion instruction (I2F, a quarter-rate
# op on NVIDIA GPUs) is what capped the first version of this GEMV (26-37%), which converted every code.
_E = tl.constexpr(100)
_BACK = tl.constexpr(2.0 ** (149 - 100))


@triton.autotune(configs=_gemv_configs(), key=["N", "K", "MAGIC"])
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, N, K, G: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr,
                  MAGIC: tl.constexpr = False):
    SL: tl.constexpr = G // 8  # words per group and row
    NGT: tl.constexpr = BW // SL  # groups per tile
    KW = K // 8
    NG = K // G
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    mn = rn < N
    ig = tl.arange(0, NGT)
    ii = tl.arange(0, SL)
    acc = tl.zeros((BN, NGT), dtype=tl.float32)
    for g0 in range(0, NG, NGT):
        mg = (g0 + ig) < NG
        wofs = (g0 + ig)[:, None] * SL + ii[None, :]  # [NGT, SL] word index in the row
        w = tl.load(w_ptr + rn[:, None, None] * KW + wofs[None, :, :], mask=mn[:, None, None] & mg[None, :, None],
                    other=0)
        t = tl.zeros((BN, NGT, SL), dtype=tl.float32)
        xs = tl.zeros((NGT, SL), dtype=tl.float32)
        # MAGIC: the usual trick instead of subnormals -- OR in 2**23's exponent, subtract 2**23 (one more op per code)
        if MAGIC:
            wh = w >> 12
        else:
            wh = w >> 8
        for j in tl.static_range(8):
            x = tl.load(x_ptr + (g0 + ig)[:, None] * G + j * SL + ii[None, :], mask=mg[:, None], other=0.0)
            x = x.to(tl.float32)
            xs += x
            if MAGIC:
                if j < 5:
                    f = ((w & (0xF << (4 * j))) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    t += f * (x * (2.0 ** (-4 * j)))[None, :, :]
                else:
                    f = ((wh & (0xF << (4 * j - 12))) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                    t += f * (x * (2.0 ** (12 - 4 * j)))[None, :, :]
            else:
                if j < 6:
                    f = (w & (0xF << (4 * j))).to(tl.float32, bitcast=True)
                    t += f * (x * (2.0 ** (_E - 4 * j)))[None, :, :]
                else:
                    f = (wh & (0xF << (4 * j - 8))).to(tl.float32, bitcast=True)
                    t += f * (x * (2.0 ** (_E - 4 * j + 8)))[None, :, :]
        if MAGIC:
            back = 1.0
        else:
            back = _BACK
        m2 = mn[:, None] & mg[None, :]
        s = tl.load(s_ptr + rn[:, None] * NG + (g0 + ig)[None, :], mask=m2, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn[:, None] * NG + (g0 + ig)[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += s * (tl.sum(t, axis=2) * back - z * tl.sum(xs, axis=1)[None, :])
    tl.store(y_ptr + rn, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=mn)


_DOT = tl.bfloat16  # the tensor-core input type of the prompt kernel (tests on Triton's interpreter use fp32)


def _gemm_configs():
    return [triton.Config({"BM": bm, "BN": bn, "BW": 32}, num_warps=w, num_stages=st)
            for bm in (16, 64) for bn in (64, 128) for w in (4, 8) for st in (2, 3)]


@triton.autotune(configs=_gemm_configs(), key=["N", "K"])
@triton.jit
def _gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K, G: tl.constexpr, DOT: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BW: tl.constexpr):
    SL: tl.constexpr = G // 8
    KW = K // 8
    NG = K // G
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mm, mn = rm < M, rn < N
    rw = tl.arange(0, BW)
    gw = rw // SL
    f0 = gw * G + rw % SL
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for w0 in range(0, KW, BW):
        mw = (w0 + rw) < KW
        m2 = mw[:, None] & mn[None, :]
        w = tl.load(w_ptr + rn[None, :] * KW + (w0 + rw)[:, None], mask=m2, other=0)  # [BW, BN]
        g = w0 // SL + gw
        s = tl.load(s_ptr + rn[None, :] * NG + g[:, None], mask=m2, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn[None, :] * NG + g[:, None], mask=m2, other=0.0).to(tl.float32)
        for j in tl.static_range(8):
            x = tl.load(x_ptr + rm[:, None] * K + (w0 * 8 + f0 + j * SL)[None, :], mask=mm[:, None] & mw[None, :],
                        other=0.0)
            wq = (((w >> (4 * j)) & 0xF).to(tl.float32) - z) * s
            acc += tl.dot(x.to(DOT), wq.to(DOT))
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


def pack(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """``q``: [N, K] codes 0..15 (any integer dtype) -> [N, K/8] int32 in the planar-per-group layout."""
    n, k = q.shape
    sl = group_size // 8
    q = q.to(torch.int32).reshape(n, k // group_size, 8, sl)  # feature j*sl + i of a group -> [j, i]
    words = torch.zeros((n, k // group_size, sl), dtype=torch.int32, device=q.device)
    for j in range(8):
        words |= q[:, :, j, :] << (4 * j)
    return words.reshape(n, k // 8).contiguous()


def unpack(words: torch.Tensor, group_size: int) -> torch.Tensor:
    """The inverse of :func:`pack`: [N, K/8] int32 -> [N, K] uint8 codes."""
    n, kw = words.shape
    sl = group_size // 8
    w = words.reshape(n, kw // sl, 1, sl)
    shifts = (4 * torch.arange(8, device=words.device, dtype=torch.int32)).reshape(1, 1, 8, 1)
    return ((w >> shifts) & 0xF).to(torch.uint8).reshape(n, kw * 8)


def matmul(x2, words, scales, zeros, group_size: int):
    """``x2 @ dequant(W).T`` for x2 [M, K] bf16 (contiguous); scales and zeros [N, K / group_size]."""
    m, k = x2.shape
    n = words.shape[0]
    y = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    if m == 1:
        import os

        magic = os.environ.get("QUANTSCOPE_INT4_GEMV") == "magic"
        _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BN"]),)](x2, words, scales, zeros, y, n, k, G=group_size,
                                                                 MAGIC=magic)
    else:
        _gemm_kernel[lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"]))](
            x2, words, scales, zeros, y, m, n, k, G=group_size, DOT=_DOT)
    return y


class PlanarInt4Linear(torch.nn.Module):
    """``y = x @ W.T + b`` with W as 4-bit codes in the planar layout."""

    def __init__(self, words, scales, zeros, in_features: int, group_size: int, bias=None):
        super().__init__()
        self.in_features, self.out_features = in_features, int(words.shape[0])
        self.group_size = group_size
        self.register_buffer("words", words)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.bias = bias

    def forward(self, x):
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch.ops.quantscope.int4_planar_mm(x2, self.words, self.scales, self.zeros, self.group_size)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


@torch.library.custom_op("quantscope::int4_planar_mm", mutates_args=())
def _int4_planar_mm(x2: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    return matmul(x2, words, scales, zeros, group_size)


@_int4_planar_mm.register_fake
def _(x2, words, scales, zeros, group_size):
    return x2.new_empty((x2.shape[0], words.shape[0]))


def from_codes(q, s, z, group_size: int, bias=None):
    """A :class:`PlanarInt4Linear` from codes ``q`` [N, K], scales and zeros [N, K / group_size]."""
    return PlanarInt4Linear(pack(q, group_size), s.contiguous().to(torch.bfloat16), z.contiguous().to(torch.bfloat16),
                            int(q.shape[1]), group_size, bias)
