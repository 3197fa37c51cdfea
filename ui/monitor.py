"""Live hardware: an always-visible status line and a chart panel (on the side-by-side tab).

Both are driven by ``gr.Timer``s that run only while someone looks: the panel's timer only while the
side-by-side tab is shown, and both stop while the browser tab is hidden (a ``visibilitychange`` listener
flips a hidden checkbox). Each refresh *touches* the process's one sampler (:func:`engine.monitor.monitor`),
which stops by itself when no page has asked for a while — an idle classroom costs nothing.
"""
from __future__ import annotations

import threading
import time

import gradio as gr

from engine.monitor import monitor
from engine.units import GiB
from ui.charts import monitor_figures

WINDOW_S = 120.0  # the charts show the last two minutes
PANEL_TICK_S = 1.0
STATUS_TICK_S = 3.0

VISIBILITY_JS = """
() => {
  const flip = () => {
    const box = document.querySelector('#qs-page-visible input');
    if (!box) return;
    const visible = !document.hidden;
    if (box.checked !== visible) { box.checked = visible; box.dispatchEvent(new Event('change')); box.dispatchEvent(new Event('input')); }
  };
  document.addEventListener('visibilitychange', flip);
  flip();
}
"""


def status_line() -> str:
    """One line: GPU name and memory used/total (or the host's RAM when there is no GPU)."""
    mon = monitor()
    mon.touch()
    snap = mon.latest() or mon.sample()
    if snap.gpus:
        parts = []
        for g in snap.gpus:
            if g.error:
                parts.append(f"GPU {g.index}: unavailable ({g.error})")
            elif g.memory_used is not None and g.memory_total:
                parts.append(f"GPU {g.index} {g.name}: {g.memory_used / GiB:.1f} / {g.memory_total / GiB:.1f} GiB"
                             + ("" if g.utilization is None else f" · {g.utilization}%"))
            else:
                parts.append(f"GPU {g.index} {g.name}: memory n/a")
        return "🟢 " + " · ".join(parts)
    h = snap.host
    ram = "RAM n/a" if h.ram_used is None else f"RAM {h.ram_used / GiB:.1f} / {h.ram_total / GiB:.1f} GiB"
    rss = "" if h.process_rss is None else f" · this app {h.process_rss / GiB:.2f} GiB"
    cpu = "" if h.cpu_percent is None else f" · CPU {h.cpu_percent:.0f}%"
    return f"⚪ No GPU ({snap.nvml}) · {ram}{rss}{cpu}"


_panel_cache: dict = {"t": float("-inf"), "figs": None}
_panel_lock = threading.Lock()


def panel_figures():
    """The two live charts (memory with engine events, utilisation/power or CPU).

    Every viewer sees the same server, so the figures are built at most once per sampling interval and shared:
    a class of 50 on this tab asks 50 times a second."""
    mon = monitor()
    mon.touch()
    with _panel_lock:
        now = time.time()
        if _panel_cache["figs"] is not None and now - _panel_cache["t"] < mon.interval_s:
            return _panel_cache["figs"]
        snaps = mon.history(since=now - WINDOW_S)
        if not snaps:
            snaps = [mon.sample()]
        figs = monitor_figures(snaps, mon.events(since=now - WINDOW_S), now)
        _panel_cache.update(t=now, figs=figs)
        return figs


def timers_for(visible: bool, panel_shown: bool):
    return gr.Timer(active=bool(visible)), gr.Timer(active=bool(visible and panel_shown))


def build_status() -> dict:
    """The status line (top of the page) and the hidden page-visibility box; call inside the Blocks."""
    line = gr.Markdown(elem_id="qs-hw-status")
    visible = gr.Checkbox(True, visible="hidden", elem_id="qs-page-visible", label="page visible")
    timer = gr.Timer(STATUS_TICK_S, active=True)
    timer.tick(status_line, None, line, api_name=False, show_progress="hidden", concurrency_limit=None,
               queue=False)
    return {"line": line, "visible": visible, "timer": timer}


def build_panel() -> dict:
    """The chart panel; call inside the side-by-side tab."""
    with gr.Accordion("Live hardware (NVML on GPUs, psutil on the host)", open=True):
        with gr.Row():
            mem = gr.Plot(show_label=False, elem_id="qs-hw-mem")
            act = gr.Plot(show_label=False, elem_id="qs-hw-act")
        gr.Markdown("Markers on the memory chart: model loading / loaded / unloaded, generation start / stop. "
                    "Sampled twice a second by one thread for the whole server, only while a page shows it.")
    timer = gr.Timer(PANEL_TICK_S, active=False)
    timer.tick(panel_figures, None, [mem, act], api_name=False, show_progress="hidden", concurrency_limit=None,
               queue=False)
    return {"mem": mem, "act": act, "timer": timer}


def wire(demo: gr.Blocks, status: dict, panel: dict, panel_tab: gr.Tab, other_tabs: list) -> None:
    """Timers follow page visibility and which tab is shown."""
    shown = gr.State(False)
    outputs = [status["timer"], panel["timer"]]

    def on_panel_tab(visible):
        return (True,) + timers_for(visible, True)

    def on_other_tab(visible):
        return (False,) + timers_for(visible, False)

    panel_tab.select(on_panel_tab, status["visible"], [shown] + outputs, api_name=False, queue=False)
    panel_tab.select(panel_figures, None, [panel["mem"], panel["act"]], api_name=False, queue=False)
    for t in other_tabs:
        t.select(on_other_tab, status["visible"], [shown] + outputs, api_name=False, queue=False)
    status["visible"].change(lambda v, s: timers_for(v, s), [status["visible"], shown], outputs, api_name=False,
                             queue=False)
    demo.load(None, None, None, js=VISIBILITY_JS)
    demo.load(status_line, None, status["line"], api_name=False, queue=False)
