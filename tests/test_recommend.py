"""The recommender (engine/recommend.py): each rule with inputs that trigger it, the lesson's GPU table, and
the calculator check with its fallbacks."""
from __future__ import annotations

import pytest

from engine.codegen import build
from engine.errors import InputError
from engine.recommend import TRAINING_HEADROOM, recommend

L8B = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize("hardware,goal,method,words", [
    # the lesson's "Practical Decision Table" for an 8B model
    ("nvidia-t4", "finetune", "qlora", "memory constrained"),
    ("nvidia-a10g", "finetune", "qlora", "would use 88%"),
    ("nvidia-a100-40gb", "finetune", "lora", "memory available"),
    ("nvidia-t4", "inference", "bnb8", "INT8"),  # "Inference only -> INT8"
])
def test_the_lesson_gpu_table(hardware, goal, method, words):
    r = recommend(goal, hardware, "quality", L8B)
    assert r.choice.method == method, (r.title, r.reasons)
    assert any(words in x for x in r.reasons), r.reasons
    assert r.status in ("fits", "tight")


def test_training_headroom_is_what_splits_a10_from_a100():
    a10 = recommend("finetune", "nvidia-a10g", "quality", L8B)
    a100 = recommend("finetune", "nvidia-a100-40gb", "quality", L8B)
    assert a10.choice.method == "qlora" and a100.choice.method == "lora"
    assert a100.used_fraction <= TRAINING_HEADROOM


@pytest.mark.parametrize("priority,method,words", [
    ("quality", "bf16", "with margin"),
    ("memory", "bnb4", "double quantization"),
    ("speed", "awq", "fastest inference"),
    ("ease", "bnb8", "easiest setup"),
])
def test_inference_priorities_on_a_big_gpu(priority, method, words):
    r = recommend("inference", "nvidia-a100-40gb", priority, L8B)
    assert r.choice.method == method and any(words in x for x in r.reasons), (r.title, r.reasons)
    if method == "bnb4":
        assert r.choice.double_quant and r.choice.quant_type == "nf4"


@pytest.mark.parametrize("hardware,priority,gguf_type", [("cpu", "quality", "Q8_0"), ("cpu", "memory", "Q4_0"),
                                                         ("cpu", "speed", "Q4_K_M"), ("apple-32gb", "ease", "Q4_K_M")])
def test_cpu_and_apple_get_gguf(hardware, priority, gguf_type):
    r = recommend("inference", hardware, priority, L8B)
    assert r.choice.method == "gguf" and r.choice.gguf_type == gguf_type and "GGUF" in r.reasons[0]
    assert (r.choice.n_gpu_layers == -1) == hardware.startswith("apple")


def test_finetune_without_a_gpu_says_it_is_slow():
    r = recommend("finetune", "cpu", "quality", L8B)
    assert r.choice.method == "qlora" and "very slow" in r.reasons[0]


def test_a_choice_that_does_not_fit_falls_back_and_says_so():
    r = recommend("inference", "apple-8gb", "quality", L8B)  # Q8_0 of an 8B model needs ~8.5 GB
    assert r.choice.gguf_type != "Q8_0" and r.tried[0] == ("GGUF Q8_0 (llama.cpp)", "does not fit")
    assert any("does not fit here" in x for x in r.reasons)


def test_nothing_fits_is_said_plainly():
    r = recommend("inference", "nvidia-t4", "memory", "meta-llama/Llama-2-70b-hf")
    assert r.status == "does not fit" and "None of these fits" in r.verdict
    assert [s for _, s in r.tried] == ["does not fit"] * len(r.tried) and len(r.tried) >= 3


def test_every_recommendation_builds_runnable_code():
    for goal in ("inference", "finetune"):
        for hw in ("nvidia-t4", "nvidia-a100-40gb", "cpu", "apple-16gb"):
            for pr in ("quality", "speed", "memory", "ease"):
                r = recommend(goal, hw, pr, L8B)
                assert build(r.choice).python


@pytest.mark.parametrize("kw,words", [(dict(goal="train"), "Goal is"), (dict(priority="cost"), "Priority is"),
                                      (dict(hardware="tpu-v9"), "tpu-v9")])
def test_bad_inputs(kw, words):
    with pytest.raises(InputError, match=words):
        recommend(**{**dict(goal="inference", hardware="nvidia-t4", priority="quality", model=L8B), **kw})
