"""Host settings (engine/policy.py): each refused input gets a clear message that leaks no server path, and the
app keeps serving (real app on loopback through gradio_client)."""
from __future__ import annotations

import json
import os

import pytest

from engine.policy import HostPolicy, PolicyError, set_host_policy


@pytest.fixture
def models_dir(tmp_path):
    d = tmp_path / "models"
    (d / "tiny").mkdir(parents=True)
    cfg = json.loads(open(os.path.join(os.path.dirname(__file__), "..", "assets", "presets",
                                       "HuggingFaceTB__SmolLM2-135M-Instruct.json")).read())
    (d / "tiny" / "config.json").write_text(json.dumps(cfg))
    (d / "custom").mkdir()
    (d / "custom" / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "x.Model"}}))
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "config.json").write_text(json.dumps(cfg))
    (d / "escape").symlink_to(tmp_path / "secret")
    return d


def test_defaults_from_the_environment():
    assert HostPolicy.from_env({}).local_paths == "any"
    assert HostPolicy.from_env({"SPACE_ID": "me/app"}).local_paths == "none"
    p = HostPolicy.from_env({"QUANTSCOPE_MODELS_DIR": "/tmp", "QUANTSCOPE_ALLOWED_MODELS": "embedded, Qwen/x",
                             "QUANTSCOPE_MAX_NEW_TOKENS": "64", "QUANTSCOPE_ALLOWED_FORMATS": "bf16,nf4"})
    assert p.local_paths == "models-dir" and p.allowed_models == {"embedded", "Qwen/x"} and p.max_new_tokens == 64
    for bad in ({"QUANTSCOPE_LOCAL_PATHS": "some"}, {"QUANTSCOPE_MAX_NEW_TOKENS": "lots"},
                {"QUANTSCOPE_MAX_NEW_TOKENS": "0"}, {"QUANTSCOPE_LOCAL_PATHS": "models-dir"}):
        with pytest.raises(ValueError):
            HostPolicy.from_env(bad)


def test_paths_only_inside_the_models_dir(models_dir):
    p = HostPolicy.from_env({"QUANTSCOPE_MODELS_DIR": str(models_dir)})
    assert p.check_model("tiny") == str(models_dir / "tiny")  # by name, inside
    assert p.check_model(str(models_dir / "tiny")) == str(models_dir / "tiny")
    assert p.check_model("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    for bad in ("../secret", "tiny/../../secret", "/etc", "~/", "escape", "/etc/passwd"):
        with pytest.raises(PolicyError, match="outside the models folder") as e:
            p.check_model(bad)
        assert str(models_dir) not in str(e.value) and str(models_dir.parent) not in str(e.value)


def test_no_local_paths_and_allowed_models():
    p = HostPolicy.from_env({"SPACE_ID": "me/app", "QUANTSCOPE_ALLOWED_MODELS": "embedded,meta-llama/Llama-3.1-8B-Instruct"})
    with pytest.raises(PolicyError, match="does not open local files"):
        HostPolicy.from_env({"SPACE_ID": "x"}).check_model("/etc")
    with pytest.raises(PolicyError, match="only offers these models"):
        p.check_model("Qwen/Qwen2.5-7B-Instruct")
    assert p.check_model("embedded") == "embedded" and p.check_model("EMBEDDED") == "EMBEDDED"


@pytest.mark.parametrize("ref", ["x" * 600, "x" * 300, "./" + "x" * 300, "owner/" + "b" * 300, "~/" + "y" * 260,
                                 "x" * 300 + ".gguf", "/tmp/a\x00b"])
@pytest.mark.parametrize("mode", ["any", "none", "models-dir"])
def test_names_no_filesystem_accepts_are_input_errors(ref, mode, tmp_path):
    """The OS raises (ENAMETOOLONG, NUL byte) where pathlib's exists() is expected to answer: every entry point
    must turn that into a message, not an internal error (CI once caught this on the calculator tab)."""
    from engine.backends.base import locate
    from engine.errors import InputError
    from engine.sources import resolve

    p = HostPolicy(local_paths=mode, models_dir=tmp_path if mode == "models-dir" else None)
    for check in (p.check_model, resolve, lambda r: locate(r, "hf"), lambda r: locate(r, "gguf")):
        with pytest.raises(InputError, match="too long|longer than 255 bytes|NUL character"):
            check(ref)


def test_remote_code_models_are_refused_everywhere(models_dir):
    p = HostPolicy.from_env({"QUANTSCOPE_MODELS_DIR": str(models_dir)})
    with pytest.raises(PolicyError, match="trust_remote_code"):
        p.check_model("custom")
    from engine.backends.base import locate

    with pytest.raises(PolicyError, match="never runs code from a model repository"):
        locate(str(models_dir / "custom"), "hf")


def test_max_model_size():
    p = HostPolicy.from_env({"QUANTSCOPE_MAX_MODEL_PARAMS": "500M"})
    assert p.max_model_params == 500_000_000
    p.check_model_size("embedded")  # 135M
    with pytest.raises(PolicyError, match="7.62B parameters; this server runs models up to 0.50B"):
        p.check_model_size("Qwen/Qwen2.5-7B-Instruct")
    HostPolicy.from_env({}).check_model_size("Qwen/Qwen2.5-7B-Instruct")  # no limit by default
    with pytest.raises(ValueError, match="QUANTSCOPE_MAX_MODEL_PARAMS"):
        HostPolicy.from_env({"QUANTSCOPE_MAX_MODEL_PARAMS": "large"})


def test_generation_limits():
    p = HostPolicy(max_new_tokens=16, max_prompt_chars=100, allowed_formats=frozenset({"bf16", "nf4"}))
    with pytest.raises(PolicyError, match="at most 16"):
        p.check_generation("hi", 17)
    with pytest.raises(PolicyError, match="limit here is 100"):
        p.check_generation("x" * 101, 8)
    with pytest.raises(PolicyError, match="does not run hqq2"):
        p.check_formats(["bf16", "hqq2", "(off)"])
    p.check_formats(["bf16", "nf4", "(off)"])


# --------------------------------------------------------------------------------------------------
# The app, restricted
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def restricted_client(tmp_path_factory):
    pytest.importorskip("torch")
    import app
    from conftest import served_app
    from gradio_client import Client

    d = tmp_path_factory.mktemp("models")
    set_host_policy(HostPolicy.from_env({"QUANTSCOPE_MODELS_DIR": str(d), "QUANTSCOPE_MAX_NEW_TOKENS": "16",
                                         "QUANTSCOPE_MAX_PROMPT_CHARS": "200",
                                         "QUANTSCOPE_ALLOWED_MODELS": "embedded,meta-llama/Llama-3.1-8B-Instruct",
                                         "QUANTSCOPE_ALLOWED_FORMATS": "bf16,nf4",
                                         "QUANTSCOPE_MAX_MODEL_PARAMS": "1B"}))
    try:
        with served_app(app.build_app) as url:
            yield Client(url, verbose=False, download_files=False, analytics_enabled=False)
    finally:
        set_host_policy(None)


@pytest.mark.parametrize("api,kw,words", [
    ("/estimate", dict(model="../../etc"), "only offers these models"),
    ("/compare", dict(model="/etc"), "only offers these models"),
    ("/compare", dict(prompt="x" * 300), "limit here is 200"),
    ("/compare", dict(max_new_tokens=64), "at most 16"),
    ("/compare", dict(pane_b="hqq2"), "does not run hqq2"),
    ("/compare", dict(model="meta-llama/Llama-3.1-8B-Instruct"), "runs models up to 1.00B side by side"),
    ("/build_config", dict(model="Qwen/Qwen2.5-7B-Instruct"), "only offers these models"),
])
def test_refused_inputs_in_the_app_and_it_keeps_serving(restricted_client, api, kw, words):
    out = restricted_client.predict(api_name=api, **kw)
    text = " ".join(x for x in out if isinstance(x, str))
    assert words in text and "Traceback" not in text, text
    ok = restricted_client.predict(api_name="/compare", max_new_tokens=2, pane_b="(off)")
    assert ok[-1]["phase"] == "done"
