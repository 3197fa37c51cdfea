"""Per-session generation limits (engine/ratelimit.py): the rules with a controlled clock, then in the real app
served on loopback: a second client (another student) is served while the first is refused."""
from __future__ import annotations

import threading

import pytest

from engine.ratelimit import RateLimitedError, SessionLimiter


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_sliding_window_per_session():
    clock = Clock()
    lim = SessionLimiter(per_window=2, window_s=60, clock=clock)
    for _ in range(2):
        lim.release(lim.admit("a"))
        clock.t += 10
    with pytest.raises(RateLimitedError, match=r"allows 2\. Try again in 40 s"):
        lim.admit("a")
    lim.release(lim.admit("b"))  # another session is not affected
    clock.t += 40  # the first start leaves the window
    lim.release(lim.admit("a"))
    with pytest.raises(RateLimitedError):
        lim.admit("a")


def test_one_run_at_a_time_per_session_and_refusals_do_not_count():
    clock = Clock()
    lim = SessionLimiter(per_window=2, window_s=60, clock=clock)
    key = lim.admit("a")
    for _ in range(3):
        with pytest.raises(RateLimitedError, match="still running"):
            lim.admit("a")
    lim.release(key)
    lim.release(lim.admit("a"))  # the refusals above used none of the allowance
    with pytest.raises(RateLimitedError, match="Try again"):
        lim.admit("a")


def test_no_rate_limit_still_one_at_a_time_and_state_is_bounded():
    clock = Clock()
    lim = SessionLimiter(per_window=0, window_s=60, clock=clock)
    for i in range(100):
        lim.release(lim.admit("a"))
        lim.release(lim.admit(f"s{i}"))
    with lim.run("a"):
        with pytest.raises(RateLimitedError, match="still running"):
            lim.admit("a")
    assert lim.sessions() == 101
    clock.t += 61
    assert lim.sessions() == 0  # idle sessions are forgotten


def test_concurrent_admits_admit_exactly_one():
    lim = SessionLimiter(per_window=100)
    got, barrier = [], threading.Barrier(8)

    def go():
        barrier.wait()
        try:
            got.append(lim.admit("same"))
        except RateLimitedError:
            pass

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == ["same"]


def test_policy_setting():
    from engine.policy import HostPolicy

    assert HostPolicy.from_env({}).runs_per_minute == 6
    assert HostPolicy.from_env({"QUANTSCOPE_RUNS_PER_MINUTE": "0"}).runs_per_minute == 0
    with pytest.raises(ValueError, match="QUANTSCOPE_RUNS_PER_MINUTE"):
        HostPolicy.from_env({"QUANTSCOPE_RUNS_PER_MINUTE": "-1"})


# --------------------------------------------------------------------------------------------------
# In the running app
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def limited_url():
    pytest.importorskip("torch")
    import app
    from conftest import served_app

    services = app.Services(limiter=SessionLimiter(per_window=2, window_s=3600))
    with served_app(lambda: app.build_app(services)) as url:
        yield url
    services.manager.unload_all()


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False, analytics_enabled=False)


def _text(out) -> str:
    return " ".join(x for x in out if isinstance(x, str))


def test_app_limits_a_session_and_serves_the_others(limited_url):
    student, other = _client(limited_url), _client(limited_url)
    for _ in range(2):
        out = student.predict(api_name="/compare", max_new_tokens=2, pane_b="(off)")
        assert out[-1]["phase"] == "done", out[-1]
    refused = student.predict(api_name="/compare", max_new_tokens=2, pane_b="(off)")
    assert "allows 2. Try again in" in _text(refused) and "Traceback" not in _text(refused)
    # a refused input does not spend the other student's allowance, nor their own
    bad = other.predict(api_name="/compare", prompt="")
    assert "⚠️" in bad[0]
    for _ in range(2):
        out = other.predict(api_name="/compare", max_new_tokens=2, pane_b="(off)")
        assert out[-1].get("phase") == "done", out
    # the calculator is not rate limited
    assert student.predict(api_name="/estimate")[0].startswith("### ")


def test_app_one_run_at_a_time_per_session(limited_url):
    student = _client(limited_url)
    first = student.submit(api_name="/compare", max_new_tokens=48, pane_b="(off)")
    for _ in range(200):  # wait until the first run streams
        if first.outputs():
            break
        threading.Event().wait(0.05)
    second = student.predict(api_name="/compare", max_new_tokens=2, pane_b="(off)")
    assert "still running" in _text(second)
    first.result()
    assert first.outputs()[-1][-1]["phase"] == "done"
