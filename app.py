"""QuantScope entry point: read settings, build the UI, queue().launch()."""
from __future__ import annotations

import logging
import os

import gradio as gr

from ui import calculator

TITLE = "QuantScope — what quantization does to an LLM"


def build_app() -> gr.Blocks:
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}")
        with gr.Tabs():
            with gr.Tab("Memory calculator", id="calculator"):
                inputs, outputs = calculator.build_tab()
        calculator.on_load(demo, inputs, outputs)
    return demo


def main() -> None:
    logging.basicConfig(level=os.environ.get("QUANTSCOPE_LOG_LEVEL", "INFO"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    demo = build_app()
    demo.queue(default_concurrency_limit=int(os.environ.get("QUANTSCOPE_CONCURRENCY", "4"))).launch(
        server_name=os.environ.get("QUANTSCOPE_HOST", "127.0.0.1"),
        server_port=int(os.environ.get("QUANTSCOPE_PORT", "7860")),
    )


if __name__ == "__main__":
    main()
