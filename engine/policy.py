"""What this server lets its users do: host settings from environment variables, checked at every request.

| variable | default | meaning |
|---|---|---|
| ``QUANTSCOPE_ALLOWED_MODELS`` | ``any`` | ``any``, or comma-separated references users may pick (``embedded``, preset / Hub ids) |
| ``QUANTSCOPE_MODELS_DIR`` | unset | a folder: local model paths are accepted only inside it (after resolving ``..`` and links) |
| ``QUANTSCOPE_LOCAL_PATHS`` | see below | ``any`` \\| ``models-dir`` \\| ``none`` |
| ``QUANTSCOPE_ALLOWED_FORMATS`` | ``any`` | comma-separated side-by-side formats (``bf16,nf4,gguf``) |
| ``QUANTSCOPE_MAX_MODEL_PARAMS`` | ``any`` | largest model side by side may load, as a count (``2B``, ``500M``) |
| ``QUANTSCOPE_MAX_NEW_TOKENS`` | ``512`` | cap on new tokens per pane |
| ``QUANTSCOPE_MAX_PROMPT_CHARS`` | ``4000`` | cap on the prompt's length |
| ``QUANTSCOPE_GENERATION_CONCURRENCY`` | ``2`` | side-by-side runs at once (the rest wait in the queue, seeing their position) |
| ``QUANTSCOPE_RUNS_PER_MINUTE`` | ``6`` | side-by-side runs one session may start per minute (``0``: no limit); one at a time always |

``QUANTSCOPE_LOCAL_PATHS`` defaults to ``models-dir`` when ``QUANTSCOPE_MODELS_DIR`` is set, to ``none`` on a
Hugging Face Space (``SPACE_ID`` is set there), and to ``any`` otherwise (your own workstation). The Hub token is
read by huggingface_hub from ``HF_TOKEN`` itself; QuantScope never reads, logs or shows it. ``trust_remote_code``
is never enabled: a model whose config needs custom code (``auto_map``) is refused with that reason.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from .errors import InputError

LOCAL_MODES = ("any", "models-dir", "none")


class PolicyError(InputError):
    """A request this server's settings do not allow (the message says which setting)."""


def _list(v: Optional[str]) -> Optional[frozenset]:
    if v is None or v.strip().lower() in ("", "any", "*"):
        return None
    return frozenset(x.strip() for x in v.split(",") if x.strip())


def _int(env: Mapping, name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be from {lo} to {hi}, got {v}")
    return v


def _count(env: Mapping, name: str) -> Optional[int]:
    """A parameter count such as ``2B`` or ``500M`` (None for unset / ``any``)."""
    raw = (env.get(name) or "").strip()
    if raw.lower() in ("", "any", "*"):
        return None
    from .sources import parse_param_count

    n = parse_param_count(raw)
    if n is None:
        raise ValueError(f"{name} must be a parameter count such as 2B or 500M, got {raw!r}")
    return n


def _looks_local(ref: str) -> bool:
    return ref.startswith((".", "/", "~", "\\")) or "\\" in ref or ref.endswith((".json", ".gguf")) or \
        ref.count("/") > 1 or ".." in ref


@dataclass(frozen=True)
class HostPolicy:
    allowed_models: Optional[frozenset] = None
    local_paths: str = "any"
    models_dir: Optional[Path] = None
    allowed_formats: Optional[frozenset] = None
    max_model_params: Optional[int] = None
    max_new_tokens: int = 512
    max_prompt_chars: int = 4000
    generation_concurrency: int = 2
    runs_per_minute: int = 6

    @classmethod
    def from_env(cls, env: Mapping = os.environ) -> "HostPolicy":
        models_dir = env.get("QUANTSCOPE_MODELS_DIR") or None
        default_local = "models-dir" if models_dir else ("none" if env.get("SPACE_ID") else "any")
        local = (env.get("QUANTSCOPE_LOCAL_PATHS") or default_local).strip().lower()
        if local not in LOCAL_MODES:
            raise ValueError(f"QUANTSCOPE_LOCAL_PATHS must be one of {', '.join(LOCAL_MODES)}, got {local!r}")
        if local == "models-dir" and not models_dir:
            raise ValueError("QUANTSCOPE_LOCAL_PATHS=models-dir needs QUANTSCOPE_MODELS_DIR")
        return cls(allowed_models=_list(env.get("QUANTSCOPE_ALLOWED_MODELS")), local_paths=local,
                   models_dir=Path(models_dir).expanduser().resolve() if models_dir else None,
                   allowed_formats=_list(env.get("QUANTSCOPE_ALLOWED_FORMATS")),
                   max_model_params=_count(env, "QUANTSCOPE_MAX_MODEL_PARAMS"),
                   max_new_tokens=_int(env, "QUANTSCOPE_MAX_NEW_TOKENS", 512, 1, 4096),
                   max_prompt_chars=_int(env, "QUANTSCOPE_MAX_PROMPT_CHARS", 4000, 1, 100_000),
                   generation_concurrency=_int(env, "QUANTSCOPE_GENERATION_CONCURRENCY", 2, 1, 64),
                   runs_per_minute=_int(env, "QUANTSCOPE_RUNS_PER_MINUTE", 6, 0, 10_000))

    # ------------------------------------------------------------------ checks
    def check_model(self, ref: Optional[str]) -> Optional[str]:
        """The reference if this server allows it; else :class:`PolicyError`. Messages never show server paths."""
        if ref is None:
            return ref
        from .sources import check_ref, path_exists

        r = check_ref(str(ref).strip())
        if self.allowed_models is not None and r.lower() not in {m.lower() for m in self.allowed_models}:
            raise PolicyError(f"This server only offers these models: {', '.join(sorted(self.allowed_models))}.")
        path = Path(r).expanduser()
        in_dir = self.models_dir is not None and not path.is_absolute() and path_exists(self.models_dir / path)
        if not (_looks_local(r) or path_exists(path) or in_dir):
            return r
        if self.local_paths == "none":
            raise PolicyError("This server does not open local files or folders; pick a preset, 'embedded' or a "
                              "Hub id (owner/name).")
        if self.local_paths == "models-dir":
            try:
                real = (self.models_dir / path if not path.is_absolute() else path).resolve()
            except (OSError, RuntimeError):
                raise PolicyError("That path cannot be opened here.") from None
            if real != self.models_dir and self.models_dir not in real.parents:
                raise PolicyError(f"'{r}' is outside the models folder this server allows; give a folder inside "
                                  "it (by its name) or a Hub id.")
            path = real
        if path.is_dir() and (path / "config.json").is_file():
            _refuse_remote_code(path / "config.json", r)
        elif path.is_file() and path.suffix == ".json":
            _refuse_remote_code(path, r)
        return str(path) if self.local_paths == "models-dir" else r

    def check_model_size(self, ref: str) -> None:
        """Refuse to load a model larger than ``max_model_params`` (the calculator is not limited: estimating a
        70B model costs nothing). A reference whose size cannot be read is left to the loader to explain."""
        if self.max_model_params is None:
            return
        from .errors import QuantScopeError
        from .sources import resolve

        try:
            spec = resolve(ref)
        except QuantScopeError:
            return
        if spec.params > self.max_model_params:
            raise PolicyError(f"{spec.name} has {spec.params / 1e9:.2f}B parameters; this server runs models up to "
                              f"{self.max_model_params / 1e9:.2f}B side by side. Pick a smaller one, or estimate "
                              "it in the calculator.")

    def check_formats(self, formats) -> None:
        if self.allowed_formats is None:
            return
        bad = [f for f in formats if f and f not in self.allowed_formats and f != "(off)"]
        if bad:
            raise PolicyError(f"This server does not run {', '.join(bad)}; allowed formats: "
                              f"{', '.join(sorted(self.allowed_formats))}.")

    def check_generation(self, prompt: str, max_new_tokens: int) -> None:
        if isinstance(prompt, str) and len(prompt) > self.max_prompt_chars:
            raise PolicyError(f"The prompt has {len(prompt):,} characters; the limit here is "
                              f"{self.max_prompt_chars:,}. Shorten it and run again.")
        if isinstance(max_new_tokens, int) and max_new_tokens > self.max_new_tokens:
            raise PolicyError(f"{max_new_tokens} new tokens asked; this server allows at most "
                              f"{self.max_new_tokens} per pane.")


def _refuse_remote_code(config: Path, ref: str) -> None:
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError):
        return  # the loader says what is wrong with it
    if isinstance(cfg, dict) and cfg.get("auto_map"):
        raise PolicyError(f"'{ref}' ships its own model code (auto_map in config.json), which would need "
                          "trust_remote_code; QuantScope never runs code from a model repository.")


_policy: Optional[HostPolicy] = None
_lock = threading.Lock()


def host_policy() -> HostPolicy:
    """The process's policy, read from the environment once."""
    global _policy
    with _lock:
        if _policy is None:
            _policy = HostPolicy.from_env()
        return _policy


def set_host_policy(p: Optional[HostPolicy]) -> None:
    """Replace the policy (app start-up with explicit settings; tests). None: read the environment again."""
    global _policy
    with _lock:
        _policy = p
