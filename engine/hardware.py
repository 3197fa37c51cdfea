"""Memory pools (GPU presets, Apple unified memory, this machine's RAM) and the fit verdict."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass

from .errors import InputError
from .memory import MAX_CONTEXT, estimate
from .sources import ASSETS
from .specs import HardwareSpec, MemoryEstimate, ModelSpec, QuantSpec, RuntimeSpec, TrainingSpec

# Verdict thresholds: "fits" leaves >= 10% free for fragmentation and what the estimate does not see;
# "tight" is between 90% and 100% of the pool.
FITS_FRACTION = 0.90


@functools.lru_cache(maxsize=1)
def _gpu_table() -> tuple[dict, ...]:
    return tuple(json.loads((ASSETS / "gpus.json").read_text()))


def hardware_choices() -> list[tuple[str, str]]:
    return [(g["label"], g["id"]) for g in _gpu_table()]


def get_hardware(hw_id: str) -> HardwareSpec:
    for g in _gpu_table():
        if g["id"] == hw_id or g["label"].lower() == str(hw_id).lower():
            mem = g["memory_bytes"]
            if g["kind"] == "cpu" and not mem:
                import psutil
                mem = psutil.virtual_memory().total
            return HardwareSpec(name=g["label"], memory_bytes=mem, kind=g["kind"],
                                bandwidth_bytes_per_s=int(g.get("bandwidth_gb_s", 0) * 1e9), note=g.get("note", ""))
    raise InputError(f"Unknown hardware '{hw_id}'. Choose one of: {', '.join(g['id'] for g in _gpu_table())}.")


def device_of(hw: HardwareSpec) -> str:
    return {"gpu": "cuda", "apple": "mps", "cpu": "cpu"}[hw.kind]


@dataclass
class Verdict:
    status: str  # fits | tight | does not fit
    used_fraction: float
    free_bytes: int
    max_context: int  # largest context that fits (0: not even one token)
    gpus_needed: int  # identical pools needed when the model is split across them (0: impossible)
    message: str


def _total_at(model, quant, runtime, training, context) -> int:
    return estimate(model, quant, dataclasses.replace(runtime, context=context), training).total_bytes


def max_context(model: ModelSpec, quant: QuantSpec, runtime: RuntimeSpec, training: TrainingSpec,
                capacity: int) -> int:
    """Largest context (tokens) whose total fits in ``capacity`` bytes; binary search over the pure estimate."""
    hi_limit = model.max_position_embeddings or MAX_CONTEXT
    if _total_at(model, quant, runtime, training, 1) > capacity:
        return 0
    if _total_at(model, quant, runtime, training, hi_limit) <= capacity:
        return hi_limit
    lo, hi = 1, hi_limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _total_at(model, quant, runtime, training, mid) <= capacity:
            lo = mid
        else:
            hi = mid
    return lo


def verdict(est: MemoryEstimate, hw: HardwareSpec, model: ModelSpec, quant: QuantSpec, runtime: RuntimeSpec,
            training: TrainingSpec) -> Verdict:
    cap = hw.memory_bytes
    total = est.total_bytes
    frac = total / cap
    status = "fits" if frac <= FITS_FRACTION else "tight" if frac <= 1 else "does not fit"
    # Splitting over n identical devices: each pays the fixed overhead, the rest divides.
    per_device = cap * FITS_FRACTION - est.overhead_bytes
    gpus = 0 if per_device <= 0 else max(1, math.ceil((total - est.overhead_bytes) / per_device))
    mc = max_context(model, quant, runtime, training, int(cap * FITS_FRACTION))
    gib = 2**30
    if status == "fits":
        msg = f"Fits: {total / gib:.2f} GiB of {cap / gib:.2f} GiB ({frac:.0%}), {(cap - total) / gib:.2f} GiB free."
    elif status == "tight":
        msg = (f"Tight: {total / gib:.2f} GiB of {cap / gib:.2f} GiB ({frac:.0%}). It may load, but fragmentation "
               "or a longer prompt can push it out of memory.")
    else:
        msg = f"Does not fit: needs {total / gib:.2f} GiB, {hw.name} has {cap / gib:.2f} GiB."
    if hw.kind != "cpu" and gpus > 1:
        msg += f" Split across {gpus} of them it would fit."
    return Verdict(status, frac, cap - total, mc, gpus, msg)
