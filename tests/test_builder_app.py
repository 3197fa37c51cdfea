"""The config-builder tab end to end: the real app on loopback through gradio_client (/build_config,
/recommend) and in headless chromium (recommend, read the code, open it in the side-by-side tab)."""
from __future__ import annotations

import pytest

from conftest import served_app


@pytest.fixture(scope="module")
def app_url():
    import app

    with served_app(app.build_app) as url:
        yield url


@pytest.fixture(scope="module")
def client(app_url):
    from gradio_client import Client

    return Client(app_url, verbose=False, download_files=False, analytics_enabled=False)


def test_build_config_defaults_and_a_refusal(client):
    code, js, pip, est, notes, fmt = client.predict(api_name="/build_config")
    assert "BitsAndBytesConfig(" in code and "bnb_4bit_use_double_quant=True" in code
    assert '"bnb_4bit_quant_type": "nf4"' in js and pip.endswith("bitsandbytes") and fmt == "nf4 + double quant"
    assert "Memory of exactly this configuration" in est and "GiB" in est
    code, js, pip, est, notes, fmt = client.predict(api_name="/build_config", method="bnb8", double_quant=True)
    assert "Not emitted" in est and "Double quantization" in est and pip == "" and "Traceback" not in est
    code, *_ = client.predict(api_name="/build_config", method="hqq", bits="x")
    assert "Not emitted" in code and "whole number" in code


def test_recommend_reproduces_the_lesson_table(client):
    out = client.predict(api_name="/recommend", goal="finetune", hardware="nvidia-t4")
    assert "QLoRA" in out[0] and out[1] == "qlora"
    out = client.predict(api_name="/recommend", goal="finetune", hardware="nvidia-a100-40gb")
    assert "LoRA on the 16-bit" in out[0] and out[1] == "lora"
    out = client.predict(api_name="/recommend", goal="inference", hardware="cpu")
    assert "GGUF" in out[0] and out[1] == "gguf"


@pytest.mark.browser
def test_browser_recommend_build_and_open_in_side_by_side(app_url, browser_page, artifacts_dir):
    from playwright.sync_api import expect

    page = browser_page
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_role("tab", name="Config builder").click()
    page.get_by_label("finetune").check()
    page.locator("#cfg-recommend").click()
    expect(page.locator("#cfg-rec")).to_contain_text("QLoRA", timeout=30_000)
    expect(page.locator("#cfg-code")).to_contain_text("prepare_model_for_kbit_training", timeout=30_000)
    expect(page.locator("#cfg-estimate")).to_contain_text("qlora")
    page.wait_for_timeout(500)
    page.screenshot(path=str(artifacts_dir / "builder_tab.png"), full_page=True)
    # switch to bitsandbytes 4-bit and open it against bf16
    method = page.get_by_role("combobox", name="Method")
    method.click()
    page.get_by_role("option", name="bitsandbytes 4-bit (NF4 / FP4)").click()
    expect(page.locator("#cfg-code")).not_to_contain_text("peft", timeout=30_000)
    page.locator("#cfg-open").click()
    expect(page.get_by_role("combobox", name="Pane B")).to_have_value("nf4 + double quant", timeout=30_000)
    expect(page.get_by_role("combobox", name="Pane A")).to_have_value("bf16")
