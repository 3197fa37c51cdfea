"""QuantScope entry point: read settings, build the engine services once, build the UI, queue().launch()."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import gradio as gr

from engine.manager import ModelManager
from engine.policy import host_policy
from ui import builder, calculator, compare, monitor

TITLE = "QuantScope — what quantization does to an LLM"


@dataclass
class Services:
    """What the tabs share in this process (one of each, thread-safe): the model cache, and how many
    generation events (side-by-side runs) may run at once; the rest wait in Gradio's queue."""

    manager: ModelManager = field(default_factory=ModelManager)
    generation_concurrency: int = 2


def services_from_env() -> Services:
    return Services(generation_concurrency=host_policy().generation_concurrency)


def build_app(services: Optional[Services] = None) -> gr.Blocks:
    services = services or Services()
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"# {TITLE}")
        status = monitor.build_status()
        with gr.Tabs() as tabs:
            with gr.Tab("Memory calculator", id="calculator") as calc_tab:
                inputs, outputs = calculator.build_tab()
            with gr.Tab("Side by side", id="compare") as compare_tab:
                cmp = compare.build_tab(services)
                panel = monitor.build_panel()
            with gr.Tab("Config builder", id="builder") as builder_tab:
                cfg = builder.build_tab()
        calculator.on_load(demo, inputs, outputs)
        builder.on_load(demo, cfg)
        cfg["open"].click(builder.open_in_compare, cfg["engine_format"], [tabs] + cmp["panes"], api_name=False)
        monitor.wire(demo, status, panel, compare_tab, [calc_tab, builder_tab])
    return demo


def main() -> None:
    logging.basicConfig(level=os.environ.get("QUANTSCOPE_LOG_LEVEL", "INFO"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        services = services_from_env()
    except ValueError as e:  # a bad QUANTSCOPE_* variable: one line, no traceback
        raise SystemExit(f"QuantScope host settings: {e}") from None
    demo = build_app(services)
    demo.queue(default_concurrency_limit=int(os.environ.get("QUANTSCOPE_CONCURRENCY", "4"))).launch(
        server_name=os.environ.get("QUANTSCOPE_HOST", "127.0.0.1"),
        server_port=int(os.environ.get("QUANTSCOPE_PORT", "7860")),
    )


if __name__ == "__main__":
    main()
