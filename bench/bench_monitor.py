"""What the hardware monitor costs (issue 5): CPU time of the sampler thread at 2 Hz over a minute, in one run.

    .venv/bin/python bench/bench_monitor.py [--seconds 60] [--interval 0.5]

The process does nothing but sample (engine.monitor.Monitor, NVML when a GPU is present, psutil always) for
``--seconds``; before that it idles for the same time with no sampler, to subtract what the process costs
on its own. CPU time = user + system of the whole process (psutil). Target: < 1% of one core. Exits 1 when
missed. Prints one JSON line at the end too.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET = 0.01


def cpu_seconds(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--interval", type=float, default=0.5)
    a = ap.parse_args()
    import psutil

    from engine.monitor import Monitor

    proc = psutil.Process()
    mon = Monitor(interval_s=a.interval, idle_stop_s=None)
    first = mon.sample()  # NVML init and imports happen here, outside the measurement
    gpus = [g.name for g in first.gpus]
    print(f"GPUs: {gpus or 'none'} (NVML: {first.nvml}); interval {a.interval} s; {a.seconds:.0f} s each phase",
          flush=True)
    c0, w0 = cpu_seconds(proc), time.perf_counter()
    time.sleep(a.seconds)
    idle = cpu_seconds(proc) - c0
    idle_wall = time.perf_counter() - w0
    mon.start()
    c1, w1 = cpu_seconds(proc), time.perf_counter()
    time.sleep(a.seconds)
    busy = cpu_seconds(proc) - c1
    wall = time.perf_counter() - w1
    mon.stop()
    cost = max(0.0, busy - idle * wall / idle_wall) / wall
    ok = cost < TARGET
    print(f"idle process: {idle:.3f} CPU s in {idle_wall:.1f} s; with the sampler: {busy:.3f} CPU s in {wall:.1f} s, "
          f"{mon.samples} samples ({busy / max(1, mon.samples) * 1e3:.2f} ms each)")
    print(f"sampler cost: {cost * 100:.3f}% of one core (target < {TARGET * 100:.0f}%): {'PASS' if ok else 'FAIL'}")
    print(json.dumps(dict(gpus=gpus, nvml=first.nvml, interval_s=a.interval, seconds=wall, samples=mon.samples,
                          cpu_s=busy, idle_cpu_s=idle, core_fraction=cost, ok=ok)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
