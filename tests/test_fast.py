"""The fast decode path on CPU with the embedded model (its CUDA half is in tests/test_gpu.py).

``hqq4-fast`` = HQQ 4-bit codes on PyTorch's own int4 kernel + a static KV cache; ``bf16-fast`` = the static cache
alone (on CUDA both also capture the step in a CUDA graph). Same weights; the same greedy tokens as the plain path
except where two candidates are tied within bf16 rounding (pinned below).
"""
from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("hqq")

from engine.backends import backend_of, load, parse_load_method  # noqa: E402
from engine.backends import int4, runners  # noqa: E402
from engine.backends.base import GenerationSettings, TokenEvent  # noqa: E402
from engine.compare import pane_quant  # noqa: E402
from engine.errors import InputError  # noqa: E402
from engine.generation import RunMetrics, run  # noqa: E402

PROMPT = "What is the capital of France?"


def _hqq(in_f=576, out_f=1536, bits=4, group_size=64, dtype=torch.bfloat16, bias=False, seed=0):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias).to(dtype)
    return HQQLinear(lin, BaseQuantizeConfig(nbits=bits, group_size=group_size), compute_dtype=dtype, device="cpu")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (4096, 1024)])
def test_int4_layer_computes_what_hqq_dequantizes(shape, bias):
    h = _hqq(*shape, bias=bias)
    x = torch.randn(3, 5, shape[0], dtype=torch.bfloat16)
    ref = x.float() @ h.dequantize().float().T + (h.bias.float() if bias else 0)
    with torch.inference_mode():
        got = int4.from_hqq(h)(x)
        hqq_path = h(x)
    assert got.shape == hqq_path.shape == (3, 5, shape[1]) and got.dtype == torch.bfloat16
    scale = ref.abs().max().item()
    # bf16 rounding of the scale, the folded zero and the output: well under 1% of the range (a wrong nibble
    # order, zero formula or group layout gives errors of the order of the range itself)
    assert (got.float() - ref).abs().max().item() < 0.01 * scale
    assert (got.float() - hqq_path.float()).abs().max().item() < 0.01 * scale


def test_int4_refuses_what_the_kernel_cannot_take_with_the_reason():
    assert int4.why_not(_hqq(), "cpu") is None
    assert "4-bit only" in int4.why_not(_hqq(bits=3), "cpu")
    assert "group sizes" in int4.why_not(_hqq(group_size=16), "cpu")
    assert "bf16" in int4.why_not(_hqq(dtype=torch.float16), "cpu")
    assert "multiple of 8 output" in int4.why_not(_hqq(576, 1540), "cpu")
    assert "groups within a row" in int4.why_not(_hqq(608, 1536, group_size=64), "cpu")


def test_fast_method_names():
    q = parse_load_method("hqq4-fast")
    assert (q.method, q.bits, q.fast, q.label) == ("hqq", 4, True, "hqq4/g64 fast")
    assert parse_load_method("bf16 fast").fast and parse_load_method("fp16+fast").label == "fp16 fast"
    assert not parse_load_method("hqq4").fast
    assert pane_quant("hqq4 fast") == q
    for bad in ("nf4-fast", "hqq3-fast", "gguf fast", "int8 fast"):
        with pytest.raises(InputError, match="fast decode path is for"):
            parse_load_method(bad)
    with pytest.raises(InputError, match="bf16"):
        parse_load_method("hqq4-fast", dtype="fp16")


def test_this_transformers_supports_the_fast_path():
    assert runners.static_unavailable() is None


@pytest.fixture(scope="module")
def models():
    out = {m: load("embedded", m, "cpu") for m in ("bf16", "bf16-fast", "hqq4", "hqq4-fast")}
    yield out
    for lm in out.values():
        backend_of(lm).unload(lm)


def collect(lm, settings, cancel=None, stop_after=None):
    ids, metrics = [], None
    for ev in run(lm, PROMPT, settings, cancel):
        if isinstance(ev, RunMetrics):
            metrics = ev
        elif ev.token_id is not None:
            ids.append(ev.token_id)
            if stop_after and len(ids) == stop_after:
                cancel.set()
    return ids, metrics


def test_fast_path_gives_the_plain_paths_tokens(models):
    s = GenerationSettings(max_new_tokens=24)
    for plain, fast in (("bf16", "bf16-fast"), ("hqq4", "hqq4-fast")):
        ids_p, m_p = collect(models[plain], s)
        ids_f, m_f = collect(models[fast], s)
        assert ids_f == ids_p, (plain, ids_p, ids_f)
        assert m_p.decode_path == "plain"
        assert m_f.decode_path.startswith("fast: static cache")
        assert "Paris" in m_f.text
        assert models[fast].weights_bytes == models[plain].weights_bytes  # storage is unchanged
    assert models["hqq4-fast"].info["hqq_backend"] == "int4 kernel"
    assert models["hqq4"].info["hqq_backend"] == "pytorch"


def test_where_fast_and_plain_greedy_part_it_is_a_bf16_near_tie(models):
    """Same weights, another accumulation order (a static cache of masked positions): greedy text can part at a
    near-tie. On this prompt it does at token 3 ("flashes" 25.125 vs "in" 25.0 in bf16: one bf16 step at that
    magnitude); the teacher-forced logits there must show such a tie, and both paths' picks must be the top 2."""
    prompt = "Explain in three sentences why a lighthouse flashes in a pattern."
    s = GenerationSettings(max_new_tokens=12)

    def ids_of(lm):
        return [e.token_id for e in run(lm, prompt, s) if isinstance(e, TokenEvent) and e.token_id is not None]

    plain, fast = ids_of(models["bf16"]), ids_of(models["bf16-fast"])
    if plain == fast:
        return  # no near-tie met on this build: nothing to explain
    k = next(i for i, (a, b) in enumerate(zip(plain, fast)) if a != b)
    lm = models["bf16"]
    prefix = backend_of(lm).chat_ids(lm, prompt, s) + plain[:k]
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([prefix])).logits[0, -1].float()
    top2 = logits.topk(2)
    assert {plain[k], fast[k]} == set(top2.indices.tolist()), (k, plain[k], fast[k], top2)
    step = 2.0 ** (torch.floor(torch.log2(top2.values[0].abs())) - 7)  # bf16 spacing at that magnitude
    assert (top2.values[0] - top2.values[1]).item() <= 2 * step.item(), top2


def test_fast_runner_is_one_per_model_grows_and_falls_back_when_busy(models):
    lm = models["bf16-fast"]
    r = runners.acquire(lm, 10, 20)
    try:
        assert r is lm.fast_runner and r.max_len == runners.LEN_STEP
        assert runners.acquire(lm, 10, 20) is None  # held by "another run"
        ids, m = collect(lm, GenerationSettings(max_new_tokens=6))
        assert m.decode_path.startswith("plain (the fast path was busy")
        assert len(ids) == 6
    finally:
        r.release()
    big = runners.acquire(lm, runners.LEN_STEP, 20)  # needs more positions than the model's runner holds
    big.release()
    assert big is lm.fast_runner and big is not r and big.max_len == 2 * runners.LEN_STEP
    # the calculator is asked about what the static cache holds, not the run's length
    assert backend_of(lm).runtime_spec(lm, 40).context == big.max_len
    ids, m = collect(lm, GenerationSettings(max_new_tokens=8))
    assert m.decode_path.startswith("fast") and len(ids) == 8


def test_fast_run_can_be_cancelled_and_frees_its_runner(models):
    lm = models["hqq4-fast"]
    cancel = threading.Event()
    ids, m = collect(lm, GenerationSettings(max_new_tokens=200, temperature=0.7, seed=1), cancel, stop_after=3)
    assert m.finish_reason == "cancelled" and 3 <= len(ids) <= 5
    r = runners.acquire(lm, 10, 10)
    assert r is not None
    r.release()


def test_fast_sampling_with_a_seed_is_reproducible(models):
    s = GenerationSettings(max_new_tokens=16, temperature=0.8, seed=7)
    a, _ = collect(models["hqq4-fast"], s)
    b, _ = collect(models["hqq4-fast"], s)
    c, _ = collect(models["hqq4-fast"], GenerationSettings(max_new_tokens=16, temperature=0.8, seed=8))
    # (not compared with plain hqq4: the two kernels round differently in bf16, which moves samples, not argmaxes)
    assert a == b and a != c


def test_stream_events_are_tokens(models):
    evs = list(backend_of(models["bf16-fast"]).stream(models["bf16-fast"], PROMPT, GenerationSettings(max_new_tokens=4)))
    assert all(isinstance(e, TokenEvent) for e in evs) and len([e for e in evs if e.token_id is not None]) == 4


def _decode(lm, settings, eos=frozenset(), depth=1, not_ready=0):
    """decode_steps on the model's static runner (CPU), pipelined as on CUDA when ``depth`` > 1 (that many tokens
    in flight); with ``not_ready``, each pipelined token reports "still on the GPU" that many times first (the run
    must yield PENDING meanwhile). Returns (ids, steps launched, most tokens in flight)."""
    from engine.backends.decode import DecodeState, decode_steps
    from engine.compute import PENDING

    ids = torch.tensor([backend_of(lm).chat_ids(lm, PROMPT, settings)])
    r = runners.acquire(lm, int(ids.shape[1]), settings.max_new_tokens)
    launched, polls, flight = [], [], [0]
    step, received = r.step, r.received

    def counting_step(tok):
        launched.append(1)
        flight[0] = max(flight[0], r.in_flight())
        return step(tok)

    def counting_received():
        flight[0] = max(flight[0], r.in_flight())
        polls.clear()
        return received()

    r.step, r.received = counting_step, counting_received
    r.ready = lambda: polls.append(1) or len(polls) > not_ready
    r.depth = depth
    try:
        with torch.inference_mode():
            items = list(decode_steps(r, ids, None, settings, set(eos), DecodeState(),
                                      pending=PENDING if not_ready else None))
    finally:
        del r.step, r.ready, r.received
        r.depth = 1
        r.release()
    out = [it[0] for it in items if it is not PENDING]
    if not_ready:
        assert sum(it is PENDING for it in items) == not_ready * (len(out) if depth > 1 else 0)
    return out, len(launched), flight[0]


@pytest.mark.parametrize("settings", [GenerationSettings(max_new_tokens=12),
                                      GenerationSettings(max_new_tokens=12, temperature=0.8, seed=3)])
def test_pipelined_decode_gives_the_same_tokens(models, settings):
    """On CUDA the fast path launches the steps that follow a token before reading it (decode_steps, up to
    ``depth`` tokens in flight): the same tokens (greedy and seeded sampling), no extra step at a length stop,
    depth - 1 wasted steps at an end of sequence (fewer near the length limit)."""
    lm = models["hqq4-fast"]
    plain, n_plain, f_plain = _decode(lm, settings)
    assert len(plain) == 12 and n_plain == 11 and f_plain == 0
    for depth in (2, 5, runners.PIPELINE_DEPTH):
        piped, n_piped, f_piped = _decode(lm, settings, depth=depth)
        waited, n_waited, _ = _decode(lm, settings, depth=depth, not_ready=2)  # PENDING while the GPU works
        assert piped == plain == waited, depth
        assert n_piped == n_waited == 11 and f_piped == depth, depth
        for k in (4, 9):
            stop = plain[k]
            k = plain.index(stop)
            plain_eos, n1, _ = _decode(lm, settings, eos={stop})
            piped_eos, n2, _ = _decode(lm, settings, eos={stop}, depth=depth)
            assert plain_eos == piped_eos == plain[:k + 1], depth
            assert (n1, n2) == (k, min(k + depth - 1, 11)), depth


def test_gqa_attention_inside_compile_matches_transformers_sdpa(monkeypatch):
    """The fast path's attention (runners.gqa_attention): inside torch.compile, one query token attends the grouped
    key/value heads directly (no per-head copy of the cache) and gives transformers' SDPA result."""
    import types

    import transformers.integrations.sdpa_attention as sdpa

    torch.manual_seed(0)
    mod = types.SimpleNamespace(num_key_value_groups=3, is_causal=True, training=False)
    q = torch.randn(1, 9, 1, 64)
    k, v = torch.randn(1, 3, 40, 64), torch.randn(1, 3, 40, 64)
    mask = (torch.arange(40) <= 25).reshape(1, 1, 1, 40)
    want, _ = sdpa.sdpa_attention_forward(mod, q, k, v, mask, scaling=0.125)

    def no_copy(*a, **kw):
        raise AssertionError("repeat_kv called: the grouped path was not taken")

    monkeypatch.setattr(sdpa, "repeat_kv", no_copy)
    torch._dynamo.reset()
    got, _ = torch.compile(lambda q, k, v, m: runners.gqa_attention(mod, q, k, v, m, scaling=0.125),
                           backend="eager", fullgraph=True)(q, k, v, mask)
    assert got.shape == want.shape == (1, 1, 9, 64)
    assert torch.allclose(got, want, atol=1e-5)


def test_captured_step_attends_only_its_bucket_of_positions_with_one_compilation():
    """Inside torch.compile, a step given ``kv_bucket`` (StaticRunner: a graph per bucket of positions) attends the
    cache's first n positions only (here the rest is NaN and unmasked: it must not be read), and buckets of other
    lengths reuse the one compilation (the length is the only dynamic size)."""
    import types

    import transformers.integrations.sdpa_attention as sdpa

    torch.manual_seed(0)
    for groups in (3, 1):  # grouped heads, and a model without (transformers' SDPA path after the cut)
        mod = types.SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=False)
        q = torch.randn(1, 9, 1, 64)
        k, v = torch.randn(1, 9 // groups, 40, 64), torch.randn(1, 9 // groups, 40, 64)
        k[:, :, 30:], v[:, :, 30:] = float("nan"), float("nan")
        mask = torch.ones(1, 1, 1, 40, dtype=torch.bool)  # a mask that would let the NaN in
        compiled = []

        def backend(gm, _example):
            compiled.append(gm)
            return gm.forward

        torch._dynamo.reset()
        step = torch.compile(lambda q, k, v, m, b: runners.gqa_attention(mod, q, k, v, m, scaling=0.125, kv_bucket=b),
                             backend=backend, fullgraph=True)
        for n in (26, 30, 17):
            bucket = torch.empty(n, dtype=torch.uint8)
            torch._dynamo.mark_dynamic(bucket, 0)
            got, _ = step(q, k, v, mask, bucket)
            want, _ = sdpa.sdpa_attention_forward(mod, q, k[:, :, :n], v[:, :, :n], mask[..., :n], scaling=0.125)
            assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-5), (groups, n)
        assert len(compiled) == 1, groups


# ---- our CUDA int4 GEMV (engine/backends/int4_cuda.py): its layout and arithmetic, checked on CPU; the kernel
# itself runs in tests/test_gpu.py ----

def _mma_fragment(lane: int, i: int, j: int):
    """Which (row within the tile, feature within the group) nibble ``j`` of word ``i`` of ``lane`` feeds, read
    off PTX's m16n8k16 A-fragment layout as the kernel builds it: register ``a_m`` = ``(w >> 4m) & 0x000F000F |
    0x43004300``, whose low / high bf16 are (row g + 8 (m & 1), column 2t + 8 (m >> 1)) / the next column; the
    16 columns of word i are features 16i .. 16i + 15 of the group."""
    g, t = lane // 4, lane % 4
    m, high = j % 4, j // 4  # nibble j is bit 4j: register a_(j % 4), its high half when j >= 4
    return g + 8 * (m & 1), 16 * i + 2 * t + 8 * (m >> 1) + high


def test_int4_gemv_layout_is_the_tensor_cores_fragment_order():
    from engine.backends import int4_cuda as ic

    n, k = ic.PACK_ROWS + 48, 640  # packed in row chunks: a chunk and a ragged one; 10 groups
    feat = torch.arange(k).expand(n, k)
    q = ((feat * 7 + torch.arange(n)[:, None] * 5 + feat // 64) % 16).to(torch.uint8)  # tells rows, features apart
    words = ic.pack(q)
    assert words.shape == (n, k // 8) and words.dtype == torch.int32
    assert torch.equal(ic.unpack(words), q)
    into = torch.zeros((n + 32, k // 8), dtype=torch.int32)
    ic.pack(q, out=into[16:n + 16])  # rows of a stacked layer
    assert torch.equal(into[16:n + 16], words) and not into[:16].any() and not into[-16:].any()
    flat = words.reshape(-1)
    # tile T, group G, lane l: the lane's 16-byte load is words (T * groups + G) * 128 + 4 l .. + 3
    for tile, grp, lane in ((0, 0, 0), (1, 3, 5), (n // 16 - 1, 9, 31), (64, 2, 18)):
        for i in range(4):
            word = int(flat[((tile * (k // 64) + grp) * 32 + lane) * 4 + i]) & 0xFFFFFFFF
            for j in range(8):
                row, col = _mma_fragment(lane, i, j)
                assert (word >> (4 * j)) & 0xF == int(q[tile * 16 + row, grp * 64 + col]), (tile, grp, lane, i, j)
    # whole tiles: rows sliced at multiples of 16 are the same tiles (sibling projections are stacked that way)
    assert torch.equal(ic.unpack(words[32:80]), q[32:80])


def test_int4_gemv_scales_are_stored_where_a_lane_group_reads_them_and_the_zero_term_is_tinygemms():
    from engine.backends import int4_cuda as ic

    n, g = 32, 10
    s = torch.rand(n, g) * 0.01 + 1e-3
    z = torch.rand(n, g) * 15
    sz = ic.pack_sz(s, z)
    assert sz.shape == (n, g, 2) and sz.dtype == torch.bfloat16
    assert torch.equal(ic.unpack_sz(sz)[..., 0], s.to(torch.bfloat16))
    assert torch.equal(ic.unpack_sz(sz)[..., 1], ((8 - z) * s).to(torch.bfloat16))
    # lanes 4g..4g+3 of (tile T, group G) read 8 bytes at uint2 index (T * groups + G) * 8 + g: (s, t) of rows g, g+8
    flat = sz.reshape(-1, 4)
    for tile, grp, gg in ((0, 0, 0), (1, 7, 3), (1, 9, 7)):
        got = flat[(tile * g + grp) * 8 + gg]
        r = tile * 16 + gg
        want = torch.stack([s[r, grp], (8 - z[r, grp]) * s[r, grp], s[r + 8, grp], (8 - z[r + 8, grp]) * s[r + 8, grp]])
        assert torch.equal(got, want.to(torch.bfloat16))


def _kernel_arithmetic(x, words, sz):
    """What the kernel computes, in fp32 on CPU: codes read as the bf16 ``128 + q`` (their bits OR'ed into
    0x4300), a tensor-core product per group with the inputs (bf16 in, fp32 sums), the inputs' sum per group (the
    all-ones mma), and per group s * d + ((8 - z) s - 136 s) * sum(x)."""
    from engine.backends import int4_cuda as ic

    q = ic.unpack(words).to(torch.int16)
    n, k = q.shape
    a = (q | 0x4300).view(torch.bfloat16).float().reshape(n, k // 64, 64)  # 128 + q, exactly
    xg = x.float().reshape(k // 64, 64)
    d = (a * xg).sum(-1)  # [N, groups]
    e = xg.sum(-1)
    pairs = ic.unpack_sz(sz).float()
    s, zt = pairs[..., 0], pairs[..., 1]
    return (s * d + (zt - 136 * s) * e).sum(-1)


def test_int4_gemv_arithmetic_gives_hqqs_matmul():
    from engine.backends import int4_cuda as ic

    # a code OR'ed into the bits of bf16 128.0 is 128 + q exactly, for every code
    q = torch.arange(16, dtype=torch.int16)
    assert torch.equal((q | 0x4300).view(torch.bfloat16).float(), 128 + q.float())
    h = _hqq(2048, 96, seed=3)
    qc, s, z, _ = int4.codes(h)
    words, sz = ic.pack(qc), ic.pack_sz(s, z)
    x = (torch.randn(2048) * 4).to(torch.bfloat16)
    ref = x.float() @ h.dequantize().float().T
    got = _kernel_arithmetic(x, words, sz)
    assert (got - ref).abs().max().item() < 0.01 * ref.abs().max().item()
    assert (ic.dequantize(words, sz).float() - h.dequantize().float()).abs().max().item() < 0.01 * \
        h.dequantize().float().abs().max().item()


def test_int4_gemv_says_what_it_cannot_take():
    from engine.backends import int4_cuda as ic

    assert "group size 64, not 128" in ic.why_not(4096, 4096, 128)
    assert "multiple of 16 output features, not 100" in ic.why_not(100, 576, 64)
    assert "multiple of 64 input features, not 600" in ic.why_not(1536, 600, 64)
    if not torch.cuda.is_available():
        assert ic.why_not(1536, 576, 64) == ic.why_not(4096, 4096, 64) == ic.available() == "no CUDA device"


def test_decode_attention_says_what_it_cannot_take_and_changes_nothing_where_it_cannot_run(monkeypatch):
    """The one-launch decode attention (CUDA, tests/test_gpu.py runs it): the shapes it refuses, with the reason;
    on a machine without CUDA (or turned off) the runner's preparation registers nothing on the model, and a
    module without its counters never goes to it."""
    from engine.backends import decode_attention as da

    assert "bf16, not torch.float16" in da.why_not(32, 8, 128, torch.float16)
    assert "head dimensions (64, 128), not 96" in da.why_not(32, 8, 96)
    assert "up to 8 query heads per key/value head, not 32 over 2" in da.why_not(32, 2, 128)
    assert "not 30 over 4" in da.why_not(30, 4, 128)
    model = _tiny("llama")  # 4 query heads over 2 key/value heads of 32 features: a shape the kernel refuses
    assert "head dimensions" in da.prepare(model, "cuda")
    monkeypatch.setenv("QUANTSCOPE_DECODE_ATTN", "0")
    assert da.prepare(model, "cuda") == "turned off (QUANTSCOPE_DECODE_ATTN=0)"
    monkeypatch.delenv("QUANTSCOPE_DECODE_ATTN")
    assert da.prepare(model, "cpu") == "CUDA only"
    if not torch.cuda.is_available():
        assert da.why_not(32, 8, 128) == "no CUDA device"
    assert not any(da.COUNTERS in m._buffers for m in model.modules())
    attn = model.model.layers[0].self_attn
    q = torch.zeros(1, 4, 1, 32, dtype=torch.bfloat16)
    kv = torch.zeros(1, 2, 8, 32, dtype=torch.bfloat16)
    assert not da.usable(attn, q, kv, kv, None)  # no counters
    attn.register_buffer(da.COUNTERS, torch.zeros(2, dtype=torch.int32), persistent=False)
    mask = torch.ones(1, 1, 1, 8, dtype=torch.bool)
    assert da.usable(attn, q, kv, kv, mask) and da.usable(attn, q, kv, kv, None)
    assert not da.usable(attn, q.float(), kv, kv, mask)  # bf16 only
    assert not da.usable(attn, torch.zeros(1, 4, 2, 32, dtype=torch.bfloat16), kv, kv, mask)  # one query token
    assert not da.usable(attn, q, kv, kv, torch.zeros(1, 1, 1, 8))  # a float mask
    assert not da.usable(attn, q, kv.transpose(2, 3), kv, mask)  # positions' features not contiguous
    r = runners.StaticRunner(model, 16, "cpu")
    assert not r.own_attention
    # past LONGEST positions the op answers with SDPA (no kernel needed: this runs on a CPU), counters untouched
    n = da.LONGEST + 1
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 32, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(1, 2, n, 32, generator=g).to(torch.bfloat16) for _ in range(2))
    mask = torch.rand(1, 1, 1, n, generator=g) > 0.3
    counters = torch.zeros(2, dtype=torch.int32)
    got = da.attend(q, k, v, mask, counters, 0.25, 8)
    want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(2, 1),
                                                            v.float().repeat_interleave(2, 1), attn_mask=mask,
                                                            scale=0.25).transpose(1, 2)
    assert got.shape == (1, 1, 4, 32) and got.is_contiguous() and counters.eq(0).all()
    assert (got.float() - want).abs().max().item() < 0.01


class _ReferenceKernel:
    """The CUDA extension's ``mm`` (engine/backends/int4_cuda.py) as PyTorch on CPU, where the kernel cannot run:
    ``x @ dequantize(W).T`` in fp32, rounded to bf16 where the kernel rounds. Decode calls (``chunk_rows`` 0) may
    fold in an RMSNorm (x comes times the norm's weight; the sums are scaled by ``rsqrt(mean(x^2) + eps)`` from
    the partial sums of squares ``norm_part``), a residual add (``res + bf16(y)``, and with ``next_w`` the next
    norm's input: ``bf16(y * next_w)`` and y's partial sums of squares) or SiLU(gate) * up of rows interleaved 8 by
    8; ``calls`` records each call's (tokens, norm, residual, next_w, act)."""

    def __init__(self):
        self.calls = []

    def mm(self, x, w, sz, warps, loads, chunk_rows, norm_part, eps, residual, next_w, act):
        from engine.backends import int4_cuda as ic

        assert (warps, loads) == (4, 2) and chunk_rows == ic.chunk_rows(x.shape[0], x.shape[1])
        fusions = (norm_part is not None, residual is not None, next_w is not None, act)
        assert not chunk_rows or not any(fusions)
        self.calls.append((x.shape[0], *fusions))
        y = x.float() @ ic.dequantize(w, sz).float().T
        if norm_part is not None:
            y = y * torch.rsqrt(norm_part.sum(0) / x.shape[1] + eps)[:, None]
        y = y.to(torch.bfloat16)
        if act:
            v = y.float().unflatten(-1, (-1, 2, 8))
            a = torch.nn.functional.silu(v[..., 0, :]).to(torch.bfloat16).float()
            return [(a * v[..., 1, :]).flatten(-2).to(torch.bfloat16)]
        if residual is not None:
            y = (residual.float() + y.float()).to(torch.bfloat16)
        if next_w is None:
            return [y]
        return [y, (y.float() * next_w.float()).to(torch.bfloat16),
                y.float().pow(2).reshape(y.shape[0], -1, 16).sum(-1).T.contiguous()]

    def mm_rope(self, x, w, sz, warps, loads, norm_part, eps, cos, sin, k_cache, v_cache, pos, q_rows, hd):
        """The q+k+v call with RoPE folded in: the stacked product (q/k rows stored in int4_cuda.rope_order), each
        q/k feature rotated with its partner as transformers' apply_rotary_pos_emb does (fp32 from the rounded
        outputs, rounded once), k and v written into the caches at ``pos`` + token; returns q."""
        from engine.backends import int4_cuda as ic

        self.calls.append((x.shape[0], "rope"))
        y = self.mm(x, w, sz, warps, loads, 0, norm_part, eps, None, None, False)[0]
        self.calls.pop()
        kv = (y.shape[1] - q_rows) // 2
        qk = ic.rope_unorder(y[:, :q_rows + kv], hd).float().unflatten(-1, (-1, hd))  # [M, heads, hd]
        rot = torch.cat([-qk[..., hd // 2:], qk[..., :hd // 2]], dim=-1)
        qk = (qk * cos.float()[:, None] + rot * sin.float()[:, None]).to(torch.bfloat16)
        p = int(pos) + torch.arange(x.shape[0])
        k_cache[0, :, p] = qk[:, q_rows // hd:].transpose(0, 1)
        v_cache[0, :, p] = y[:, q_rows + kv:].unflatten(-1, (-1, hd)).transpose(0, 1)
        return qk[:, :q_rows // hd].flatten(1)


@pytest.fixture()
def reference_kernel(monkeypatch):
    """Our CUDA GEMV's Python side on CPU: the extension replaced by :class:`_ReferenceKernel`, every layer shape
    on launch configuration (4, 2)."""
    from engine.backends import int4_cuda as ic

    ref = _ReferenceKernel()
    monkeypatch.setattr(ic, "_ext", lambda: ref)
    monkeypatch.setattr(ic, "_config", lambda n, k, device, mode="": (4, 2))
    return ref


def test_our_gemv_layers_and_fused_siblings_route_rows_right(reference_kernel):
    """The Python side of the CUDA GEMV on CPU: the kernel is absent here (no GPU), so the extension is replaced by
    its reference arithmetic (x @ dequantize(W).T); the layers, biases and the q/k/v fusion around it are real."""
    from engine.backends import int4_cuda as ic

    mod = torch.nn.Module()
    names, hs = ("q_proj", "k_proj", "v_proj"), []
    for name, out_f, seed in zip(names, (64, 16, 16), (1, 2, 3)):
        hs.append(_hqq(1024, out_f, bias=True, seed=seed))
        q, s, z, bias = int4.codes(hs[-1])
        setattr(mod, name, ic.from_codes(q, s, z, bias, config=(4, 2)))
    with torch.inference_mode():
        for tokens in (1, 5, ic.DEQUANT_MIN_TOKENS):
            x = torch.randn(1, tokens, 1024, dtype=torch.bfloat16)
            want = [getattr(mod, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
            ref = x.float() @ ic.dequantize(mod.k_proj.words, mod.k_proj.sz).float().T + mod.k_proj.bias.float()
            assert want[1].shape == (1, tokens, 16)
            assert (want[1].float() - ref).abs().max().item() < 0.01 * ref.abs().max().item()
            fused = torch.nn.Module()
            group = ic.fuse_codes(fused, names, [64, 16, 16], (int4.codes(h) for h in hs))
            assert fused.fused_q_k_v is group and isinstance(fused.k_proj, ic._Part)
            assert torch.equal(group.linear.words, torch.cat([getattr(mod, n).words for n in names]))
            assert torch.equal(group.linear.sz, torch.cat([getattr(mod, n).sz for n in names]))
            in_order = [fused.q_proj(x)]
            # a decode step computes the siblings' rows at once; a prompt each sibling's own (no stacked output
            # held while the others are computed and used)
            assert (ic.get(fused.fused_q_k_v, "stacked") is None) == (tokens >= ic.DEQUANT_MIN_TOKENS), tokens
            in_order += [fused.k_proj(x), fused.v_proj(x)]
            assert ic.get(fused.fused_q_k_v, "stacked") is None  # the last sibling let go of the stacked output
            alone = [fused.v_proj(x), fused.k_proj(x), fused.q_proj(x)]
            ic.put(fused.fused_q_k_v, "stacked", None)
            for a, b in zip(want, in_order):
                assert torch.equal(a, b)
            for a, b in zip(want[::-1], alone):
                assert torch.equal(a, b)


def test_gate_and_up_rows_are_interleaved_eight_by_eight_and_the_kernel_output_is_silu_gate_times_up(
        reference_kernel):
    from engine.backends import int4_cuda as ic

    gate, up = _hqq(256, ic.PACK_ROWS + 48, seed=4), _hqq(256, ic.PACK_ROWS + 48, seed=5)  # a ragged pack chunk
    lin = ic.gate_up_from_codes(int4.codes(gate), int4.codes(up))
    qg, qu = int4.codes(gate)[0], int4.codes(up)[0]
    got = ic.unpack(lin.words)
    assert got.shape == (2 * qg.shape[0], 256) and lin.mode == "act" and lin.out_features == qg.shape[0]
    for tile in (0, 3, got.shape[0] // 16 - 1):
        assert torch.equal(got[16 * tile:16 * tile + 8], qg[8 * tile:8 * tile + 8])
        assert torch.equal(got[16 * tile + 8:16 * tile + 16], qu[8 * tile:8 * tile + 8])
    sz_g, sz_u = (ic.unpack_sz(ic.pack_sz(*int4.codes(h)[1:3])) for h in (gate, up))
    assert torch.equal(ic.unpack_sz(lin.sz), ic.interleave8(sz_g, sz_u))
    with torch.inference_mode():
        for tokens in (1, 5, ic.DEQUANT_MIN_TOKENS):  # the kernel's epilogue; a prompt's PyTorch ops (silu_mul)
            x = torch.randn(tokens, 256, dtype=torch.bfloat16)
            g = (x.float() @ gate.dequantize().float().T).to(torch.bfloat16)
            u = (x.float() @ up.dequantize().float().T).to(torch.bfloat16)
            want = torch.nn.functional.silu(g) * u
            y = lin(x)
            assert y.shape == want.shape
            assert (y.float() - want.float()).abs().max().item() < 0.02 * want.float().abs().max().item(), tokens
    with pytest.raises(ValueError, match="same shape"):
        ic.gate_up_from_codes(int4.codes(gate), int4.codes(_hqq(256, 64)))


def test_a_norm_input_and_its_partial_sums_give_transformers_rmsnorm():
    """What a fused GEMV is given for an RMSNorm (int4_cuda.norm_input: x * weight and 16-feature sums of squares)
    and the factor it applies (rms_scale) make transformers' LlamaRMSNorm, within bf16 rounding."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from engine.backends import int4_cuda as ic

    norm = LlamaRMSNorm(576, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(576) + 0.5)
    h = (torch.randn(2, 3, 576) * 4).to(torch.bfloat16)
    xn, part = ic.norm_input(h, norm.weight)
    assert xn.shape == h.shape and part.shape == (576 // 16, 6) and part.dtype == torch.float32
    assert torch.equal(part.sum(0), h.float().pow(2).sum(-1).reshape(6)) or \
        torch.allclose(part.sum(0), h.float().pow(2).sum(-1).reshape(6), rtol=1e-6)
    got = xn.reshape(6, 576).float() * ic.rms_scale(part, 576, 1e-5)
    want = norm(h).reshape(6, 576).float()
    assert (got - want).abs().max().item() <= 2 ** -7 * want.abs().max().item()


def _tiny(arch: str, hidden: int = 128):
    import transformers as tf

    cfg = dict(hidden_size=hidden, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
               num_hidden_layers=2, vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-5)
    config = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch](**cfg)
    torch.manual_seed(11)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    with torch.no_grad():  # norms away from 1, so a norm weight applied twice or not at all shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand_like(p) + 0.5)
    return model


def _quantized_copies(model):
    """(the model with every projection replaced by HQQ's dequantized weight in a plain Linear: the plain path's
    arithmetic; HQQ codes of each projection by module name)."""
    import copy

    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    plain, hqq = copy.deepcopy(model), {}
    for name, mod in list(plain.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                h = HQQLinear(child, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=torch.bfloat16,
                              device="cpu", del_orig=False)
                hqq[f"{name}.{child_name}"] = h
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                lin = lin.to(torch.bfloat16)
                with torch.no_grad():
                    lin.weight.copy_(h.dequantize())
                    if child.bias is not None:
                        lin.bias.copy_(child.bias)
                setattr(mod, child_name, lin)
    return plain, hqq


def _on_our_gemv(model, hqq, fuse_layers: bool):
    """A copy of ``model`` on our GEMV as ``int4.convert`` builds it on CUDA: q/k/v stacked (stored for the RoPE
    fold where ``int4_fusion.rope_head_dim`` says so), gated MLP, o_proj; with ``fuse_layers`` the decoder layers
    fused too."""
    import copy

    from engine.backends import int4_cuda as ic
    from engine.backends import int4_fusion as fu

    ours = copy.deepcopy(model)
    for i, layer in enumerate(ours.model.layers):
        p = f"model.layers.{i}"
        attn = layer.self_attn
        qkv = [hqq[f"{p}.self_attn.{n}"] for n in ("q_proj", "k_proj", "v_proj")]
        sizes = [h.meta["shape"][0] for h in qkv]
        ic.fuse_codes(attn, ("q_proj", "k_proj", "v_proj"), sizes, (int4.codes(h) for h in qkv),
                      rope_head_dim=fu.rope_head_dim(attn, sizes, qkv[0].bias is not None))
        attn.o_proj = ic.from_codes(*int4.codes(hqq[f"{p}.self_attn.o_proj"]))
        layer.mlp = fu.gated_mlp(*(int4.codes(hqq[f"{p}.mlp.{n}"]) for n in ("gate_proj", "up_proj", "down_proj")))
        assert fu.why_not_layer(layer) is None
    if fuse_layers:
        assert fu.fuse_decoder_layers(ours) == (len(ours.model.layers), {})
        assert fu.fuse_decoder_layers(ours) == (0, {})  # fused layers are not fused again
    return ours


@pytest.mark.parametrize("arch,hidden", [("llama", 128), ("qwen2", 128), ("mistral", 128), ("llama", 256)])
def test_a_fused_decoder_layer_computes_what_transformers_layer_computes(arch, hidden, reference_kernel,
                                                                         monkeypatch):
    """Norms, residual adds and SiLU * up folded into the GEMV (engine/backends/int4_fusion.py), on the kernel's
    reference arithmetic: the whole model's logits match the plain path's (same 4-bit weights, transformers'
    layers) as closely as our GEMV without the layer fusion does, for decode-sized inputs (the kernel's fused
    epilogues) and a prompt (PyTorch's ops around cuBLAS); each fused layer makes 4 kernel calls, and hands the
    next layer its norm's input."""
    from engine.backends import int4_fusion as fu

    from engine.backends import int4_cuda as ic

    norm_inputs, norm_input = [], ic.norm_input
    monkeypatch.setattr(ic, "norm_input", lambda h, w: norm_inputs.append(1) or norm_input(h, w))
    model = _tiny(arch, hidden)
    plain, hqq = _quantized_copies(model)
    unfused, fused = _on_our_gemv(model, hqq, False), _on_our_gemv(model, hqq, True)
    # heads of 64 features (hidden 256) without q/k/v biases: q and k rows stored for the RoPE fold, which eager
    # forwards put back in the heads' order
    assert (fused.model.layers[0].self_attn.fused_q_k_v.rope is not None) == (hidden == 256 and arch != "qwen2")
    assert type(fused.model.layers[0]).__name__ == "Fused" + type(model.model.layers[0]).__name__
    assert isinstance(fused.model.layers[0].self_attn.o_proj, fu.AddsResidual)
    rel = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()  # noqa: E731
    with torch.inference_mode():
        for tokens in (1, 5, 40):
            ids = torch.randint(0, 320, (1, tokens), generator=torch.Generator().manual_seed(tokens))
            want = plain(input_ids=ids, use_cache=False, output_hidden_states=True)
            base = unfused(input_ids=ids, use_cache=False, output_hidden_states=True)
            reference_kernel.calls.clear()
            norm_inputs.clear()
            got = fused(input_ids=ids, use_cache=False, output_hidden_states=True)
            # the first layer's norm input from PyTorch's ops, the second's handed over by the first's down (a
            # prompt's o and down projections prepare the next norm's input with the same function: 3 more)
            assert len(norm_inputs) == (1 if tokens < 32 else 4), (tokens, len(norm_inputs))
            if tokens < 32:  # decode sizes: the fused kernel calls, 4 per layer
                t = tokens
                layer = [(t, True, False, False, False), (t, False, True, True, False), (t, True, False, False, True)]
                assert reference_kernel.calls == layer + [(t, False, True, True, False)] + layer + \
                    [(t, False, True, False, False)]  # the last layer's down prepares no next norm
            # every layer's output (and the logits) as close to the plain path's as without the layer fusion, up
            # to half more rounding (a prompt rounds the weighted norm input, then the normalized one; a 1% error
            # in one residual add doubles layer 0's)
            for h_got, h_base, h_want in zip(got.hidden_states + (got.logits,), base.hidden_states + (base.logits,),
                                             want.hidden_states + (want.logits,)):
                assert rel(h_got, h_want) <= 1.5 * rel(h_base, h_want) + 1e-3, (tokens, rel(h_got, h_want),
                                                                                  rel(h_base, h_want))
            agree = (got.logits.argmax(-1) == want.logits.argmax(-1)).float().mean().item()
            assert agree >= 0.8, (tokens, agree)


def test_the_rope_fold_step_attends_and_fills_the_cache_as_transformers_layers_do(reference_kernel, monkeypatch):
    """The fast path's one-token step with RoPE and the cache writes inside the q+k+v GEMV
    (int4_fusion.folded_attention), on the kernels' reference arithmetic (CPU: int4_cuda's extension replaced by
    _ReferenceKernel, the attention kernel by SDPA): after the same prompt and the same tokens, each step's logits
    and the cache's keys and values match the step through transformers' attention (same fused model, RoPE and
    cache.update as separate ops) within bf16 rounding; the fold runs once per layer and step, only where the
    runner's attention modules hold the attention kernel's counters."""
    from engine.backends import decode_attention as da

    class SdpaAttention:
        def attend(self, q, k, v, mask, counters, scale, chunks):
            # the step's own key and value (the last position the mask lets in) are in the cache before it is read
            last = int(mask.reshape(-1).nonzero().max())
            assert k[0, :, last].abs().sum() > 0 and v[0, :, last].abs().sum() > 0, "read before the cache write"
            out = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                                   scale=scale, enable_gqa=True)
            return out.transpose(1, 2).contiguous().to(q.dtype)

    monkeypatch.setattr(da, "_ext", lambda: SdpaAttention())
    model = _tiny("llama", 256)  # heads of 64 features, 2 query heads per key/value head
    plain, hqq = _quantized_copies(model)
    fused = _on_our_gemv(model, hqq, True)
    g = torch.Generator().manual_seed(3)
    prompt, steps = torch.randint(0, 320, (1, 9), generator=g), torch.randint(0, 320, (4, 1, 1), generator=g)
    bucket = torch.empty(16, dtype=torch.uint8)  # the step's attention length (9 + 4 positions used)
    runs = {}
    for fold in (False, True, "compiled"):
        if fold is True:  # what decode_attention.prepare gives each attention module on CUDA
            for m in fused.modules():
                if hasattr(m, "num_key_value_groups"):
                    m.register_buffer(da.COUNTERS, torch.zeros(2, dtype=torch.int32), persistent=False)
                    m.quantscope_attn_chunks = 4
        r = runners.StaticRunner(fused, 32, "cpu")
        step = r._forward
        if fold == "compiled":  # as the runner's step is compiled on CUDA (here without inductor's code generation:
            # the graph, its functionalized cache writes and their order are what is checked)
            torch._dynamo.reset()
            step = torch.compile(r._forward, backend="aot_eager")
            torch._dynamo.mark_dynamic(bucket, 0)
        reference_kernel.calls.clear()
        with torch.inference_mode():
            r.prefill(prompt)
            logits = [step(tok, bucket) for tok in steps]
        rope_calls = sum(1 for c in reference_kernel.calls if c[1] == "rope")
        runs[fold] = logits, r.cache.layers, rope_calls
    (want, want_layers, none), (got, got_layers, calls) = runs[False], runs[True]
    assert none == 0 and calls == len(steps) * len(fused.model.layers)
    compiled, compiled_layers, compiled_calls = runs["compiled"]
    assert compiled_calls >= calls  # tracing runs the op too
    for a, b in zip(compiled, got):
        assert torch.equal(a, b)
    for lc, lg in zip(compiled_layers, got_layers):
        assert torch.equal(lc.keys, lg.keys) and torch.equal(lc.values, lg.values)
    rel = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()  # noqa: E731
    for a, b in zip(got, want):
        assert rel(a, b) < 0.015 and torch.equal(a.argmax(-1), b.argmax(-1))  # a wrong RoPE sign: 0.036
    used = prompt.shape[1] + len(steps)
    for lg, lw in zip(got_layers, want_layers):
        assert torch.equal(lg.keys[:, :, :prompt.shape[1]], lw.keys[:, :, :prompt.shape[1]])  # the prompt's: eager
        assert rel(lg.keys[:, :, :used], lw.keys[:, :, :used]) < 0.015
        assert rel(lg.values[:, :, :used], lw.values[:, :, :used]) < 0.015
        assert lg.keys[:, :, used:].eq(0).all() and lg.values[:, :, used:].eq(0).all()


def test_a_killed_builds_lock_is_cleared_and_a_running_builds_is_kept(tmp_path):
    """PyTorch's extension build holds a lock file in its folder; a build killed mid-way leaves it, and every later
    build (the next load of a fast model) would wait on it forever. cuda_ext.build removes one whose builder (host
    and process id, recorded beside it) has exited, or one older than a build can take, and leaves a fresh one of
    a live builder alone."""
    import os
    import time

    from engine.backends import cuda_ext

    import socket
    import subprocess
    import sys

    lock = tmp_path / "lock"
    assert not cuda_ext.clear_stale_lock(str(tmp_path))  # no lock
    lock.write_text("")
    assert not cuda_ext.clear_stale_lock(str(tmp_path)) and lock.exists()  # a build running now, builder unknown
    cuda_ext._record_builder(str(tmp_path))  # this process: alive
    assert not cuda_ext.clear_stale_lock(str(tmp_path)) and lock.exists()
    old = time.time() - cuda_ext.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    assert cuda_ext.clear_stale_lock(str(tmp_path)) and not lock.exists()  # too old to be a build
    # a fresh lock whose builder has exited (killed mid-build): removed at once
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text("")
    (tmp_path / cuda_ext.BUILDER).write_text(f"{socket.gethostname()} {gone.pid}")
    assert cuda_ext.clear_stale_lock(str(tmp_path)) and not lock.exists()


def test_rope_order_pairs_each_feature_with_its_partner_in_one_tile():
    from engine.backends import int4_cuda as ic

    for hd in (64, 128):
        rows = torch.arange(3 * hd)
        stored = ic.rope_order(rows, hd)
        for s in (0, 5, 8, 15, 16, hd - 1, hd + 17, 2 * hd + 30):
            head, w = divmod(s, hd)
            t, r = divmod(w, 16)
            assert stored[s] == head * hd + (8 * t + r if r < 8 else hd // 2 + 8 * t + r - 8)
        assert torch.equal(ic.rope_unorder(stored[None], hd)[0], rows)


def test_two_eager_runs_of_one_fused_model_at_once_get_their_own_results(reference_kernel):
    """A run that finds the fast runner busy takes the plain path on the same model: two forwards of one fused
    model in two threads (switching as often as Python allows) must each get what it gets alone -- the layers hand
    their projections per-call data (int4_cuda.put/take), which must not cross threads."""
    import sys

    model = _tiny("llama")
    plain, hqq = _quantized_copies(model)
    fused = _on_our_gemv(model, hqq, True)
    inputs = [torch.randint(0, 320, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 5)]
    with torch.inference_mode():
        alone = [fused(input_ids=ids, use_cache=False).logits for ids in inputs]
    got, errors = {0: [], 1: []}, []

    def worker(i):
        try:
            with torch.inference_mode():
                for _ in range(15):
                    got[i].append(fused(input_ids=inputs[i], use_cache=False).logits)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors
    for i in (0, 1):
        assert len(got[i]) == 15 and all(torch.equal(g, alone[i]) for g in got[i]), i


def test_only_layers_written_like_llamas_are_fused():
    """The allowlist (int4_fusion.LAYERS/MLPS/NORMS) names classes whose forward is Llama's in the installed
    transformers: if one changes, the allowlist must."""
    import inspect
    import importlib

    from engine.backends import int4_fusion as fu

    def cls(name):
        arch = name.removesuffix("DecoderLayer").removesuffix("MLP").removesuffix("RMSNorm").lower()
        return getattr(importlib.import_module(f"transformers.models.{arch}.modeling_{arch}"), name)

    for group in (fu.LAYERS, fu.MLPS, fu.NORMS):
        sources = {inspect.getsource(cls(n).forward) for n in group}
        assert len(sources) == 1, group
    # the RoPE fold (int4_fusion.folded_attention) does what these attention forwards' bodies do: q/k/v, RoPE with
    # rotate_half, cache.update, attention with self.scaling, o_proj (Mistral and Qwen2 also pass their sliding
    # window, which the fold declines: int4_fusion.rope_head_dim; their signatures' annotations differ)
    def body(n):
        mod = importlib.import_module(f"transformers.models.{n[:-9].lower()}.modeling_{n[:-9].lower()}")
        lines = inspect.getsource(getattr(mod, n).forward).splitlines()
        start = next(i for i, line in enumerate(lines) if line.strip().startswith(") ->")) + 1
        return "\n".join(line for line in lines[start:] if "sliding_window" not in line)

    attn = {n: body(n) for n in fu.ATTENTIONS}
    assert len(set(attn.values())) == 1, fu.ATTENTIONS
    src = attn["LlamaAttention"]
    assert "apply_rotary_pos_emb(query_states, key_states, cos, sin)" in src and "cache.update(" in src
    assert "scaling=self.scaling" in src and "self.o_proj(attn_output)" in src and "norm" not in src
    for n in fu.ATTENTIONS:
        mod = importlib.import_module(f"transformers.models.{n[:-9].lower()}.modeling_{n[:-9].lower()}")
        assert mod.rotate_half(torch.arange(4.0)).tolist() == [-2.0, -3.0, 0.0, 1.0], n
    assert fu.why_not_layer(torch.nn.Linear(2, 2)) == "Linear is not a Llama-style decoder layer"
    layer = _tiny("llama").model.layers[0]
    assert fu.why_not_layer(layer) == "q/k/v are not one int4 GEMV"
    assert fu.mlp_fusable(layer.mlp)


def test_every_runner_of_a_model_knows_it_is_on_our_attention(models):
    """A model's second runner (a longer run replaced the first, or the first was dropped) finds the model already
    switched to gqa_attention: it must still cut its steps' attention to their bucket where it compiles."""
    lm = models["bf16-fast"]
    assert runners.use_gqa_attention(lm.model) and lm.model.config._attn_implementation == runners.GQA_ATTENTION
    assert runners.use_gqa_attention(lm.model)  # again: already on it


def test_a_step_attends_a_bucket_that_holds_every_position_it_needs(models):
    """StaticRunner.bucket_len: the step that leaves p positions in the cache (it writes position p - 1) attends
    the smallest multiple of BUCKET holding them, never more than the cache; all of it when not bucketed (CPU)."""
    r = runners.acquire(models["bf16-fast"], 10, 2000)
    try:
        assert not r.bucketed and r.bucket_len(5) == r.max_len  # no compiled graph on CPU
        r.bucketed = True
        b = runners.BUCKET
        for p, want in ((1, b), (b - 1, b), (b, b), (b + 1, 2 * b), (r.max_len - 1, r.max_len), (r.max_len, r.max_len)):
            assert r.bucket_len(p) == want, p
    finally:
        r.bucketed = False
        r.release()


def test_the_static_cache_keeps_one_position_counter_advanced_once_per_forward(models):
    """StaticRunner shares one position counter between the cache's layers and advances it once per forward pass
    (transformers bumps one per layer: a kernel each in the captured step). The positions it writes are
    transformers' own: the keys each layer holds after a prefill and steps equal those of transformers'
    StaticCache driven by the same tokens, and nothing is written past the counter."""
    from transformers import StaticCache

    lm = models["bf16-fast"]
    ids = torch.tensor([[1, 510, 3172, 282, 4649, 314]])
    r = runners.acquire(lm, int(ids.shape[1]), 8)
    try:
        with torch.inference_mode():
            logits = r.prefill(ids)
            toks = []
            for _ in range(3):
                toks.append(r.greedy(logits))
                logits = r.step(toks[-1])
        layers = r.cache.layers
        assert all(layer.cumulative_length is r.counter for layer in layers)
        assert int(r.counter) == ids.shape[1] + 3 == r.pos

        ref = StaticCache(config=lm.model.config, max_cache_len=r.max_len)
        with torch.inference_mode():
            want = lm.model(input_ids=ids, cache=ref, use_cache=True).logits[:, -1, :]
            for t in toks:
                want = lm.model(input_ids=t, cache=ref, use_cache=True).logits[:, -1, :]
        assert [int(c.cumulative_length) for c in ref.layers] == [r.pos] * len(layers)  # 1 counter bumped per layer
        for ours, theirs in zip(layers, ref.layers):
            assert torch.equal(ours.keys[:, :, :r.pos], theirs.keys[:, :, :r.pos])
            assert torch.equal(ours.values[:, :, :r.pos], theirs.values[:, :, :r.pos])
            assert not ours.keys[:, :, r.pos:].any()
        assert torch.equal(logits, want)
    finally:
        r.release()


@pytest.mark.parametrize("vocab", [5, 1024, 1025, 49152, 128256])
def test_chunked_argmax_is_argmax_ties_included(vocab):
    """The captured step's argmax in two rounds gives torch.argmax's index: the first of equal largest values,
    also when they sit in different chunks, at a chunk's edges, or in the padded last chunk."""
    g = torch.Generator().manual_seed(vocab)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(3, vocab, generator=g).to(dtype)
        x[1] = x[1].round()  # bf16 / integer values: many ties
        top = x[2].max()
        for i in sorted({vocab - 1, vocab // 2, min(1023, vocab - 1), 0}, reverse=True):
            x[2, i] = top + 1  # ties across chunks: the first must win
        got = runners.chunked_argmax(x)
        assert got.shape == (3, 1) and got.dtype == torch.long
        assert torch.equal(got, x.argmax(dim=-1, keepdim=True)), (vocab, dtype)
    assert int(runners.chunked_argmax(torch.zeros(1, vocab))) == 0


def test_compacting_a_converted_model_moves_each_tensor_once_and_keeps_its_outputs(reference_kernel):
    """base.compact_tensors (run on CUDA after int4.convert, so that the weights leave no allocator holes behind):
    every parameter and buffer gets fresh storage holding the same values, parameters stay the same objects (tied
    embeddings stay tied and are moved once), tensors that share a storage (a view, an alias) are left where they
    are (moving one would part them), and the converted, layer-fused model computes exactly what it did."""
    import transformers as tf

    from engine.backends.base import compact_tensors

    cfg = tf.LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=320, max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(5)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    plain, hqq = _quantized_copies(model)
    ours = _on_our_gemv(plain, hqq, fuse_layers=True)
    ours.model.layers[0].register_buffer("a_view", ours.model.layers[0].mlp.gate_up.words[:4])
    ours.model.layers[1].register_buffer("an_alias", ours.model.layers[1].mlp.down_proj.sz.view(-1))  # same size
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        before = ours(ids).logits
    tensors = {id(t): t for m in ours.modules() for t in [*m._parameters.values(), *m._buffers.values()]
               if t is not None}
    params = {n: p for n, p in ours.named_parameters(remove_duplicate=False)}
    ptrs = {i: t.data_ptr() for i, t in tensors.items()}
    held = [t.data for t in tensors.values()]  # the old storages stay alive: fresh ones get other addresses
    assert params["lm_head.weight"] is params["model.embed_tokens.weight"]
    l0, l1 = ours.model.layers[0], ours.model.layers[1]
    stay = {id(l0.a_view), id(l0.mlp.gate_up.words), id(l1.an_alias), id(l1.mlp.down_proj.sz)}
    moved = compact_tensors(ours, "cpu:0")  # the device as named ("cuda" on a GPU: its tensors say cuda:0)
    want = sum(t.numel() * t.element_size() for t in tensors.values() if id(t) not in stay)
    assert moved == want
    after_params = dict(ours.named_parameters(remove_duplicate=False))
    assert all(after_params[n] is p for n, p in params.items())  # the same Parameter objects, still tied
    for m in ours.modules():
        for name, t in [*m._parameters.items(), *m._buffers.items()]:
            if t is None:
                continue
            old = tensors.get(id(t))
            if id(t) in stay:  # a view, or a tensor with an alias: not moved (moving one would part them)
                assert t.data_ptr() == ptrs[id(t)], name
            elif isinstance(t, torch.nn.Parameter):
                assert t.data_ptr() != ptrs[id(t)], name
            else:  # a buffer: a new tensor object in the module, fresh storage
                assert old is None and all(t.data_ptr() != p for p in ptrs.values()), name
    del held
    with torch.no_grad():
        after = ours(ids).logits
    assert torch.equal(before, after)
