"""Compiling our CUDA kernels at first use (``torch.utils.cpp_extension.load_inline``): one place that says why a
kernel cannot be built on this machine (no GPU, no nvcc, no ninja, a GPU too old, a compiler error) instead of
raising. The built extensions are cached in ``~/.cache/quantscope`` (or ``QUANTSCOPE_KERNEL_CACHE``)."""
from __future__ import annotations

import os
import shutil
from typing import Union

import torch


def build_dir(name: str) -> str:
    root = os.environ.get("QUANTSCOPE_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "quantscope")
    d = os.path.join(root, f"{name}_torch{torch.__version__.replace('+', '_')}")
    os.makedirs(d, exist_ok=True)
    return d


# Programmatic dependent launch (compute capability 9.0 on): a kernel launched with ``launch_pdl`` may be launched
# while the kernel before it in the stream (or in a captured graph) is still running, so its launch and start overlap
# that kernel's end. ``pdl_wait()`` holds its threads until that kernel has completed and its writes are visible:
# nothing may be read or written before it. ``pdl_trigger()`` (after the wait, so at most two kernels overlap) lets
# the next kernel be launched. QUANTSCOPE_PDL=0 launches as usual (the wait then returns at once). Pasted into a
# kernel source after the torch/CUDA includes.
PDL_SRC = r"""
#include <cstdlib>
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
static bool pdl_on() {
  static const bool on = [] {
    const char* e = std::getenv("QUANTSCOPE_PDL");
    if (e && e[0] == '0') return false;
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
    return major >= 9;
  }();
  return on;
}
template <typename... Params, typename... Args>
static void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = 0;
  cfg.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_on() ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}
"""


# A build takes about a minute; PyTorch's build lock (a file in the build folder) left by a build that was killed (a
# timeout, a closed terminal) would make every later build wait forever. The builder's host and process id are
# written beside it (BUILDER); a lock whose builder is gone, or older than this, is removed before building.
STALE_LOCK_S = 15 * 60
BUILDER = "quantscope_builder"


def _gone(directory: str) -> bool:
    """Whether the process that last started a build in ``directory`` (this host's) has exited."""
    import socket

    try:
        with open(os.path.join(directory, BUILDER)) as f:
            host, pid = f.read().split()
        if host != socket.gethostname():
            return False
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):  # no record, another host's, or not ours to signal: not known to be gone
        return False
    return False


def clear_stale_lock(directory: str, max_age_s: float = STALE_LOCK_S) -> bool:
    """Remove the build lock in ``directory`` when its builder has exited or it is older than ``max_age_s``; True if
    removed."""
    import time

    lock = os.path.join(directory, "lock")
    try:
        if time.time() - os.path.getmtime(lock) > max_age_s or _gone(directory):
            os.remove(lock)
            return True
    except OSError:  # no lock, or another process removed it first
        pass
    return False


def _record_builder(directory: str) -> None:
    import socket

    try:
        with open(os.path.join(directory, BUILDER), "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}")
    except OSError:  # a read-only cache: the age bound still applies
        pass


def _ninja_from_pip() -> bool:
    try:
        import ninja
    except ImportError:
        return False
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return True


def build(name: str, cpp: str, cuda: str, functions: list[str], what: str, ldflags: tuple[str, ...] = ()) \
        -> Union[object, str]:
    """The compiled extension ``name``, or the reason it cannot be built here (a string that names ``what``)."""
    from torch.utils import cpp_extension

    if not torch.cuda.is_available():
        return "no CUDA device"
    if not (cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))):
        return f"nvcc (the CUDA toolkit) is not installed, so {what} cannot be compiled"
    if not (shutil.which("ninja") or _ninja_from_pip()):
        return f"ninja is not installed (pip install ninja), so {what} cannot be compiled"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"{what} needs bf16 tensor cores (compute capability 8.0 or newer; this GPU has {major}.{minor})"
    clear_stale_lock(build_dir(name))
    _record_builder(build_dir(name))
    try:
        return cpp_extension.load_inline(
            name=name, cpp_sources=cpp, cuda_sources=cuda, functions=functions,
            extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"],
            extra_ldflags=list(ldflags), build_directory=build_dir(name), verbose=False)
    except Exception as e:  # a toolkit too old for this GPU, a compiler error: say it, the caller keeps its fallback
        last = str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""
        return f"{what} did not compile ({type(e).__name__}: {last})"
