"""QuantScope entry point: read settings, build the engine services once, build the UI, queue().launch()."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import engine  # noqa: F401  first, before Gradio imports numpy (engine.cxx_runtime)
import gradio as gr

from engine.manager import ModelManager
from engine.policy import host_policy
from engine.ratelimit import SessionLimiter
from ui import builder, calculator, compare, monitor

TITLE = "QuantScope — what quantization does to an LLM"
# show_error: an input Gradio itself cannot read (a word where a number goes, sent through the API) gets Gradio's
# message naming the input and the type it expected, not a bare "the upstream app raised an exception". Handlers
# catch their own errors, so nothing else reaches this path.
LAUNCH_OPTIONS = dict(show_error=True)


@dataclass
class Services:
    """What the tabs share in this process (one of each, thread-safe): the model cache, how many generation
    events (side-by-side runs) may run at once (the rest wait in Gradio's queue) and the per-session limits."""

    manager: ModelManager = field(default_factory=ModelManager)
    generation_concurrency: int = 2
    limiter: SessionLimiter = field(default_factory=lambda: SessionLimiter(per_window=0))


def services_from_env() -> Services:
    policy = host_policy()
    return Services(generation_concurrency=policy.generation_concurrency,
                    limiter=SessionLimiter(per_window=policy.runs_per_minute, window_s=60.0))


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


def listen_address(env=os.environ) -> tuple:
    """(host, port): QUANTSCOPE_HOST/PORT if set; else what a platform sets (Gradio's own GRADIO_SERVER_NAME/PORT
    on a Hugging Face Space, PORT on others); else loopback:7860. A Space must listen on 0.0.0.0."""
    host = env.get("QUANTSCOPE_HOST") or env.get("GRADIO_SERVER_NAME") or \
        ("0.0.0.0" if env.get("SPACE_ID") else "127.0.0.1")
    port = env.get("QUANTSCOPE_PORT") or env.get("GRADIO_SERVER_PORT") or env.get("PORT") or "7860"
    try:
        return host, int(port)
    except ValueError:
        raise ValueError(f"the port must be a whole number, got {port!r}") from None


def main() -> None:
    logging.basicConfig(level=os.environ.get("QUANTSCOPE_LOG_LEVEL", "INFO"))
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        services = services_from_env()
        host, port = listen_address()
    except ValueError as e:  # a bad QUANTSCOPE_* variable: one line, no traceback
        raise SystemExit(f"QuantScope host settings: {e}") from None
    demo = build_app(services)
    demo.queue(default_concurrency_limit=int(os.environ.get("QUANTSCOPE_CONCURRENCY", "4"))).launch(
        server_name=host, server_port=port, **LAUNCH_OPTIONS)


if __name__ == "__main__":
    main()
