"""Tab "Memory calculator": will this model fit, in which format, at which context?"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, fields

import gradio as gr

from engine.errors import QuantScopeError
from engine.policy import host_policy
from engine.hardware import hardware_choices
from engine.report import Selection, build, explain
from engine.sources import preset_choices
from ui.charts import memory_bars

log = logging.getLogger(__name__)
D = Selection()  # the tab's initial selection = every parameter's default
METHOD_CHOICES = ["fp32", "fp16", "bf16", "int8", "nf4", "fp4", "hqq8", "hqq6", "hqq5", "hqq4", "hqq3", "hqq2",
                  "hqq1", "gptq8", "gptq4", "gptq3", "gptq2", "awq4", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m",
                  "q4_k_s", "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k", "iq4_xs", "iq3_m", "iq2_xs", "iq1_m"]
KV_CHOICES = ["auto", "fp16", "bf16", "fp32", "fp8", "q8_0", "q4_0"]
BADGE = {"fits": "<span style='color:#1a7f37'>FITS</span>", "tight": "<span style='color:#b7791f'>TIGHT</span>",
         "does not fit": "<span style='color:#cf222e'>DOES NOT FIT</span>"}


def selection_from(values: dict) -> Selection:
    """A Selection from loose values (JSON or URL query), ignoring unknown keys."""
    names = {f.name for f in fields(Selection)}
    return Selection(**{k: v for k, v in values.items() if k in names})


def estimate(model: str = D.model, method: str = D.method, group_size: float = 0, double_quant: bool = D.double_quant,
             context: float = D.context, batch: float = D.batch, kv_dtype: str = D.kv_dtype, mode: str = D.mode,
             hardware: str = D.hardware, lora_rank: float = D.lora_rank, optimizer: str = D.optimizer,
             gradient_checkpointing: bool = D.gradient_checkpointing, overhead_mib: float = -1,
             int8_outlier_pct: float = D.int8_outlier_pct):
    """The tab's main event (api_name="estimate"): verdict, chart, worked formula, shareable JSON.

    Bad input never raises: the verdict box says what was wrong and what to do.
    """
    def num(v):
        # Number boxes give floats (or None when cleared); API callers may send strings. Keep whole numbers
        # whole, read numeric strings ("4096", "nan"), pass the rest to the engine so that it explains
        # what is wrong with them.
        if v is None:
            return None
        if isinstance(v, str):
            try:
                v = float(v.strip())
            except ValueError:
                return v
        return int(v) if isinstance(v, float) and v == v and abs(v) < 1e18 and v == int(v) else v

    # A negative overhead means "the device default"; anything that is not a number (or NaN) goes to the
    # engine, which explains it (comparing it with 0 here raised a TypeError before the try below).
    overhead_mib = num(overhead_mib)
    default_overhead = overhead_mib is None or (isinstance(overhead_mib, (int, float)) and overhead_mib < 0)
    sel = Selection(model=model, method=method, group_size=num(group_size) or None, double_quant=bool(double_quant),
                    context=num(context), batch=num(batch), kv_dtype=kv_dtype, mode=mode, hardware=hardware,
                    lora_rank=num(lora_rank), optimizer=optimizer, gradient_checkpointing=bool(gradient_checkpointing),
                    overhead_mib=None if default_overhead else overhead_mib,
                    int8_outlier_pct=D.int8_outlier_pct if int8_outlier_pct is None else num(int8_outlier_pct))
    share = json.dumps(asdict(sel))
    try:
        host_policy().check_model(sel.model)
        r = build(sel)
    except QuantScopeError as e:
        return f"### <span style='color:#cf222e'>Input problem:</span> {e}", None, "", share
    except Exception:  # never a traceback on the page
        log.exception("estimate failed for %r", sel)
        return "### <span style='color:#cf222e'>Error:</span> Something went wrong computing this estimate; the error was logged. Try other values.", \
            None, "", share
    v = r.verdict
    head = (f"### {BADGE[v.status]} {v.message}\n"
            f"**{r.quant.name}** · {r.model.name} · context {sel.context:,} × batch {sel.batch} · {sel.mode}"
            f" · max context that fits: **{v.max_context:,}** tokens"
            + (f" · GPUs needed: **{v.gpus_needed}**" if r.hardware.kind == "gpu" else ""))
    rows = list(r.comparison)
    if r.estimate.method not in [x.method for x in rows]:
        rows.append(r.estimate)
    fig = memory_bars(rows, r.hardware.memory_bytes, r.hardware.name, r.estimate.method)
    return head, fig, explain(r), share


def load_shared(share_json: str):
    """Fill the inputs from a pasted selection JSON."""
    try:
        sel = selection_from(json.loads(share_json or "{}"))
    except (json.JSONDecodeError, TypeError, AttributeError):
        gr.Warning("That is not a selection JSON (copy it from the box above).")
        return [gr.update()] * len(fields(Selection))  # one per input, in _values' order
    return _values(sel)


def from_url(request: gr.Request):
    """Fill the inputs from the page URL's query (?model=...&method=nf4&context=8192)."""
    q = dict(request.query_params) if request else {}
    vals = {}
    for f in fields(Selection):
        if f.name in q:
            raw = q[f.name]
            if f.name in ("double_quant", "gradient_checkpointing"):
                vals[f.name] = raw.lower() in ("1", "true", "yes")
            elif f.name in ("context", "batch", "group_size", "lora_rank", "overhead_mib", "int8_outlier_pct"):
                try:
                    v = float(raw)
                    vals[f.name] = v if f.name == "int8_outlier_pct" and v != int(v) else int(v)
                except (ValueError, OverflowError):
                    continue
            else:
                vals[f.name] = raw
    allowed = {"hardware": [h for _, h in hardware_choices()], "kv_dtype": KV_CHOICES,
               "mode": ["inference", "lora", "qlora", "full"], "optimizer": ["adamw", "adamw8bit", "sgd"]}
    for key, ok in allowed.items():
        if key in vals and vals[key] not in ok:
            gr.Warning(f"The link's {key} '{vals.pop(key)}' is unknown; using the default. Choose one of: {', '.join(ok)}.")
    return _values(selection_from(vals))


def _values(s: Selection):
    return [s.model, s.method, s.group_size or 0, s.double_quant, s.context, s.batch, s.kv_dtype, s.mode,
            s.hardware, s.lora_rank, s.optimizer, s.gradient_checkpointing,
            -1 if s.overhead_mib is None else s.overhead_mib, s.int8_outlier_pct]


def build_tab(services=None) -> None:
    # The number boxes have no precision or minimum on purpose: gr.Number(precision=0) runs int(round(x))
    # before the handler, so an API call with NaN, infinity or a string ended in a bare "error" (a traceback
    # in the log) and 0.5 became 0 silently. Every value reaches estimate(), whose engine call says what
    # is wrong with it; whole floats are made ints there.
    gr.Markdown("Will this model fit, in which format, at which context? Weights and KV cache are exact byte "
                "counts (checked against real quantized models); activations and overhead are estimates.")
    with gr.Row():
        with gr.Column(scale=1, min_width=320):
            model = gr.Dropdown(preset_choices(), value=D.model, label="Model", allow_custom_value=True,
                                info="A preset, a Hub id (owner/name), a local config.json or .gguf file, or a "
                                     "parameter count like 7B")
            method = gr.Dropdown(METHOD_CHOICES, value=D.method, label="Format", allow_custom_value=True)
            with gr.Row():
                group_size = gr.Number(0, label="Group size (0 = default)", step=1)
                double_quant = gr.Checkbox(D.double_quant, label="Double quant (bnb 4-bit)")
            with gr.Row():
                context = gr.Number(D.context, label="Context (tokens)", step=1)
                batch = gr.Number(D.batch, label="Batch", step=1)
            kv_dtype = gr.Dropdown(KV_CHOICES, value=D.kv_dtype, label="KV-cache dtype")
            mode = gr.Radio(["inference", "lora", "qlora", "full"], value=D.mode, label="Mode")
            hardware = gr.Dropdown(hardware_choices(), value=D.hardware, label="Hardware")
            with gr.Accordion("Training, overhead and LLM.int8", open=False):
                lora_rank = gr.Number(D.lora_rank, label="LoRA rank", step=1)
                optimizer = gr.Dropdown(["adamw", "adamw8bit", "sgd"], value=D.optimizer, label="Optimizer")
                grad_ckpt = gr.Checkbox(D.gradient_checkpointing, label="Gradient checkpointing")
                overhead = gr.Number(-1, label="Runtime overhead MiB (-1 = device default)")
                int8_outliers = gr.Number(D.int8_outlier_pct, label="LLM.int8 outlier columns % (100 = the bound)",
                                          info="int8 only: the share of a layer's input columns holding a value of "
                                               "6.0 or more; it depends on the prompt. Side by side shows what an "
                                               "int8 run's prompt had.")
        with gr.Column(scale=2):
            verdict = gr.Markdown(elem_id="calc-verdict")
            chart = gr.Plot(show_label=False, elem_id="calc-chart")
    explanation = gr.Markdown(elem_id="calc-explain")
    with gr.Accordion("Share this selection", open=False):
        share = gr.Textbox(label="Selection JSON (copy it, or paste one and press Load)", lines=2,
                           buttons=["copy"], elem_id="calc-share")
        gr.Markdown("The page also reads its URL: `?model=Qwen/Qwen2.5-7B-Instruct&method=q4_k_m&context=8192`.")
        load = gr.Button("Load", size="sm")
    inputs = [model, method, group_size, double_quant, context, batch, kv_dtype, mode, hardware, lora_rank,
              optimizer, grad_ckpt, overhead, int8_outliers]
    outputs = [verdict, chart, explanation, share]
    gr.on([i.change for i in inputs], estimate, inputs, outputs, api_name="estimate", trigger_mode="always_last",
          concurrency_limit=None)
    load.click(load_shared, share, inputs, api_name=False)
    return inputs, outputs


def on_load(demo: gr.Blocks, inputs, outputs) -> None:
    demo.load(from_url, None, inputs, api_name=False).then(estimate, inputs, outputs, api_name=False)
