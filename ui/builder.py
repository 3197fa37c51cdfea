"""Tab "Config builder": recommend a method, configure it, export code that runs with the pinned libraries.

Handlers: :func:`recommend_choice` (the guided part) and :func:`build_config` (api_name="build_config": form ->
snippet, JSON, pip line, memory estimate of exactly this configuration). Both return messages for bad input.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict

import gradio as gr

from engine.codegen import AWQ_FORMATS, DTYPES, GGUF_TYPES, LABELS, METHODS, STORAGE, ConfigChoice, build
from engine.errors import QuantScopeError
from engine.policy import host_policy
from engine.hardware import hardware_choices
from engine.recommend import GOALS, PRIORITIES, recommend
from engine.sources import preset_choices
from engine.units import GiB

log = logging.getLogger(__name__)
D = ConfigChoice()
FORM = ("method", "model", "device", "quant_type", "compute_dtype", "double_quant", "quant_storage", "skip_modules",
        "threshold", "cpu_offload", "bits", "group_size", "desc_act", "sym", "damp", "dataset", "zero_point",
        "awq_format", "axis", "gguf_type", "n_gpu_layers", "n_ctx", "lora_r", "lora_alpha", "lora_dropout",
        "target_modules")
GROUPS = {"bnb": ("bnb4", "qlora", "bnb8"), "quant": ("gptq", "awq", "hqq"), "gguf": ("gguf",),
          "lora": ("qlora", "lora")}


def _csv(v) -> tuple:
    if isinstance(v, (list, tuple)):
        return tuple(str(x).strip() for x in v if str(x).strip())
    return tuple(s.strip() for s in str(v or "").split(",") if s.strip())


def _int(v, name):
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise QuantScopeError(f"{name} must be a whole number, got {v!r}.") from None
    if f != int(f):
        raise QuantScopeError(f"{name} must be a whole number, got {v!r}.")
    return int(f)


def choice_from_form(values: dict) -> ConfigChoice:
    v = dict(values)
    v["skip_modules"] = _csv(v.get("skip_modules"))
    v["target_modules"] = _csv(v.get("target_modules"))
    for k in ("bits", "group_size", "axis", "n_gpu_layers", "n_ctx", "lora_r", "lora_alpha"):
        v[k] = _int(v[k], k.replace("_", " "))
    for k in ("threshold", "damp", "lora_dropout"):
        v[k] = float(v[k])
    return ConfigChoice(**{k: v[k] for k in FORM})


def estimate_md(c: ConfigChoice, hardware: str, context: int) -> str:
    from engine.codegen import calculator_method
    from engine.report import Selection, build as report

    mode = {"qlora": "qlora", "lora": "lora"}.get(c.method, "inference")
    gs = c.group_size if c.method in ("hqq", "gptq", "awq") else None
    try:
        host_policy().check_model(c.model)
        r = report(Selection(model=c.model, method=calculator_method(c), group_size=gs,
                             double_quant=c.double_quant if c.method in ("bnb4", "qlora") else False, context=context,
                             mode=mode, hardware=hardware, lora_rank=c.lora_r), compare=False)
    except QuantScopeError as e:
        return f"Memory estimate: not available for this model ({e})"
    e = r.estimate
    return (f"**Memory of exactly this configuration** ({mode}, context {context:,}): weights "
            f"{e.weights_bytes / GiB:.2f} GiB, total **{e.total_bytes / GiB:.2f} GiB** — {r.verdict.message}")


def build_config(method: str = D.method, model: str = D.model, device: str = D.device, quant_type: str = D.quant_type,
                 compute_dtype: str = D.compute_dtype, double_quant: bool = D.double_quant,
                 quant_storage: str = D.quant_storage, skip_modules: str = "", threshold: float = D.threshold,
                 cpu_offload: bool = D.cpu_offload, bits: float = D.bits, group_size: float = D.group_size,
                 desc_act: bool = D.desc_act, sym: bool = D.sym, damp: float = D.damp, dataset: str = D.dataset,
                 zero_point: bool = D.zero_point, awq_format: str = D.awq_format, axis: float = D.axis,
                 gguf_type: str = D.gguf_type, n_gpu_layers: float = D.n_gpu_layers, n_ctx: float = D.n_ctx,
                 lora_r: float = D.lora_r, lora_alpha: float = D.lora_alpha, lora_dropout: float = D.lora_dropout,
                 target_modules: str = ",".join(D.target_modules), hardware: str = "nvidia-t4",
                 context: float = 2048):
    """The tab's main event (api_name="build_config"): (python, json, pip, estimate, notes, side-by-side format)."""
    values = dict(locals())
    try:
        c = choice_from_form({k: values[k] for k in FORM})
        b = build(c)
        ctx = _int(context, "context")
    except QuantScopeError as e:
        msg = f"⚠️ Not emitted: {e}"
        return "# " + msg.replace("\n", " "), "{}", "", msg, "", ""
    except (TypeError, ValueError) as e:
        msg = f"⚠️ Not emitted: invalid value ({e})"
        return "# " + msg, "{}", "", msg, "", ""
    notes = "\n".join(f"- {n}" for n in b.notes)
    return (b.python, json.dumps(b.config_json, indent=2), b.pip, estimate_md(c, hardware, ctx), notes,
            b.engine_method or "")


def recommend_choice(goal: str = "inference", hardware: str = "nvidia-t4", priority: str = "quality",
                     model: str = D.model, context: float = 2048):
    """Guided choice: the recommendation text plus every form value it sets (method first)."""
    try:
        host_policy().check_model(model)
        r = recommend(goal, hardware, priority, model, _int(context, "context"))
    except QuantScopeError as e:
        return [f"⚠️ {e}"] + [gr.update() for _ in FORM]
    badge = {"fits": "<span style='color:#1a7f37'>FITS</span>", "tight": "<span style='color:#b7791f'>TIGHT</span>",
             "does not fit": "<span style='color:#cf222e'>DOES NOT FIT</span>"}.get(r.status, r.status)
    text = [f"### Recommended: {r.title} — {badge}", *[f"- {x}" for x in r.reasons], "", f"Calculator: {r.verdict}"]
    c = asdict(r.choice)
    c["skip_modules"] = ", ".join(c["skip_modules"])
    c["target_modules"] = ", ".join(c["target_modules"])
    return ["\n".join(text)] + [c[k] for k in FORM]


def visibility(method: str):
    """Show the settings of this method; set the defaults that make a switch valid at once (8-bit has no double
    quant; HQQ's usual group is 64, GPTQ/AWQ's 128)."""
    dq = gr.update(value=False) if method == "bnb8" else gr.update()
    gs = gr.update(value=64 if method == "hqq" else 128) if method in ("hqq", "gptq", "awq") else gr.update()
    return [gr.Accordion(visible=method in ms) for ms in GROUPS.values()] + [dq, gs]


def build_tab(open_compare=None):
    """Builds the tab; ``open_compare(pane_format)`` wiring is done by app.py through the returned button."""
    gr.Markdown("**How do I do it?** Tell it your goal, hardware and priority for a recommendation (the reference "
                "texts' decision rules, checked by the calculator), adjust the settings, and copy code that runs "
                "with today's libraries — tested against the embedded model for every format that runs on a CPU.")
    with gr.Row():
        goal = gr.Radio(list(GOALS), value="inference", label="Goal")
        hardware = gr.Dropdown(hardware_choices(), value="nvidia-t4", label="Hardware")
        priority = gr.Radio(list(PRIORITIES), value="quality", label="Priority")
        context = gr.Number(2048, label="Context (tokens)")
    with gr.Row():
        model = gr.Dropdown(preset_choices(), value=D.model, label="Model (Hub id or local folder)",
                            allow_custom_value=True, scale=3)
        rec_btn = gr.Button("Recommend", variant="primary", scale=1, elem_id="cfg-recommend")
    rec = gr.Markdown(elem_id="cfg-rec")
    with gr.Row():
        method = gr.Dropdown([(f"{LABELS[m]}", m) for m in METHODS], value=D.method, label="Method",
                             elem_id="cfg-method")
        device = gr.Radio(["auto", "cuda", "cpu"], value=D.device, label="Device")
    with gr.Accordion("bitsandbytes", open=True) as acc_bnb:
        with gr.Row():
            quant_type = gr.Radio(["nf4", "fp4"], value=D.quant_type, label="4-bit type")
            compute_dtype = gr.Dropdown(list(DTYPES), value=D.compute_dtype, label="Compute dtype")
            quant_storage = gr.Dropdown(list(STORAGE), value=D.quant_storage, label="Storage dtype")
            double_quant = gr.Checkbox(D.double_quant, label="Double quantization")
        with gr.Row():
            skip_modules = gr.Textbox("", label="Modules to skip (comma-separated)")
            threshold = gr.Number(D.threshold, label="8-bit outlier threshold")
            cpu_offload = gr.Checkbox(D.cpu_offload, label="8-bit: fp32 CPU offload")
    with gr.Accordion("GPTQ / AWQ / HQQ", open=True, visible=False) as acc_quant:
        with gr.Row():
            bits = gr.Number(D.bits, label="Bits")
            group_size = gr.Number(D.group_size, label="Group size")
            axis = gr.Radio([0, 1], value=D.axis, label="HQQ axis")
            awq_format = gr.Radio(list(AWQ_FORMATS), value=D.awq_format, label="AWQ format (was: version)")
        with gr.Row():
            desc_act = gr.Checkbox(D.desc_act, label="GPTQ desc_act")
            sym = gr.Checkbox(D.sym, label="GPTQ symmetric")
            damp = gr.Number(D.damp, label="GPTQ dampening")
            dataset = gr.Textbox(D.dataset, label="GPTQ calibration dataset")
            zero_point = gr.Checkbox(D.zero_point, label="AWQ zero point")
    with gr.Accordion("GGUF (llama.cpp)", open=True, visible=False) as acc_gguf:
        with gr.Row():
            gguf_type = gr.Dropdown(list(GGUF_TYPES), value=D.gguf_type, label="GGUF type")
            n_gpu_layers = gr.Number(D.n_gpu_layers, label="n_gpu_layers (-1 = all)")
            n_ctx = gr.Number(D.n_ctx, label="n_ctx")
    with gr.Accordion("LoRA", open=True, visible=False) as acc_lora:
        with gr.Row():
            lora_r = gr.Number(D.lora_r, label="r")
            lora_alpha = gr.Number(D.lora_alpha, label="alpha")
            lora_dropout = gr.Number(D.lora_dropout, label="dropout")
            target_modules = gr.Textbox(", ".join(D.target_modules), label="Target modules")
    estimate = gr.Markdown(elem_id="cfg-estimate")
    notes = gr.Markdown(elem_id="cfg-notes")
    pip = gr.Textbox(label="Install", buttons=["copy"], elem_id="cfg-pip")
    code = gr.Code(language="python", label="Python", elem_id="cfg-code")
    cfg_json = gr.Code(language="json", label="quantization_config (JSON)", elem_id="cfg-json")
    engine_fmt = gr.Textbox(visible=False)
    open_btn = gr.Button("Open this format in Side by side (vs bf16)", elem_id="cfg-open", visible=True)

    by_name = dict(method=method, model=model, device=device, quant_type=quant_type, compute_dtype=compute_dtype,
                   double_quant=double_quant, quant_storage=quant_storage, skip_modules=skip_modules,
                   threshold=threshold, cpu_offload=cpu_offload, bits=bits, group_size=group_size, desc_act=desc_act,
                   sym=sym, damp=damp, dataset=dataset, zero_point=zero_point, awq_format=awq_format, axis=axis,
                   gguf_type=gguf_type, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, lora_r=lora_r, lora_alpha=lora_alpha,
                   lora_dropout=lora_dropout, target_modules=target_modules)
    form = [by_name[k] for k in FORM]
    inputs = form + [hardware, context]
    outputs = [code, cfg_json, pip, estimate, notes, engine_fmt]
    gr.on([c.change for c in inputs], build_config, inputs, outputs, api_name="build_config",
          trigger_mode="always_last", concurrency_limit=None)
    method.change(visibility, method, [acc_bnb, acc_quant, acc_gguf, acc_lora, double_quant, group_size],
                  api_name=False, queue=False)
    rec_btn.click(recommend_choice, [goal, hardware, priority, model, context], [rec] + form,
                  api_name="recommend", concurrency_limit=None)
    return {"inputs": inputs, "outputs": outputs, "open": open_btn, "engine_format": engine_fmt}


def open_in_compare(fmt: str):
    """(selected tab, pane A..D) for the side-by-side tab: this format against bf16."""
    if not fmt:
        gr.Warning("This format does not run in the app's engine (GPTQ/AWQ need a GPU and a pre-quantized "
                   "checkpoint; GGUF types other than the shipped file need that file). Nothing to open.")
        return [gr.update()] * 5
    return [gr.Tabs(selected="compare"), "bf16", fmt, "(off)", "(off)"]


def on_load(demo: gr.Blocks, parts: dict) -> None:
    demo.load(build_config, parts["inputs"], parts["outputs"], api_name=False)
