"""engine.gguf_meta: the calculator sizes a bare .gguf file from its header (no config.json needed), on the real
embedded GGUF and on headers written with the gguf package's own writer."""
from __future__ import annotations

import os

import pytest

from engine import embedded, gguf_meta
from engine.errors import ConfigError
from engine.sources import resolve

gguf = pytest.importorskip("gguf")


def test_the_embedded_gguf_gives_the_shape_its_config_gives():
    from_file, from_config = resolve(str(embedded.gguf_path())), resolve("embedded")
    for field in ("model_type", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "tie_word_embeddings", "max_position_embeddings", "params"):
        assert getattr(from_file, field) == getattr(from_config, field), field
    assert [(t.name, t.shape) for t in from_file.tensors] == [(t.name, t.shape) for t in from_config.tensors]
    assert from_file.name == embedded.gguf_path().name


def test_the_header_lists_the_tensors_the_gguf_package_reads():
    """An independent reader (the gguf package's, which reads the whole file) sees the same tensors and shapes."""
    header = gguf_meta.read_header(embedded.gguf_path())
    reader = gguf.GGUFReader(str(embedded.gguf_path()))
    theirs = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    assert header.tensors == theirs and len(theirs) == 272
    assert header.metadata["general.architecture"] == "llama"
    assert header.metadata["tokenizer.ggml.tokens"].count == 49152  # counted, not decoded


def _write(path, arch: str, kv: dict, tensors: dict):
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        (w.add_uint32 if isinstance(value, int) else w.add_string)(key, value)
    import numpy as np

    for name, shape in tensors.items():
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_mixture_of_experts_file_written_as_llama_is_read_as_mixtral(tmp_path):
    p = tmp_path / "moe.gguf"
    _write(p, "llama", {"llama.block_count": 2, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
                        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2, "llama.vocab_size": 100,
                        "llama.context_length": 512, "llama.expert_count": 4, "llama.expert_used_count": 2},
           {"token_embd.weight": (100, 64), "output.weight": (100, 64)})
    cfg = gguf_meta.hf_config(p)
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 4 and cfg["num_experts_per_tok"] == 2
    assert cfg["tie_word_embeddings"] is False  # output.weight is there
    spec = resolve(str(p))
    assert spec.num_experts == 4 and spec.num_layers == 2 and spec.vocab_size == 100


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("not a model"), "is not a GGUF file"),
    (lambda p: p.write_bytes(embedded.gguf_path().read_bytes()[:50_000]), "cut short or damaged"),
    (lambda p: _write(p, "rwkv6", {}, {}), "is a rwkv6 model; the calculator reads GGUF files of"),
    (lambda p: _write(p, "llama", {"llama.block_count": 2}, {}),
     r"lacks llama\.attention\.head_count, so its shape is unknown"),
])
def test_a_gguf_the_calculator_cannot_read_gets_a_message(tmp_path, make, message):
    p = tmp_path / "x.gguf"
    make(p)
    with pytest.raises(ConfigError, match=message):
        resolve(str(p))


def test_a_missing_gguf_file_is_named_as_missing(tmp_path):
    from engine.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match=r"No file at 'nope\.gguf'\. Check the path of the \.gguf file\."):
        resolve(str(tmp_path / "nope.gguf"))


def test_a_bare_gguf_file_gets_a_prediction_when_it_runs(tmp_path):
    """Loaded by its path (no config.json beside it), a GGUF's run is still compared with the calculator."""
    from engine.backends import backend_of, load
    from engine.backends.base import GenerationSettings
    from engine.generation import RunMetrics, run

    pytest.importorskip("llama_cpp")
    link = tmp_path / "alone.gguf"
    os.symlink(embedded.gguf_path(), link)
    lm = load(str(link), "gguf", device="cpu")
    try:
        assert lm.spec is not None and lm.spec.params == resolve("embedded").params
        metrics = [ev for ev in run(lm, "Say hi.", GenerationSettings(max_new_tokens=4))
                   if isinstance(ev, RunMetrics)][0]
        assert metrics.predicted_bytes and metrics.predicted_weights_bytes
        # the weights the calculator predicts for the file's own type are what llama.cpp holds (within 3%)
        assert abs(metrics.predicted_weights_bytes - lm.weights_bytes) <= 0.03 * lm.weights_bytes
    finally:
        backend_of(lm).unload(lm)
