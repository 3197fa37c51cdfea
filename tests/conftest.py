"""Shared test fixtures: serving a Gradio app on loopback and driving it in headless chromium.

Fixtures
--------
``launch_app(build)``
    Serve a Gradio app on 127.0.0.1 (a free port) and return its local URL. ``build`` is a
    ``gr.Blocks`` or a zero-argument callable returning one. Servers are closed at the end of the
    session; the same ``build`` object is served once and reused unless ``fresh=True``.
``served_app(build)``
    The same as a context manager, for module-scoped fixtures of your own
    (``from conftest import served_app``).
``chromium_path``
    ``/usr/bin/chromium`` (Debian's package), or the test is skipped with the reason.
``browser_page``
    A fresh playwright ``Page`` (1400x1000) in headless chromium; the browser is shared by the session.
``artifacts_dir``
    ``<repo>/artifacts/``, created; browser tests save screenshots there.

Nothing here loads a model.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import engine  # noqa: F401  before any test module imports numpy (engine.cxx_runtime)

# Gradio must not phone home from tests (the network is closed; each attempt only costs time).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 1000}


# --------------------------------------------------------------------------------------------
# Serving a Gradio app
# --------------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _as_blocks(build: Any):
    import gradio as gr

    demo = build if isinstance(build, gr.Blocks) else build()
    if not isinstance(demo, gr.Blocks):
        raise TypeError(f"build must be a gr.Blocks or return one, got {type(demo).__name__}")
    return demo


def start_app(build: Any, **launch_kwargs: Any) -> tuple[Any, str]:
    """Launch ``build`` on loopback without blocking; returns ``(demo, local_url)``.

    ``launch_kwargs`` override the defaults passed to ``Blocks.launch``.
    """
    demo = _as_blocks(build)
    last_error: Exception | None = None
    for _ in range(5):  # a free port can be taken between probing and binding: retry on a new one
        kwargs = dict(
            server_name="127.0.0.1",
            server_port=free_port(),
            prevent_thread_lock=True,
            quiet=True,
            share=False,
            inbrowser=False,
            ssr_mode=False,
        )
        kwargs.update(launch_kwargs)
        try:
            _app, local_url, _share = demo.queue().launch(**kwargs)
        except OSError as exc:
            last_error = exc
            time.sleep(0.2)
            continue
        return demo, local_url
    raise RuntimeError(f"could not launch the Gradio app on loopback: {last_error}")


def stop_app(demo: Any) -> None:
    with contextlib.suppress(Exception):
        demo.close(verbose=False)


@contextlib.contextmanager
def served_app(build: Any, **launch_kwargs: Any) -> Iterator[str]:
    """Context manager: serve ``build`` on loopback, yield its local URL, close it afterwards."""
    demo, url = start_app(build, **launch_kwargs)
    try:
        yield url
    finally:
        stop_app(demo)


@pytest.fixture(scope="session")
def launch_app() -> Iterator[Callable[..., str]]:
    """Factory: ``url = launch_app(build, fresh=False, **launch_kwargs)``.

    The same ``build`` object is served once per session (so a module's tests share one server)
    unless ``fresh=True``. All servers close when the session ends.
    """
    shared: dict[int, tuple[Any, Any, str]] = {}  # id(build) -> (build kept alive, demo, url)
    fresh_demos: list[Any] = []

    def _launch(build: Any, *, fresh: bool = False, **launch_kwargs: Any) -> str:
        if not fresh and id(build) in shared:
            return shared[id(build)][2]
        demo, url = start_app(build, **launch_kwargs)
        if fresh:
            fresh_demos.append(demo)
        else:
            shared[id(build)] = (build, demo, url)
        return url

    yield _launch
    for demo in [d for _b, d, _u in shared.values()] + fresh_demos:
        stop_app(demo)


# --------------------------------------------------------------------------------------------
# Browser
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's chromium (``apt-get install chromium``; ``make test`` installs it)."""
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(
            f"{CHROMIUM} not found: install Debian's chromium (`bash scripts/setup.sh --test` "
            "or `apt-get install -y chromium`) to run the browser tests"
        )
    return str(CHROMIUM)


@pytest.fixture(scope="session")
def _browser(chromium_path: str):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium_path,
            headless=True,
            args=CHROMIUM_ARGS,
        )
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def browser_page(_browser):
    """A fresh page (own context, 1400x1000 viewport) in headless chromium."""
    context = _browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(30_000)
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """``<repo>/artifacts/`` (git-ignored), where browser tests save screenshots."""
    path = REPO_ROOT / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path
