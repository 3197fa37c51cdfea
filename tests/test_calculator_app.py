"""The memory-calculator tab end to end: the real app (``app.build_app``) served on loopback, driven
through ``gradio_client`` (its ``/estimate`` API) and, once, in headless chromium.

Every figure the app shows is compared with what ``engine.report.build`` computes for the same selection,
and every bad input must come back as a clear "Input problem:" message while the server keeps serving.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, replace

import pytest

from conftest import served_app
from engine.report import Selection, build, explain
from engine.units import GiB

DEFAULTS = Selection()
PROBLEM = "Input problem:"
GIB_RE = r"([0-9]+\.[0-9]{2}) GiB"


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app_url() -> str:
    import app

    with served_app(app.build_app) as url:
        yield url


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False, download_files=False, analytics_enabled=False)


def call(client, **kwargs) -> tuple[str, object, str, str]:
    """One ``/estimate`` call with the handler's keyword names; returns (verdict, plot, explanation, share)."""
    out = client.predict(api_name="/estimate", **kwargs)
    assert isinstance(out, (tuple, list)) and len(out) == 4, out
    return tuple(out)


def api_kwargs(sel: Selection) -> dict:
    """The ``/estimate`` keyword arguments for a Selection (the handler's 0 / -1 mean "default")."""
    kw = asdict(sel)
    kw["group_size"] = kw["group_size"] or 0
    kw["overhead_mib"] = -1 if kw["overhead_mib"] is None else kw["overhead_mib"]
    return kw


def weights_gib(explanation: str) -> float:
    m = re.search(r"really holds \*\*" + GIB_RE + r"\*\* of weights", explanation)
    assert m, explanation
    return float(m.group(1))


def total_gib(explanation: str) -> float:
    m = re.search(r"\*\*Total " + GIB_RE + r"\*\*", explanation)
    assert m, explanation
    return float(m.group(1))


def plot_json(plot) -> dict:
    assert isinstance(plot, dict) and plot.get("type") == "plotly", plot
    fig = json.loads(plot["plot"])
    assert fig["data"], "empty figure"
    return fig


def assert_serving(client) -> None:
    """A good call right after a bad one still answers with the initial selection's verdict."""
    verdict, plot, explanation, _ = call(client)
    assert "FITS" in verdict and PROBLEM not in verdict, verdict
    assert plot is not None and "8,030,261,248" in explanation


# --------------------------------------------------------------------------------------------
# The API and the initial selection
# --------------------------------------------------------------------------------------------
def test_estimate_endpoint_has_defaults_for_every_parameter(client):
    info = client.view_api(return_format="dict", print_info=False)
    assert "/estimate" in info["named_endpoints"]
    params = info["named_endpoints"]["/estimate"]["parameters"]
    names = [p["parameter_name"] for p in params]
    assert names == ["model", "method", "group_size", "double_quant", "context", "batch", "kv_dtype", "mode",
                     "hardware", "lora_rank", "optimizer", "gradient_checkpointing", "overhead_mib",
                     "int8_outlier_pct"]
    assert all(p["parameter_has_default"] for p in params), [p["parameter_name"] for p in params
                                                             if not p["parameter_has_default"]]


def test_bare_call_answers_for_the_initial_selection(client):
    verdict, plot, explanation, share = call(client)
    r = build(DEFAULTS)
    # verdict: Llama-3.1-8B-Instruct as nf4 on a T4, 4096 tokens
    assert r.verdict.status == "fits"
    assert "FITS" in verdict and PROBLEM not in verdict
    assert "**nf4**" in verdict and "meta-llama/Llama-3.1-8B-Instruct" in verdict and "context 4,096" in verdict
    assert f"{r.estimate.total_bytes / GiB:.2f} GiB" in verdict
    assert f"of {r.hardware.memory_bytes / GiB:.2f} GiB" in verdict
    assert f"max context that fits: **{r.verdict.max_context:,}** tokens" in verdict
    # the chart: stacked bars, one per compared format, with the T4's capacity line
    fig = plot_json(plot)
    bars = [t for t in fig["data"] if t.get("type") == "bar"]
    assert {t["name"] for t in bars} >= {"Weights", "KV cache", "Activations (est.)", "Runtime overhead"}
    assert "nf4" in bars[0]["x"] and "bf16" in bars[0]["x"] and "Q4_K_M" in bars[0]["x"]
    assert len(bars[0]["x"]) == len(r.comparison)
    capacity = [s for s in fig["layout"]["shapes"] if s.get("type") == "line"]
    assert capacity and capacity[0]["y0"] == pytest.approx(r.hardware.memory_bytes / GiB)
    assert any(t.get("name") == "NVIDIA T4 (16 GB): 15.0 GiB" for t in fig["data"])  # the line's legend entry
    # the explanation: the textbook formula with this model's parameter count
    assert "8,030,261,248" in explanation
    assert "8,030,261,248 × 32 ÷ 8 = 32,121,044,992 bytes = **29.92 GiB**" in explanation
    for gib in ("29.92 GiB", "14.96 GiB", "7.48 GiB", "3.74 GiB"):
        assert f"**{gib}**" in explanation, gib
    assert explanation == explain(r)
    # the shareable selection round-trips
    assert json.loads(share) == asdict(DEFAULTS)
    assert Selection(**json.loads(share)) == DEFAULTS


# --------------------------------------------------------------------------------------------
# The answer follows the inputs, and equals the engine's
# --------------------------------------------------------------------------------------------
def test_longer_context_turns_the_verdict_to_does_not_fit(client):
    short, _, short_expl, _ = call(client, context=4096)
    long, long_plot, long_expl, long_share = call(client, context=131072)
    assert "FITS" in short and "DOES NOT FIT" not in short
    assert "DOES NOT FIT" in long and "context 131,072" in long
    assert "NVIDIA T4 (16 GB)" in long and "Split across" in long
    assert total_gib(long_expl) > 15.0 > total_gib(short_expl)
    assert weights_gib(long_expl) == weights_gib(short_expl)  # only the KV cache and activations grow
    assert json.loads(long_share)["context"] == 131072
    assert plot_json(long_plot)


def test_formats_change_the_weights(client):
    w = {m: weights_gib(call(client, method=m)[2]) for m in ("bf16", "int8", "nf4", "hqq4", "q4_k_m", "q2_k")}
    assert w["bf16"] > w["int8"] > w["q4_k_m"] > w["q2_k"]
    assert w["bf16"] > w["nf4"] and w["bf16"] > w["hqq4"]
    for m, got in w.items():
        want = build(replace(DEFAULTS, method=m), compare=False).estimate.weights_bytes / GiB
        assert got == pytest.approx(want, abs=0.005), m


def test_hardware_batch_and_kv_dtype_change_the_answer(client):
    base = total_gib(call(client)[2])
    batch4 = total_gib(call(client, batch=4)[2])
    fp8 = total_gib(call(client, kv_dtype="fp8", context=32768)[2])
    fp16 = total_gib(call(client, kv_dtype="fp16", context=32768)[2])
    assert batch4 > base and fp16 > fp8
    verdict_3060 = call(client, model="meta-llama/Llama-2-13b-hf", method="bf16", hardware="rtx-3060-12gb")[0]
    verdict_h200 = call(client, model="meta-llama/Llama-2-13b-hf", method="bf16", hardware="nvidia-h200-141gb")[0]
    assert "DOES NOT FIT" in verdict_3060 and "GeForce RTX 3060" in verdict_3060
    assert "FITS" in verdict_h200 and "DOES NOT FIT" not in verdict_h200


SELECTIONS = [
    DEFAULTS,
    Selection(model="Qwen/Qwen2.5-7B-Instruct", method="q4_k_m", context=32768, hardware="rtx-3060-12gb"),
    Selection(model="meta-llama/Llama-2-70b-hf", method="hqq4", hardware="nvidia-h100-80gb-sxm"),
    Selection(model="mistralai/Mixtral-8x7B-Instruct-v0.1", method="nf4", double_quant=True, context=8192,
              hardware="nvidia-a100-80gb"),
    Selection(model="HuggingFaceTB/SmolLM2-135M-Instruct", method="fp32", hardware="apple-8gb", batch=8),
    Selection(model="google/gemma-2-9b-it", method="gptq4", group_size=32, kv_dtype="fp8", hardware="nvidia-l4"),
    Selection(model="meta-llama/Llama-3.1-8B-Instruct", method="nf4", mode="qlora", lora_rank=64,
              optimizer="adamw8bit", hardware="nvidia-l4", context=2048),
    Selection(model="HuggingFaceTB/SmolLM2-360M-Instruct", method="bf16", mode="full", optimizer="sgd",
              gradient_checkpointing=False, context=1024, hardware="nvidia-t4", overhead_mib=300),
    Selection(model="7B", method="q8_0", hardware="rtx-4090"),
    Selection(model="meta-llama/Llama-3.2-1B-Instruct", method="int8", context=512, int8_outlier_pct=37.5,
              hardware="nvidia-t4"),
]


@pytest.mark.parametrize("sel", SELECTIONS, ids=lambda s: f"{s.model.split('/')[-1]}-{s.method}-{s.mode}")
def test_answer_equals_the_engine(client, sel):
    verdict, plot, explanation, share = call(client, **api_kwargs(sel))
    r = build(sel)
    assert PROBLEM not in verdict, verdict
    assert f"{r.estimate.total_bytes / GiB:.2f} GiB" in verdict
    assert r.verdict.message in verdict
    assert f"**{r.quant.name}**" in verdict
    assert f"max context that fits: **{r.verdict.max_context:,}** tokens" in verdict
    assert explanation == explain(r)
    assert json.loads(share) == asdict(sel)
    # the chart's total labels are the compared formats' totals (plus the selection if not among them)
    fig = plot_json(plot)
    labels = next(t for t in fig["data"] if t.get("mode") == "text")
    rows = list(r.comparison)
    if r.estimate.method not in [x.method for x in rows]:
        rows.append(r.estimate)
    assert labels["x"] == [x.method for x in rows]
    assert labels["text"] == [f"{x.total_bytes / GiB:.1f}" for x in rows]


# --------------------------------------------------------------------------------------------
# Bad input: a clear message, and the server keeps serving
# --------------------------------------------------------------------------------------------
BAD_INPUTS = [
    (dict(model="no-such-model"), "'no-such-model' is not a preset, a parameter count"),
    (dict(model="1"), "too small for a language model"),
    (dict(model="x" * 600), "too long"),
    (dict(model="./" + "x" * 300), "longer than 255 bytes"),
    (dict(model="/tmp/a\x00b"), "NUL character"),
    (dict(model="/nonexistent/dir/config.json"), "No config.json found"),
    (dict(context=-5), "Context length must be a whole number of at least 1, got -5"),
    (dict(context=0), "Context length must be a whole number of at least 1, got 0"),
    (dict(context=None), "Context length must be a whole number"),
    (dict(context="nan"), "Context length must be a whole number, got nan"),
    (dict(context="inf"), "Context length must be a whole number, got inf"),
    (dict(context="many"), "Context length must be a whole number, got 'many'"),
    (dict(context=10**12), "Context length 1,000,000,000,000 is larger than the calculator accepts (10,000,000)"),
    (dict(context=4096.5), "Context length must be a whole number of at least 1, got 4096.5"),
    (dict(batch=0), "Batch size must be a whole number of at least 1, got 0"),
    (dict(batch=0.5), "Batch size must be a whole number of at least 1, got 0.5"),
    (dict(batch=10**9), "Batch size 1,000,000,000 is larger than the calculator accepts"),
    (dict(method="q9_x"), "Unknown method 'q9_x'"),
    (dict(method=""), "No method given"),
    (dict(method="hqq7"), "HQQ supports 1, 2, 3, 4, 5, 6, 8 bits; 7 is not one of them"),
    (dict(method="hqq4", group_size=0.5), "Group size must be a positive whole number"),
    (dict(method="hqq4", group_size=-5), "Group size must be a positive whole number (or -1 for GPTQ"),
    (dict(method="hqq4", group_size="nan"), "Group size must be a positive whole number"),
    (dict(method="gptq4", group_size=10**7), "Group size 10000000 is implausibly large"),
    (dict(mode="lora"), "lora fine-tuning needs a 16- or 32-bit base model"),
    (dict(mode="full", method="q4_k_m"), "full fine-tuning needs a 16- or 32-bit base model"),
    (dict(mode="lora", method="bf16", lora_rank=0), "LoRA rank must be a whole number of at least 1, got 0"),
    (dict(mode="qlora", lora_rank=10**6), "LoRA rank 1,000,000 is larger than the calculator accepts (4,096)"),
    (dict(overhead_mib="nan"), "Overhead must be a finite number of MiB"),
    (dict(overhead_mib="inf"), "Overhead must be a finite number of MiB"),
    (dict(overhead_mib="lots"), "Overhead must be a finite number of MiB"),
    (dict(method="int8", int8_outlier_pct=150), "LLM.int8 outlier columns must be a percentage from 0 to 100, got 150"),
    (dict(method="int8", int8_outlier_pct="nan"), "LLM.int8 outlier columns must be a percentage from 0 to 100"),
    (dict(int8_outlier_pct="some"), "LLM.int8 outlier columns must be a percentage from 0 to 100, got 'some'"),
]


@pytest.mark.parametrize("kwargs,message", BAD_INPUTS, ids=lambda v: repr(v)[:40] if isinstance(v, dict) else "")
def test_bad_input_gives_a_clear_message(client, kwargs, message, capfd):
    verdict, plot, explanation, share = call(client, **kwargs)
    assert verdict.startswith("### <span style='color:#cf222e'>Input problem:</span> "), verdict
    assert message in verdict, verdict
    assert plot is None and explanation == ""
    assert json.loads(share)["model"] == kwargs.get("model", DEFAULTS.model)  # the selection stays shareable
    assert_serving(client)
    assert "Traceback" not in capfd.readouterr().err  # handled, not crashed (and nothing in the log)


def test_nan_and_infinity_reach_the_handler(app_url, client):
    """JSON has no NaN, so gradio_client refuses float('nan'); a raw HTTP call sends the literal that
    Python's json module writes, and the server must answer it like any other bad number."""
    import httpx

    with pytest.raises(ValueError):
        client.predict(api_name="/estimate", context=float("nan"))
    for literal, shown in (("NaN", "nan"), ("Infinity", "inf"), ("-Infinity", "-inf")):
        data = json.dumps(list(api_kwargs(DEFAULTS).values())).replace("4096", literal, 1)
        assert literal in data
        post = httpx.post(f"{app_url}gradio_api/call/estimate", content='{"data": %s}' % data,
                          headers={"content-type": "application/json"}, timeout=30)
        post.raise_for_status()
        stream = httpx.get(f"{app_url}gradio_api/call/estimate/{post.json()['event_id']}", timeout=60).text
        assert "event: complete" in stream, stream
        payload = json.loads(stream.split("event: complete", 1)[1].split("data:", 1)[1].strip().splitlines()[0])
        assert PROBLEM in payload[0] and f"Context length must be a whole number, got {shown}" in payload[0]
    assert_serving(client)


def test_numeric_strings_are_numbers(client):
    verdict = call(client, context="8192", batch="2")[0]
    assert PROBLEM not in verdict and "context 8,192 × batch 2" in verdict


GRADIO_REJECTS = [
    # kv_dtype, hardware and optimizer are closed dropdowns and mode a radio: gradio itself rejects other
    # values before the handler runs, with its own (clear) message.
    (dict(kv_dtype="fp6"), "Value: fp6 is not in the list of choices: ['auto', 'fp16'"),
    (dict(hardware="tpu-v5"), "Value: tpu-v5 is not in the list of choices: ['nvidia-t4'"),
    (dict(hardware="NVIDIA T4 (16 GB)"), "is not in the list of choices"),  # the label is not the value
    (dict(mode="pretrain"), "is not in the list of choices: ['inference', 'lora', 'qlora', 'full']"),
    (dict(mode="full", method="bf16", optimizer="lion"), "Value: lion is not in the list of choices"),
]


@pytest.mark.parametrize("kwargs,message", GRADIO_REJECTS, ids=lambda v: repr(v)[:40] if isinstance(v, dict) else "")
def test_values_outside_a_components_choices(client, kwargs, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as err:
        call(client, **kwargs)
    assert message in str(err.value)
    assert_serving(client)


@pytest.mark.parametrize("kwargs,message", [
    (dict(kv_dtype="fp6"), "Unknown KV-cache dtype 'fp6'. Choose auto, fp32"),
    (dict(hardware="tpu-v5"), "Unknown hardware 'tpu-v5'. Choose one of: nvidia-t4"),
    (dict(mode="pretrain"), "Unknown mode 'pretrain'. Choose inference, lora, qlora or full."),
    (dict(mode="full", method="bf16", optimizer="lion"), "Unknown optimizer 'lion'. Choose adamw"),
])
def test_handler_explains_what_gradio_would_reject(kwargs, message):
    """Called directly (as the CLI, a test or another tab would), the handler explains these too."""
    from ui.calculator import estimate

    verdict, plot, explanation, _ = estimate(**kwargs)
    assert PROBLEM in verdict and message in verdict and plot is None and explanation == ""


def test_hub_id_while_offline(client, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the server runs in this process: it sees this at call time
    verdict, plot, _, _ = call(client, model="quantscope-tests/no-such-model")
    assert PROBLEM in verdict and "Offline mode is on" in verdict and "cannot be fetched" in verdict
    assert plot is None
    assert_serving(client)


def test_hub_id_without_network(client, monkeypatch):
    """No Hub access here: a Hub id fails fast with a message (online, the repo simply does not exist)."""
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("QUANTSCOPE_OFFLINE", raising=False)
    t0 = time.monotonic()
    verdict = call(client, model="quantscope-tests/no-such-model-either")[0]
    assert time.monotonic() - t0 < 20
    assert PROBLEM in verdict
    assert "Could not reach the Hugging Face Hub" in verdict or "No model 'quantscope-tests" in verdict, verdict
    assert_serving(client)


def test_concurrent_good_and_bad_calls(client):
    jobs = [client.submit(api_name="/estimate", **kw) for kw in
            (dict(context=131072), dict(method="q9_x"), dict(), dict(batch=0), dict(model="Qwen/Qwen3-8B"))]
    results = [j.result(timeout=120)[0] for j in jobs]
    assert "DOES NOT FIT" in results[0]
    assert PROBLEM in results[1] and PROBLEM in results[3]
    assert "FITS" in results[2] and "Qwen/Qwen3-8B" in results[4]


# --------------------------------------------------------------------------------------------
# In the browser
# --------------------------------------------------------------------------------------------
@pytest.mark.browser
def test_browser_pick_model_and_format_and_open_a_link(app_url, browser_page, artifacts_dir):
    from playwright.sync_api import expect

    page = browser_page
    verdict = page.locator("#calc-verdict")
    page.goto(app_url, wait_until="domcontentloaded")
    page.locator("#calc-chart .js-plotly-plot").wait_for(timeout=60_000)
    expect(verdict).to_contain_text("meta-llama/Llama-3.1-8B-Instruct")
    expect(verdict).to_contain_text("FITS")
    first = verdict.inner_text()
    assert "nf4" in first

    # another model, chosen from the dropdown's list
    model = page.get_by_role("combobox", name="Model")
    model.click()
    model.fill("Qwen2.5-7B")
    page.get_by_role("option", name="Qwen2.5-7B-Instruct", exact=True).click()
    expect(verdict).to_contain_text("Qwen/Qwen2.5-7B-Instruct", timeout=30_000)
    # another format, typed into the dropdown and confirmed with Enter
    fmt = page.get_by_role("combobox", name="Format")
    fmt.click()
    fmt.fill("q4_k_m")
    fmt.press("Enter")
    expect(verdict).to_contain_text("Q4_K_M", timeout=30_000)
    expect(verdict).not_to_have_text(first)
    r = build(replace(DEFAULTS, model="Qwen/Qwen2.5-7B-Instruct", method="q4_k_m"))
    expect(verdict).to_contain_text(r.verdict.message, timeout=30_000)
    expect(page.locator("#calc-explain")).to_contain_text("7,615,616,512")  # Qwen2.5-7B's parameter count
    assert model.input_value() == "Qwen2.5-7B-Instruct" and fmt.input_value() == "q4_k_m"
    page.locator("#calc-chart .js-plotly-plot").wait_for()
    page.wait_for_timeout(500)  # let plotly finish drawing the new bars
    page.screenshot(path=str(artifacts_dir / "calculator_tab.png"), full_page=True)

    # a shared link fills the inputs and the verdict
    page.goto(app_url + "?model=Qwen/Qwen2.5-7B-Instruct&method=q4_k_m&context=32768&hardware=rtx-3060-12gb",
              wait_until="domcontentloaded")
    page.locator("#calc-chart .js-plotly-plot").wait_for(timeout=60_000)
    r = build(Selection(model="Qwen/Qwen2.5-7B-Instruct", method="q4_k_m", context=32768, hardware="rtx-3060-12gb"))
    expect(verdict).to_contain_text("context 32,768", timeout=30_000)
    expect(verdict).to_contain_text("Q4_K_M · Qwen/Qwen2.5-7B-Instruct")
    expect(verdict).to_contain_text(r.verdict.message)
    expect(verdict).to_contain_text("of 12.00 GiB")
    assert page.get_by_role("combobox", name="Hardware").input_value() == "GeForce RTX 3060 (12 GB)"
    assert page.get_by_label("Context (tokens)").input_value() == "32768"
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifacts_dir / "calculator_url.png"), full_page=True)

    # LLM.int8's outlier columns, from a link: the estimate uses the share and the explanation says so
    page.goto(app_url + "?model=meta-llama/Llama-3.2-1B-Instruct&method=int8&context=512&int8_outlier_pct=40",
              wait_until="domcontentloaded")
    r = build(Selection(model="meta-llama/Llama-3.2-1B-Instruct", method="int8", context=512, int8_outlier_pct=40))
    bound = build(Selection(model="meta-llama/Llama-3.2-1B-Instruct", method="int8", context=512))
    assert r.estimate.total_bytes < bound.estimate.total_bytes
    expect(verdict).to_contain_text(f"{r.estimate.total_bytes / GiB:.2f} GiB", timeout=60_000)
    expect(page.locator("#calc-explain")).to_contain_text("with 40% of a layer's input columns")
