"""Live hardware monitor: GPUs through NVML (nvidia-ml-py), the host through psutil, one sampler per process.

* :class:`Nvml` — lazy ``nvmlInit`` (once, on first use) and ``nvmlShutdown`` at exit. Every query goes through
  :meth:`Nvml.query`, the one place that turns ``NVMLError_NotSupported`` (a field this GPU does not have)
  into ``None`` — shown as "n/a" — so no field can raise. No library, no driver, no device: NVML is
  *unavailable* with the reason, and snapshots hold the host only. One GPU failing (``GpuIsLost``, a handle
  that cannot be read) gives that GPU an ``error`` and leaves the others.
* :class:`Monitor` — a daemon sampler thread (default 2 Hz) writing :class:`Snapshot` s into a ring buffer
  (default 5 minutes), and a list of engine events (model load/unload, generation start/stop) for the
  timeline. The thread runs only while someone watches: :meth:`Monitor.touch` (each UI refresh) starts it,
  and it stops by itself after ``idle_stop_s`` without a touch — an idle classroom costs nothing.
* ``python -m engine monitor [--once] [--json]`` prints snapshots (``engine/__main__.py``).

Pure data, no gradio; the UI (ui/monitor.py) only reads :meth:`Monitor.history`.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.5
DEFAULT_HISTORY_S = 300.0
DEFAULT_IDLE_STOP_S = 15.0
MAX_EVENTS = 500


# ---------------------------------------------------------------------------------------------
# Snapshots
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    used_bytes: Optional[int]  # None: the driver does not say (n/a)
    this_process: bool


@dataclass(frozen=True)
class GpuSnapshot:
    index: int
    name: str = "GPU"
    memory_used: Optional[int] = None
    memory_total: Optional[int] = None
    utilization: Optional[int] = None  # % of time a kernel ran
    power_w: Optional[float] = None
    power_limit_w: Optional[float] = None
    temperature_c: Optional[int] = None
    sm_clock_mhz: Optional[int] = None
    processes: tuple = ()
    error: Optional[str] = None  # this GPU could not be read; the fields above are None


@dataclass(frozen=True)
class HostSnapshot:
    cpu_percent: Optional[float] = None
    cpu_count: Optional[int] = None
    ram_used: Optional[int] = None
    ram_total: Optional[int] = None
    process_rss: Optional[int] = None


@dataclass(frozen=True)
class Snapshot:
    t: float  # time.time()
    gpus: tuple
    host: HostSnapshot
    nvml: str  # "ok", or why there are no GPU figures

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gpus"] = [asdict(g) for g in self.gpus]
        return d


@dataclass(frozen=True)
class MonitorEvent:
    t: float
    kind: str  # load | unload | generate_start | generate_stop
    label: str


# ---------------------------------------------------------------------------------------------
# NVML
# ---------------------------------------------------------------------------------------------
class Nvml:
    """NVML behind one chokepoint (see the module docstring)."""

    def __init__(self, module_loader: Optional[Callable[[], Any]] = None):
        self._load_module = module_loader or self._import
        self._lock = threading.Lock()
        self._state: Optional[str] = None  # None: not tried; "ok"; or the reason it is unavailable
        self.nv = None

    @staticmethod
    def _import():
        import pynvml  # nvidia-ml-py

        return pynvml

    def init(self) -> str:
        """Initialise once; returns "ok" or the reason NVML is unavailable."""
        with self._lock:
            if self._state is None:
                try:
                    nv = self._load_module()
                except ImportError as e:
                    self._state = f"nvidia-ml-py is not installed ({e})"
                    return self._state
                try:
                    nv.nvmlInit()
                    self.nv = nv
                    self._state = "ok"
                    atexit.register(self.shutdown)
                except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
                    self._state = f"NVML unavailable: {_nvml_error_text(e)}"
            return self._state

    def shutdown(self) -> None:
        with self._lock:
            if self._state == "ok" and self.nv is not None:
                try:
                    self.nv.nvmlShutdown()
                except Exception:  # noqa: BLE001
                    pass
            self._state, self.nv = None, None

    def query(self, fn_name: str, *args, default=None):
        """``pynvml.<fn_name>(*args)``; NotSupported (and NoPermission) -> ``default``; other NVML errors
        raise (the caller marks that GPU as failed)."""
        nv = self.nv
        try:
            return getattr(nv, fn_name)(*args)
        except Exception as e:  # noqa: BLE001
            if _is_nvml_error(nv, e, ("NVMLError_NotSupported", "NVMLError_NoPermission", "NVMLError_FunctionNotFound")):
                return default
            raise

    def gpus(self) -> list:
        if self.init() != "ok":
            return []
        nv = self.nv
        try:
            count = int(nv.nvmlDeviceGetCount())
        except Exception as e:  # noqa: BLE001
            return [GpuSnapshot(index=-1, error=f"cannot count GPUs: {_nvml_error_text(e)}")]
        return [self._gpu(i) for i in range(count)]

    def _gpu(self, i: int) -> GpuSnapshot:
        q = self.query
        try:
            h = self.nv.nvmlDeviceGetHandleByIndex(i)
            name = q("nvmlDeviceGetName", h, default="GPU")
            name = name.decode() if isinstance(name, bytes) else str(name)
            mem = q("nvmlDeviceGetMemoryInfo", h)
            util = q("nvmlDeviceGetUtilizationRates", h)
            power = q("nvmlDeviceGetPowerUsage", h)  # milliwatts
            limit = q("nvmlDeviceGetEnforcedPowerLimit", h)
            temp = q("nvmlDeviceGetTemperature", h, 0)  # NVML_TEMPERATURE_GPU
            clock = q("nvmlDeviceGetClockInfo", h, 1)  # NVML_CLOCK_SM
            procs = q("nvmlDeviceGetComputeRunningProcesses", h, default=[]) or []
        except Exception as e:  # noqa: BLE001 - this GPU only
            return GpuSnapshot(index=i, error=_nvml_error_text(e))
        me = os.getpid()
        return GpuSnapshot(
            index=i, name=name,
            memory_used=None if mem is None else int(mem.used), memory_total=None if mem is None else int(mem.total),
            utilization=None if util is None else int(util.gpu),
            power_w=None if power is None else power / 1000.0, power_limit_w=None if limit is None else limit / 1000.0,
            temperature_c=None if temp is None else int(temp), sm_clock_mhz=None if clock is None else int(clock),
            processes=tuple(ProcessMemory(pid=int(p.pid), used_bytes=_used(p), this_process=int(p.pid) == me)
                            for p in procs))


def _used(p) -> Optional[int]:
    v = getattr(p, "usedGpuMemory", None)
    return None if v is None or v < 0 or v >= 2**63 else int(v)  # NVML_VALUE_NOT_AVAILABLE is ~0ULL


def _is_nvml_error(nv, e: BaseException, names: tuple) -> bool:
    for n in names:
        cls = getattr(nv, n, None) if nv is not None else None
        if isinstance(cls, type) and isinstance(e, cls):
            return True
    return type(e).__name__ in names


def _nvml_error_text(e: BaseException) -> str:
    try:
        s = str(e)
    except Exception:  # noqa: BLE001 - pynvml's __str__ calls into the library
        s = ""
    return s or type(e).__name__


# ---------------------------------------------------------------------------------------------
# Host
# ---------------------------------------------------------------------------------------------
class Host:
    def __init__(self):
        try:
            import psutil

            self._ps = psutil
            self._proc = psutil.Process()
            psutil.cpu_percent(None)  # the first call only sets the baseline
        except ImportError:
            self._ps = None

    def snapshot(self) -> HostSnapshot:
        ps = self._ps
        if ps is None:
            return HostSnapshot()
        vm = ps.virtual_memory()
        try:
            rss = int(self._proc.memory_info().rss)
        except Exception:  # noqa: BLE001
            rss = None
        return HostSnapshot(cpu_percent=float(ps.cpu_percent(None)), cpu_count=os.cpu_count(),
                            ram_used=int(vm.total - vm.available), ram_total=int(vm.total), process_rss=rss)


# ---------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------
class Monitor:
    """One sampler per process (see the module docstring). Thread-safe."""

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S, history_s: float = DEFAULT_HISTORY_S,
                 idle_stop_s: Optional[float] = DEFAULT_IDLE_STOP_S, nvml: Optional[Nvml] = None):
        if not interval_s > 0:
            raise ValueError("interval_s must be positive")
        self.interval_s = interval_s
        self.idle_stop_s = idle_stop_s
        self.nvml = nvml or Nvml()
        self.host = Host()
        self._buf: deque = deque(maxlen=max(1, int(round(history_s / interval_s))))
        self._events: deque = deque(maxlen=MAX_EVENTS)
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._last_touch = 0.0
        self.samples = 0

    # ---- reading
    def sample(self) -> Snapshot:
        """Take one snapshot now (also what the sampler thread does)."""
        state = self.nvml.init()
        gpus = tuple(self.nvml.gpus()) if state == "ok" else ()
        return Snapshot(t=time.time(), gpus=gpus, host=self.host.snapshot(),
                        nvml=state if state != "ok" or gpus else "ok (no GPU found)")

    def history(self, since: Optional[float] = None) -> list:
        with self._lock:
            snaps = list(self._buf)
        return snaps if since is None else [s for s in snaps if s.t > since]

    def latest(self) -> Optional[Snapshot]:
        with self._lock:
            return self._buf[-1] if self._buf else None

    def events(self, since: Optional[float] = None) -> list:
        with self._lock:
            ev = list(self._events)
        return ev if since is None else [e for e in ev if e.t > since]

    def mark(self, kind: str, label: str) -> None:
        """An engine event on the timeline (cheap; does not start the sampler)."""
        with self._lock:
            self._events.append(MonitorEvent(time.time(), kind, label))

    # ---- the thread
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def touch(self) -> None:
        """Someone is watching: start the sampler if needed and keep it running for ``idle_stop_s``."""
        self._last_touch = time.monotonic()
        self.start()

    def start(self) -> None:
        with self._lock:
            if self.running:
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._loop, args=(self._stop,), name="quantscope-monitor",
                                            daemon=True)
            self._last_touch = self._last_touch or time.monotonic()
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            th, self._thread = self._thread, None
            self._stop.set()
        if th is not None and th is not threading.current_thread():
            th.join(timeout)

    def _loop(self, stop: threading.Event) -> None:
        next_t = time.monotonic()
        while not stop.is_set():
            try:
                snap = self.sample()
                with self._lock:
                    self._buf.append(snap)
                    self.samples += 1
            except Exception:  # noqa: BLE001 - the sampler must not die
                log.exception("monitor sample failed")
            if self.idle_stop_s is not None and time.monotonic() - self._last_touch > self.idle_stop_s:
                with self._lock:
                    if self._stop is stop:
                        self._thread = None
                return
            next_t += self.interval_s
            stop.wait(max(0.0, next_t - time.monotonic()))


_monitor: Optional[Monitor] = None
_monitor_lock = threading.Lock()


def monitor() -> Monitor:
    """The process's monitor (created on first use; its thread starts when someone watches)."""
    global _monitor
    with _monitor_lock:
        if _monitor is None:
            _monitor = Monitor()
        return _monitor


def mark(kind: str, label: str) -> None:
    monitor().mark(kind, label)
