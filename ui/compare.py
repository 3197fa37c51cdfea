"""Tab "Side by side": one prompt, up to four formats of one model streaming together, measured against pane A.

The handler :func:`compare` is a generator (api_name="compare"); it turns the engine's
:class:`~engine.compare.CompareState` snapshots into component values with :func:`render`. Every parameter has a
default (the tab's initial setup: the embedded model, bf16 vs NF4), so ``Client(url).predict(api_name="/compare")``
runs a real comparison.
"""
from __future__ import annotations

import contextlib
import html
import logging
import threading
import time
from typing import Optional

import gradio as gr

from engine.backends.base import GenerationSettings
from engine.compare import MAX_PANES, OFF, PANE_CHOICES, CompareState, PaneState, run_compare
from engine.errors import QuantScopeError
from engine.policy import host_policy
from engine.quality import token_agreement
from engine.ratelimit import SessionLimiter
from engine.units import MiB
from ui.charts import kl_lines
from ui.zerogpu import gpu_handler

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "Explain in three sentences why a lighthouse flashes in a pattern."
DEFAULT_PANES = ("bf16", "nf4", OFF, OFF)
DIFF_LABEL = "differs from A"
FIRST_LABEL = "first difference"

STREAM_INTERVAL_S = 0.15  # at most ~7 token updates a second per run reach the page

# One-click comparisons for a class (pane A is always the 16-bit baseline).
ONLINE_SUGGESTION = "HuggingFaceTB/SmolLM2-360M-Instruct"  # a small instruct model, when online
PRESETS = {
    "The lesson's setup: bf16 vs NF4 + double quant": ("bf16", "nf4 + double quant", OFF, OFF),
    "bitsandbytes: bf16 vs int8 vs NF4 vs FP4": ("bf16", "int8", "nf4", "fp4"),
    "How low can you go: HQQ 4 / 3 / 2-bit vs bf16": ("bf16", "hqq4", "hqq3", "hqq2"),
    "Three toolkits at 4 bits: NF4 vs HQQ vs GGUF": ("bf16", "nf4", "hqq4", "gguf"),
    "Plain vs fast path: HQQ 4-bit and bf16, each both ways": ("bf16", "bf16 fast", "hqq4", "hqq4 fast"),
    "Sanity check: bf16 vs bf16 (identical → KL 0)": ("bf16", "bf16", OFF, OFF),
}


# ---------------------------------------------------------------------------------------------
# Rendering (pure: state -> component values)
# ---------------------------------------------------------------------------------------------
def _mib(n: Optional[int]) -> str:
    return "–" if n is None else f"{n / MiB:,.0f} MiB"


def _s(x: Optional[float], unit: str = "s", digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f} {unit}"


PEAK_KIND = {"rss": "process RSS, all panes", "cuda_max_allocated": "CUDA allocator, all panes",
             "nvml_process": "NVML process, all panes"}


def pane_header(p: PaneState) -> str:
    head = f"### {p.letter} · {html.escape(p.choice)}"
    status = {"waiting": "waiting", "loading": "loading…", "loaded": "loaded, starting…",
              "streaming": "generating…", "done": "done", "cancelled": "stopped", "error": "failed"}[p.status]
    lines = [head, f"**{status}**" + (f" · {p.backend}" if p.backend else "")]
    if p.error:
        lines.append(f"⚠️ {html.escape(p.error)}")
        return "\n\n".join(lines)
    if p.load_s is not None:
        load = f"load {_s(p.load_s, digits=1)}" + (" (already loaded)" if p.cached else "")
        if p.quantize_s:
            load += f", of which quantizing {_s(p.quantize_s, digits=1)}"
        lines.append(load)
    m = p.metrics
    if m is not None:
        lines.append(f"TTFT {_s(m.ttft_s)} · **{_s(m.tokens_per_s, 'tok/s', 1)}** · {m.tokens} tokens "
                     f"({m.finish_reason})")
        if m.decode_path:
            lines.append(f"decode: {html.escape(m.decode_path)}")
        pred_w = _mib(m.predicted_weights_bytes)
        lines.append(f"weights {_mib(m.weights_bytes)} (calculator: {pred_w})")
        lines.append(f"peak {_mib(m.peak_bytes)} ({PEAK_KIND.get(m.peak_kind, m.peak_kind)}) · "
                     f"this model predicted {_mib(m.predicted_bytes)}")
        if m.int8_outliers is not None:
            kind, share = m.int8_outliers
            lines.append(f"LLM.int8 outlier columns in this prompt: **{share:.0%}** of {html.escape(kind)}'s inputs "
                         "(the calculator's outlier share; predicted with it)")
    elif p.pieces:
        lines.append(f"{len(p.token_ids)} tokens so far")
    if p.agreement is not None and p.index > 0:
        a = p.agreement
        first = "none" if a.first_divergence is None else f"token {a.first_divergence + 1}"
        lines.append(f"identical to A: **{a.percent:.0f}%** of {a.compared} tokens · first difference: {first}")
    return "\n\n".join(lines)


def pane_tokens(p: PaneState, baseline: Optional[PaneState]) -> list:
    """(text, label) pieces for gr.HighlightedText: tokens that differ from A's at the same position are marked
    (live: against A's tokens so far)."""
    if not p.pieces:
        return []
    if baseline is None or p.index == 0:
        return [(t, None) for t, _ in p.pieces]
    base_ids = baseline.token_ids
    out, k, first = [], 0, True
    for text, tid in p.pieces:
        label = None
        if tid is not None:
            differs = (k < len(base_ids) and tid != base_ids[k]) or (
                k >= len(base_ids) and baseline.status in ("done", "cancelled", "error"))  # A stopped before
            if differs:
                label, first = (FIRST_LABEL if first else DIFF_LABEL), False
            k += 1
        out.append((text, label))
    return out


def quality_table(state: CompareState) -> str:
    rows = [p for p in state.panes[1:]]
    if not rows:
        return "Add a second pane to compare it with pane A."
    if state.phase in ("load", "generate"):
        return "The comparison with pane A (per-token KL, top-1 agreement, perplexity) appears when every pane is done."
    out = ["| | format | same tokens as A | KL on A's answer (mean / max) | top-1 agreement | "
           "perplexity of A's answer (A → pane) | KL on reference text | top-1 (ref) | perplexity of ref (A → pane) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for p in rows:
        a, q, r = p.agreement, p.answer_quality, p.reference_quality
        same = "–" if a is None else f"{a.percent:.0f}%"
        cells = [p.letter, html.escape(p.choice), same]
        if q is not None:
            cells += [f"{q.mean_kl:.4f} / {q.max_kl:.3f}", f"{q.top1_agreement:.0f}%", f"{q.ppl_baseline:.2f} → {q.ppl_pane:.2f}"]
        else:
            cells += ["–", "–", "–"]
        if r is not None:
            cells += [f"{r.mean_kl:.4f}", f"{r.top1_agreement:.0f}%", f"{r.ppl_baseline:.1f} → {r.ppl_pane:.1f}"]
        else:
            cells += ["–", "–", "–"]
        out.append("| " + " | ".join(cells) + " |")
    notes = [f"- {p.letter}: {html.escape(p.quality_note)}" for p in rows if p.quality_note]
    out.append("")
    out.append("KL is in nats, KL(P_A ‖ P_pane) per token, with both models reading the same tokens "
               "(teacher forcing); 0 means the pane predicts exactly what A predicts. Perplexity: lower is better.")
    return "\n".join(out + ([""] + notes if notes else []))


def kl_figure(state: CompareState):
    base = state.panes[0] if state.panes else None
    series = []
    for p in state.panes[1:]:
        label = f"{p.letter} · {p.choice}"
        if p.answer_quality is not None and base is not None:
            toks = [t for t, i in base.pieces if i is not None]
            series.append((label, "answer", p.answer_quality.kl, toks[: len(p.answer_quality.kl)]))
        if p.reference_quality is not None:
            series.append((label, "reference", p.reference_quality.kl, [""] * len(p.reference_quality.kl)))
    return kl_lines(series)


def render(state: CompareState, full: bool = True) -> list:
    """Component values for one snapshot: status, 4 headers, 4 token boxes, quality table, KL chart, JSON.

    ``full=False`` (a token update while streaming) leaves the quality table and the chart as they are: they
    change only between phases, and building the plotly figure for every token cost more CPU than the tokens.
    """
    base = state.panes[0] if state.panes else None
    headers, boxes = [], []
    for i in range(MAX_PANES):
        p = state.panes[i] if i < len(state.panes) else None
        headers.append("" if p is None else pane_header(p))
        boxes.append([] if p is None else pane_tokens(p, base))
    heavy = [quality_table(state), kl_figure(state)] if full else [gr.skip(), gr.skip()]
    return [status_line(state)] + headers + boxes + heavy + [state.to_dict()]


def throttled(states, interval_s: float = STREAM_INTERVAL_S):
    """(state, full) pairs: every phase change and the last state in full; token updates in between at most
    one per ``interval_s`` (a page cannot show more, and each update costs the server a diff of every output)."""
    last_phase, last_t, pending = None, float("-inf"), None
    for state in states:
        now = time.monotonic()
        if state.phase != last_phase or state.phase in ("done", "cancelled"):
            last_phase, last_t, pending = state.phase, now, None
            yield state, True
        elif now - last_t >= interval_s:
            last_t, pending = now, None
            yield state, False
        else:
            pending = state
    if pending is not None:
        yield pending, True


def status_line(state: CompareState) -> str:
    extra = []
    if state.load_wall_s is not None:
        extra.append(f"loads {state.load_wall_s:.1f} s")
    if state.generate_wall_s is not None:
        extra.append(f"generation {state.generate_wall_s:.1f} s")
    if state.score_wall_s is not None:
        extra.append(f"scoring {state.score_wall_s:.1f} s")
    return f"**{state.message}**" + (f" ({', '.join(extra)})" if extra else "")


def message_only(text: str) -> list:
    """Every output for a run that could not start (or broke): the message and the error in the numbers; the
    panes, the table and the chart keep what the last comparison showed, so a mistyped input loses nothing."""
    return [f"⚠️ {text}"] + [gr.skip()] * (2 * MAX_PANES + 2) + [{"error": text}]


# ---------------------------------------------------------------------------------------------
# The handler
# ---------------------------------------------------------------------------------------------
def compare(manager, model: str = "embedded", prompt: str = DEFAULT_PROMPT, pane_a: str = DEFAULT_PANES[0],
            pane_b: str = DEFAULT_PANES[1], pane_c: str = DEFAULT_PANES[2], pane_d: str = DEFAULT_PANES[3],
            max_new_tokens: float = 64, temperature: float = 0.0, seed: float = 0, *,
            limiter: Optional[SessionLimiter] = None, session: Optional[str] = None):
    """Stream a comparison (api_name="compare"). Bad input gives a message, never a traceback.

    ``limiter`` (per-session limits) admits the run for ``session`` after the inputs are checked, so a refused
    input does not use up the session's allowance."""
    cancel = threading.Event()
    try:
        n = int(max_new_tokens) if isinstance(max_new_tokens, (int, float)) and max_new_tokens == max_new_tokens \
            else max_new_tokens
        sd = int(seed) if isinstance(seed, (int, float)) and seed == seed else None
        settings = GenerationSettings(max_new_tokens=n, temperature=float(temperature or 0.0), seed=sd)
        if pane_a in (None, "", OFF):
            yield message_only("Pane A is the baseline: choose a format for it (bf16 is the usual one).")
            return
        policy = host_policy()
        ref = policy.check_model((model or "embedded").strip())
        policy.check_model_size(ref)
        policy.check_formats([pane_a, pane_b, pane_c, pane_d])
        policy.check_generation(prompt or "", settings.max_new_tokens)
        stream = run_compare(manager, ref, [pane_a, pane_b, pane_c, pane_d], prompt or "", settings,
                             cancel=cancel, max_prompt_chars=policy.max_prompt_chars)  # validates, runs nothing
        with limiter.run(session) if limiter is not None else contextlib.nullcontext():
            for state, full in throttled(stream):
                yield render(state, full)
    except QuantScopeError as e:
        yield message_only(str(e))
    except (TypeError, ValueError) as e:
        yield message_only(f"Invalid setting: {e}")
    except Exception:  # noqa: BLE001 - the page gets a message, the log gets the traceback
        log.exception("compare failed")
        yield message_only("Something went wrong on the server while comparing; the error was logged. "
                           "Try again, or with fewer panes.")
    finally:
        cancel.set()  # the stop button / a closed tab close this generator: stop every pane


def apply_preset(name: str):
    panes = PRESETS.get(name)
    if panes is None:
        return [gr.update()] * MAX_PANES
    return list(panes)


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------
def build_tab(services) -> None:
    manager, limiter = services.manager, services.limiter

    # A real function (not functools.partial): Gradio passes gr.Request only to a parameter it can see annotated.
    def run_compare_event(model: str = "embedded", prompt: str = DEFAULT_PROMPT, pane_a: str = DEFAULT_PANES[0],
                          pane_b: str = DEFAULT_PANES[1], pane_c: str = DEFAULT_PANES[2],
                          pane_d: str = DEFAULT_PANES[3], max_new_tokens: float = 64, temperature: float = 0.0,
                          seed: float = 0, request: gr.Request = None):
        yield from compare(manager, model, prompt, pane_a, pane_b, pane_c, pane_d, max_new_tokens, temperature,
                           seed, limiter=limiter, session=getattr(request, "session_hash", None))

    gr.Markdown("Same prompt, several formats of one model, **streaming at the same time**. Pane A is the 16-bit "
                "baseline; tokens where another pane departs from A are highlighted. When every pane is done, "
                "each one is measured against A with both models reading the same tokens (teacher forcing): "
                "per-token KL divergence, top-1 agreement and perplexity, on A's answer and on a short "
                "reference text.")
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", lines=2, max_lines=8, elem_id="cmp-prompt")
        with gr.Column(scale=2):
            preset = gr.Dropdown(list(PRESETS), value=None, label="Classroom presets",
                                 info="Fills the panes with a ready-made comparison", elem_id="cmp-preset")
    with gr.Row():
        model = gr.Dropdown(["embedded", ONLINE_SUGGESTION], value="embedded", label="Model", allow_custom_value=True,
                            scale=2, info="embedded = SmolLM2-135M-Instruct shipped with the app (its 16-bit weights "
                                          "are the exact dequantisation of a Q4_1 GGUF); or a Hub id, downloaded "
                                          "when online (owner/name:FILE for a GGUF repository), or a local folder")
        pane_inputs = []
        for i, letter in enumerate("ABCD"):
            choices = list(PANE_CHOICES) + ([OFF] if i >= 1 else [])
            # allow_custom_value: a format typed in (or sent through the API) reaches the handler, which
            # explains what is wrong with it, instead of Gradio's bare "not in the list of choices".
            pane_inputs.append(gr.Dropdown(choices, value=DEFAULT_PANES[i], label=f"Pane {letter}",
                                           elem_id=f"cmp-pane-{letter.lower()}", scale=1, allow_custom_value=True))
    with gr.Row():
        max_new = gr.Slider(1, 512, value=64, step=1, label="Max new tokens")
        temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature (0 = greedy)")
        seed = gr.Number(0, label="Seed", precision=0)
        run = gr.Button("Compare", variant="primary", elem_id="cmp-run")
        stop = gr.Button("Stop", variant="stop", elem_id="cmp-stop")
    status = gr.Markdown(elem_id="cmp-status")
    headers, boxes, columns = [], [], []
    with gr.Row(equal_height=False):
        for i, letter in enumerate("ABCD"):
            with gr.Column(min_width=240, visible=DEFAULT_PANES[i] != OFF) as col:
                columns.append(col)
                headers.append(gr.Markdown(elem_id=f"cmp-head-{letter.lower()}"))
                boxes.append(gr.HighlightedText(label=f"Pane {letter}", show_inline_category=False,
                                                color_map={FIRST_LABEL: "#e45756", DIFF_LABEL: "#f8c8c8"},
                                                show_legend=letter != "A", combine_adjacent=True,
                                                adjacent_separator="", elem_id=f"cmp-text-{letter.lower()}"))
    table = gr.Markdown(elem_id="cmp-quality")
    chart = gr.Plot(kl_lines([]), show_label=False, elem_id="cmp-chart")
    with gr.Accordion("All numbers (JSON)", open=False):
        raw = gr.JSON(label="Comparison")
    gr.Markdown("Peak memory in a pane header is the whole process's (all panes share it); the calculator's "
                "prediction is for that pane's model alone.")

    inputs = [model, prompt] + pane_inputs + [max_new, temperature, seed]
    outputs = [status] + headers + boxes + [table, chart, raw]
    handler = gpu_handler(run_compare_event)
    ev = run.click(handler, inputs, outputs, api_name="compare", concurrency_limit=services.generation_concurrency,
                   concurrency_id="generation")
    ev2 = prompt.submit(handler, inputs, outputs, api_name=False, concurrency_limit=services.generation_concurrency,
                        concurrency_id="generation")
    stop.click(None, None, None, cancels=[ev, ev2], api_name=False)
    preset.change(apply_preset, preset, pane_inputs, api_name=False)
    parts = {"panes": pane_inputs}
    for dd, col in zip(pane_inputs[1:], columns[1:]):  # a pane that is off takes no room
        dd.change(lambda v: gr.Column(visible=v not in (None, "", OFF)), dd, col, api_name=False, queue=False)
    return parts
