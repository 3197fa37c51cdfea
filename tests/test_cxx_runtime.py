"""engine.cxx_runtime: the C++ runtime is loaded globally before numpy, so numpy's extension does not take over
libstdc++'s own references (what crashed llama.cpp beside PyTorch on an H200 machine; docs/benchmarks.md).

Checked with the dynamic loader's own report (``LD_DEBUG=bindings``) in fresh interpreters, on the entry points
the app and the CLI use.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's loader only")


def libstdcxx_bound_to_numpy(code: str, tmp_path: Path) -> list[str]:
    """The symbols that libstdc++ itself binds to numpy's extension module in a fresh ``python -c code``."""
    out = tmp_path / "ld"
    env = dict(os.environ, LD_DEBUG="bindings", LD_DEBUG_OUTPUT=str(out), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    text = "".join(p.read_text(errors="replace") for p in tmp_path.glob("ld.*"))
    assert "binding file" in text, "the loader wrote no bindings report"
    return re.findall(r"binding file \S*libstdc\+\+\S* \[\d+\] to \S*numpy\S* \[\d+\]: normal symbol `([^']+)'", text)


def test_numpy_first_takes_over_libstdcxx_references_here(tmp_path):
    """The hazard itself, so that the next test means something on this machine."""
    taken = libstdcxx_bound_to_numpy("import numpy", tmp_path)
    if not taken:
        pytest.skip("this numpy exports none of libstdc++'s symbols: nothing for engine.cxx_runtime to prevent")
    assert "_ZTISt9exception" in taken  # typeinfo for std::exception


@pytest.mark.parametrize("code", ["import engine, numpy, torch; assert engine.cxx_runtime.shared_early",
                                  "import app",  # the web app: Gradio imports numpy
                                  "import engine.__main__"])  # the CLI
def test_engine_first_keeps_libstdcxx_on_itself(tmp_path, code):
    if code == "import app":
        pytest.importorskip("gradio")  # the GPU machine runs the engine without the UI
    assert libstdcxx_bound_to_numpy(code, tmp_path) == []


def test_sharing_after_numpy_says_it_came_too_late():
    code = "import numpy; from engine import cxx_runtime; print(cxx_runtime.shared_early)"
    # engine/__init__ runs share() after numpy here: too late, and it says so
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"


def test_the_vocabulary_check_runs_in_this_process_order_and_says_what_to_do(monkeypatch):
    """The llama.cpp backend's child check mirrors the parent: a process that imported numpy before the engine
    (a script using the engine as a library) checks in that order, and a crash there names the cause."""
    from engine import cxx_runtime, embedded
    from engine.backends import llamacpp_backend as lb

    monkeypatch.setattr(cxx_runtime, "shared_early", True)
    assert "import engine, numpy, torch, llama_cpp;" in lb.vocab_probe()
    monkeypatch.setattr(cxx_runtime, "shared_early", False)
    assert "import numpy, torch, engine, llama_cpp;" in lb.vocab_probe()
    monkeypatch.setattr(lb, "_vocab_checked", {})
    monkeypatch.setattr(lb, "_VOCAB_PROBE", "import ctypes; ctypes.string_at(0)")  # a child that segfaults
    why = lb.vocab_check(embedded.gguf_path())
    assert why.startswith("llama.cpp crashed (SIGSEGV)") and why.endswith("import engine first")
