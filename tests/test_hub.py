"""Hub ids and Hub GGUF repositories: downloaded when online, from the cache after, never in offline mode.

There is no network to the real Hub here, so a Hub runs on loopback (tests/fake_hub.py) serving the embedded
model's own files: its 16-bit transformers folder as ``qs-test/tiny-instruct`` and its GGUF file under two names
as ``qs-test/tiny-gguf``. The engine runs as a user runs it, ``python -m engine generate`` in a subprocess, with
``HF_ENDPOINT`` pointing at that Hub and an empty ``HF_HOME``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("huggingface_hub")

from engine import embedded  # noqa: E402
from fake_hub import FakeHub  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    hf = embedded.hf_path()
    remote = tmp_path_factory.mktemp("remote-code")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (remote / "config.json").write_text(json.dumps(cfg))
    gguf = embedded.gguf_path()
    repos = {
        "qs-test/tiny-instruct": {p.name: p for p in hf.iterdir() if p.is_file() and p.name != "quantscope.json"},
        "qs-test/tiny-gguf": {"tiny.Q4_1.gguf": gguf, "tiny.Q4_1-copy.gguf": gguf, "README.md": hf / "config.json"},
        "qs-test/remote-code": {"config.json": remote / "config.json", "model.safetensors": hf / "model.safetensors"},
    }
    with FakeHub(repos) as h:
        yield h


def _engine(hub, home, *args, offline=False, timeout=600, **env):
    e = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_HUB_OFFLINE="1" if offline else "0",
             QUANTSCOPE_OFFLINE="0", HF_HUB_DISABLE_XET="1", **env)
    e.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "engine", "generate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=e)


@pytest.mark.slow
def test_hub_model_is_downloaded_once_then_served_from_the_cache_offline(hub, tmp_path):
    args = ("--model", "qs-test/tiny-instruct", "--method", "bf16", "--prompt", PROMPT, "--max-new-tokens", "12",
            "--json")
    p = _engine(hub, tmp_path, *args)
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads(p.stdout)
    assert "Paris" in d["text"]
    assert len(hub.served("model.safetensors")) == 1 and hub.served("config.json")
    n = len(hub.requests)
    q = _engine(hub, tmp_path, *args, offline=True)  # no network asked: the cache serves it
    assert q.returncode == 0, q.stderr[-2000:]
    assert json.loads(q.stdout)["text"] == d["text"]
    assert len(hub.requests) == n
    # a model not in the cache, offline: a clear refusal, nothing fetched
    r = _engine(hub, tmp_path, "--model", "qs-test/not-cached", "--method", "bf16", offline=True, timeout=120)
    assert r.returncode == 2 and "offline mode is on" in r.stderr and len(hub.requests) == n


@pytest.mark.slow
def test_hub_refusals_come_before_any_weights(hub, tmp_path):
    weights = len(hub.served(".safetensors"))
    r = _engine(hub, tmp_path, "--model", "qs-test/remote-code", "--method", "bf16", timeout=120)
    assert r.returncode == 2 and "never runs code from a model repository" in r.stderr, r.stderr
    r = _engine(hub, tmp_path, "--model", "qs-test/tiny-instruct", "--method", "bf16", timeout=120,
                QUANTSCOPE_MAX_DOWNLOAD_GB="0.1")
    assert r.returncode == 2 and "0.3 GB to download" in r.stderr and "at most 0.1 GB" in r.stderr, r.stderr
    r = _engine(hub, tmp_path, "--model", "qs-test/no-such-model", "--method", "bf16", timeout=120)
    assert r.returncode == 2 and "No model 'qs-test/no-such-model' on the Hugging Face Hub" in r.stderr, r.stderr
    assert len(hub.served(".safetensors")) == weights  # no weights fetched for any of the three


@pytest.mark.slow
def test_hub_gguf_repo_picks_one_file(hub, tmp_path):
    pytest.importorskip("llama_cpp")
    r = _engine(hub, tmp_path, "--model", "qs-test/tiny-gguf", "--method", "gguf", timeout=120)
    assert r.returncode == 2 and "holds 2 GGUF files" in r.stderr and "tiny.Q4_1.gguf" in r.stderr, r.stderr
    assert not hub.served(".gguf")
    p = _engine(hub, tmp_path, "--model", "qs-test/tiny-gguf:tiny.Q4_1.gguf", "--method", "gguf", "--prompt", PROMPT,
                "--max-new-tokens", "12", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    local = _engine(hub, tmp_path, "--model", str(embedded.gguf_path()), "--method", "gguf", "--prompt", PROMPT,
                    "--max-new-tokens", "12", "--json")
    assert local.returncode == 0, local.stderr[-2000:]
    assert json.loads(p.stdout)["text"] == json.loads(local.stdout)["text"]  # the same file, greedy
    # predicted from the file's header in both cases (a GGUF repository often has no config.json)
    predicted = [json.loads(x.stdout)["predicted_weights_bytes"] for x in (p, local)]
    assert predicted[0] and predicted[0] == predicted[1]
    assert hub.served("tiny.Q4_1.gguf") and not hub.served("copy.gguf")
    r = _engine(hub, tmp_path, "--model", "qs-test/tiny-gguf:Q8_0", "--method", "gguf", timeout=120)
    assert r.returncode == 2 and "matches 'Q8_0'" in r.stderr, r.stderr
