"""Side-by-side engine (engine/compare.py, engine/quality.py) on the embedded model, real backends on CPU."""
from __future__ import annotations

import math
import threading

import pytest

torch = pytest.importorskip("torch")

from engine import quality  # noqa: E402
from engine.backends.base import GenerationSettings  # noqa: E402
from engine.compare import MAX_PROMPT_CHARS, pane_quant, run_compare  # noqa: E402
from engine.errors import InputError  # noqa: E402
from engine.manager import ModelManager  # noqa: E402

STORY = "Write a short story about a robot who learns to paint."
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def manager():
    m = ModelManager()
    yield m
    m.unload_all()


def final(states):
    last = None
    for s in states:
        last = s
    return last


# ------------------------------------------------------------------------------------------ pure parts
def test_token_agreement():
    a = quality.token_agreement([1, 2, 3, 4], [1, 2, 9, 4, 5])
    assert a.compared == 4 and a.identical == 3 and a.first_divergence == 2
    assert a.same == [True, True, False, True, False] and a.percent == 75.0
    same = quality.token_agreement([1, 2], [1, 2])
    assert same.percent == 100.0 and same.first_divergence is None
    assert quality.token_agreement([1, 2, 3], [1, 2]).first_divergence == 2  # stopped early


def test_compare_distributions_by_hand():
    lp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0]]), -1)
    same = quality.compare_distributions(lp, lp.clone(), [0, 1])
    assert same.mean_kl == pytest.approx(0.0, abs=1e-7) and same.top1_agreement == 100.0
    assert same.ppl_baseline == pytest.approx(same.ppl_pane)
    p = torch.log_softmax(torch.tensor([[0.0, 2.0, 0.0], [0.0, 3.0, 0.0]]), -1)
    d = quality.compare_distributions(lp, p, [0, 1])
    b0 = lp[0].exp()
    expected = float((b0 * (lp[0] - p[0])).sum())  # KL of the first row; the second rows are equal
    assert d.kl[0] == pytest.approx(expected, rel=1e-5) and d.kl[1] == pytest.approx(0.0, abs=1e-6)
    assert d.top1_agreement == 50.0
    assert d.ppl_baseline == pytest.approx(math.exp(-(lp[0, 0] + lp[1, 1]).item() / 2), rel=1e-5)
    # padded vocabularies: the common part is compared
    padded = torch.cat([p, torch.full((2, 5), -1e9)], dim=1)
    assert quality.compare_distributions(lp, padded, [0, 1]).mean_kl == pytest.approx(d.mean_kl, rel=1e-4)
    with pytest.raises(InputError):
        quality.compare_distributions(lp, p, [0])


def test_pane_choices_parse_and_bad_ones_explain():
    assert pane_quant("nf4 + double quant").double_quant
    assert pane_quant("hqq3").bits == 3
    assert pane_quant("gguf").method == "gguf"
    for bad, words in (("int8 + double quant", "Double quantization"), ("q9_z", "Unknown pane format"),
                       ("(off)", "off")):
        with pytest.raises(InputError, match=words):
            pane_quant(bad)


# ------------------------------------------------------------------------------------------ real runs
def test_identical_panes_agree_fully(manager):
    s = final(run_compare(manager, "embedded", ["bf16", "bf16"], STORY, GenerationSettings(max_new_tokens=12),
                          device="cpu"))
    a, b = s.panes
    assert s.phase == "done" and a.status == b.status == "done"
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12
    assert b.agreement.percent == 100.0 and b.agreement.first_divergence is None
    for d in (b.answer_quality, b.reference_quality):
        assert d.mean_kl < 1e-6 and d.top1_agreement == 100.0
        assert d.ppl_baseline == pytest.approx(d.ppl_pane, rel=1e-6)
    assert b.answer_quality.tokens == 12
    assert b.reference_quality.tokens > 150  # the shipped paragraph
    assert manager.loads >= 1 and a.metrics.tokens == 12


def test_bf16_vs_nf4_and_gguf_stream_together_and_differ(manager):
    snaps = []
    for st in run_compare(manager, "embedded", ["bf16", "nf4", "gguf"], STORY,
                          GenerationSettings(max_new_tokens=24), device="cpu"):
        snaps.append([(p.status, len(p.token_ids)) for p in st.panes])
        s = st
    assert s.phase == "done", s.message
    # streaming together: some snapshot shows every pane part-way (none finished, all started)
    assert any(all(0 < n < 24 for _, n in snap) for snap in snaps), snaps[:40]
    a, b, c = s.panes
    for p in (b, c):
        assert p.status == "done" and p.metrics.tokens == 24
        assert p.answer_quality.mean_kl > 0 and 0 <= p.answer_quality.top1_agreement <= 100
        assert p.reference_quality.mean_kl > 0 and p.reference_quality.ppl_pane > 1
        assert len(p.answer_quality.kl) == 24
        assert 0 <= p.agreement.percent <= 100
    # 4-bit loses something against the 16-bit baseline on the reference text, but not everything
    assert 50 < b.reference_quality.top1_agreement < 100
    assert b.reference_quality.ppl_pane != b.reference_quality.ppl_baseline
    assert s.load_wall_s is not None and s.generate_wall_s > 0 and s.score_wall_s > 0
    d = s.to_dict()
    assert d["panes"][1]["answer"]["mean_kl"] == b.answer_quality.mean_kl


def test_a_failing_pane_does_not_stop_the_others(manager):
    s = final(run_compare(manager, "embedded", ["bf16", "gptq4", "bf16"], QUESTION,
                          GenerationSettings(max_new_tokens=8), device="cpu"))
    a, bad, c = s.panes
    assert bad.status == "error" and "GPTQ" in bad.error and "Traceback" not in bad.error
    assert a.status == "done" and c.status == "done" and "Paris" in a.text
    assert c.agreement.percent == 100.0
    assert bad.answer_quality is None and "did not load" in bad.quality_note
    assert "failed: B" in s.message


@pytest.mark.parametrize("prompt,words", [("", "empty"), ("   \n", "empty"),
                                           ("x" * (MAX_PROMPT_CHARS + 1), "limit")])
def test_bad_prompts_are_refused_before_anything_loads(manager, prompt, words):
    loads = manager.loads
    with pytest.raises(InputError, match=words):
        run_compare(manager, "embedded", ["bf16", "nf4"], prompt)  # at the call, before any next()
    assert manager.loads == loads


def test_cancel_stops_every_pane(manager):
    cancel = threading.Event()
    last = None
    for st in run_compare(manager, "embedded", ["bf16", "nf4"], STORY, GenerationSettings(max_new_tokens=200),
                          cancel=cancel, device="cpu"):
        last = st
        if sum(len(p.token_ids) for p in st.panes) >= 4:
            cancel.set()
    assert last.phase == "cancelled"
    assert all(p.status == "cancelled" and len(p.token_ids) < 60 for p in last.panes)
    assert all(p.answer_quality is None for p in last.panes)


def test_closing_the_stream_early_releases_the_models(manager):
    gen = run_compare(manager, "embedded", ["bf16", "nf4"], STORY, GenerationSettings(max_new_tokens=200),
                      device="cpu")
    for st in gen:
        if any(p.token_ids for p in st.panes):
            break
    gen.close()  # what Gradio does when the browser goes away
    from engine.compute import scheduler

    import time

    deadline = time.time() + 10
    while scheduler().active() and time.time() < deadline:
        time.sleep(0.05)
    assert scheduler().active() == 0
    assert all(e["in_use"] == 0 for e in manager.cached())


def test_loads_at_the_same_time_do_not_corrupt_each_other():
    """Three formats requested at once (three panes or three users): each model matches a lone load of its
    format. Before loads were serialised, a bf16 model loaded next to NF4 and HQQ ones gave NaN logits."""
    from engine.backends import backend_of, load

    mgr = ModelManager()
    got, errors = {}, []

    def get(method):
        try:
            got[method] = mgr.get("embedded", method, "cpu")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=get, args=(m,)) for m in ("bf16", "nf4", "fp4")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(got) == 3
    lone = load("embedded", "bf16", "cpu")
    try:
        b = backend_of(lone)
        ids = b.tokenize(lone, quality.reference_text())[:64]
        ref = b.score(lone, ids, 1)
        for method, lm in got.items():
            lp = backend_of(lm).score(lm, ids, 1)
            assert torch.isfinite(lp).all(), method
            d = quality.compare_distributions(ref, lp, ids[1:])
            if method == "bf16":
                assert d.mean_kl < 1e-6, d.mean_kl
            else:
                assert 0 < d.mean_kl < 1.0 and d.top1_agreement > 50, (method, d.mean_kl, d.top1_agreement)
    finally:
        b.unload(lone)
        mgr.unload_all()
