"""engine/monitor.py: NVML by scenario (a fake pynvml: this machine has no GPU — the one place mocks are used),
the sampler thread and its ring buffer, engine events, the CLI, and the live panel in a real browser."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from engine.monitor import Monitor, Nvml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# A fake pynvml, configured per scenario
# --------------------------------------------------------------------------------------------
class NVMLError(Exception):
    pass


def _err(name):
    return type(name, (NVMLError,), {})


class FakeNvml:
    NVMLError = NVMLError
    NVMLError_NotSupported = _err("NVMLError_NotSupported")
    NVMLError_NoPermission = _err("NVMLError_NoPermission")
    NVMLError_FunctionNotFound = _err("NVMLError_FunctionNotFound")
    NVMLError_GpuIsLost = _err("NVMLError_GpuIsLost")
    NVMLError_DriverNotLoaded = _err("NVMLError_DriverNotLoaded")

    def __init__(self, gpus=(), init_error=None, not_supported=(), lost=()):
        self.gpus = list(gpus)
        self.init_error = init_error
        self.not_supported = set(not_supported)
        self.lost = set(lost)
        self.inits = self.shutdowns = 0

    def nvmlInit(self):
        self.inits += 1
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        if i in self.lost:
            raise self.NVMLError_GpuIsLost("GPU is lost")
        return i

    def _field(self, name, h):
        if name in self.not_supported:
            raise self.NVMLError_NotSupported("Not Supported")
        return self.gpus[h][name]

    def nvmlDeviceGetName(self, h):
        return self._field("name", h)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=self._field("used", h), total=self._field("total", h), free=0)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self._field("util", h), memory=0)

    def nvmlDeviceGetPowerUsage(self, h):
        return self._field("power_mw", h)

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return self._field("limit_mw", h)

    def nvmlDeviceGetTemperature(self, h, sensor):
        assert sensor == 0
        return self._field("temp", h)

    def nvmlDeviceGetClockInfo(self, h, clock):
        assert clock == 1
        return self._field("sm", h)

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=pid, usedGpuMemory=mem) for pid, mem in self._field("procs", h)]


GiB = 2**30


def gpu(name="NVIDIA H100 80GB HBM3", used=10 * GiB, total=80 * GiB, util=37, power_mw=312_000, limit_mw=700_000,
        temp=51, sm=1980, procs=()):
    return dict(name=name, used=used, total=total, util=util, power_mw=power_mw, limit_mw=limit_mw, temp=temp, sm=sm,
                procs=list(procs))


def monitor_with(fake, **kw) -> Monitor:
    return Monitor(nvml=Nvml(module_loader=lambda: fake), **kw)


# --------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------
def test_two_gpus_with_processes_and_this_one_marked():
    me = os.getpid()
    fake = FakeNvml(gpus=[gpu(procs=[(me, 6 * GiB), (4242, 2 * GiB)]),
                          gpu(name=b"NVIDIA L4", used=1 * GiB, total=24 * GiB, util=0, power_mw=16_500,
                              limit_mw=72_000, temp=35, sm=210)])
    snap = monitor_with(fake).sample()
    assert snap.nvml == "ok" and len(snap.gpus) == 2
    a, b = snap.gpus
    assert (a.name, a.memory_used, a.memory_total, a.utilization) == ("NVIDIA H100 80GB HBM3", 10 * GiB, 80 * GiB, 37)
    assert (a.power_w, a.power_limit_w, a.temperature_c, a.sm_clock_mhz) == (312.0, 700.0, 51, 1980)
    assert [(p.pid, p.used_bytes, p.this_process) for p in a.processes] == [(me, 6 * GiB, True),
                                                                            (4242, 2 * GiB, False)]
    assert b.name == "NVIDIA L4" and b.power_w == 16.5 and b.processes == ()
    assert snap.host.ram_total and snap.host.process_rss and snap.host.cpu_count
    json.dumps(snap.to_dict())  # serialisable
    assert fake.inits == 1
    monitor_with(fake).nvml.shutdown()


def test_not_supported_fields_are_none_not_errors():
    fake = FakeNvml(gpus=[gpu(procs=[(1, 2**64 - 1)])], not_supported={"power_mw", "limit_mw", "temp"})
    g = monitor_with(fake).sample().gpus[0]
    assert g.error is None and g.memory_used == 10 * GiB and g.utilization == 37
    assert g.power_w is None and g.power_limit_w is None and g.temperature_c is None
    assert g.processes[0].used_bytes is None  # NVML_VALUE_NOT_AVAILABLE
    from engine.cli_monitor import describe

    line = describe(monitor_with(fake).sample())
    assert "power n/a / n/a" in line and "n/a" in line


def test_one_failing_gpu_leaves_the_others():
    fake = FakeNvml(gpus=[gpu(), gpu(name="second")], lost={0})
    a, b = monitor_with(fake).sample().gpus
    assert a.error and "lost" in a.error.lower() and a.memory_used is None
    assert b.error is None and b.name == "second"


def test_no_driver_means_host_only_with_the_reason():
    fake = FakeNvml(init_error=FakeNvml.NVMLError_DriverNotLoaded("Driver Not Loaded"))
    mon = monitor_with(fake)
    snap = mon.sample()
    assert snap.gpus == () and "Driver Not Loaded" in snap.nvml
    assert snap.host.ram_used and snap.host.cpu_percent is not None
    mon.sample()
    assert fake.inits == 1  # not retried at every sample


def test_library_missing_is_a_reason_too():
    def missing():
        raise ImportError("No module named 'pynvml'")

    snap = Monitor(nvml=Nvml(module_loader=missing)).sample()
    assert snap.gpus == () and "nvidia-ml-py is not installed" in snap.nvml


def test_real_nvml_here_says_why_there_is_no_gpu():
    """This machine has no NVIDIA driver: the real pynvml path must give host figures and a reason."""
    snap = Monitor().sample()
    if snap.gpus:
        pytest.skip("a GPU is present")
    assert snap.nvml and snap.nvml != "ok" and snap.host.ram_total > 0


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------
def test_sampler_ring_buffer_is_bounded_and_stops():
    mon = monitor_with(FakeNvml(gpus=[gpu()]), interval_s=0.01, history_s=0.05, idle_stop_s=None)
    mon.start()
    time.sleep(0.4)
    assert mon.running and mon.samples >= 10
    hist = mon.history()
    assert len(hist) == 5 and hist[-1] is mon.latest()  # only the newest 5 kept
    assert all(a.t < b.t for a, b in zip(hist, hist[1:]))
    mon.stop()
    assert not mon.running
    n = mon.samples
    time.sleep(0.1)
    assert mon.samples == n


def test_sampler_stops_when_nobody_watches_and_restarts_on_touch():
    mon = monitor_with(FakeNvml(gpus=[gpu()]), interval_s=0.02, idle_stop_s=0.2)
    mon.touch()
    assert mon.running
    time.sleep(0.6)
    assert not mon.running  # idle: stopped by itself
    n = mon.samples
    assert 5 <= n <= 25
    mon.touch()
    time.sleep(0.1)
    assert mon.running and mon.samples > n
    mon.stop()


def test_engine_marks_loads_and_generations_on_the_timeline():
    pytest.importorskip("torch")
    from engine.backends.base import GenerationSettings
    from engine.manager import ModelManager
    from engine.monitor import monitor

    t0 = time.time()
    mgr = ModelManager()
    list(mgr.generate("embedded", "bf16", "Hi", GenerationSettings(max_new_tokens=2), device="cpu"))
    mgr.unload_all()
    kinds = [e.kind for e in monitor().events(since=t0)]
    assert kinds == ["load_start", "load", "generate_start", "generate_stop", "unload"], kinds


def test_cli_once_json_without_gpu():
    out = subprocess.run([sys.executable, "-m", "engine", "monitor", "--once", "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    if d["gpus"]:
        pytest.skip("a GPU is present")
    assert d["gpus"] == [] and d["host"]["ram_total"] > 0 and d["host"]["process_rss"] > 0 and d["nvml"]
    bad = subprocess.run([sys.executable, "-m", "engine", "monitor", "--interval", "-1"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "positive" in bad.stderr and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------------------------
# In the browser
# --------------------------------------------------------------------------------------------
@pytest.mark.browser
def test_browser_panel_updates_and_pauses_when_hidden(launch_app, browser_page, artifacts_dir):
    import app
    from playwright.sync_api import expect

    from engine.monitor import monitor

    url = launch_app(app.build_app)
    page = browser_page
    page.goto(url, wait_until="domcontentloaded")
    expect(page.locator("#qs-hw-status")).to_contain_text("RAM", timeout=30_000)
    page.get_by_role("tab", name="Side by side").click()
    page.locator("#qs-hw-mem .js-plotly-plot").wait_for(timeout=30_000)
    page.locator("#qs-hw-mem").scroll_into_view_if_needed()
    page.wait_for_timeout(2500)
    first = page.locator("#qs-hw-mem").screenshot(path=str(artifacts_dir / "monitor_1.png"))
    page.wait_for_timeout(4000)
    second = page.locator("#qs-hw-mem").screenshot(path=str(artifacts_dir / "monitor_2.png"))
    assert first != second, "the live chart did not change in 4 s"
    page.screenshot(path=str(artifacts_dir / "monitor_tab.png"), full_page=True)
    assert monitor().running
    # hide the page: the timers stop, and the sampler stops by itself once nobody asks
    page.evaluate("""() => { Object.defineProperty(document, 'hidden', {value: true, configurable: true});
                             document.dispatchEvent(new Event('visibilitychange')); }""")
    page.wait_for_timeout(1000)
    n = monitor().samples
    mon = monitor()
    deadline = time.time() + mon.idle_stop_s + 10
    while mon.running and time.time() < deadline:
        time.sleep(0.5)
    assert not mon.running, "the sampler kept running for a hidden page"
    assert monitor().samples - n <= (mon.idle_stop_s + 2) / mon.interval_s


@pytest.mark.gpu
def test_real_nvml_on_a_gpu_marks_this_process():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")  # 512 MiB held by this process
    mon = Monitor()
    snap = mon.sample()
    assert snap.nvml == "ok" and snap.gpus, snap.nvml
    g = snap.gpus[torch.cuda.current_device()]
    assert g.error is None and g.name and g.memory_total > 2**30 and 0 < g.memory_used <= g.memory_total
    assert g.utilization is not None and 0 <= g.utilization <= 100
    mine = [p for p in g.processes if p.this_process]
    if mine and mine[0].used_bytes is not None:  # containers may hide other processes' pids
        assert mine[0].used_bytes >= 512 * 2**20
    del x
    mon.nvml.shutdown()
