"""Plotly figures, built as plotly's JSON (no gradio here, so handlers stay testable).

Why not ``plotly.graph_objects``: its validation (and the deep copy of the template it makes on every
``update_layout``) cost 15-30 ms per figure here, which under a class of 50 was most of the calculator's latency
(bench/load.py; a py-spy profile put 70% of the calculator's time in plotly). :class:`Figure` is the same JSON,
built directly in well under a millisecond; ``gr.Plot`` serialises any value with a ``to_json()`` method as a
plotly figure. The template (plotly_white) is plotly's own, converted once.
"""
from __future__ import annotations

import functools
import json
from typing import Optional

from engine.specs import MemoryEstimate
from engine.units import GiB


class Figure(dict):
    """A plotly figure as a plain dict ``{"data": [...], "layout": {...}}``."""

    def __init__(self, layout: Optional[dict] = None):
        super().__init__(data=[], layout={"template": template(), **(layout or {})})

    @property
    def data(self) -> list:
        return self["data"]

    @property
    def layout(self) -> dict:
        return self["layout"]

    def trace(self, type_: str, **kw) -> None:
        self["data"].append({"type": type_, **kw})

    def shape(self, **kw) -> None:
        self["layout"].setdefault("shapes", []).append(kw)

    def annotation(self, **kw) -> None:
        self["layout"].setdefault("annotations", []).append(kw)

    def hline(self, y: float, color: str, dash: str = "dash", yref: str = "y", xref: str = "x domain") -> None:
        self.shape(type="line", xref=xref, x0=0, x1=1, yref=yref, y0=y, y1=y, line=dict(color=color, dash=dash))

    def to_json(self) -> str:
        return json.dumps(self, separators=(",", ":"), allow_nan=False, default=_jsonable)


def _jsonable(v):
    if hasattr(v, "item"):  # numpy / torch scalars
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


@functools.lru_cache(maxsize=1)
def _template_json() -> str:
    import plotly.io as pio

    return json.dumps(pio.templates["plotly_white"].to_plotly_json())


def template() -> dict:
    """plotly_white as JSON (a fresh copy: figures may be edited)."""
    return json.loads(_template_json())


def _finite(values):
    """NaN and infinities are not JSON: plotly draws None as a gap."""
    return [None if v is None or v != v or v in (float("inf"), float("-inf")) else v for v in values]


PARTS = (("weights_bytes", "Weights", "#4C78A8"), ("kv_cache_bytes", "KV cache", "#F58518"),
         ("activations_bytes", "Activations (est.)", "#54A24B"), ("overhead_bytes", "Runtime overhead", "#B3B3B3"),
         ("gradients_bytes", "Gradients", "#E45756"), ("optimizer_bytes", "Optimizer states", "#B279A2"))


def memory_bars(rows: list[MemoryEstimate], capacity_bytes: int, capacity_label: str, selected: str) -> Figure:
    """Stacked bars, one per format, with the device's capacity as a horizontal line."""
    x = [r.method for r in rows]
    totals = [r.total_bytes / GiB for r in rows]
    top = max(totals + [capacity_bytes / GiB]) * 1.15
    fig = Figure(dict(barmode="stack", height=430, margin=dict(l=50, r=20, t=40, b=60),
                      yaxis=dict(title=dict(text="GiB (2³⁰ bytes)"), range=[0, top]),
                      legend=dict(orientation="h", y=1.08, x=0),
                      title=dict(text="Memory by format (highlighted: your selection)", font=dict(size=14), y=0.99)))
    for attr, name, color in PARTS:
        ys = [getattr(r, attr) / GiB for r in rows]
        if not any(ys):
            continue
        fig.trace("bar", name=name, x=x, y=ys, marker=dict(color=color),
                  hovertemplate="%{x}<br>" + name + ": %{y:.2f} GiB<extra></extra>")
    fig.trace("scatter", x=x, y=totals, mode="text", text=[f"{t:.1f}" for t in totals], textposition="top center",
              showlegend=False, hoverinfo="skip")
    # The capacity line is labelled in the legend, not by an annotation on the line: an annotation sat on
    # top of the total labels of every bar whose total is near the capacity.
    fig.hline(capacity_bytes / GiB, "#D62728")
    fig.trace("scatter", x=[x[0]] if x else [], y=[None] if x else [], mode="lines", hoverinfo="skip",
              line=dict(dash="dash", color="#D62728"), name=f"{capacity_label}: {capacity_bytes / GiB:.1f} GiB")
    if selected in x:
        i = x.index(selected)
        fig.shape(type="rect", xref="x", yref="y domain", x0=i - 0.45, x1=i + 0.45, y0=0, y1=1,
                  fillcolor="#FFD700", opacity=0.18, line=dict(width=0), layer="below")
    return fig


PANE_COLORS = ("#4C78A8", "#F58518", "#54A24B", "#E45756")
KL_ROWS = ((0.58, 1.0), (0.0, 0.42))  # two stacked plots, 0.16 apart (plotly's make_subplots layout)


def kl_lines(series: list[tuple[str, str, list[float], list[str]]]) -> Figure:
    """Per-token KL divergence from pane A along a text: one line per (pane label, which text, KL values, token
    texts for the hover). Two rows: A's own answer, and the shipped reference text."""
    letters = sorted({s[0] for s in series})
    fig = Figure(dict(height=500, margin=dict(l=55, r=20, t=95, b=50),
                      legend=dict(orientation="h", y=1.1, yanchor="bottom", x=1, xanchor="right"),
                      title=dict(text="Per-token KL from pane A" if letters else "Run a comparison to see per-token KL",
                                 font=dict(size=14), x=0, y=0.98),
                      xaxis=dict(anchor="y", domain=[0, 1]), yaxis=dict(anchor="x", domain=list(KL_ROWS[0]),
                                                                        title=dict(text="KL (nats)"),
                                                                        rangemode="tozero"),
                      xaxis2=dict(anchor="y2", domain=[0, 1], title=dict(text="token position")),
                      yaxis2=dict(anchor="x2", domain=list(KL_ROWS[1]), title=dict(text="KL (nats)"),
                                  rangemode="tozero")))
    for (_, hi), text in zip(KL_ROWS, ("On pane A's answer (teacher-forced)", "On the reference text")):
        fig.annotation(text=text, x=0.5, xref="paper", xanchor="center", y=hi, yref="paper", yanchor="bottom",
                       showarrow=False, font=dict(size=16))
    if not series:  # plotly draws a subplot's axes only once a trace uses them: one empty trace per row
        for xa, ya in (("x", "y"), ("x2", "y2")):
            fig.trace("scatter", x=[], y=[], xaxis=xa, yaxis=ya, showlegend=False, hoverinfo="skip")
    answered = {s[0] for s in series if s[1] == "answer"}
    for label, which, kl, toks in series:
        row = 1 if which == "answer" else 2
        color = PANE_COLORS["ABCD".index(label[0]) % len(PANE_COLORS)] if label[:1] in "ABCD" else None
        fig.trace("scatter", x=list(range(len(kl))), y=_finite(kl), mode="lines", name=label, legendgroup=label,
                  showlegend=row == 1 or label not in answered, line=dict(color=color, width=1.6),
                  customdata=list(toks), xaxis="x" if row == 1 else "x2", yaxis="y" if row == 1 else "y2",
                  hovertemplate="token %{x}: %{customdata}<br>KL %{y:.4f} nats<extra>" + label + "</extra>")
    return fig


EVENT_STYLE = {"load": ("#2ca02c", "loaded"), "unload": ("#7f7f7f", "unloaded"),
               "generate_start": ("#1f77b4", "generation start"), "generate_stop": ("#9467bd", "generation stop"),
               "load_start": ("#bcbd22", "loading")}


GAP_S = 3.0  # samples further apart than this (the sampler stopped) are not joined by a line


def monitor_figures(snaps: list, events: list, now: float) -> tuple[Figure, Figure]:
    """(memory figure, activity figure) from monitor snapshots and engine events; x = seconds before now.

    Where the sampler was paused (nobody watching) the lines break instead of joining across the pause."""
    raw_xs = [s.t - now for s in snaps]
    breaks = {i for i in range(1, len(raw_xs)) if raw_xs[i] - raw_xs[i - 1] > GAP_S}

    def gapped(values, fill=lambda i: None):
        out = []
        for i, v in enumerate(values):
            if i in breaks:
                out.append(fill(i))
            out.append(v)
        return out

    xs = gapped(raw_xs, fill=lambda i: (raw_xs[i - 1] + raw_xs[i]) / 2)  # the gap's own point: every line has None

    def frame(title: str) -> Figure:
        return Figure(dict(height=260, margin=dict(l=45, r=45, t=35, b=35),
                           title=dict(text=title, font=dict(size=13), x=0), legend=dict(orientation="h", y=-0.25),
                           xaxis=dict(title=None, ticksuffix=" s", range=[min(raw_xs + [-60]), 0]),
                           yaxis=dict(rangemode="tozero")))

    gpu_ids = sorted({g.index for s in snaps for g in s.gpus if g.error is None})
    if gpu_ids:
        mem, act = frame("GPU memory (GiB)"), frame("GPU utilisation (%) and power (W)")
        for i in gpu_ids:
            g_at = [next((g for g in s.gpus if g.index == i), None) for s in snaps]
            name = next((g.name for g in g_at if g is not None), f"GPU {i}")
            mem.trace("scatter", x=xs, y=gapped([None if g is None or g.memory_used is None
                                                 else g.memory_used / GiB for g in g_at]), mode="lines", name=f"GPU {i} used", line=dict(width=2))
            mine = [None if g is None else next((p.used_bytes / GiB for p in g.processes
                                                 if p.this_process and p.used_bytes is not None), None) for g in g_at]
            if any(v is not None for v in mine):
                mem.trace("scatter", x=xs, y=gapped(mine), mode="lines", name=f"GPU {i}: this app", line=dict(dash="dot"))
            total = next((g.memory_total for g in reversed(g_at) if g is not None and g.memory_total), None)
            if total:
                mem.hline(total / GiB, "#D62728")
                mem.annotation(text=f"{name}: {total / GiB:.0f} GiB", xref="x domain", x=0, xanchor="left",
                               yref="y", y=total / GiB, yanchor="bottom", showarrow=False)
            act.trace("scatter", x=xs, y=gapped([None if g is None else g.utilization for g in g_at]), mode="lines",
                      name=f"GPU {i} util %")
            act.trace("scatter", x=xs, y=gapped([None if g is None else g.power_w for g in g_at]), mode="lines",
                      name=f"GPU {i} power W", yaxis="y2", line=dict(dash="dot"))
    else:
        why = snaps[-1].nvml if snaps else ""
        mem = frame(f"Memory (GiB) — CPU only: {why}" if why else "Memory (GiB)")
        act = frame("CPU utilisation (%)")
        mem.trace("scatter", x=xs, y=gapped([None if s.host.ram_used is None else s.host.ram_used / GiB
                                             for s in snaps]), mode="lines", name="RAM used (host)")
        mem.trace("scatter", x=xs, y=gapped([None if s.host.process_rss is None else s.host.process_rss / GiB
                                             for s in snaps]), mode="lines", name="this app (RSS)")
        act.trace("scatter", x=xs, y=gapped([s.host.cpu_percent for s in snaps]), mode="lines", name="CPU %")
    for e in events:
        color, text = EVENT_STYLE.get(e.kind, ("#999", e.kind))
        mem.shape(type="line", xref="x", x0=e.t - now, x1=e.t - now, yref="y domain", y0=0, y1=1,
                  line=dict(color=color, width=1), opacity=0.7)
        mem.trace("scatter", x=[e.t - now], y=[0], mode="markers",
                  marker=dict(color=color, size=8, symbol="triangle-up"), showlegend=False,
                  hovertemplate=f"{text}: {e.label}<extra></extra>")
    act.layout["yaxis"].update(range=[0, 105])
    act.layout["yaxis2"] = dict(overlaying="y", side="right", rangemode="tozero", showgrid=False)
    return mem, act
