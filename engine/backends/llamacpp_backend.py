"""llama.cpp backend (llama-cpp-python): GGUF files, loaded as they are.

Method ``gguf`` means "the file as shipped"; a GGUF type name (``q4_1``, ``q4_k_m``, ...) is accepted when it
is the file's own type (llama.cpp does not re-quantize on load). All layers are offloaded to the GPU
(``n_gpu_layers=-1``) when the device is CUDA and the installed llama_cpp build supports offload; otherwise
everything runs on the CPU and ``info["offload"]`` says why.

Streaming steps the token-level ``Llama.generate`` on the process's compute thread (:mod:`engine.compute`,
interleaved with other runs; ggml's CPU threads and PyTorch's share one OpenMP runtime): the prompt is the model's own
chat template (GGUF ``tokenizer.chat_template``) rendered by llama_cpp's Jinja2 formatter, the KV cache is
reset before each run (so TTFT always includes the full prefill), the cancel event is checked between
tokens, and bytes are decoded incrementally so multi-byte characters split across tokens come out whole.
A ``Llama`` object is not thread-safe: one run at a time per loaded model (others wait, cancellably).

Measured weights: ``llama_model_size`` -- the bytes of every tensor of the loaded model, which equals the
file's tensor data.

Before a file is loaded in this process for the first time, a child process (importing the engine, numpy and
PyTorch, as this one does) reads its vocabulary with llama.cpp (:func:`vocab_check`): llama.cpp's C++ can crash the
whole process on a file, and a crash would stop the app for every user. A CUDA build of llama-cpp-python 0.3.36 on an
H200 machine segfaulted in ``llama_vocab::load`` whenever numpy had loaded the C++ runtime first -- fixed by
:mod:`engine.cxx_runtime`; the check stays as the guard for what is not known yet. A file the child cannot read is
refused with the reason; the check runs once per file per process (~2-4 s, mostly the imports).
"""
from __future__ import annotations

import codecs
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .. import cxx_runtime
from ..errors import BackendUnavailableError, GenerationError, InputError, ModelLoadError
from ..specs import QuantSpec, RuntimeSpec
from ..compute import isolated, scheduler
from .base import (Backend, GenerationSettings, LoadedModel, Prompt, TokenEvent, TokenStream, check_device,
                   locate, model_spec, to_messages)

DEFAULT_N_CTX = 4096


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp's C code prints to fd 2 even with verbose=False in some paths; silence it while loading."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(fd, 2)
    finally:
        os.close(fd)


# What the child process runs: the imports this process holds, in the order that matters here (engine.cxx_runtime:
# ``engine`` before numpy, as the app does, or after it, as a script that imported numpy first did), then llama.cpp
# reading only the vocabulary. ``engine`` from this process's copy.
_VOCAB_PROBE = ("import sys; sys.path.insert(0, sys.argv[2]); {imports}; "
                "llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)")
_ENGINE_PARENT = str(Path(__file__).resolve().parents[2])


def vocab_probe() -> str:
    """The child's program, with this process's import order."""
    return _VOCAB_PROBE.format(imports="import numpy, torch, engine, llama_cpp" if cxx_runtime.late()
                               else "import engine, numpy, torch, llama_cpp")


VOCAB_CHECK_TIMEOUT_S = 300
_vocab_checked: dict[tuple, Optional[str]] = {}
_vocab_lock = threading.Lock()


def vocab_check(path: Path) -> Optional[str]:
    """None when llama.cpp reads ``path``'s vocabulary in a child process, else why not (a crash or an error).
    Remembered per file (path, size, modification time) for this process. A child that outlasts
    :data:`VOCAB_CHECK_TIMEOUT_S` (a machine under heavy load) proves nothing either way: the load goes ahead."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _vocab_lock:
        if key in _vocab_checked:
            return _vocab_checked[key]
        try:
            r = subprocess.run([sys.executable, "-c", vocab_probe(), str(path), _ENGINE_PARENT], capture_output=True,
                               text=True, timeout=VOCAB_CHECK_TIMEOUT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return None
        why = None
        if r.returncode < 0:
            try:
                sig = signal.Signals(-r.returncode).name
            except ValueError:
                sig = f"signal {-r.returncode}"
            why = (f"llama.cpp crashed ({sig}) while reading the vocabulary of {path.name} in a separate process, "
                   "so QuantScope did not load it here (a crash would stop the app for everyone). The file may be "
                   "damaged, or this llama-cpp-python build fails on it next to PyTorch: try another GGUF file or "
                   "another llama-cpp-python build")
            if cxx_runtime.late():
                why += (". This process imported numpy before QuantScope's engine, which is known to make llama.cpp "
                        "crash (engine/cxx_runtime.py): import engine first")
        elif r.returncode:
            lines = [ln for ln in (r.stderr or "").strip().splitlines() if ln.strip()]
            last = lines[-1][:300] if lines else f"exit status {r.returncode}"
            last = re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", last)  # the child's exception, without its class
            why = f"llama.cpp could not read the vocabulary of {path.name}: {last}"
        _vocab_checked[key] = why
        return why


def file_type(llm) -> Optional[str]:
    """The llama.cpp file type (``Q4_1``) of a loaded model, from its ``general.file_type``; None if absent."""
    from .. import gguf_rules

    try:
        return gguf_rules.FTYPE_NAMES.get(int(llm.metadata["general.file_type"]))
    except (KeyError, ValueError, TypeError):
        return None


def _chat_tokens(llm, messages: list[dict]) -> list[int]:
    """The chat prompt's tokens, formatted with the GGUF file's own template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise GenerationError("This GGUF file has no chat template, so chat prompts cannot be formatted.")

    def piece(tid: Optional[int]) -> str:
        return "" if tid is None or tid < 0 else llm.detokenize([tid], special=True).decode("utf-8", "replace")

    fmt = Jinja2ChatFormatter(template=template, eos_token=piece(llm.token_eos()), bos_token=piece(llm.token_bos()))
    text = fmt(messages=messages).prompt
    return list(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))


class LlamaCppBackend(Backend):
    name = "llama.cpp"
    label = "llama.cpp"
    methods = ("gguf",)

    def __init__(self, n_ctx: int = DEFAULT_N_CTX):
        self.n_ctx = n_ctx

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as e:
            return False, f"llama_cpp (llama-cpp-python) is not installed ({e})"
        except Exception as e:  # noqa: BLE001 - e.g. the shared library failed to load
            return False, f"llama_cpp failed to import: {e.__class__.__name__}: {e}"
        return True, ""

    @staticmethod
    def gpu_offload() -> bool:
        import llama_cpp

        try:
            return bool(llama_cpp.llama_supports_gpu_offload())
        except Exception:  # noqa: BLE001
            return False

    def load(self, ref: str, quant: QuantSpec, device: Optional[str] = None) -> LoadedModel:
        ok, why = self.available()
        if not ok:
            raise BackendUnavailableError(f"llama.cpp cannot run here: {why}.")
        if quant.method != "gguf":
            raise InputError(f"llama.cpp loads GGUF files (method gguf), not {quant.name}.")
        import llama_cpp

        device = check_device(device)
        files = locate(ref, "gguf")
        t0 = time.perf_counter()  # the load time shown includes the first check of the file (the wait a user sees)
        why = vocab_check(files.gguf)
        if why:
            raise ModelLoadError(why + ".")
        info: dict = {"n_ctx": self.n_ctx, "file": files.gguf.name}
        n_gpu_layers = 0
        if device.startswith("cuda"):
            if self.gpu_offload():
                n_gpu_layers = -1
                info["offload"] = "all layers on the GPU"
            else:
                info["offload"] = "this llama_cpp build has no GPU support: running on the CPU"
                device = "cpu"
        try:
            with _quiet_stderr():
                llm = isolated(llama_cpp.Llama, model_path=str(files.gguf), n_ctx=self.n_ctx,
                               n_gpu_layers=n_gpu_layers, verbose=False)
        except Exception as e:  # noqa: BLE001 - ValueError "Failed to load model from file", ...
            raise ModelLoadError(f"llama.cpp could not load {files.gguf.name}: {e}") from e
        load_s = time.perf_counter() - t0
        info["n_gpu_layers"] = n_gpu_layers
        ftype = info["file_type"] = file_type(llm)
        if quant.quant_type and ftype and quant.quant_type.upper() != ftype:
            with contextlib.suppress(Exception):
                llm.close()
            raise InputError(f"The file is {ftype}; llama.cpp loads GGUF files as they are and does not convert "
                             f"them to {quant.quant_type}. Use method gguf (or {ftype.lower()}).")
        q = quant if quant.quant_type or not ftype else QuantSpec(method="gguf", quant_type=ftype, dtype="fp16",
                                                                 label=ftype)
        return LoadedModel(backend=self.name, ref=files.ref, quant=q, device=device, model=llm, tokenizer=None,
                           load_s=load_s, quantize_s=0.0, weights_bytes=int(llm._model.size()),
                           path=str(files.gguf), spec=model_spec(files), info=info)

    def runtime_spec(self, loaded: LoadedModel, context_tokens: int) -> RuntimeSpec:
        # llama.cpp allocates the whole KV cache (n_ctx tokens, f16) when the context is created.
        dev = "cuda" if loaded.device.startswith("cuda") else "cpu"
        return RuntimeSpec(context=int(loaded.info.get("n_ctx", self.n_ctx)), batch=1, kv_dtype="fp16", device=dev)

    def unload(self, loaded: LoadedModel) -> None:
        with loaded.lock:
            llm, loaded.model = loaded.model, None
            if llm is not None:
                with contextlib.suppress(Exception):
                    llm.close()

    def _llm(self, loaded: LoadedModel):
        llm = loaded.model
        if llm is None:
            raise InputError("This model has been unloaded; load it again.")
        return llm

    def chat_ids(self, loaded: LoadedModel, prompt: Prompt, settings: GenerationSettings) -> list[int]:
        messages = to_messages(prompt, settings)
        with loaded.lock:
            return _chat_tokens(self._llm(loaded), messages)

    def tokenize(self, loaded: LoadedModel, text: str) -> list[int]:
        with loaded.lock:
            return list(self._llm(loaded).tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def score(self, loaded: LoadedModel, ids, start: int):
        """llama-cpp-python keeps every position's logits only when the model was created with
        ``logits_all=True`` (which costs n_ctx x vocab floats); we evaluate the context once, then one token at a
        time, reading the last position's logits after each step."""
        import numpy as np
        import torch

        ids = [int(i) for i in ids]
        if not 1 <= start < len(ids):
            raise InputError(f"Nothing to score: start {start} with {len(ids)} tokens.")
        with loaded.lock:
            llm = self._llm(loaded)
            if len(ids) > llm.n_ctx():
                raise InputError(f"{len(ids)} tokens do not fit in the context of {llm.n_ctx()} tokens.")

            def run():
                n_vocab = llm.n_vocab()
                rows = np.empty((len(ids) - start, n_vocab), dtype=np.float32)
                llm.reset()
                llm.eval(ids[:start])
                for i in range(start, len(ids)):
                    rows[i - start] = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
                    if i + 1 < len(ids):
                        llm.eval([ids[i]])
                llm.reset()
                return torch.log_softmax(torch.from_numpy(rows), dim=-1)

            return scheduler().call(run)

    def stream(self, loaded: LoadedModel, prompt: Prompt, settings: GenerationSettings = GenerationSettings(),
               cancel_event: Optional[threading.Event] = None) -> TokenStream:
        import llama_cpp

        if not loaded.loaded:
            raise InputError("This model has been unloaded; load it again.")
        messages = to_messages(prompt, settings)

        def cancelled() -> bool:
            return cancel_event is not None and cancel_event.is_set()

        def run(ts: TokenStream):
            while not loaded.lock.acquire(timeout=0.05):  # one run at a time per Llama
                if cancelled():
                    ts.finish_reason = "cancelled"
                    ts.finished.set()
                    return
            handle = None
            try:
                llm = loaded.model
                if llm is None:
                    raise InputError("This model has been unloaded; load it again.")
                vocab = llm._model.vocab
                tokens = _chat_tokens(llm, messages)
                if len(tokens) + settings.max_new_tokens > llm.n_ctx():
                    raise InputError(f"The prompt ({len(tokens)} tokens) plus {settings.max_new_tokens} new tokens "
                                     f"do not fit in the context of {llm.n_ctx()} tokens.")
                ts.prompt_tokens = len(tokens)
                if settings.greedy:
                    kw = dict(temp=0.0)
                else:
                    kw = dict(temp=float(settings.temperature), top_p=float(settings.top_p),
                              top_k=settings.top_k, min_p=0.0)
                state: dict = {}

                def steps():  # on the compute thread
                    if settings.seed is not None:
                        llm.set_seed(settings.seed)
                    llm.reset()  # no prefix reuse: every run pays its full prefill, so TTFT is comparable
                    gen = llm.generate(tokens, repeat_penalty=1.0, reset=True, **kw)
                    try:
                        n = 0
                        for tid in gen:
                            t = time.perf_counter()
                            n += 1
                            eog = bool(llama_cpp.llama_vocab_is_eog(vocab, tid))
                            yield int(tid), t, eog
                            if eog:
                                state["finish"] = "eos"
                                return
                            if n >= settings.max_new_tokens:
                                state["finish"] = "length"
                                return
                            if cancelled():
                                state["finish"] = "cancelled"
                                return
                    finally:
                        gen.close()

                handle = scheduler().stream(steps(), cancel=cancel_event, name=f"llama.cpp:{loaded.method}")
                dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
                for tid, t, eog in handle:
                    yield TokenEvent("" if eog else dec.decode(llm.detokenize([tid])), tid, t)
                rest = dec.decode(b"", final=True)
                if rest:
                    yield TokenEvent(rest, None, time.perf_counter())
                ts.finish_reason = state.get("finish", "cancelled")
            except (InputError, GenerationError):
                ts.finish_reason = "error"
                raise
            except GeneratorExit:
                raise
            except Exception as e:  # noqa: BLE001
                ts.finish_reason = "error"
                raise GenerationError(f"llama.cpp generation failed: {e.__class__.__name__}: {e}") from e
            finally:
                if handle is not None:
                    handle.close()
                if ts.finish_reason is None:
                    ts.finish_reason = "cancelled"
                loaded.lock.release()
                ts.finished.set()

        return TokenStream(run)
