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


EVENT_STYLE = {"load": ("#2ca02c", "loaded"), "unload": ("#7f7f7f", "unloaded"),
               "generate_start": ("#1f77b4", "generation start"), "generate_stop": ("#9467bd", "generation stop"),
               "load_start": ("#bcbd22", "loading")}


def monitor_figures(snaps: list, events: list, now: float):
    """(memory figure, activity figure) from monitor snapshots and engine events; x = seconds before now."""
    mem, act = go.Figure(), go.Figure()
    xs = [s.t - now for s in snaps]
    gpu_ids = sorted({g.index for s in snaps for g in s.gpus if g.error is None})
    if gpu_ids:
        for i in gpu_ids:
            g_at = [next((g for g in s.gpus if g.index == i), None) for s in snaps]
            name = next((g.name for g in g_at if g is not None), f"GPU {i}")
            mem.add_scatter(x=xs, y=[None if g is None or g.memory_used is None else g.memory_used / GiB for g in g_at],
                            mode="lines", name=f"GPU {i} used", line=dict(width=2))
            mine = [None if g is None else next((p.used_bytes / GiB for p in g.processes
                                                 if p.this_process and p.used_bytes is not None), None) for g in g_at]
            if any(v is not None for v in mine):
                mem.add_scatter(x=xs, y=mine, mode="lines", name=f"GPU {i}: this app", line=dict(dash="dot"))
            total = next((g.memory_total for g in reversed(g_at) if g is not None and g.memory_total), None)
            if total:
                mem.add_hline(y=total / GiB, line_dash="dash", line_color="#D62728",
                              annotation_text=f"{name}: {total / GiB:.0f} GiB", annotation_position="top left")
            act.add_scatter(x=xs, y=[None if g is None else g.utilization for g in g_at], mode="lines",
                            name=f"GPU {i} util %")
            act.add_scatter(x=xs, y=[None if g is None else g.power_w for g in g_at], mode="lines",
                            name=f"GPU {i} power W", yaxis="y2", line=dict(dash="dot"))
        mem_title, act_title = "GPU memory (GiB)", "GPU utilisation (%) and power (W)"
    else:
        mem.add_scatter(x=xs, y=[None if s.host.ram_used is None else s.host.ram_used / GiB for s in snaps],
                        mode="lines", name="RAM used (host)")
        mem.add_scatter(x=xs, y=[None if s.host.process_rss is None else s.host.process_rss / GiB for s in snaps],
                        mode="lines", name="this app (RSS)")
        act.add_scatter(x=xs, y=[s.host.cpu_percent for s in snaps], mode="lines", name="CPU %")
        why = snaps[-1].nvml if snaps else ""
        mem_title = f"Memory (GiB) — CPU only: {why}" if why else "Memory (GiB)"
        act_title = "CPU utilisation (%)"
    for e in events:
        color, text = EVENT_STYLE.get(e.kind, ("#999", e.kind))
        mem.add_vline(x=e.t - now, line_color=color, line_width=1, opacity=0.7)
        mem.add_scatter(x=[e.t - now], y=[0], mode="markers", marker=dict(color=color, size=8, symbol="triangle-up"),
                        showlegend=False, hovertemplate=f"{text}: {e.label}<extra></extra>")
    for fig, title in ((mem, mem_title), (act, act_title)):
        fig.update_layout(height=260, margin=dict(l=45, r=45, t=35, b=35), template="plotly_white",
                          title=dict(text=title, font_size=13, x=0), legend=dict(orientation="h", y=-0.25),
                          xaxis=dict(title=None, ticksuffix=" s", range=[min(xs + [-60]), 0]),
                          yaxis=dict(rangemode="tozero"))
    act.update_layout(yaxis=dict(range=[0, 105]),
                      yaxis2=dict(overlaying="y", side="right", rangemode="tozero", showgrid=False))
    return mem, act
