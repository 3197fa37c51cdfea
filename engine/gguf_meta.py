"""A GGUF file's shape, read from its header: the metadata keys and the tensor list, not the weights.

llama.cpp's files carry the model's hyperparameters (``llama.block_count``, ``llama.embedding_length``, ...) and
every tensor's name and shape in a header before the data, so the calculator can size a bare ``.gguf`` file
without a ``config.json`` (:func:`hf_config` turns the header into the config keys
:func:`engine.architectures.build_model_spec` reads). The reader follows the GGUF specification (versions 2 and 3,
little-endian): scalars are read, arrays only counted (a tokenizer's 49,152 tokens are skipped, not decoded), the
tensor data never touched (the file is memory-mapped): 0.04 s for the embedded model's header, where the ``gguf``
package's reader takes 2 s (it decodes every array).
"""
from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

MAGIC = b"GGUF"
# GGUF value types -> struct format of a scalar (8 = string, 9 = array are read apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
# general.architecture -> transformers' model_type (llama.cpp writes Mistral's and Mixtral's files as "llama")
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "gemma2": "gemma2",
               "phi3": "phi3"}


@dataclass(frozen=True)
class ArrayInfo:
    """An array value, counted but not read."""

    type: int
    count: int


@dataclass(frozen=True)
class Header:
    metadata: dict  # key -> scalar, string or ArrayInfo
    tensors: dict  # name -> shape as transformers orders it (out_features first), from GGUF's innermost-first dims


class _Cursor:
    def __init__(self, data, pos: int = 0):
        self.data, self.pos = data, pos

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise EOFError
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.data):
            raise EOFError
        s = self.data[self.pos:self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype == STRING:
                for _ in range(count):
                    n = self.take("Q")
                    self.pos += n
            elif etype in _SCALARS:
                self.pos += count * struct.calcsize("<" + _SCALARS[etype])
            else:
                raise ValueError(f"array of value type {etype}")
            if self.pos > len(self.data):
                raise EOFError
            return ArrayInfo(etype, count)
        if vtype not in _SCALARS:
            raise ValueError(f"value type {vtype}")
        return self.take(_SCALARS[vtype])


def read_header(path: Path) -> Header:
    """The metadata and tensor shapes of the GGUF file at ``path`` (memory-mapped: only the header's pages are
    read). Raises :class:`ConfigError` for a file that is not a readable GGUF."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != MAGIC:
                raise ConfigError(f"'{path.name}' is not a GGUF file (it does not start with GGUF). Give a llama.cpp "
                                  ".gguf file, or a model folder with its config.json.")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(data, path.name)
    except OSError as e:
        raise _unreadable(path, e) from None


def _unreadable(path: Path, e: OSError) -> ConfigError:
    return ConfigError(f"'{path.name}' cannot be read ({e.strerror or e.__class__.__name__}).")


def _parse(data, name: str) -> Header:
    """The header after the magic (checked by :func:`read_header`)."""
    c = _Cursor(data, pos=len(MAGIC))
    try:
        version = c.take("I")
        if version not in (2, 3):
            raise ConfigError(f"'{name}' is GGUF version {version}; the calculator reads versions 2 and 3.")
        n_tensors, n_kv = c.take("Q"), c.take("Q")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise ValueError("implausible counts")
        meta = {}
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.take("I"))
        tensors = {}
        for _ in range(n_tensors):
            name = c.string()
            dims = [c.take("Q") for _ in range(c.take("I"))]
            c.take("I")  # ggml type
            c.take("Q")  # offset of the data
            tensors[name] = tuple(reversed(dims))
    except (EOFError, ValueError, struct.error):
        raise ConfigError(f"'{name}' is not a readable GGUF file (its header is cut short or damaged).") from None
    return Header(meta, tensors)


@functools.lru_cache(maxsize=16)
def _config(path: str, mtime_ns: int, size: int) -> dict:
    h = read_header(Path(path))
    meta, tensors = h.metadata, h.tensors
    name = Path(path).name
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ConfigError(f"'{name}' names no architecture (general.architecture), so its shape is unknown.")

    def key(k: str, required: bool = True):
        v = meta.get(f"{arch}.{k}")
        if isinstance(v, ArrayInfo):  # a per-layer array (some architectures): the calculator takes one value
            raise ConfigError(f"'{name}' gives {arch}.{k} per layer; the calculator needs one value.")
        if v is None and required:
            raise ConfigError(f"'{name}' lacks {arch}.{k}, so its shape is unknown.")
        return v

    experts = int(key("expert_count", required=False) or 0)
    model_type = "mixtral" if arch == "llama" and experts else MODEL_TYPES.get(arch)
    if model_type is None:
        raise ConfigError(f"'{name}' is a {arch} model; the calculator reads GGUF files of "
                          f"{', '.join(sorted(MODEL_TYPES))} models.")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size", required=False) or (tokens.count if isinstance(tokens, ArrayInfo) else None) \
        or tensors.get("token_embd.weight", (None,))[0]
    heads = int(key("attention.head_count"))
    cfg = {
        "model_type": model_type,
        "vocab_size": int(vocab or 0),
        "hidden_size": int(key("embedding_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", required=False) or heads),
        "intermediate_size": int(key("feed_forward_length")),
        "max_position_embeddings": int(key("context_length", required=False) or 0),
        "tie_word_embeddings": "output.weight" not in tensors,
        # qwen2 has q/k/v biases by its model_type; elsewhere transformers' attention_bias covers q/k/v/o
        "attention_bias": "blk.0.attn_output.bias" in tensors or
                          (model_type != "qwen2" and "blk.0.attn_q.bias" in tensors),
        "mlp_bias": "blk.0.ffn_down.bias" in tensors,
    }
    head_dim = key("attention.key_length", required=False)
    if head_dim:
        cfg["head_dim"] = int(head_dim)
    window = key("attention.sliding_window", required=False)
    if window:
        cfg["sliding_window"] = int(window)
    if experts:
        cfg["num_local_experts"] = experts
        cfg["num_experts_per_tok"] = int(key("expert_used_count", required=False) or 2)
    return cfg


def hf_config(path: Path) -> dict:
    """transformers-style config keys for the GGUF file at ``path`` (cached per file version)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        raise _unreadable(path, e) from None
    return dict(_config(str(path.resolve()), st.st_mtime_ns, st.st_size))
