"""Resolve a model reference to a :class:`ModelSpec`.

A reference is one of: a bundled preset (Hub id, label or file stem, case-insensitive), ``embedded``
(the offline SmolLM2-135M-Instruct), a local ``config.json`` or model folder, a local ``.gguf`` file (its header's
hyperparameters and tensor list: :mod:`engine.gguf_meta`), a Hub id (only its
``config.json`` is fetched, through huggingface_hub), or a bare parameter count such as ``7B`` or
``350m`` (approximate: the shape is borrowed from the nearest preset).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path

from . import gguf_meta
from .architectures import build_model_spec
from .errors import ConfigError, GatedModelError, InputError, ModelNotFoundError, OfflineError
from .specs import ModelSpec

ASSETS = Path(__file__).resolve().parent.parent / "assets"
PRESETS_DIR = ASSETS / "presets"
DEFAULT_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
PARAM_COUNT = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e\d+)?)\s*([kmbt]?)\s*(?:params?|parameters)?\s*$", re.I)
SCALE = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


@functools.lru_cache(maxsize=1)
def preset_index() -> tuple[dict, ...]:
    return tuple(json.loads((PRESETS_DIR / "index.json").read_text()))


def preset_choices() -> list[tuple[str, str]]:
    """(label, id) pairs for pickers."""
    return [(p["label"], p["id"]) for p in preset_index()]


def _find_preset(ref: str) -> dict | None:
    key = ref.strip().lower()
    for p in preset_index():
        if key in (p["id"].lower(), p["label"].lower(), p["file"].lower().removesuffix(".json"),
                   p["id"].split("/")[-1].lower()):
            return p
    return None


@functools.lru_cache(maxsize=64)
def _preset_spec(file: str, hub_id: str) -> ModelSpec:
    cfg = json.loads((PRESETS_DIR / file).read_text())
    return build_model_spec(cfg, name=hub_id, source="preset")


def _local_config(path: Path) -> dict:
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelNotFoundError(f"No config.json found at '{path.name}'. Give a model folder or its config.json.")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"'{path.name}' is not valid JSON ({e.__class__.__name__}). Check the file.") from None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
        os.environ.get("QUANTSCOPE_OFFLINE", "0").lower() in ("1", "true", "yes")


_reach_cache: dict[tuple[str, int], tuple[float, bool]] = {}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the Hub endpoint (cached 60 s), so that no network fails in seconds,
    not after huggingface_hub's retries."""
    import socket
    import time
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    addr = (url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443))
    now = time.monotonic()
    hit = _reach_cache.get(addr)
    if hit and now - hit[0] < 60:
        return hit[1]
    try:
        with socket.create_connection(addr, timeout=timeout):
            ok = True
    except OSError:
        ok = False
    _reach_cache[addr] = (now, ok)
    return ok


@functools.lru_cache(maxsize=128)
def _hub_config(repo_id: str) -> str:
    if offline():
        raise OfflineError(f"Offline mode is on, so '{repo_id}' cannot be fetched from the Hugging Face Hub. "
                           "Pick a bundled preset, a local config.json, or a parameter count such as 7B.")
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise OfflineError("huggingface_hub is not installed, so Hub ids cannot be resolved.") from None
    if not _hub_reachable():
        raise OfflineError(f"Could not reach the Hugging Face Hub to fetch '{repo_id}' (no network). "
                           "Pick a bundled preset, a local config.json, or a parameter count such as 7B.")
    try:
        path = hf_hub_download(repo_id, "config.json", etag_timeout=5)
    except hf_errors.LocalEntryNotFoundError:
        raise OfflineError(f"Could not reach the Hugging Face Hub to fetch '{repo_id}'. "
                           "Pick a bundled preset, a local config.json, or a parameter count such as 7B.") from None
    except hf_errors.GatedRepoError:
        raise GatedModelError(f"'{repo_id}' is gated on the Hub: accept its terms on huggingface.co and set "
                              "HF_TOKEN, or pick the bundled preset of the same model.") from None
    except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError):
        raise ModelNotFoundError(f"No model '{repo_id}' on the Hugging Face Hub (or it is private). "
                                 "Check the spelling.") from None
    except hf_errors.EntryNotFoundError:
        raise ConfigError(f"'{repo_id}' has no config.json, so its shape is unknown (GGUF-only repos are not "
                          "read yet). Give a parameter count instead.") from None
    except (hf_errors.LocalEntryNotFoundError, OSError, hf_errors.HfHubHTTPError) as e:
        raise OfflineError(f"Could not reach the Hugging Face Hub to fetch '{repo_id}' ({e.__class__.__name__}). "
                           "Pick a bundled preset, a local config.json, or a parameter count such as 7B.") from None
    return Path(path).read_text()


def from_param_count(n: int, label: str) -> ModelSpec:
    """An approximate model of ``n`` parameters: the nearest preset's shapes with its layer count scaled."""
    if n < 1_000_000:
        raise InputError(f"{label}: {n:,} parameters is too small for a language model; give at least 1M.")
    if n > 10**13:
        raise InputError(f"{label}: {n:,} parameters is more than the calculator accepts (10T).")
    best = min(preset_index(), key=lambda p: abs(p["params_b"] * 1e9 - n))
    base = _preset_spec(best["file"], best["id"])
    cfg = json.loads((PRESETS_DIR / best["file"]).read_text())
    fixed = sum(t.numel for t in base.tensors if t.layer is None)
    per_layer = (base.params - fixed) / base.num_layers
    layers = max(1, round((n - fixed) / per_layer))
    cfg["num_hidden_layers"] = layers
    cfg.pop("layer_types", None)
    spec = build_model_spec(cfg, name=label, source="params")
    note = (f"Approximate: only the parameter count is known; shapes are borrowed from {best['label']} with "
            f"{layers} layers ({spec.params / 1e9:.2f}B parameters).")
    return dataclasses.replace(spec, approximate=True, note=note)


def parse_param_count(text: str) -> int | None:
    """``7B`` / ``500M`` / ``1.5e9`` as a whole number of parameters, or None if the text is not a count."""
    m = PARAM_COUNT.match(text)
    return None if m is None else int(float(m.group(1)) * SCALE[m.group(2).lower()])


MAX_REF_CHARS = 512  # longer than any Hub id or sane path
MAX_NAME_BYTES = 255  # one file or folder name (NAME_MAX on Linux, macOS and Windows filesystems)


def check_ref(ref: str) -> str:
    """``ref`` unchanged, or :class:`InputError` for a reference no filesystem accepts.

    Checked before any path operation: the OS answers over-long names with ENAMETOOLONG and NUL bytes with
    ValueError, which pathlib's ``exists``/``is_file`` raise instead of answering False.
    """
    if len(ref) > MAX_REF_CHARS:
        raise InputError(f"The model reference is too long ({len(ref):,} characters; {MAX_REF_CHARS} at most). "
                         "Give a preset, a Hub id (owner/name) or a path.")
    if "\x00" in ref:
        raise InputError("The model reference contains a NUL character; remove it.")
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in re.split(r"[/\\]", ref)):
        raise InputError(f"A file or folder name in the model reference is longer than {MAX_NAME_BYTES} bytes, "
                         "which no filesystem accepts. Check the path.")
    return ref


def path_exists(path: Path) -> bool:
    """``path.exists()`` that answers False where the OS refuses the name (too long, bad bytes) instead of raising."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def resolve(ref: str | None) -> ModelSpec:
    """Resolve a model reference (see module docstring). Raises domain errors with user-facing text."""
    if ref is None or not str(ref).strip():
        ref = DEFAULT_MODEL
    ref = check_ref(str(ref).strip())
    if ref.lower() == "embedded":
        ref = EMBEDDED_ID
    p = _find_preset(ref)
    if p:
        return _preset_spec(p["file"], p["id"])
    n = parse_param_count(ref)
    if n is not None:
        return from_param_count(n, f"{ref} (approximate)")
    path = Path(ref).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        if not path_exists(path):
            raise ModelNotFoundError(f"No file at '{path.name}'. Check the path of the .gguf file.")
        return build_model_spec(gguf_meta.hf_config(path), name=path.name, source="local")
    if ref.startswith((".", "/", "~")) or ref.endswith(".json") or path_exists(path):
        cfg = _local_config(path)
        return build_model_spec(cfg, name=path.name if path.is_dir() else path.parent.name or path.name,
                                source="local")
    if HUB_ID.match(ref):
        try:
            cfg = json.loads(_hub_config(ref))
        except json.JSONDecodeError:
            raise ConfigError(f"The config.json of '{ref}' is not valid JSON.") from None
        return build_model_spec(cfg, name=ref, source="hub")
    raise ModelNotFoundError(
        f"'{ref}' is not a preset, a parameter count (e.g. 7B), a local config.json or .gguf file, or a Hub id "
        "(owner/name).")
