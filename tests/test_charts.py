"""The figures are plotly JSON built directly (ui/charts.py): valid for gr.Plot, finite, with the monitor's
pauses shown as gaps. Rendering in a real browser is covered by the tabs' browser tests."""
from __future__ import annotations

import json
from types import SimpleNamespace as N

import gradio as gr

from ui.charts import kl_lines, monitor_figures


def test_gr_plot_serialises_our_figures_as_plotly():
    out = gr.Plot().postprocess(kl_lines([("B · nf4", "answer", [0.1, float("nan"), 0.3], ["a", "b", "c"])]))
    assert out.type == "plotly"
    fig = json.loads(out.plot)  # strict JSON: a NaN would not parse in the browser
    assert fig["data"][0]["y"] == [0.1, None, 0.3] and fig["layout"]["template"]["layout"]
    assert {a["text"] for a in fig["layout"]["annotations"]} == {"On pane A's answer (teacher-forced)",
                                                                  "On the reference text"}


def test_monitor_lines_break_where_the_sampler_paused():
    host = N(ram_used=2**30, process_rss=2**29, cpu_percent=50.0)
    snaps = [N(t=t, gpus=[], host=host, nvml="no driver") for t in (0, 0.5, 1.0, 10.0, 10.5)]
    mem, act = monitor_figures(snaps, [N(t=0.5, kind="load", label="bf16")], now=11.0)
    ram = mem.data[0]
    assert ram["x"] == [-11.0, -10.5, -10.0, -5.5, -1.0, -0.5] and ram["y"] == [1.0, 1.0, 1.0, None, 1.0, 1.0]
    assert act.data[0]["y"].count(None) == 1
    assert mem.layout["shapes"][0]["x0"] == -10.5  # the load event's marker line
    json.loads(mem.to_json()) and json.loads(act.to_json())


def test_empty_kl_chart_draws_both_rows_axes():
    """Before any comparison, both stacked plots show their axes (plotly draws a subplot only once a trace uses
    it; seen in a screenshot: only the top row had axes)."""
    fig = json.loads(gr.Plot().postprocess(kl_lines([])).plot)
    used = {(t.get("xaxis", "x"), t.get("yaxis", "y")) for t in fig["data"]}
    assert used == {("x", "y"), ("x2", "y2")}
    assert all(not t["x"] and t["showlegend"] is False for t in fig["data"])
