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
