"""The test infrastructure itself works: serve a tiny Gradio app on loopback, call it through
gradio_client, and drive it in headless Debian chromium with playwright."""
from __future__ import annotations

import urllib.request

import pytest


def shout(text: str) -> str:
    return (text or "").upper()


def build_upper():
    import gradio as gr

    with gr.Blocks(title="infra check") as demo:
        inp = gr.Textbox(label="Input", elem_id="inp")
        btn = gr.Button("Upper-case", elem_id="go")
        out = gr.Textbox(label="Output", elem_id="out")
        btn.click(shout, inputs=inp, outputs=out, api_name="upper")
    return demo


def test_launch_serves_on_loopback(launch_app):
    url = launch_app(build_upper)
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
    # the same build is served once per session
    assert launch_app(build_upper) == url


def test_gradio_client_predict(launch_app):
    from gradio_client import Client

    client = Client(launch_app(build_upper), verbose=False, download_files=False, analytics_enabled=False)
    assert client.predict("quant scope", api_name="/upper") == "QUANT SCOPE"


@pytest.mark.browser
def test_browser_flow(launch_app, browser_page, artifacts_dir):
    from playwright.sync_api import expect

    page = browser_page
    page.goto(launch_app(build_upper), wait_until="domcontentloaded")
    page.locator("#inp textarea").fill("hello chromium")
    page.locator("#go").click()
    result = page.locator("#out textarea")
    expect(result).to_have_value("HELLO CHROMIUM", timeout=30_000)
    shot = artifacts_dir / "infra_upper.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 1000
