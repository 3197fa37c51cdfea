"""Deployment files and settings (issue 7): the Hugging Face Spaces front matter, requirements.txt, the Spacefile,
where the app listens, ZeroGPU's decorator, and the engine's compute thread after a fork (ZeroGPU forks)."""
from __future__ import annotations

import os
import sys
import tomllib
import types
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def front_matter() -> dict:
    import yaml

    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n"), "README.md must open with the Spaces front matter"
    return yaml.safe_load(text.split("---\n")[1])


def test_spaces_front_matter_pins_the_gradio_we_test_with():
    fm = front_matter()
    assert fm["sdk"] == "gradio" and fm["app_file"] == "app.py"
    assert str(fm["sdk_version"]) == version("gradio")  # the Space runs the Gradio version our tests ran
    assert str(fm["python_version"]) == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert fm["suggested_hardware"] in {"cpu-basic", "cpu-upgrade", "t4-small", "t4-medium", "l4x1", "a10g-small",
                                        "a10g-large", "a100-large", "zero-a10g"}
    assert len(fm["short_description"]) <= 60  # the Hub refuses longer ones


def test_requirements_txt_matches_pyproject():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [x.strip() for x in (ROOT / "requirements.txt").read_text().splitlines()]
    assert [x for x in lines if x and not x.startswith("#")] == deps


def test_spacefile_is_v0_and_runs_the_app():
    import yaml

    sf = yaml.safe_load((ROOT / "Spacefile").read_text())
    assert sf["v"] == 0 and len(sf["micros"]) == 1
    micro = sf["micros"][0]
    assert micro["run"] == "python app.py" and micro["primary"] is True and micro["src"] == "."
    assert set(micro) <= {"name", "src", "engine", "primary", "run", "dev", "commands", "include",
                          "public_routes", "presets", "actions"}


@pytest.mark.parametrize("env,expected", [
    ({}, ("127.0.0.1", 7860)),
    ({"SPACE_ID": "me/quantscope"}, ("0.0.0.0", 7860)),
    ({"SPACE_ID": "me/q", "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"}, ("0.0.0.0", 7861)),
    ({"PORT": "8080"}, ("127.0.0.1", 8080)),
    ({"QUANTSCOPE_HOST": "::1", "QUANTSCOPE_PORT": "9000", "GRADIO_SERVER_PORT": "1"}, ("::1", 9000)),
])
def test_listen_address(env, expected):
    import app

    assert app.listen_address(env) == expected


def test_bad_port_is_one_line(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, str(ROOT / "app.py")], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "QUANTSCOPE_PORT": "eighty"}, timeout=120)
    assert r.returncode != 0 and "port must be a whole number" in r.stderr and "Traceback" not in r.stderr


def test_zerogpu_decorator_only_when_spaces_is_installed(monkeypatch):
    """ZeroGPU hardware is absent here: a stand-in ``spaces`` module records what the Space's would be given."""
    from ui.zerogpu import DURATION_S, gpu_handler

    def handler(x, request=None):
        yield x

    monkeypatch.setitem(sys.modules, "spaces", None)  # not installed
    assert gpu_handler(handler) is handler
    seen = {}

    def GPU(duration):
        def wrap(fn):
            seen.update(fn=fn, duration=duration)
            return fn
        return wrap

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=GPU))
    assert gpu_handler(handler) is handler and seen == {"fn": handler, "duration": DURATION_S}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_compute_scheduler_works_in_a_forked_child():
    """ZeroGPU runs each GPU call in a forked process, which has no compute thread: the child must get its own."""
    from engine.compute import scheduler

    assert scheduler().call(lambda: 41) == 41  # the parent's thread exists
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must not wait forever for the parent's thread
        try:
            os.write(w, str(scheduler().call(lambda: 42)).encode())
        finally:
            os._exit(0)
    os.close(w)
    import select

    ready, _, _ = select.select([r], [], [], 30)
    got = os.read(r, 16).decode() if ready else "timeout"
    os.waitpid(pid, 0)
    assert got == "42"


def test_the_server_serves_no_files_of_the_host(launch_app):
    """Gradio's file route refuses the host's files: secrets, the app's own source, the models folder."""
    import httpx

    import app

    url = launch_app(app.build_app)
    for path in ("/etc/passwd", str(ROOT / "app.py"), "app.py", "../../etc/passwd", str(ROOT / "pyproject.toml"),
                 str(ROOT / "assets" / "reference_text.txt")):
        r = httpx.get(url + "gradio_api/file=" + path, timeout=30)
        assert r.status_code in (403, 404), (path, r.status_code)
        assert "root:" not in r.text and "import" not in r.text


def test_an_input_gradio_cannot_read_gets_a_message_naming_it(launch_app):
    """A word where a number goes (possible only through the API): the client is told which input and what type."""
    from gradio_client import Client

    import app

    url = launch_app(app.build_app, fresh=True, **app.LAUNCH_OPTIONS)
    client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
    import re

    with pytest.raises(Exception, match=re.escape("Expected a `float | None`, but the value passed")):
        client.predict(api_name="/compare", seed="many words")
    assert client.predict(api_name="/estimate")[0].startswith("### ")  # still serving
