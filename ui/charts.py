"""Plotly figures (no gradio here, so handlers stay testable)."""
from __future__ import annotations

import plotly.graph_objects as go

from engine.specs import MemoryEstimate
from engine.units import GiB

PARTS = (("weights_bytes", "Weights", "#4C78A8"), ("kv_cache_bytes", "KV cache", "#F58518"),
         ("activations_bytes", "Activations (est.)", "#54A24B"), ("overhead_bytes", "Runtime overhead", "#B3B3B3"),
         ("gradients_bytes", "Gradients", "#E45756"), ("optimizer_bytes", "Optimizer states", "#B279A2"))


def memory_bars(rows: list[MemoryEstimate], capacity_bytes: int, capacity_label: str, selected: str) -> go.Figure:
    """Stacked bars, one per format, with the device's capacity as a horizontal line."""
    x = [r.method for r in rows]
    fig = go.Figure()
    for attr, name, color in PARTS:
        ys = [getattr(r, attr) / GiB for r in rows]
        if not any(ys):
            continue
        fig.add_bar(name=name, x=x, y=ys, marker_color=color,
                    hovertemplate="%{x}<br>" + name + ": %{y:.2f} GiB<extra></extra>")
    totals = [r.total_bytes / GiB for r in rows]
    fig.add_scatter(x=x, y=totals, mode="text", text=[f"{t:.1f}" for t in totals], textposition="top center",
                    showlegend=False, hoverinfo="skip")
    # The capacity line is labelled in the legend, not by an annotation on the line: an annotation sat on
    # top of the total labels of every bar whose total is near the capacity.
    fig.add_hline(y=capacity_bytes / GiB, line_dash="dash", line_color="#D62728")
    fig.add_scatter(x=[x[0]] if x else [], y=[None] if x else [], mode="lines", hoverinfo="skip",
                    line=dict(dash="dash", color="#D62728"),
                    name=f"{capacity_label}: {capacity_bytes / GiB:.1f} GiB")
    if selected in x:
        fig.add_vrect(x0=x.index(selected) - 0.45, x1=x.index(selected) + 0.45, fillcolor="#FFD700", opacity=0.18,
                      line_width=0, layer="below")
    top = max(totals + [capacity_bytes / GiB]) * 1.15
    fig.update_layout(barmode="stack", height=430, margin=dict(l=50, r=20, t=40, b=60),
                      yaxis=dict(title="GiB (2³⁰ bytes)", range=[0, top]),
                      legend=dict(orientation="h", y=1.08, x=0), template="plotly_white",
                      title=dict(text="Memory by format (highlighted: your selection)", font_size=14, y=0.99))
    return fig


PANE_COLORS = ("#4C78A8", "#F58518", "#54A24B", "#E45756")


def kl_lines(series: list[tuple[str, str, list[float], list[str]]]) -> go.Figure:
    """Per-token KL divergence from pane A along a text: one line per (pane label, which text, KL values, token
    texts for the hover). Two rows: A's own answer, and the shipped reference text."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=1, vertical_spacing=0.16,
                        subplot_titles=("On pane A's answer (teacher-forced)", "On the reference text"))
    letters = sorted({s[0] for s in series})
    for label, which, kl, toks in series:
        row = 1 if which == "answer" else 2
        color = PANE_COLORS["ABCD".index(label[0]) % len(PANE_COLORS)] if label[:1] in "ABCD" else None
        fig.add_scatter(x=list(range(len(kl))), y=kl, mode="lines", name=label, legendgroup=label,
                        showlegend=row == 1 or label not in {s[0] for s in series if s[1] == "answer"},
                        line=dict(color=color, width=1.6), customdata=toks, row=row, col=1,
                        hovertemplate="token %{x}: %{customdata}<br>KL %{y:.4f} nats<extra>" + label + "</extra>")
    fig.update_yaxes(title_text="KL (nats)", rangemode="tozero")
    fig.update_xaxes(title_text="token position", row=2, col=1)
    fig.update_layout(height=500, margin=dict(l=55, r=20, t=95, b=50), template="plotly_white",
                      legend=dict(orientation="h", y=1.1, yanchor="bottom", x=1, xanchor="right"),
                      title=dict(text="Per-token KL from pane A" if letters else "Run a comparison to see per-token KL",
                                 font_size=14, x=0, y=0.98))
    return fig
