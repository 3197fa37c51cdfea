"""transformers backends: 16/32-bit models and bitsandbytes LLM.int8 / NF4 / FP4, plus the streaming machinery
shared with the HQQ backend.

Streaming: the chat template is applied in the caller's thread; the decode loop
(:func:`engine.backends.decode.decode_steps`: prefill, then one cached forward pass per token) runs on the
process's compute thread (:mod:`engine.compute`), interleaved with every other run, and stops between two
tokens when a ``threading.Event`` is set -- by the caller (stop button, client disconnect) -- or when the
consumer closes or abandons the stream. Text deltas come from incremental detokenisation
(:class:`IncrementalDecoder`), correct for characters split over several tokens. Loading runs on a
short-lived thread (:func:`engine.compute.isolated`).

transformers 5 removed ``load_in_8bit=`` / ``load_in_4bit=`` from ``from_pretrained``: bitsandbytes is
configured through ``quantization_config=BitsAndBytesConfig(...)`` only.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from ..compute import PENDING, isolated, scheduler
from ..errors import BackendUnavailableError, GenerationError, InputError, ModelLoadError, QuantScopeError
from ..specs import QuantSpec
from .base import (Backend, GenerationSettings, LoadedModel, Prompt, TokenEvent, TokenStream, check_device,
                   locate, model_spec, release_freed_memory, to_messages, torch_dtype)
from .decode import DecodeState, decode_steps
from .measure import weight_bytes

log = logging.getLogger(__name__)


def _import_error(lib: str) -> Optional[str]:
    try:
        __import__(lib)
    except ImportError as e:
        return f"{lib} is not installed ({e})"
    except Exception as e:  # noqa: BLE001 - a broken install (missing native library, ...) is "not available"
        return f"{lib} failed to import: {e.__class__.__name__}: {e}"
    return None


# ---------------------------------------------------------------------------------------------
# Streaming helpers
# ---------------------------------------------------------------------------------------------
class IncrementalDecoder:
    """Token ids in, text deltas out. Decodes a short window (``prefix``..end) and emits only once the new
    text no longer ends in an incomplete character (U+FFFD), so multi-byte characters split across tokens
    and tokenizers whose pieces merge differently in context both come out right."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


def _eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


# transformers' from_pretrained flips process-wide switches while it builds a model (the default dtype, the
# patched ``torch.nn.init`` functions of ``no_init_weights``, meta-device contexts). Two loads at once — two
# panes, two users — were seen to corrupt each other: a bf16 model loaded next to an NF4 and an HQQ one
# produced NaN logits. Loads of the transformers-based backends therefore run one at a time (load time is
# counted from the moment the lock is taken).
_LOAD_LOCK = threading.Lock()


def pick_runner(loaded: LoadedModel, prompt_tokens: int, max_new_tokens: int):
    """(runner, what it is) for one run: the fast path's static runner for a ``fast`` format when it is free,
    else the plain path."""
    from .runners import DynamicRunner, acquire

    if loaded.quant.fast:
        r = acquire(loaded, prompt_tokens, max_new_tokens)
        if r is not None:
            return r, ("fast: static cache + CUDA graph" if r.graphed else "fast: static cache (no CUDA graph on CPU)")
        return DynamicRunner(loaded.model), "plain (the fast path was busy with another run of this model)"
    return DynamicRunner(loaded.model), "plain"


def hf_stream(loaded: LoadedModel, prompt: Prompt, settings: GenerationSettings,
              cancel_event: Optional[threading.Event]) -> TokenStream:
    """Stream from a transformers model (also used by HQQ): the chat template is applied in the caller's
    thread, the decode steps (:func:`~engine.backends.decode.decode_steps`) run on the compute thread."""
    import torch

    if not loaded.loaded:
        raise InputError("This model has been unloaded; load it again.")
    model, tok = loaded.model, loaded.tokenizer
    messages = to_messages(prompt, settings)

    def run(ts: TokenStream):
        try:
            enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
        except Exception as e:  # noqa: BLE001 - no template, bad roles, ...
            raise GenerationError(f"Could not apply the model's chat template: {e}") from None
        dev = loaded.info.get("input_device", loaded.device)
        ts.prompt_tokens = int(enc["input_ids"].shape[1])
        eos = _eos_ids(model, tok)
        state = DecodeState()

        def steps():
            ids = enc["input_ids"].to(dev)
            mask = enc["attention_mask"].to(dev) if "attention_mask" in enc else None
            runner, ts.decode_path = pick_runner(loaded, ts.prompt_tokens, settings.max_new_tokens)
            try:
                yield from decode_steps(runner, ids, mask, settings, eos, state, cancel_event, pending=PENDING)
            finally:
                runner.release()

        handle = scheduler().stream(steps(), step_context=torch.inference_mode, cancel=cancel_event,
                                    name=f"{loaded.backend}:{loaded.method}")
        dec = IncrementalDecoder(tok)
        try:
            for tid, t in handle:
                yield TokenEvent(dec.add(tid), tid, t)
            rest = dec.flush()
            if rest:
                yield TokenEvent(rest, None, time.perf_counter())
            ts.finish_reason = state.finish_reason or "cancelled"
        except (MemoryError, torch.OutOfMemoryError) as e:
            ts.finish_reason = "error"
            raise GenerationError(f"Ran out of memory while generating with {loaded.method} on "
                                  f"{loaded.device}. Try fewer new tokens or a smaller format.") from e
        except QuantScopeError:
            ts.finish_reason = "error"
            raise
        except Exception as e:  # noqa: BLE001 - library errors become one user-facing line
            ts.finish_reason = "error"
            raise GenerationError(f"Generation failed: {e.__class__.__name__}: {e}") from e
        finally:
            handle.close()
            if ts.finish_reason is None:
                ts.finish_reason = "cancelled"
            ts.finished.set()

    return TokenStream(run)


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------
class _Int8LogFilter(logging.Filter):
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast ..." at WARNING on *every* int8 matmul."""

    def filter(self, record):
        return "inputs will be cast" not in record.getMessage()


_filter_installed = False


def _quiet_bnb_int8():
    global _filter_installed
    if not _filter_installed:
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_Int8LogFilter())
        _filter_installed = True


class HFBackend(Backend):
    """Common loading and streaming for backends built on transformers."""

    @classmethod
    def available(cls) -> tuple[bool, str]:
        for lib in ("torch", "transformers"):
            why = _import_error(lib)
            if why:
                return False, why
        return True, ""

    def _check(self, quant: QuantSpec, device: Optional[str]) -> str:
        ok, why = self.available()
        if not ok:
            raise BackendUnavailableError(f"{self.label} cannot run here: {why}.")
        if not self.serves(quant):
            raise InputError(f"{self.label} does not load {quant.name}; it loads {', '.join(self.methods)}.")
        return check_device(device)

    def _from_pretrained(self, path, **kw):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path), **kw)  # never trust_remote_code

    def _build(self, path, quant: QuantSpec, device: str):
        """Return (model, quantize_s, info). Subclasses override."""
        raise NotImplementedError

    def load(self, ref: str, quant: QuantSpec, device: Optional[str] = None) -> LoadedModel:
        import torch
        from transformers import AutoTokenizer

        device = self._check(quant, device)
        files = locate(ref, "hf")
        try:
            with _LOAD_LOCK:  # from_pretrained is not thread-safe (see _LOAD_LOCK)
                t0 = time.perf_counter()
                tok = AutoTokenizer.from_pretrained(str(files.hf_dir))
                model, quantize_s, info = isolated(self._build, files.hf_dir, quant, device)
        except (BackendUnavailableError, InputError, ModelLoadError):
            raise
        except (MemoryError, torch.OutOfMemoryError) as e:
            raise ModelLoadError(f"Not enough memory on {device} to load {files.ref} as {quant.name}.") from e
        except Exception as e:  # noqa: BLE001 - library errors become one user-facing line
            raise ModelLoadError(f"Could not load {files.ref} as {quant.name} on {device}: "
                                 f"{e.__class__.__name__}: {e}") from e
        model.eval()
        release_freed_memory()
        info.setdefault("input_device", str(next(model.parameters()).device))
        loaded = LoadedModel(backend=self.name, ref=files.ref, quant=quant, device=device, model=model, tokenizer=tok,
                             load_s=0.0, quantize_s=quantize_s, weights_bytes=weight_bytes(model),
                             path=str(files.hf_dir), spec=model_spec(files), info=info)
        if quant.fast:
            from .runners import static_unavailable, warm

            why = static_unavailable()
            if why:
                raise BackendUnavailableError(f"{quant.name} cannot run here: {why}. Use {quant.label.split()[0]}.")
            try:
                info["fast_warmup_s"] = round(warm(loaded), 2)
            except (MemoryError, torch.OutOfMemoryError) as e:
                raise ModelLoadError(f"Not enough memory on {device} for the fast path's static cache of "
                                     f"{files.ref} as {quant.name}.") from e
        loaded.load_s = time.perf_counter() - t0
        return loaded

    def stream(self, loaded: LoadedModel, prompt: Prompt, settings: GenerationSettings = GenerationSettings(),
               cancel_event: Optional[threading.Event] = None) -> TokenStream:
        return hf_stream(loaded, prompt, settings, cancel_event)

    def chat_ids(self, loaded: LoadedModel, prompt: Prompt, settings: GenerationSettings) -> list[int]:
        if not loaded.loaded:
            raise InputError("This model has been unloaded; load it again.")
        try:
            enc = loaded.tokenizer.apply_chat_template(to_messages(prompt, settings), add_generation_prompt=True,
                                                       return_dict=True)
        except QuantScopeError:
            raise
        except Exception as e:  # noqa: BLE001
            raise GenerationError(f"Could not apply the model's chat template: {e}") from None
        return list(enc["input_ids"])

    def tokenize(self, loaded: LoadedModel, text: str) -> list[int]:
        return list(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])

    def score(self, loaded: LoadedModel, ids, start: int):
        import torch

        ids = [int(i) for i in ids]
        if not 1 <= start < len(ids):
            raise InputError(f"Nothing to score: start {start} with {len(ids)} tokens.")
        model = loaded.model
        if model is None:
            raise InputError("This model has been unloaded; load it again.")
        dev = loaded.info.get("input_device", loaded.device)
        keep = len(ids) - start + 1  # the positions start-1 .. len-1; the last one predicts past the text

        def forward():
            with torch.inference_mode():
                x = torch.tensor([ids], device=dev)
                try:
                    logits = model(input_ids=x, use_cache=False, logits_to_keep=keep).logits
                except TypeError:  # a model class without logits_to_keep
                    logits = model(input_ids=x, use_cache=False).logits[:, -keep:]
                return torch.log_softmax(logits[0, :-1].float(), dim=-1).cpu()

        try:
            return scheduler().call(forward)
        except (MemoryError, torch.OutOfMemoryError) as e:
            raise GenerationError(f"Ran out of memory while scoring {len(ids)} tokens with {loaded.method}.") from e


class TransformersBackend(HFBackend):
    """Unquantized models in fp32, fp16 or bf16."""

    name = "transformers"
    label = "transformers"
    methods = ("fp32", "fp16", "bf16")

    def _build(self, path, quant, device):
        model = self._from_pretrained(path, dtype=torch_dtype(quant.dtype), device_map={"": device})
        return model, 0.0, {}


class BitsAndBytesBackend(HFBackend):
    """bitsandbytes LLM.int8 and 4-bit (NF4 / FP4, optional double quantization), quantized while loading."""

    name = "bitsandbytes"
    label = "bitsandbytes"
    methods = ("int8", "bnb4")

    @classmethod
    def available(cls) -> tuple[bool, str]:
        ok, why = super().available()
        if not ok:
            return ok, why
        why = _import_error("bitsandbytes")
        return (False, why) if why else (True, "")

    def _build(self, path, quant, device):
        from transformers import BitsAndBytesConfig

        dtype = torch_dtype(quant.dtype)
        if quant.method == "int8":
            _quiet_bnb_int8()
            qc = BitsAndBytesConfig(load_in_8bit=True)
        else:
            qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type or "nf4",
                                    bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=dtype)
        model = self._from_pretrained(path, dtype=dtype, quantization_config=qc, device_map={"": device})
        # bitsandbytes quantizes inside from_pretrained: its time is part of load_s and cannot be separated.
        return model, None, {}
