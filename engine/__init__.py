"""QuantScope's engine: everything that is not UI (never imports gradio)."""
import os

from . import cxx_runtime

# First, before numpy or PyTorch are imported anywhere: llama.cpp crashes beside them otherwise (engine.cxx_runtime).
cxx_runtime.share()

# PyTorch's CUDA allocator with expandable segments: measured on an H200 (docs/benchmarks.md), quantising with
# HQQ on the GPU otherwise left the process holding 1-3 GB more than its tensors (NVML 10-46% above the
# calculator's total for Llama-3.1-8B HQQ; +1.5% with it), and LLM.int8 up to 14% more. Read when CUDA first
# allocates, so it is set here, before the engine imports torch; a value the user set is kept.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
