"""Start a ComfyUI server process from a checkout (``main.py``) for one run or a test session, and stop it."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

from comfy_client import ComfyClient, RunError, free_port


def comfy_python(comfyui_path, explicit=None):
    if explicit:
        return explicit
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    root = pathlib.Path(comfyui_path).resolve()
    for cand in (root / "venv" / "bin" / "python", root / ".venv" / "bin" / "python",
                 root.parent / "venv" / "bin" / "python", root.parent / "python_embeded" / "python.exe"):
        if cand.exists():
            return str(cand)
    return sys.executable


class ComfyServer:
    """A ComfyUI server process started from a checkout (``main.py``), stopped by ``stop()``."""

    def __init__(self, comfyui_path, port=None, base_directory=None, python=None, cpu=True, extra_args=(),
                 log_path=None):
        self.comfyui_path = pathlib.Path(comfyui_path).resolve()
        if not (self.comfyui_path / "main.py").exists():
            raise RunError(f"{self.comfyui_path} is not a ComfyUI checkout (no main.py)", code=2)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.python = comfy_python(self.comfyui_path, python)
        self.args = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port)]
        if cpu:
            self.args.append("--cpu")
        self._base_directory = pathlib.Path(base_directory).resolve() if base_directory else None
        if base_directory:
            self.args += ["--base-directory", str(self._base_directory)]   # ComfyUI runs in its own folder
        self.args += list(extra_args)
        self.log_path = pathlib.Path(log_path) if log_path else None
        self.proc = None
        self._log = None

    def start(self, timeout=120.0):
        if self.log_path:
            self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, cwd=self.comfyui_path, stdout=self._log or subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        client = ComfyClient(self.url, timeout=5)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    if self._log:
                        self._log.close()
                        self._log = None
                    raise RunError(f"ComfyUI exited with code {self.proc.returncode} during start-up"
                                   + (f"; see {self.log_path}" if self.log_path else "")
                                   + self.startup_hint(), code=3)
                if client.alive():
                    return self
                time.sleep(0.3)
        finally:
            client.close()
        self.stop()
        raise RunError(f"ComfyUI did not answer on {self.url} within {timeout:.0f} s"
                       + (f"; see {self.log_path}" if self.log_path else ""), code=3)

    @property
    def models_dir(self):
        """The models/ folder this server reads (its --base-directory's, else the checkout's)."""
        return self._base_directory / "models" if self._base_directory else self.comfyui_path / "models"

    def exit_note(self):
        """'' while the process runs, else how it ended (for a run that lost its server)."""
        if not self.proc or self.proc.poll() is None:
            return ""
        rc = self.proc.returncode
        how = f"killed by signal {-rc}" + (" (SIGKILL: the out-of-memory killer does this)" if rc == -9 else "") \
            if rc < 0 else f"exited with code {rc}"
        return f"the ComfyUI process {how}"

    NO_GPU_SIGNS = ("Found no NVIDIA driver", "Torch not compiled with CUDA enabled", "No CUDA GPUs are available",
                    "no CUDA-capable device", "CUDA driver initialization failed", "NVIDIA driver on your system is too old",
                    "Failed to initialize NVML", "No HIP GPUs are available")

    def startup_hint(self):
        """A hint for a start-up failure, read from the server log."""
        text = self.log_text()
        if "--cpu" not in self.args and any(s.lower() in text.lower() for s in self.NO_GPU_SIGNS):
            return ("\n  The log says there is no usable GPU / driver: add --cpu to run ComfyUI on the CPU "
                    "(slow, but it works), or fix the NVIDIA driver / CUDA build of torch.")
        tail = [ln for ln in text.strip().splitlines() if ln.strip()][-3:]
        return ("\n  last lines of the log:\n    " + "\n    ".join(tail)) if tail else ""

    def log_text(self):
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
