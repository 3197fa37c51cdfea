"""ZeroGPU support for Hugging Face Spaces: ``spaces.GPU`` around the generation handler when the ``spaces``
package is installed (it is on every Space), unchanged otherwise.

On ZeroGPU hardware a GPU is attached only while a function decorated with ``spaces.GPU`` runs, in a forked
worker process; elsewhere ``spaces.GPU`` does nothing (its documented behaviour off ZeroGPU). The engine's
compute scheduler starts afresh in a forked child (engine/compute.py), and models loaded inside the call live
only for that call, so each comparison on ZeroGPU loads its models again. Not exercised on real ZeroGPU
hardware (we have none); see README.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

DURATION_S = int(os.environ.get("QUANTSCOPE_ZEROGPU_DURATION", "120"))  # seconds of GPU a call may hold


def gpu_handler(fn: Callable) -> Callable:
    try:
        spaces = importlib.import_module("spaces")
    except ImportError:
        return fn
    return spaces.GPU(duration=DURATION_S)(fn)
