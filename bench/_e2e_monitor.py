"""Samplers for bench/comfy_e2e.py: device memory in use (NVML, every ~50 ms) and the host RSS of the ComfyUI
server process with its children (psutil), kept as a time series so a node's peak is the max over its window."""
from __future__ import annotations

import threading
import time


class Monitor:
    def __init__(self, pid, gpu_index=0, period=0.05):
        self.pid, self.period = pid, period
        self.samples = []              # (monotonic t, vram bytes or None, rss bytes or None)
        self.nvml_error = None
        self._handle = None
        self._stop = threading.Event()
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(gpu_index)
            self.gpu_name = pynvml.nvmlDeviceGetName(self._handle)
            self.gpu_name = self.gpu_name.decode() if isinstance(self.gpu_name, bytes) else self.gpu_name
        except Exception as e:  # noqa: BLE001 - no NVML (CPU machine, no nvidia-ml-py): RAM only
            self.nvml_error, self.gpu_name = f"{type(e).__name__}: {e}", None
        import psutil
        self._psutil = psutil
        self._proc = psutil.Process(pid)
        self._thread = threading.Thread(target=self._loop, name="e2e-monitor", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _rss(self):
        try:
            procs = [self._proc] + self._proc.children(recursive=True)
        except self._psutil.Error:
            return None
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except self._psutil.Error:
                pass
        return total

    def _vram(self):
        if self._handle is None:
            return None
        try:
            return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
        except Exception:  # noqa: BLE001
            return None

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self._vram(), self._rss()))
            self._stop.wait(self.period)

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)

    def baseline_vram(self):
        return self._vram()

    def peak(self, t0, t1):
        """(peak VRAM bytes, peak RSS bytes) over [t0, t1], including the last sample before t0 (a node shorter than
        the period still gets one); None where nothing was measured."""
        before = [s for s in self.samples if s[0] < t0][-1:]
        inside = before + [s for s in self.samples if t0 <= s[0] <= t1]
        vr = [s[1] for s in inside if s[1] is not None]
        rs = [s[2] for s in inside if s[2] is not None]
        return (max(vr) if vr else None), (max(rs) if rs else None)
