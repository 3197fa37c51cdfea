"""The engine on a CUDA GPU, every backend (``pytest -m gpu``; deselected by default, skipped without CUDA).

No Hub and no weights on the GPU machine: the model is a random-weight checkpoint built from a bundled preset's
real config (default Llama-3.2-1B: tied embeddings, grouped-query attention; ``QS_GPU_PRESET`` picks another),
with the embedded model's tokenizer files (``QS_GPU_TOKENIZER`` = a folder holding them, else the embedded
model's materialised folder). Memory and speed do not depend on weight values; text quality does, so no test
here reads the text.

Per format (bf16, fp16, nf4, nf4 + double quant, fp4, int8, hqq4, and llama.cpp when its CUDA build is
installed): the weights measured on the loaded objects within 1% of the calculator, the allocator peak of a
run above the weights and below the calculator's prediction + 10%, incremental streaming, the engine's greedy
tokens equal ``model.generate``'s, and cancellation. Then a real CUDA out-of-memory during generation (a
per-process memory cap) becomes the domain error, frees the model, and the next request succeeds.

Run on the device machine: ``QS_GPU_TOKENIZER=dir python -m pytest -m gpu tests/test_gpu.py``.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from engine.backends import backend_for, backend_of, load, parse_load_method  # noqa: E402
from engine.backends.base import GenerationSettings, TokenEvent  # noqa: E402
from engine.errors import BackendUnavailableError, OutOfMemoryDuringGenerationError  # noqa: E402
from engine.generation import RunMetrics, run  # noqa: E402
from engine.memory import estimate  # noqa: E402
from engine.sources import resolve  # noqa: E402

PRESET = os.environ.get("QS_GPU_PRESET", "meta-llama/Llama-3.2-1B-Instruct")
STORY = "Write a long story about a dragon who learns to bake bread."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
METHODS = ["bf16", "fp16", "nf4", "nf4-dq", "fp4", "int8", "hqq4", "bf16-fast", "hqq4-fast"]


def _method(name: str):
    if name == "nf4-dq":
        return parse_load_method("nf4", double_quant=True)
    return parse_load_method(name)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    import transformers as tf

    from engine.sources import PRESETS_DIR, _find_preset

    tok_dir = os.environ.get("QS_GPU_TOKENIZER")
    if not tok_dir:
        from engine import embedded

        tok_dir = str(embedded.hf_path())
    p = _find_preset(PRESET)
    cfg = json.loads((PRESETS_DIR / p["file"]).read_text())
    mt = cfg.pop("model_type")
    ckpt = tmp_path_factory.mktemp("gpu-ckpt")
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(mt, **cfg), dtype=torch.bfloat16)
    m.save_pretrained(ckpt)
    del m
    gc.collect()
    torch.cuda.empty_cache()
    for name in TOKENIZER_FILES:
        if (Path(tok_dir) / name).is_file():
            shutil.copy2(Path(tok_dir) / name, ckpt / name)
    assert (ckpt / "tokenizer.json").is_file(), f"no tokenizer.json in {tok_dir}"
    return str(ckpt)


@pytest.fixture
def loaded(checkpoint, request):
    quant = _method(request.param)
    try:
        backend_for(quant)
    except BackendUnavailableError as e:
        pytest.skip(str(e))
    gc.collect()
    torch.cuda.empty_cache()
    lm = load(checkpoint, quant, "cuda")
    yield lm
    backend_of(lm).unload(lm)
    del lm
    gc.collect()
    torch.cuda.empty_cache()


def collect(lm, settings, cancel=None):
    events, metrics, arrivals = [], None, []
    for ev in run(lm, STORY, settings, cancel):
        arrivals.append(time.perf_counter())
        if isinstance(ev, RunMetrics):
            metrics = ev
        else:
            events.append(ev)
    return events, metrics, arrivals


@pytest.mark.parametrize("loaded", METHODS, indirect=True)
def test_load_stream_and_memory_match_the_calculator(loaded, checkpoint):
    lm = loaded
    assert lm.device.startswith("cuda") and lm.loaded
    predicted = estimate(resolve(checkpoint), lm.quant).weights_bytes
    assert abs(lm.weights_bytes - predicted) <= 0.01 * predicted, (lm.method, lm.weights_bytes, predicted)

    settings = GenerationSettings(max_new_tokens=24, temperature=0.0)
    collect(lm, GenerationSettings(max_new_tokens=2))  # warm-up (kernels, autotuning)
    events, m, arrivals = collect(lm, settings)
    toks = [e for e in events if e.token_id is not None]
    assert m.tokens == len(toks) and 1 <= m.tokens <= 24
    assert m.peak_kind.startswith("cuda")
    assert m.weights_bytes <= m.peak_bytes
    predicted_run = m.predicted_bytes - m.predicted_overhead_bytes
    # Measured on an H100: HQQ's default path dequantizes each layer to 16-bit before its matmul, a transient
    # the calculator does not count yet (+133 MiB on this 1B model, +306 MiB on Llama-3.1-8B): known, checked last.
    hqq_gap = lm.backend == "hqq" and lm.info.get("hqq_backend") == "pytorch" and m.peak_bytes > 1.10 * predicted_run
    assert hqq_gap or m.peak_bytes <= 1.10 * predicted_run, (m.peak_bytes, predicted_run)
    if lm.quant.method == "int8":  # the share of outlier columns its prompt had, and the prediction uses it
        # (how close that prediction is at 512-8,192 tokens: bench/gpu_validate.py; at this ~70-token run the
        # fixed cuBLAS workspaces in max_memory_allocated are 4% of a 1B int8 model: 1,574 vs 1,510 MB on an H200)
        kind, share = m.int8_outliers
        assert 0 <= share <= 1 and kind.endswith("proj"), m.int8_outliers
        runtime = dataclasses.replace(backend_of(lm).runtime_spec(lm, m.prompt_tokens + m.tokens),
                                      int8_outlier_share=share)
        assert m.predicted_bytes == estimate(lm.spec, lm.quant, runtime).total_bytes
    else:
        assert m.int8_outliers is None
    if m.tokens >= 4:  # streaming: the first token reaches us before the last one is made
        assert arrivals[0] < toks[-1].t
        assert m.tokens_per_s and m.tokens_per_s > 0

    if lm.backend != "llama.cpp":  # the engine's greedy decode equals model.generate's on the same weights
        enc = lm.tokenizer.apply_chat_template([{"role": "user", "content": STORY}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
        dev = lm.info.get("input_device", lm.device)
        enc = {k: v.to(dev) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.inference_mode():
            out = lm.model.generate(**enc, max_new_tokens=m.tokens, min_new_tokens=m.tokens, do_sample=False)
        ref = out[0, enc["input_ids"].shape[1]:].tolist()
        ids = [e.token_id for e in toks]
        # bf16 ties can flip late tokens between two kernel schedules; the first ones must agree. The fast path
        # runs torch.compile's fused kernels (another rounding order than generate's eager ones): on this
        # random-weight model, whose logits are near-ties, bf16-fast first departed at token 7 on an H200. It
        # must agree for 4 tokens, and replaying its graph must give exactly its own tokens again.
        agree = 4 if lm.quant.fast else 8
        assert ids[:agree] == ref[:agree], (lm.method, ids, ref)
        if lm.quant.fast:
            again, _, _ = collect(lm, settings)
            assert [e.token_id for e in again if e.token_id is not None] == ids
    if hqq_gap:
        pytest.xfail(f"HQQ dequantize workspace not in the calculator yet: peak {m.peak_bytes:,} B, "
                     f"predicted {predicted_run:,} B")


@pytest.mark.parametrize("loaded", ["bf16-fast", "hqq4-fast"], indirect=True)
def test_fast_path_is_captured_at_load_and_replayed(loaded):
    lm = loaded
    assert lm.info["fast_warmup_s"] > 0 and lm.fast_runner is not None and lm.fast_runner.graph is not None
    graph = lm.fast_runner.graph
    from engine.backends import decode_attention

    cfg = lm.model.config
    # our decode attention where its kernel builds (the preset is bf16, 64-dim heads, 4 query heads per kv head)
    assert lm.fast_runner.own_attention == (decode_attention.why_not(
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) is None)
    if lm.backend == "hqq":
        from engine.backends import int4_cuda

        # our int4 kernel where nvcc and ninja can build it (the preset's shapes are whole tiles and groups), else
        # tinygemm
        want = "QuantScope int4 GEMV" if int4_cuda.available() is None else "int4 kernel"
        assert lm.info["hqq_backend"] == want, lm.info
        if want.startswith("QuantScope"):  # q/k rows stored for the RoPE fold (Llama, heads of 64, no biases)
            attn = lm.model.model.layers[0].self_attn
            assert attn.fused_q_k_v.rope == (cfg.head_dim, cfg.num_attention_heads * cfg.head_dim)
    _, m, _ = collect(lm, GenerationSettings(max_new_tokens=16, temperature=0.0))
    assert m.decode_path == "fast: static cache + CUDA graph" and m.tokens == 16
    assert lm.fast_runner.graph is graph  # replayed, not captured again
    # the calculator is asked about the static cache's full length
    assert m.predicted_bytes == estimate(lm.spec, lm.quant, backend_of(lm).runtime_spec(lm, 1)).total_bytes


@pytest.mark.parametrize("loaded", ["bf16-fast", "hqq4-fast"], indirect=True)
def test_captured_steps_attend_their_bucket_of_positions(loaded):
    """A captured step attends the cache's used positions rounded up to runners.BUCKET (a graph per bucket, one
    compilation for all): crossing a bucket captures the next one, and the logits along 600 forced tokens match
    steps that attend every position of the cache (the masked positions add nothing) within bf16 rounding."""
    from engine.backends import runners

    lm = loaded
    r = runners.acquire(lm, 16, 600)
    try:
        assert r.bucketed and set(r.graphs) == {runners.BUCKET}  # captured at load (warm)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert frames > 0  # the step was compiled at load
        g = torch.Generator(device="cuda").manual_seed(1)
        prompt = torch.randint(0, 1000, (1, 16), device="cuda", generator=g)
        forced = torch.randint(0, 1000, (600, 1, 1), device="cuda", generator=g)

        def logits_along():
            out = [r.prefill(prompt).float()]
            for t in forced[:-1]:
                out.append(r.step(t).float().clone())
            torch.cuda.synchronize()
            return torch.cat(out)

        with torch.inference_mode(), r.on_stream():
            cut = logits_along()
            buckets, compiled = set(r.graphs), torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames
            r.bucketed = False  # every step over all max_len positions (one more graph)
            full = logits_along()
        assert buckets == {256, 512, 768} and r.max_len == runners.CUDA_MIN_LEN, (buckets, r.max_len)
        assert compiled == 0, f"{compiled} more compilations for the buckets"
        assert r.max_len in r.graphs
        err, scale = (cut - full).abs().max().item(), full.abs().max().item()
        agree = (cut.argmax(-1) == full.argmax(-1)).float().mean().item()
        # bf16 rounding: the attention kernel reduces over 256.. vs 2,048 positions (measured on an H200: largest
        # difference 0.117 at logit scale 5, ~4 bf16 steps; argmax agreement 95-96% on random weights' near-ties)
        assert err < 0.05 * scale and agree > 0.9, (err, scale, agree)
    finally:
        r.release()
        lm.fast_runner = None  # the test changed its runner: the next run builds a fresh one
        r.close()


def _attention_fp32(q, k, v, mask, scale):
    """The reference: fp32 attention of one query token, query head h on key/value head h // G."""
    g = q.shape[1] // k.shape[1]
    kf, vf = k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = (q.float() @ kf.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ vf).transpose(1, 2)  # [1, 1, H, D]


@pytest.mark.parametrize("dim,heads,kv_heads", [(128, 32, 8), (64, 32, 8), (128, 28, 4), (64, 9, 3), (128, 8, 8)])
def test_decode_attention_matches_fp32_attention_and_ignores_masked_positions(dim, heads, kv_heads):
    """Our one-launch decode attention against fp32 attention: lengths of one sub-chunk, several, odd ones and
    long ones (one block per head, chunks combined by the last block; past decode_attention.LONGEST the op answers
    with SDPA); the static cache's layout (a cut of a
    longer buffer); positions past the used length holding NaN and inf (masked: they must not enter any sum);
    its counters back at zero after each launch; and inside a CUDA graph replayed with new values."""
    from engine.backends import decode_attention as da

    if da.why_not(heads, kv_heads, dim) is not None:
        pytest.skip(da.why_not(heads, kv_heads, dim))
    g = torch.Generator(device="cuda").manual_seed(0)
    cap = 4608
    kc = torch.randn(1, kv_heads, cap, dim, device="cuda", generator=g).to(torch.bfloat16)
    vc = torch.randn(1, kv_heads, cap, dim, device="cuda", generator=g).to(torch.bfloat16)
    counters = torch.zeros(kv_heads, dtype=torch.int32, device="cuda")
    chunks = da.chunks_per_head(kv_heads, "cuda")
    scale = dim ** -0.5
    for n, used in ((32, 32), (37, 20), (512, 300), (700, 700), (4096, 2900), (4608, 4608)):
        q = (3 * torch.randn(1, heads, 1, dim, device="cuda", generator=g)).to(torch.bfloat16)
        k, v = kc[:, :, :n], vc[:, :, :n]
        mask = torch.zeros(1, 1, 1, cap, dtype=torch.bool, device="cuda")
        mask[..., :used] = True
        mask = mask[..., :n]
        k_dirty, v_dirty = k.clone(), v.clone()  # what a reused cache could hold past the used positions
        k_dirty[:, :, used:] = float("nan")
        v_dirty[:, :, used:] = float("inf")
        ref = _attention_fp32(q, k[:, :, :used], v[:, :, :used], None, scale)
        sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                                enable_gqa=True).transpose(1, 2).float()
        for kk, vv in ((k, v), (k_dirty, v_dirty)):
            got = da.attend(q, kk, vv, mask, counters, scale, chunks).float()
            err, sdpa_err = (got - ref).abs().max().item(), (sdpa - ref).abs().max().item()
            assert torch.isfinite(got).all() and err <= max(2 * sdpa_err, 0.01), (n, used, err, sdpa_err)
            assert counters.eq(0).all(), counters
        if used == n:  # no mask: every position attended
            got = da.attend(q, k, v, None, counters, scale, chunks).float()
            assert (got - ref).abs().max().item() <= max(2 * (sdpa - ref).abs().max().item(), 0.01)
    # captured and replayed with new values in the same buffers
    n = 1000
    q = torch.randn(1, heads, 1, dim, device="cuda", generator=g).to(torch.bfloat16)
    mask = torch.ones(1, 1, 1, n, dtype=torch.bool, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        da.attend(q, kc[:, :, :n], vc[:, :, :n], mask, counters, scale, chunks)  # warm
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = da.attend(q, kc[:, :, :n], vc[:, :, :n], mask, counters, scale, chunks)
    for _ in range(3):
        q.copy_(torch.randn(q.shape, device="cuda", generator=g))
        kc.copy_(torch.randn(kc.shape, device="cuda", generator=g))
        mask[..., torch.randint(0, n, (50,), device="cuda", generator=g)] = False
        graph.replay()
        torch.cuda.synchronize()
        ref = _attention_fp32(q, kc[:, :, :n], vc[:, :, :n], mask, scale)
        assert (out.float() - ref).abs().max().item() < 0.02 and counters.eq(0).all()


def test_int4_kernel_on_cuda_computes_what_hqq_dequantizes():
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    from engine.backends import int4

    torch.manual_seed(0)
    for in_f, out_f in ((4096, 4096), (4096, 1024), (14336, 4096)):
        lin = torch.nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)
        h = HQQLinear(lin, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.bfloat16, device="cuda")
        assert int4.why_not(h, "cuda") is None
        x = torch.randn(1, in_f, dtype=torch.bfloat16, device="cuda")
        with torch.inference_mode():
            ref = x.float() @ h.dequantize().float().T
            got = int4.from_hqq(h)(x).float()
        assert (got - ref).abs().max().item() < 0.01 * ref.abs().max().item()


def test_our_int4_gemv_computes_what_hqq_dequantizes_and_fuses_siblings():
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    from engine.backends import int4, int4_cuda

    why = int4_cuda.available()
    if why:
        pytest.skip(why)
    torch.manual_seed(0)
    layers, codes = {}, {}
    # 8B shapes; a bias; K = 576, not a multiple of 1,024 (SmolLM2's hidden size): whole groups of 64 are enough
    for in_f, out_f in ((4096, 4096), (4096, 1024), (14336, 4096), (2048, 1008), (576, 1536)):
        lin = torch.nn.Linear(in_f, out_f, bias=out_f == 1008).to(torch.bfloat16)
        h = HQQLinear(lin, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.bfloat16, device="cuda")
        q, s, z, bias = codes[(in_f, out_f)] = int4.codes(h)
        ours = int4_cuda.from_codes(q, s, z, bias)
        layers[(in_f, out_f)] = ours
        # one token; short prompts (8 tokens per block, a ragged last block); longer ones (dequantized in row
        # chunks + cuBLAS)
        for m in (1, 3, 9, int4_cuda.DEQUANT_MIN_TOKENS + 4, 100):
            x = torch.randn(m, in_f, dtype=torch.bfloat16, device="cuda") * 2
            with torch.inference_mode():
                ref = x.float() @ h.dequantize().float().T + (0 if bias is None else bias.float())
                got = ours(x).float()
            assert got.shape == ref.shape
            assert (got - ref).abs().max().item() < 0.01 * ref.abs().max().item(), (in_f, out_f, m)
    # q/k/v stacked into one call: the separate layers' outputs (up to the summation order of the stacked shape's
    # launch configuration) in transformers' order, and bit for bit the same alone or out of order
    mod = torch.nn.Module()
    mod.q_proj, mod.k_proj, mod.v_proj = layers[(4096, 4096)], layers[(4096, 1024)], layers[(4096, 1024)]
    x = torch.randn(1, 1, 4096, dtype=torch.bfloat16, device="cuda")
    with torch.inference_mode():
        want = [mod.q_proj(x), mod.k_proj(x), mod.v_proj(x)]
        int4_cuda.fuse_codes(mod, ("q_proj", "k_proj", "v_proj"), [4096, 1024, 1024],
                             [codes[(4096, 4096)], codes[(4096, 1024)], codes[(4096, 1024)]])
        assert isinstance(mod.q_proj, int4_cuda._Part)
        got = [mod.q_proj(x), mod.k_proj(x), mod.v_proj(x)]
        alone = [mod.v_proj(x), mod.k_proj(x)]
        assert int4_cuda.get(mod.fused_q_k_v, "stacked") is None  # the last sibling let go of the stacked output
    for a, b in zip(want, got):
        assert (a.float() - b.float()).abs().max().item() <= 0.01 * a.float().abs().max().item()
    assert torch.equal(alone[0], got[2]) and torch.equal(alone[1], got[1])


def test_our_int4_gemv_folds_in_the_norm_the_residual_add_and_silu_times_up():
    """The fusions of engine/backends/int4_fusion.py in the kernel, at an 8B's shapes, against the same kernel
    without them followed by PyTorch's ops: the residual add rounds as the separate add does (bit for bit) and
    writes the next norm's input (x * weight bit for bit, the sums of squares up to their order); SiLU(gate) * up
    within one bf16 step (expf vs PyTorch's exp); the norm scales the sums instead of the input (close, not
    equal); a prompt's path (PyTorch's ops around cuBLAS) agrees with the kernel's."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    from engine.backends import int4, int4_cuda as ic

    why = ic.available()
    if why:
        pytest.skip(why)
    torch.manual_seed(1)

    def hqq_codes(in_f, out_f):
        lin = torch.nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)
        return int4.codes(HQQLinear(lin, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.bfloat16,
                                    device="cuda"))

    def close(got, want, rel):
        return (got.float() - want.float()).abs().max().item() <= rel * want.float().abs().max().item()

    gate, up, down = hqq_codes(4096, 14336), hqq_codes(4096, 14336), hqq_codes(14336, 4096)
    gate_up = ic.gate_up_from_codes(gate, up)
    g_lin, u_lin, d_lin = ic.from_codes(*gate), ic.from_codes(*up), ic.from_codes(*down)
    norm_w = (torch.rand(4096, device="cuda") + 0.5).to(torch.bfloat16)
    for m in (1, 3, 9, ic.DEQUANT_MIN_TOKENS + 4):
        decode = m < ic.DEQUANT_MIN_TOKENS
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16) * 3
        with torch.inference_mode():
            # SiLU(gate) * up from interleaved rows = the separate layers' outputs through PyTorch's ops
            want = torch.nn.functional.silu(g_lin(x)) * u_lin(x)
            got = gate_up(x)
            if decode:
                # gate and up come from sums added in another order (the interleaved layer's launch shape is timed
                # on its own): a sum on a rounding boundary can round to the next bf16 value (up to 2^-7 of the
                # value), before SiLU and the product round again: two bf16 steps, for under 1% of the outputs
                diff = (got.float() - want.float()).abs()
                bound = 2 ** -6 * want.float().abs() + 1e-3 * want.float().abs().max()
                worst = (diff / bound).max().item()
                assert worst <= 1, (m, worst, (got != want).float().mean().item())
                assert (got != want).float().mean().item() < 0.01, m
            else:
                assert close(got, want, 0.01), m
            # the residual add, and the next norm's input
            h = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16) * 2
            a = torch.randn(m, 14336, device="cuda", dtype=torch.bfloat16)
            want = h + d_lin(a)
            got = d_lin(a, residual=h)
            assert torch.equal(got, want) if decode else close(got, want, 0.01), m
            y, xn, part = d_lin(a, residual=h, next_w=norm_w)
            assert torch.equal(y, got) and torch.equal(xn, y * norm_w), m
            assert part.shape == (4096 // 16, m) and torch.allclose(part, ic.squares(y), rtol=1e-5), m
            # the RMSNorm, with and without SiLU * up: against the normalized input in fp32
            xn, part = ic.norm_input(x, norm_w)
            ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w.float()
            ref_g = ref @ ic.dequantize(g_lin.words, g_lin.sz).float().T
            ref_u = ref @ ic.dequantize(u_lin.words, u_lin.sz).float().T
            assert close(g_lin(xn, norm=(part, 1e-5)), ref_g, 0.01), m
            assert close(gate_up(xn, norm=(part, 1e-5)), torch.nn.functional.silu(ref_g) * ref_u, 0.02), m


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (32, 8, 64)])
def test_the_rope_fold_rotates_q_and_k_and_writes_the_cache_as_transformers_does(heads, kv_heads, head_dim):
    """A q+k+v GEMV stored for the RoPE fold (int4_cuda.qkv_rope), at an 8B's and a 1B's attention shapes, against
    the same codes stacked the usual way followed by transformers' apply_rotary_pos_emb and the cache write: q
    rotated, k rotated and v at the position in the cache (within one bf16 step: one rounding instead of three),
    every other position untouched; its eager outputs (the rows put back in the heads' order) equal the usual
    stacking's bit for bit; inside a CUDA graph replayed at a new position too."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from engine.backends import int4, int4_cuda as ic

    why = ic.available()
    if why:
        pytest.skip(why)
    torch.manual_seed(2)
    hidden = 4096 if head_dim == 128 else 2048
    sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    codes = []
    for n in sizes:
        lin = torch.nn.Linear(hidden, n, bias=False).to(torch.bfloat16)
        codes.append(int4.codes(HQQLinear(lin, BaseQuantizeConfig(nbits=4, group_size=64),
                                          compute_dtype=torch.bfloat16, device="cuda")))
    names = ("q_proj", "k_proj", "v_proj")
    usual, roped = torch.nn.Module(), torch.nn.Module()
    ic.fuse_codes(usual, names, sizes, iter(codes))
    group = ic.fuse_codes(roped, names, sizes, iter(codes), rope_head_dim=head_dim)
    for m in (usual, roped):
        m.fused_q_k_v.linear.set_mode("norm")
    norm_w = (torch.rand(hidden, device="cuda") + 0.5).to(torch.bfloat16)
    length = 300
    k_cache, v_cache = (torch.randn(1, kv_heads, length, head_dim, device="cuda").to(torch.bfloat16)
                        for _ in range(2))
    inv_freq = 1.0 / (500000 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim))

    def rotary(position):
        freqs = position * inv_freq
        emb = torch.cat([freqs, freqs])[None, None]
        return emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)

    def expected(x, part, position):
        ic.put(usual.fused_q_k_v, "norm", (part, 1e-5))
        q, k, v = (getattr(usual, n)(x).view(1, 1, -1, head_dim).transpose(1, 2) for n in names)
        ic.put(usual.fused_q_k_v, "norm", None)
        cos, sin = rotary(position)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q.transpose(1, 2).reshape(1, 1, -1), k[0, :, 0], v[0, :, 0]

    def close(got, want):  # one bf16 step of the larger value
        return ((got.float() - want.float()).abs() <= 2 ** -7 * want.float().abs().max()).all()

    with torch.inference_mode():
        for position in (0, 137):
            x = torch.randn(1, 1, hidden, device="cuda", dtype=torch.bfloat16)
            xn, part = ic.norm_input(x, norm_w)
            # eager outputs of the stored-for-RoPE group: the usual ones, bit for bit
            for t in (1, 5, ic.DEQUANT_MIN_TOKENS + 3):
                xt = torch.randn(1, t, hidden, device="cuda", dtype=torch.bfloat16)
                for n in names:
                    assert torch.equal(getattr(roped, n)(xt), getattr(usual, n)(xt)), (n, t)
            kc, vc = k_cache.clone(), v_cache.clone()
            pos = torch.tensor(position, device="cuda")
            cos, sin = rotary(position)
            ic.put(group, "norm", (part, 1e-5))
            q = ic.qkv_rope(group, xn, cos, sin, kc, vc, pos)
            ic.put(group, "norm", None)
            want_q, want_k, want_v = expected(xn, part, position)
            assert q.shape == want_q.shape and close(q, want_q), position
            assert close(kc[0, :, position], want_k) and close(vc[0, :, position], want_v), position
            others = torch.ones(length, dtype=torch.bool, device="cuda")
            others[position] = False
            assert torch.equal(kc[:, :, others], k_cache[:, :, others])
            assert torch.equal(vc[:, :, others], v_cache[:, :, others])
        # captured once, replayed at another position with new inputs
        x_in = torch.randn(1, 1, hidden, device="cuda", dtype=torch.bfloat16)
        xn, part = ic.norm_input(x_in, norm_w)
        pos, (cos, sin) = torch.tensor(5, device="cuda"), rotary(5)
        kc, vc = k_cache.clone(), v_cache.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            ic.put(group, "norm", (part, 1e-5))
            ic.qkv_rope(group, xn, cos, sin, kc, vc, pos)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=s):
            q_out = ic.qkv_rope(group, xn, cos, sin, kc, vc, pos)
        ic.put(group, "norm", None)
        x_new = torch.randn(1, 1, hidden, device="cuda", dtype=torch.bfloat16)
        xn2, part2 = ic.norm_input(x_new, norm_w)
        xn.copy_(xn2)
        part.copy_(part2)
        pos.fill_(211)
        c2, s2 = rotary(211)
        cos.copy_(c2)
        sin.copy_(s2)
        graph.replay()
        torch.cuda.synchronize()
        want_q, want_k, want_v = expected(xn2, part2, 211)
        assert close(q_out, want_q) and close(kc[0, :, 211], want_k) and close(vc[0, :, 211], want_v)


def test_reloading_a_fast_model_reuses_its_streams_and_leaves_no_memory_behind(checkpoint):
    """PyTorch keeps a cuBLAS workspace per stream it ever ran on: a fast runner's streams come from a pool, so
    loading, running and unloading a fast model again and again does not grow the process."""
    streams, after = [], []
    for _ in range(3):
        lm = load(checkpoint, _method("bf16-fast"), "cuda")
        collect(lm, GenerationSettings(max_new_tokens=2))
        streams.append(lm.fast_runner.stream)
        backend_of(lm).unload(lm)
        del lm
        gc.collect()
        torch.cuda.empty_cache()
        after.append(torch.cuda.memory_allocated())
    assert streams[0] == streams[1] == streams[2]
    assert after[2] <= after[0] + (1 << 20), after


@pytest.mark.parametrize("loaded", ["bf16", "nf4"], indirect=True)
def test_cancel_stops_a_gpu_run(loaded):
    cancel = threading.Event()
    got = 0
    for ev in run(loaded, STORY, GenerationSettings(max_new_tokens=400, temperature=0.0), cancel):
        if isinstance(ev, TokenEvent) and ev.token_id is not None:
            got += 1
            if got == 3:
                cancel.set()
        elif isinstance(ev, RunMetrics):
            assert ev.finish_reason == "cancelled" and 3 <= ev.tokens <= 6


def _gguf_for_gpu() -> str:
    """The GGUF the llama.cpp test loads: ``QS_GPU_GGUF`` (e.g. the random checkpoint converted by
    ``bench/gpu_llama_cpp.sh``), else the embedded model where its package is installed."""
    path = os.environ.get("QS_GPU_GGUF", "").strip()
    if path:
        assert Path(path).is_file(), f"QS_GPU_GGUF={path} is not a file"
        return path
    from engine import embedded

    try:
        embedded.gguf_path()
    except Exception as e:  # noqa: BLE001 - the package is absent on the GPU machine
        pytest.skip(f"no GGUF file here (set QS_GPU_GGUF, see bench/gpu_llama_cpp.sh): {e}")
    return "embedded"


def test_llama_cpp_on_gpu_or_says_why():
    quant = parse_load_method("gguf")
    try:
        backend_for(quant)
    except BackendUnavailableError as e:
        assert "llama" in str(e)  # the UI shows this reason
        pytest.skip(str(e))
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        pytest.skip("llama-cpp-python here is a CPU build (no CUDA offload)")
    source = _gguf_for_gpu()
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info()[0]
    lm = load(source, quant, "cuda")
    try:
        # every layer offloaded, and the weights really went to the GPU (llama.cpp allocates outside PyTorch, in
        # this process: the device's free memory drops by at least the weights)
        assert lm.info.get("n_gpu_layers") == -1 and lm.device.startswith("cuda"), lm.info
        taken = free_before - torch.cuda.mem_get_info()[0]
        assert taken >= 0.9 * lm.weights_bytes, (taken, lm.weights_bytes)
        _, m, _ = collect(lm, GenerationSettings(max_new_tokens=32))
        assert m.tokens >= 1
        print(f"llama.cpp on {torch.cuda.get_device_name()}: {lm.info.get('file_type')} {lm.weights_bytes / 2**20:.0f} MiB "
              f"weights, {taken / 2**20:.0f} MiB taken on the device, {m.tokens} tokens at {m.tokens_per_s or 0:.1f} tok/s; "
              f"peak {m.peak_kind} {(m.peak_bytes or 0) / 2**20:.0f} MiB, predicted {(m.predicted_bytes or 0) / 2**20:.0f} MiB")
    finally:
        backend_of(lm).unload(lm)


def test_oom_during_generation_is_a_domain_error_and_the_next_run_works(checkpoint):
    """A real CUDA OOM: cap this process's allocator just above the loaded weights, then ask for a long prompt."""
    from engine.manager import ModelManager

    mgr = ModelManager()
    lm = mgr.get(checkpoint, "bf16", "cuda")
    total = torch.cuda.get_device_properties(0).total_memory
    cap = (torch.cuda.memory_allocated() + 64 * 2**20) / total
    long_prompt = "bread " * 6000
    try:
        torch.cuda.set_per_process_memory_fraction(cap)
        with pytest.raises(OutOfMemoryDuringGenerationError) as ei:
            for _ in mgr.generate(checkpoint, "bf16", long_prompt, GenerationSettings(max_new_tokens=4), device="cuda"):
                pass
        assert "out of memory" in str(ei.value).lower() and "/tmp" not in str(ei.value)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert not lm.loaded and len(mgr) == 0  # freed
    events = list(mgr.generate(checkpoint, "bf16", STORY, GenerationSettings(max_new_tokens=4), device="cuda"))
    assert isinstance(events[-1], RunMetrics) and events[-1].tokens >= 1
    mgr.unload_all()
