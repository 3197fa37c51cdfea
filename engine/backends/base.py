"""The interface every model loader implements, and the value objects that cross it.

A :class:`Backend` loads a model reference in one storage format (:class:`~engine.specs.QuantSpec`) onto a
device and returns a :class:`LoadedModel`; :meth:`Backend.stream` then produces :class:`TokenEvent`\\ s one
token at a time through a :class:`TokenStream`, which can be cancelled from another thread with a
``threading.Event``. Backends import their heavy libraries lazily and say whether they can run, and why
not (:meth:`Backend.available`).

Model references (:func:`locate`): ``embedded`` (the bundled SmolLM2-135M-Instruct, see
:mod:`engine.embedded`), a local Hugging Face model folder, a local ``.gguf`` file, or a Hub id (``owner/name``,
or ``owner/name:FILE`` for a GGUF repository): from the local Hugging Face cache, else downloaded when online
(:mod:`engine.hub`).
"""
from __future__ import annotations

import gc
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence, Union

from ..errors import InputError, ModelNotFoundError
from ..specs import ModelSpec, QuantSpec, RuntimeSpec

Messages = Sequence[dict]
Prompt = Union[str, Messages]

MAX_NEW_TOKENS = 8192


def default_device() -> str:
    """``cuda`` when PyTorch sees a GPU, else ``cpu``."""
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: Optional[str]) -> str:
    if device is None or device == "auto":
        return default_device()
    d = str(device).strip().lower()
    if d == "cpu":
        return d
    if d == "cuda" or d.startswith("cuda:"):
        import torch

        if not torch.cuda.is_available():
            raise InputError("No CUDA GPU is visible to PyTorch here; use device 'cpu' (or 'auto').")
        return d
    raise InputError(f"Unknown device '{device}'. Use auto, cpu or cuda.")


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate. ``temperature`` 0 means greedy decoding (the default, reproducible); above 0 the
    next token is sampled (``top_p`` nucleus, optional ``top_k``), reproducibly when ``seed`` is given."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filtering
    seed: Optional[int] = None
    system: Optional[str] = None  # a system message prepended when the prompt is a plain string

    def __post_init__(self):
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS:
            raise InputError(f"Max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, got {n!r}.")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t != t or not 0 <= t <= 10:
            raise InputError(f"Temperature must be a number from 0 to 10, got {t!r}.")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or p != p or not 0 < p <= 1:
            raise InputError(f"Top-p must be a number above 0 and at most 1, got {p!r}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"Top-k must be a whole number, 0 or more, got {self.top_k!r}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**32):
            raise InputError(f"Seed must be a whole number from 0 to 2^32-1, got {self.seed!r}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def to_messages(prompt: Prompt, settings: GenerationSettings) -> list[dict]:
    """A chat message list from a plain prompt or a message list (validated)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("The prompt is empty; type a question or an instruction.")
        msgs = [{"role": "user", "content": prompt}]
        if settings.system:
            msgs.insert(0, {"role": "system", "content": settings.system})
        return msgs
    msgs = list(prompt or [])
    if not msgs:
        raise InputError("The conversation is empty; add a user message.")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise InputError("Each message needs a role (system, user or assistant) and a text content.")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. ``text`` is the text it adds (possibly empty: a token holding half of a
    multi-byte character, or a special token); ``t`` is ``time.perf_counter()`` when it was produced.
    A final flush event (``token_id`` None) may carry text still held back when the run ended."""

    text: str
    token_id: Optional[int]
    t: float


@dataclass(eq=False)
class LoadedModel:
    """A model loaded by a backend, with what its loading measured.

    ``load_s`` is the wall time until the model was ready (quantization included); ``quantize_s`` the part
    spent quantizing where it can be separated (HQQ), 0.0 for formats that are not quantized at load, and
    None where the library quantizes inside loading (bitsandbytes). ``weights_bytes`` is measured from the
    loaded objects (:mod:`engine.backends.measure`; llama.cpp: ``llama_model_size``).
    """

    backend: str
    ref: str
    quant: QuantSpec
    device: str
    model: Any
    tokenizer: Any
    load_s: float
    quantize_s: Optional[float]
    weights_bytes: int
    path: str = ""
    spec: Optional[ModelSpec] = None  # the model's shape, for the calculator's prediction (None if unknown)
    info: dict = field(default_factory=dict)
    fast_runner: Any = field(default=None, repr=False)  # the fast path's StaticRunner (engine.backends.runners)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def method(self) -> str:
        return self.quant.name

    @property
    def loaded(self) -> bool:
        return self.model is not None


class TokenStream:
    """An iterator of :class:`TokenEvent` with what the run learnt on the way.

    ``prompt_tokens`` is known once iteration starts; ``finish_reason`` is ``eos``, ``length``,
    ``cancelled`` or ``error`` once it ends; ``finished`` is set once the backend's work for the run has
    ended (no step of it runs afterwards). :meth:`close` (or abandoning the iterator) stops the run.
    """

    def __init__(self, gen_fn: Callable[["TokenStream"], Iterator[TokenEvent]]):
        self.prompt_tokens: int = 0
        self.decode_path: str = ""  # how tokens were produced (plain / fast ...), when the backend says
        self.finish_reason: Optional[str] = None
        self.finished = threading.Event()
        self.started: float = time.perf_counter()
        self._gen = gen_fn(self)

    def __iter__(self):
        return self

    def __next__(self) -> TokenEvent:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()  # a started run ends through its own finally (which sets ``finished``)
        if self.finish_reason is None:
            self.finish_reason = "cancelled"
        self.finished.set()


class Backend(ABC):
    """One loader behind the common interface. Subclasses set ``name``, ``methods`` (the
    ``QuantSpec.method`` values they serve) and ``label``."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    methods: ClassVar[tuple[str, ...]] = ()

    @classmethod
    @abstractmethod
    def available(cls) -> tuple[bool, str]:
        """(True, "") when the backend can run here, else (False, a user-facing reason)."""

    @classmethod
    def serves(cls, quant: QuantSpec) -> bool:
        return quant.method in cls.methods

    @abstractmethod
    def load(self, ref: str, quant: QuantSpec, device: Optional[str] = None) -> LoadedModel:
        """Load ``ref`` stored as ``quant`` on ``device`` (None: :func:`default_device`)."""

    @abstractmethod
    def stream(self, loaded: LoadedModel, prompt: Prompt, settings: GenerationSettings = GenerationSettings(),
               cancel_event: Optional[threading.Event] = None) -> TokenStream:
        """Generate from a chat prompt, token by token; setting ``cancel_event`` stops it between tokens."""

    @abstractmethod
    def chat_ids(self, loaded: LoadedModel, prompt: Prompt, settings: GenerationSettings) -> list[int]:
        """The prompt's token ids as a run sees them (chat template applied, generation prompt added)."""

    @abstractmethod
    def tokenize(self, loaded: LoadedModel, text: str) -> list[int]:
        """Token ids of plain ``text`` (no chat template, no special tokens added)."""

    @abstractmethod
    def score(self, loaded: LoadedModel, ids: Sequence[int], start: int) -> "torch.Tensor":
        """Teacher forcing: log-probabilities (float32, on the CPU) of shape ``[len(ids) - start, vocab]``; row i
        is the model's next-token distribution after ``ids[:start + i]`` (so it scores ``ids[start + i]``).
        Runs on the compute thread; ``1 <= start < len(ids)``."""

    def runtime_spec(self, loaded: LoadedModel, context_tokens: int) -> RuntimeSpec:
        """The calculator's runtime for a run that ended with ``context_tokens`` tokens in context (the fast
        path's static cache holds all its positions from the start)."""
        dev = "cuda" if loaded.device.startswith("cuda") else "cpu"
        r = loaded.fast_runner
        ctx = max(context_tokens, r.max_len) if r is not None else context_tokens
        return RuntimeSpec(context=max(1, ctx), batch=1, device=dev)

    def unload(self, loaded: LoadedModel) -> None:
        """Drop the model and free its memory (CUDA cache included)."""
        with loaded.lock:
            loaded.model = None
            loaded.tokenizer = None
            if loaded.fast_runner is not None:
                loaded.fast_runner.close()
            loaded.fast_runner = None
        release_memory(loaded.device)


# ---------------------------------------------------------------------------------------------
# Model references
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFiles:
    """Where a model's files are: ``hf_dir`` (a transformers folder) and/or ``gguf`` (a GGUF file)."""

    ref: str
    hf_dir: Optional[Path] = None
    gguf: Optional[Path] = None
    spec_ref: Optional[str] = None  # what engine.sources.resolve takes for this model's shape


def is_embedded(ref: str) -> bool:
    from ..sources import EMBEDDED_ID

    r = (ref or "").strip().lower()
    return r in ("embedded", EMBEDDED_ID.lower())


def locate(ref: str, kind: str) -> ModelFiles:
    """Find the files of ``ref`` for a backend that needs ``kind`` (``hf`` or ``gguf``)."""
    from .. import embedded

    if not isinstance(ref, str) or not ref.strip():
        raise InputError("No model given. Use 'embedded', a local model folder, or a .gguf file.")
    from ..sources import check_ref

    ref = check_ref(ref.strip())
    if is_embedded(ref):
        if kind == "gguf":
            return ModelFiles(ref="embedded", gguf=embedded.gguf_path(), spec_ref="embedded")
        return ModelFiles(ref="embedded", hf_dir=embedded.hf_path(), spec_ref="embedded")
    path = Path(ref).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        if kind != "gguf":
            raise InputError(f"'{path.name}' is a GGUF file: load it with method gguf (llama.cpp).")
        return ModelFiles(ref=ref, gguf=path, spec_ref=str(path))  # the calculator reads its header
    if path.is_dir():
        if kind == "gguf":
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise ModelNotFoundError(f"Method gguf needs a .gguf file; '{path.name}' holds {len(ggufs)}. "
                                         "Give the file's path.")
            return ModelFiles(ref=ref, gguf=ggufs[0],
                              spec_ref=str(path) if (path / "config.json").is_file() else str(ggufs[0]))
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"'{path.name}' has no config.json, so it is not a transformers model folder.")
        from ..policy import _refuse_remote_code

        _refuse_remote_code(path / "config.json", path.name)  # trust_remote_code is never enabled
        return ModelFiles(ref=ref, hf_dir=path, spec_ref=str(path))
    from .. import hub
    from ..sources import HUB_ID

    hub_gguf = hub.HUB_GGUF.match(ref)
    if ref.startswith((".", "/", "~")) or (path.suffix.lower() == ".gguf" and not (hub_gguf and hub_gguf["pick"])):
        raise ModelNotFoundError(f"No model file or folder at '{ref}'.")

    if HUB_ID.match(ref) and kind == "hf":
        local = hub.hf_model(ref)
        return ModelFiles(ref=ref, hf_dir=local, spec_ref=str(local))
    if hub_gguf and kind == "gguf":
        gguf = hub.gguf_file(ref)
        return ModelFiles(ref=ref, gguf=gguf, spec_ref=str(gguf))  # the calculator reads its header
    raise ModelNotFoundError(f"'{ref}' is not 'embedded', a local model folder, a .gguf file or a Hub id "
                             "(owner/name; owner/name:FILE for a GGUF repository).")


def model_spec(files: ModelFiles) -> Optional[ModelSpec]:
    """The model's shape for predictions, or None when it cannot be read."""
    if not files.spec_ref:
        return None
    from ..errors import QuantScopeError
    from ..sources import resolve

    try:
        return resolve(files.spec_ref)
    except QuantScopeError:
        return None


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc ``malloc_trim``), so that the process's
    resident memory reflects what is live after a load (bitsandbytes and HQQ first materialise a 16-bit
    copy; without this the freed pages stay resident and inflate every later RSS reading)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def release_memory(device: str) -> None:
    """:func:`release_freed_memory`, and on a GPU PyTorch's CUDA cache emptied too (after an unload or a dropped
    static cache), so that NVML and the next load see the memory as free."""
    release_freed_memory()
    if device.startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


def compact_tensors(model, device: str) -> int:
    """Move ``model``'s tensors on ``device`` to the host and back (freeing the allocator's cache in between), so
    that they sit in compact allocator segments; returns the bytes moved. A conversion that builds new weights
    while the old ones and its temporaries are alive (``int4.convert`` on an 8B model) leaves its survivors spread
    over segments with holes: PyTorch's allocator gives a segment back only when all of it is free, so the holes
    stay reserved (0.62 GB on an 8B model, 32 segments; NVML counts them, the calculator does not;
    bench/results/gpu_reserved_hqq4fast_8b_h200_2026-11-27.log). Parameters keep their identity (tied weights
    stay tied: each tensor moves once); tensors of the model that share a storage (a view, an alias) stay where
    they are, so that they go on sharing it."""
    import torch

    def where(d) -> tuple:  # "cuda" and "cuda:0" (the current GPU) are one device, as are "cpu" and "cpu:0"
        d = torch.device(d)
        return d.type, d.index if d.index is not None else (torch.cuda.current_device() if d.type == "cuda" else 0)

    home = where(device)
    target = torch.device(*home)  # every tensor moved lives here

    on_device = [t for m in model.modules() for t in [*m._parameters.values(), *m._buffers.values()]
                 if t is not None and where(t.device) == home]
    owners: dict = {}  # storage -> the distinct tensors on it
    for t in on_device:
        owners.setdefault(t.untyped_storage().data_ptr(), set()).add(id(t))

    def movable(t) -> bool:  # the only tensor of the model on its storage, and all of it
        return (len(owners[t.untyped_storage().data_ptr()]) == 1 and not t.storage_offset()
                and t.untyped_storage().nbytes() == t.numel() * t.element_size())

    params = {id(p): p for p in on_device if isinstance(p, torch.nn.Parameter) and movable(p)}
    buffers = {id(b): b for b in on_device if not isinstance(b, torch.nn.Parameter) and movable(b)}
    moved = sum(t.numel() * t.element_size() for t in [*params.values(), *buffers.values()])
    with torch.no_grad():
        for p in params.values():  # the Parameter objects stay (ties and references hold); their data moves
            p.data = p.data.to("cpu", copy=True)
        host = {i: b.to("cpu", copy=True) for i, b in buffers.items()}
        _swap_buffers(model, host)  # ids stay unique: `buffers` holds the originals until here
        buffers.clear()
        release_memory(device)  # every moved tensor's device memory is free now: whole segments go back
        for p in params.values():
            p.data = p.data.to(target)
        _swap_buffers(model, {id(h): h.to(target) for h in host.values()})
    return moved


def _swap_buffers(model, new: dict) -> None:
    """Replace every buffer of ``model``'s modules whose id is a key of ``new`` by its value."""
    for module in model.modules():
        for name, b in list(module._buffers.items()):
            if b is not None and id(b) in new:
                module._buffers[name] = new[id(b)]


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
            "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[name]
