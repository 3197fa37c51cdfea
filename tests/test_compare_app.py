"""The side-by-side tab end to end: the real app served on loopback, driven through gradio_client (its
streaming ``/compare`` API, every parameter defaulted) and in headless chromium. Real models on CPU."""
from __future__ import annotations

import pytest

from conftest import served_app

pytest.importorskip("torch")

OUTPUTS = 1 + 4 + 4 + 3  # status, 4 headers, 4 token boxes, quality table, chart, JSON


@pytest.fixture(scope="module")
def app_url():
    import app

    services = app.Services()
    with served_app(lambda: app.build_app(services)) as url:
        yield url
    services.manager.unload_all()


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False, download_files=False, analytics_enabled=False)


def stream(client, **kw) -> list:
    """Every streamed output of one /compare call, in order."""
    job = client.submit(api_name="/compare", **kw)
    outs = list(job)
    final = job.outputs()[-1] if job.outputs() else None
    if final is not None and (not outs or outs[-1] != final):
        outs.append(final)
    assert outs, "no output"
    assert all(len(o) == OUTPUTS for o in outs)
    return outs


def result(outs) -> dict:
    return outs[-1][-1]


def test_bare_call_runs_the_default_comparison(client):
    """No arguments: the tab's initial setup (embedded model, bf16 vs NF4) compares for real."""
    outs = stream(client, max_new_tokens=24)  # the only override: fewer tokens than the default 64, for time
    r = result(outs)
    assert r["phase"] == "done", r
    a, b = r["panes"]
    assert a["format"] == "bf16" and b["format"] == "nf4"
    for p in (a, b):
        assert p["status"] == "done" and p["tokens"] == 24 and p["text"].strip()
        m = p["metrics"]
        assert m["ttft_s"] > 0 and m["tokens_per_s"] > 0 and m["weights_bytes"] > 0 and m["peak_bytes"] > 0
        assert m["predicted_bytes"] > m["predicted_weights_bytes"] > 0
    assert b["answer"]["mean_kl"] > 0 and b["reference"]["mean_kl"] > 0
    assert 0 <= b["identical_to_A_percent"] <= 100
    # it streamed: several updates, and one where both panes had text but neither was done
    partial = [o[-1] for o in outs[:-1] if isinstance(o[-1], dict) and o[-1].get("panes")]
    assert any(all(0 < p["tokens"] < 24 for p in x["panes"]) for x in partial), [
        [(p["status"], p["tokens"]) for p in x["panes"]] for x in partial]
    # the page shows the numbers: headers, highlighted tokens, the table and the chart
    final = outs[-1]
    assert "tok/s" in final[1] and "tok/s" in final[2] and "identical to A" in final[2]
    assert "KL on A's answer" in final[9]
    chart = final[10]
    assert chart and chart.get("type") == "plotly"


def test_identical_panes_give_full_agreement_and_zero_kl(client):
    r = result(stream(client, pane_a="bf16", pane_b="bf16", max_new_tokens=12,
                      prompt="What is the capital of France?"))
    a, b = r["panes"]
    assert "Paris" in a["text"] and b["text"] == a["text"]
    assert b["identical_to_A_percent"] == 100.0
    assert b["answer"]["mean_kl"] < 1e-6 and b["answer"]["top1_agreement"] == 100.0
    assert b["reference"]["mean_kl"] < 1e-6


def test_an_int8_pane_shows_its_prompts_outlier_columns_and_predicts_with_them(client):
    """LLM.int8 (real bitsandbytes on CPU): the pane says what share of its widest layer's input columns crossed
    the outlier threshold in this prompt -- the calculator's setting -- and its prediction used that share."""
    from engine.formats import parse_method
    from engine.memory import estimate
    from engine.sources import resolve
    from engine.specs import RuntimeSpec

    outs = stream(client, pane_b="int8", max_new_tokens=4, prompt="What is the capital of France?")
    r = result(outs)
    a, b = r["panes"]
    assert b["status"] == "done", b
    kind, share = b["metrics"]["int8_outliers"]
    assert kind == "down_proj" and 0 < share < 1
    assert a["metrics"]["int8_outliers"] is None
    header = outs[-1][2]
    assert f"LLM.int8 outlier columns in this prompt: **{share:.0%}** of down_proj's inputs" in header
    # predicted with this share, which is less than the bound (every column)
    ctx = b["metrics"]["prompt_tokens"] + b["metrics"]["tokens"]
    told, bound = (estimate(resolve("embedded"), parse_method("int8"),
                            RuntimeSpec(context=ctx, device="cpu", int8_outlier_share=s)).total_bytes for s in (share, 1))
    assert b["metrics"]["predicted_bytes"] == told < bound


@pytest.mark.parametrize("kw,words", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="x" * 5000), "limit here is 4,000"),
    (dict(pane_a="(off)"), "Pane A is the baseline"),
    (dict(pane_b="q9_z"), "Unknown pane format"),
    (dict(model="no/such-model-here"), "no/such-model-here"),
])
def test_bad_input_gets_a_message_and_the_app_keeps_serving(client, kw, words):
    out = stream(client, **kw)[-1]
    assert words in out[0] and "Traceback" not in out[0], out[0]
    # still serving
    r = result(stream(client, pane_b="(off)", max_new_tokens=2))
    assert r["phase"] == "done" and r["panes"][0]["tokens"] == 2


def test_out_of_range_slider_values_are_refused_by_gradio_with_a_message(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="less than minimum value 1"):
        client.predict(api_name="/compare", max_new_tokens=0)
    assert result(stream(client, pane_b="(off)", max_new_tokens=2))["phase"] == "done"


def test_a_pane_that_cannot_load_fails_alone(client):
    outs = stream(client, pane_b="gptq4", pane_c="bf16", max_new_tokens=6)
    r = result(outs)
    a, bad, c = r["panes"]
    assert bad["status"] == "error" and "GPTQ" in bad["error"]
    assert a["status"] == c["status"] == "done" and c["identical_to_A_percent"] == 100.0
    assert "GPTQ" in outs[-1][2] and "failed: B" in outs[-1][0]


@pytest.mark.browser
def test_browser_bad_input_keeps_the_last_comparison_on_the_page(app_url, browser_page):
    """An empty prompt after a comparison: the message says what to do, and the panes still show that
    comparison's answers (a refused run replaces nothing but the status line)."""
    from playwright.sync_api import expect

    page = browser_page
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_role("tab", name="Side by side").click()
    page.locator("#cmp-prompt textarea").fill("What is the capital of France?")
    for letter in "bcd":
        pane = page.get_by_role("combobox", name=f"Pane {letter.upper()}")
        pane.fill("(off)")  # the panes take typed values too
        pane.press("Enter")
        expect(pane).to_have_value("(off)")
    page.get_by_label("Max new tokens").last.fill("6")
    page.locator("#cmp-run").click()
    status = page.locator("#cmp-status")
    expect(status).to_contain_text("1 of 1 panes finished", timeout=180_000)
    answer = page.locator("#cmp-text-a").inner_text()
    assert answer.strip(), "the comparison wrote no answer"
    page.locator("#cmp-prompt textarea").fill("")
    page.locator("#cmp-run").click()
    expect(status).to_contain_text("The prompt is empty", timeout=30_000)
    expect(page.locator("#cmp-head-a")).to_contain_text("tok/s")
    assert page.locator("#cmp-text-a").inner_text() == answer


@pytest.mark.browser
def test_browser_preset_compare_and_screenshot(app_url, browser_page, artifacts_dir):
    from playwright.sync_api import expect

    page = browser_page
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_role("tab", name="Side by side").click()
    preset = page.get_by_role("combobox", name="Classroom presets")
    preset.click()
    page.get_by_role("option", name="Three toolkits at 4 bits: NF4 vs HQQ vs GGUF").click()
    expect(page.get_by_role("combobox", name="Pane D")).to_have_value("gguf", timeout=10_000)
    page.get_by_label("Max new tokens").last.fill("32")
    page.locator("#cmp-run").click()
    status = page.locator("#cmp-status")
    expect(page.locator("#cmp-head-b")).to_contain_text("generating", timeout=120_000)
    expect(status).to_contain_text("panes finished", timeout=240_000)
    expect(status).to_contain_text("4 of 4 panes finished")
    for letter in "abcd":
        expect(page.locator(f"#cmp-head-{letter}")).to_contain_text("tok/s")
    expect(page.locator("#cmp-quality")).to_contain_text("KL on A's answer")
    page.locator("#cmp-chart .js-plotly-plot").wait_for(timeout=30_000)
    page.wait_for_timeout(800)
    page.screenshot(path=str(artifacts_dir / "compare_tab.png"), full_page=True)
