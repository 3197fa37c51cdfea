"""The C++ runtime in the process's global symbol scope, before numpy or PyTorch load it.

Measured on an H200 machine (Python 3.12, numpy 2.5, PyTorch 2.11, a CUDA build of llama-cpp-python 0.3.36;
docs/benchmarks.md): when numpy is imported first -- PyTorch imports it too -- the system's ``libstdc++.so.6``
arrives as a dependency of numpy's extension module, which Python loads privately, and the loader binds some of
libstdc++'s own references (the type information of ``std::exception``, ``std::bad_alloc``,
``std::runtime_error``, ``std::__throw_bad_array_new_length``) to the copies that numpy's module exports instead
of its own (``LD_DEBUG=bindings``). llama.cpp's library, loaded later, then segfaulted while compiling its
tokenizer's ``std::regex`` on every GGUF file. Loading ``libstdc++.so.6`` globally before anything else does
(:func:`share`) keeps its references on itself: llama.cpp then loads and decodes beside numpy and PyTorch, in
either import order. It must run before numpy's first import: ``engine/__init__`` calls it, and the entry points
import ``engine`` before anything that imports numpy (``app.py`` before Gradio).
"""
from __future__ import annotations

import ctypes
import os
import sys

SONAME = "libstdc++.so.6"

shared_early: bool = False  # True when share() loaded it before numpy was imported (what the fix needs)


def share() -> bool:
    """Load :data:`SONAME` with ``RTLD_GLOBAL`` (Linux only; once is enough). Returns :data:`shared_early`."""
    global shared_early
    if not sys.platform.startswith("linux"):
        return False
    early = "numpy" not in sys.modules
    try:
        ctypes.CDLL(SONAME, mode=os.RTLD_GLOBAL)
    except OSError:  # no system C++ runtime (a static build of everything): nothing to share
        return False
    shared_early = shared_early or early
    return shared_early


def late() -> bool:
    """True on Linux when numpy was imported before :func:`share` ran (the hazard is then in place)."""
    return sys.platform.startswith("linux") and not shared_early
