"""Models from the Hugging Face Hub: the local cache first, a download when online (never in offline mode).

Two kinds of Hub reference reach the engine:

- ``owner/name``: a transformers model. Its ``config.json`` is fetched first and refused when it ships its own
  code (``auto_map``: QuantScope never runs code from a model repository), then the weights (``*.safetensors``,
  or PyTorch's ``*.bin`` where a repository has no safetensors), tokenizer and generation files.
- ``owner/name:PICK`` (or ``owner/name`` holding a single ``.gguf``): one GGUF file of a repository for
  llama.cpp; ``PICK`` is a file name or a part of one, e.g. ``Q4_K_M``.

Before any weights are downloaded their total size is compared with ``QUANTSCOPE_MAX_DOWNLOAD_GB`` (default
20): a shared instance should not fill its disk because one visitor typed a 70B id. The memory check (does it
fit?) follows in :class:`engine.manager.ModelManager`, before the model is loaded. ``HF_HUB_OFFLINE=1`` or
``QUANTSCOPE_OFFLINE=1`` uses the local cache only. ``HF_ENDPOINT`` points at another Hub (the tests run a
local one).
"""
from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Optional

from .errors import GatedModelError, InputError, ModelNotFoundError, OfflineError, QuantScopeError

HUB_GGUF = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95})"
                      r"(?::(?P<pick>[A-Za-z0-9._-]{1,200}))?$")
HF_FILES = ("*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken")  # config, tokenizer, chat template, generation
DEFAULT_MAX_GB = 20.0


def max_download_bytes() -> int:
    raw = os.environ.get("QUANTSCOPE_MAX_DOWNLOAD_GB", "")
    try:
        gb = float(raw) if raw.strip() else DEFAULT_MAX_GB
    except ValueError:
        gb = DEFAULT_MAX_GB
    return int(gb * 1e9)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def _online(ref: str) -> None:
    from .sources import _hub_reachable, offline

    if offline():
        raise OfflineError(f"'{ref}' is not in the local Hugging Face cache and offline mode is on "
                           "(HF_HUB_OFFLINE / QUANTSCOPE_OFFLINE), so it cannot be downloaded. Use 'embedded', "
                           "a local model folder or .gguf file, or download it first (hf download).")
    if not _hub_reachable():
        raise OfflineError(f"'{ref}' is not in the local Hugging Face cache and the Hugging Face Hub cannot be "
                           "reached (no network). Use 'embedded', a local model folder or .gguf file.")


def _hub_errors(ref: str, e: Exception) -> Exception:
    from huggingface_hub import errors as hf

    if isinstance(e, hf.GatedRepoError):
        return GatedModelError(f"'{ref}' is gated on the Hub: accept its terms on huggingface.co and set HF_TOKEN.")
    if isinstance(e, (hf.RepositoryNotFoundError, hf.RevisionNotFoundError)):
        return ModelNotFoundError(f"No model '{ref}' on the Hugging Face Hub (or it is private). Check the spelling.")
    if isinstance(e, hf.EntryNotFoundError):
        return ModelNotFoundError(f"'{ref}' on the Hub has no config.json, so it is not a transformers model "
                                  "(for a GGUF repository, use method gguf).")
    return OfflineError(f"Could not download '{ref}' from the Hugging Face Hub ({e.__class__.__name__}). "
                        "Check the network, or use 'embedded' or a local model.")


def _repo_files(repo: str) -> dict[str, int]:
    """{file name: size in bytes} of the repository's main revision."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo, files_metadata=True)
    return {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}


def _cached_snapshot(repo: str, patterns) -> Optional[Path]:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=list(patterns), local_files_only=True))
    except Exception:  # noqa: BLE001 - any miss means "not in the local cache"
        return None


def _check_size(ref: str, files: dict[str, int], chosen: list[str]) -> None:
    total = sum(files[f] for f in chosen)
    if total > max_download_bytes():
        raise InputError(f"'{ref}' is {_gb(total)} to download; this instance downloads at most "
                         f"{_gb(max_download_bytes())} (QUANTSCOPE_MAX_DOWNLOAD_GB). Pick a smaller model, "
                         "or download it into the Hugging Face cache first.")


def hf_model(repo: str) -> Path:
    """The local folder of the transformers model ``repo`` (from the cache, else downloaded)."""
    from .policy import _refuse_remote_code

    local = _cached_snapshot(repo, HF_FILES + ("*.safetensors", "*.bin"))
    if local is not None and (local / "config.json").is_file() and \
            (any(local.glob("*.safetensors")) or any(local.glob("*.bin"))):
        return local
    _online(repo)
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        config = Path(hf_hub_download(repo, "config.json", etag_timeout=10))
        _refuse_remote_code(config, repo)  # before any weights
        files = _repo_files(repo)
        weights = [f for f in files if fnmatch.fnmatch(f, "*.safetensors") and "/" not in f]
        if not weights:
            weights = [f for f in files if fnmatch.fnmatch(f, "*.bin") and "/" not in f
                       and not f.startswith(("training_args", "optimizer"))]
        if not weights:
            raise ModelNotFoundError(f"'{repo}' on the Hub has no weights QuantScope can load (*.safetensors or "
                                     "*.bin at the top level).")
        _check_size(repo, files, weights)
        small = [f for f in files if "/" not in f and any(fnmatch.fnmatch(f, p) for p in HF_FILES)]
        return Path(snapshot_download(repo, allow_patterns=small + weights, etag_timeout=10))
    except QuantScopeError:
        raise
    except Exception as e:  # noqa: BLE001 - huggingface_hub and network errors become one message
        raise _hub_errors(repo, e) from None


def _pick_gguf(ref: str, names: list[str], pick: Optional[str]) -> str:
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"'{ref}' holds no .gguf file.")
    if pick:
        exact = [n for n in ggufs if Path(n).name == pick or n == pick]
        ggufs = exact or [n for n in ggufs if pick.lower() in Path(n).name.lower()]
        if not ggufs:
            raise ModelNotFoundError(f"No .gguf file of '{ref.split(':')[0]}' matches '{pick}'.")
    if len(ggufs) > 1:
        shown = ", ".join(Path(n).name for n in ggufs[:8]) + (" ..." if len(ggufs) > 8 else "")
        raise InputError(f"'{ref}' holds {len(ggufs)} GGUF files ({shown}); add one after a colon, e.g. "
                         f"'{ref.split(':')[0]}:{Path(ggufs[0]).name}' or a part of its name such as Q4_K_M.")
    return ggufs[0]


def gguf_file(ref: str) -> Path:
    """The local path of the GGUF file ``owner/name[:PICK]`` (from the cache, else downloaded)."""
    m = HUB_GGUF.match(ref)
    if not m:
        raise InputError(f"'{ref}' is not a Hub GGUF reference (owner/name or owner/name:FILE).")
    repo, pick = m.group("repo"), m.group("pick")
    local = _cached_snapshot(repo, ["*.gguf"])
    if local is not None:
        names = [str(p.relative_to(local)) for p in local.rglob("*.gguf")]
        try:
            return local / _pick_gguf(ref, names, pick)
        except (ModelNotFoundError, InputError):
            pass  # not (only) in the cache: ask the Hub
    _online(ref)
    from huggingface_hub import hf_hub_download

    try:
        files = _repo_files(repo)
        name = _pick_gguf(ref, list(files), pick)
        _check_size(ref, files, [name])
        return Path(hf_hub_download(repo, name, etag_timeout=10))
    except QuantScopeError:
        raise
    except Exception as e:  # noqa: BLE001 - huggingface_hub and network errors become one message
        raise _hub_errors(repo, e) from None
