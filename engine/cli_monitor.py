"""``python -m engine monitor [--once] [--json] [--interval S] [--count N]``: hardware snapshots for scripts."""
from __future__ import annotations

import json
import time

from .cliutil import whole_number
from .units import GiB


def add_parser(sub) -> None:
    m = sub.add_parser("monitor", help="GPU (NVML) and host snapshots")
    m.add_argument("--once", action="store_true", help="one snapshot, then exit")
    m.add_argument("--json", action="store_true", help="one JSON object per snapshot (integer bytes)")
    m.add_argument("--interval", type=float, default=0.5, help="seconds between snapshots (default 0.5)")
    m.add_argument("--count", type=whole_number, default=0, help="stop after N snapshots (0: until Ctrl-C)")
    m.set_defaults(func=run)


def _fmt(v, unit="", scale=1.0, digits=0) -> str:
    return "n/a" if v is None else f"{v / scale:.{digits}f}{unit}"


def describe(snap) -> str:
    h = snap.host
    lines = [f"host: CPU {_fmt(h.cpu_percent, '%', digits=0)} of {h.cpu_count} cores · RAM "
             f"{_fmt(h.ram_used, '', GiB, 1)} / {_fmt(h.ram_total, ' GiB', GiB, 1)} · this process "
             f"{_fmt(h.process_rss, ' GiB', GiB, 2)}"]
    if not snap.gpus:
        lines.append(f"GPUs: none ({snap.nvml})")
    for g in snap.gpus:
        if g.error:
            lines.append(f"GPU {g.index}: error: {g.error}")
            continue
        mine = next((p.used_bytes for p in g.processes if p.this_process), None)
        lines.append(f"GPU {g.index} {g.name}: memory {_fmt(g.memory_used, '', GiB, 1)} / "
                     f"{_fmt(g.memory_total, ' GiB', GiB, 1)} · util {_fmt(g.utilization, '%')} · power "
                     f"{_fmt(g.power_w, ' W')} / {_fmt(g.power_limit_w, ' W')} · {_fmt(g.temperature_c, ' °C')} · "
                     f"SM {_fmt(g.sm_clock_mhz, ' MHz')} · {len(g.processes)} processes"
                     + ("" if mine is None else f" (this one {mine / GiB:.2f} GiB)"))
    return "\n".join(lines)


def run(args) -> int:
    from .errors import InputError
    from .monitor import Monitor

    if not args.interval > 0:
        raise InputError(f"--interval must be a positive number of seconds, got {args.interval}.")
    mon = Monitor(interval_s=args.interval, idle_stop_s=None)
    n = 1 if args.once else args.count
    i = 0
    try:
        while True:
            t0 = time.monotonic()
            snap = mon.sample()
            print(json.dumps(snap.to_dict()) if args.json else describe(snap), flush=True)
            i += 1
            if n and i >= n:
                return 0
            time.sleep(max(0.0, args.interval - (time.monotonic() - t0)))
    except KeyboardInterrupt:
        return 0
    finally:
        mon.nvml.shutdown()
