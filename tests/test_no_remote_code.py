"""bench/no_remote_code.py, through which bench/gpu_llama_cpp.sh runs llama.cpp's converter: the auto classes'
decision goes to the wrapper, which always answers no; a model folder's own code never runs; a folder that needs
none loads as usual. (No test here opts in to remote code: the wrapper's answer is checked where it is made.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# loads a folder as a script run through the wrapper would, and reports which resolver the auto classes use
SCRIPT = """
import sys
import transformers.models.auto.configuration_auto as config_auto
import transformers.models.auto.tokenization_auto as tokenizer_auto
from transformers import AutoConfig
print("resolvers", config_auto.resolve_trust_remote_code.__name__, tokenizer_auto.resolve_trust_remote_code.__name__)
cfg = AutoConfig.from_pretrained(sys.argv[1])
print("loaded", type(cfg).__name__)
"""


def _folders(tmp_path, model_type="llama"):
    cfg = {"model_type": model_type, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    custom = tmp_path / "custom"
    custom.mkdir()
    marker = tmp_path / "ran"
    (custom / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoConfig": "own_code.OwnConfig"}}))
    (custom / "own_code.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig\n"
        "class OwnConfig(LlamaConfig):\n    pass\n")
    script = tmp_path / "asks.py"
    script.write_text(SCRIPT)
    return plain, custom, marker, script


def _run(script, folder):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "no_remote_code.py"), str(script), str(folder)],
                          capture_output=True, text=True, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": ""})


def test_every_auto_class_asks_the_wrapper_which_always_says_no(tmp_path):
    """The auto classes decide through ``resolve_trust_remote_code``; under the wrapper they call ``never``, which
    gives transformers' answer for a caller that did not opt in, whatever it is asked."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import no_remote_code
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import inspect

    assert "_resolve(False," in inspect.getsource(no_remote_code.never)
    plain, _, _, script = _folders(tmp_path)
    r = _run(script, plain)
    assert r.returncode == 0 and "resolvers never never" in r.stdout, r.stderr[-2000:]


def test_a_folders_own_code_never_runs(tmp_path):
    # a type transformers knows: its own class is used, not the folder's
    _, custom, marker, script = _folders(tmp_path)
    r = _run(script, custom)
    assert r.returncode == 0 and "loaded LlamaConfig" in r.stdout, r.stderr[-2000:]
    assert not marker.exists()


def test_a_folder_that_needs_its_own_code_is_refused(tmp_path):
    _, custom, marker, script = _folders(tmp_path, model_type="own_model")
    r = _run(script, custom)
    assert r.returncode != 0 and "custom code" in r.stderr, r.stderr[-2000:]
    assert not marker.exists()


def test_a_folder_without_code_loads_as_usual(tmp_path):
    plain, _, _, script = _folders(tmp_path)
    r = _run(script, plain)
    assert r.returncode == 0 and "loaded LlamaConfig" in r.stdout, r.stderr[-2000:]
