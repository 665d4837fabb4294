"""ONNX Runtime sessions: one per (model file, providers), chosen provider logged once, loud fall-backs.

ComfyUI users' most common DWPose problem is a GPU provider that silently is not used (1-2 s a frame
instead of ~20 ms). This module therefore:

- asks for ``CUDAExecutionProvider`` (then ``CPUExecutionProvider``) when ONNX Runtime offers it, else the
  CPU provider of ONNX Runtime itself (never OpenCV DNN);
- compares the providers the session really got with the ones requested and, when a GPU provider was
  dropped, logs a warning that says why (missing CUDA / cuDNN library named by the loader,
  CPU-only ``onnxruntime`` package, both ``onnxruntime`` and ``onnxruntime-gpu`` installed), once: a log
  record only, not also a Python ``RuntimeWarning`` (ComfyUI printed both, so every warning appeared twice);
- keeps that warning on the session (``SessionInfo.warning``, ``DWPose.provider_warnings``) so the node shows it on
  every run, not only the server log once;
- logs the chosen provider once per model file;
- caches sessions so a video never re-creates them per frame (``session_creations()`` counts them).
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import sys
import threading
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("steadydancer_turbo.dwpose")

GPU_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "DmlExecutionProvider",
    "CoreMLExecutionProvider",
    "OpenVINOExecutionProvider",
)

_lock = threading.Lock()
_sessions: dict = {}
_creations = 0
_logged: set = set()


def _ort():
    import onnxruntime  # imported lazily: importing the pack must stay cheap

    return onnxruntime


def available_providers() -> list[str]:
    return list(_ort().get_available_providers())


def default_providers() -> list[str]:
    """CUDA (then CPU) when this ONNX Runtime build has the CUDA provider, else CPU only."""
    avail = available_providers()
    if "CUDAExecutionProvider" in avail:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _provider_name(p) -> str:
    return p[0] if isinstance(p, (tuple, list)) else p


def normalize_providers(providers) -> list:
    """``None``/"auto" -> default_providers(); "cpu"/"cuda"/"tensorrt" shorthands; lists pass through.

    CPU is always appended as the last resort so a session can be created on any machine.
    """
    if providers is None or providers == "auto":
        out = default_providers()
    elif isinstance(providers, str):
        short = {
            "cpu": ["CPUExecutionProvider"],
            "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
            "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        }
        out = short.get(providers.lower(), [providers])
    else:
        out = list(providers)
    if "CPUExecutionProvider" not in [_provider_name(p) for p in out]:
        out.append("CPUExecutionProvider")
    return out


def _installed_ort_packages() -> list[str]:
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover
        return []
    names = []
    for dist in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                 "onnxruntime-rocm", "onnxruntime-training"):
        try:
            metadata.version(dist)
            names.append(dist)
        except metadata.PackageNotFoundError:
            pass
        except Exception:  # pragma: no cover - broken metadata
            pass
    return names


def _cuda_load_error() -> str | None:
    """Load ORT's CUDA provider library the way ORT does and return the loader's error text, if any."""
    ort = _ort()
    capi = os.path.join(os.path.dirname(ort.__file__), "capi")
    lib = "onnxruntime_providers_cuda.dll" if sys.platform == "win32" else "libonnxruntime_providers_cuda.so"
    path = os.path.join(capi, lib)
    if not os.path.exists(path):
        return f"{lib} is not in {capi}"
    try:
        ctypes.CDLL(path)
    except OSError as e:
        return str(e)
    return None


def explain_gpu_fallback(requested: list, got: list[str]) -> str:
    """A human reason why the GPU providers in ``requested`` are not in ``got``."""
    ort = _ort()
    avail = available_providers()
    pkgs = _installed_ort_packages()
    wanted = [_provider_name(p) for p in requested if _provider_name(p) in GPU_PROVIDERS]
    reasons = []
    missing_build = [p for p in wanted if p not in avail]
    if missing_build:
        reasons.append(
            f"this onnxruntime build ({ort.__version__}, packages installed: {', '.join(pkgs) or 'unknown'}) "
            f"does not include {', '.join(missing_build)}; its providers are {avail}. "
            "Install onnxruntime-gpu (and uninstall the CPU-only onnxruntime package)"
        )
    if "onnxruntime" in pkgs and "onnxruntime-gpu" in pkgs:
        reasons.append(
            "both onnxruntime and onnxruntime-gpu are installed; they share one module folder and the CPU "
            "package can shadow the GPU one: uninstall both, then install only onnxruntime-gpu"
        )
    if "CUDAExecutionProvider" in wanted and "CUDAExecutionProvider" in avail:
        err = _cuda_load_error()
        if err:
            reasons.append(
                f"the CUDA provider library could not be loaded: {err}. onnxruntime-gpu {ort.__version__} "
                "needs the CUDA and cuDNN versions listed at "
                "https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements"
            )
        else:
            reasons.append(
                "the CUDA provider library loads, but no usable CUDA device was found or the provider failed "
                "to initialise (driver too old for this CUDA build, no GPU visible, CUDA_VISIBLE_DEVICES empty?)"
            )
    if not reasons:
        reasons.append("ONNX Runtime dropped it while creating the session (see ONNX Runtime's log above)")
    return "; ".join(reasons)


@dataclass
class SessionInfo:
    """An ORT session plus what was asked for and what was obtained."""

    session: object
    path: str
    requested: list
    providers: list[str]
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    warning: str = ""  # why a requested GPU provider is not used ("" when it is, or none was asked for)

    @property
    def provider(self) -> str:
        return self.providers[0] if self.providers else "none"

    @property
    def on_gpu(self) -> bool:
        return self.provider in GPU_PROVIDERS


def _session_options(threads: int | None):
    ort = _ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3  # ORT's own error lines still appear; our warning explains them
    return so


def _with_options(providers: list) -> list:
    """Add sensible CUDA options (heuristic conv algo search: batch shapes vary between calls)."""
    out = []
    for p in providers:
        if p == "CUDAExecutionProvider":
            out.append(("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}))
        else:
            out.append(p)
    return out


def get_session(model, providers=None, threads: int | None = None) -> SessionInfo:
    """Return the cached session for ``model`` (a path or serialized ONNX bytes), creating it once.

    Logs the provider once per model, and a warning when a requested GPU provider was dropped.
    """
    global _creations
    req = normalize_providers(providers)
    key_model = model if isinstance(model, str) else ("<bytes>", hash(bytes(model)))
    key = (key_model, tuple(_provider_name(p) for p in req), threads)
    with _lock:
        info = _sessions.get(key)
        if info is not None:
            return info
        ort = _ort()
        name = os.path.basename(model) if isinstance(model, str) else "<in-memory model>"
        if "CUDAExecutionProvider" in [_provider_name(p) for p in req] and hasattr(ort, "preload_dlls"):
            try:  # finds CUDA/cuDNN from the nvidia-* pip wheels torch brings along
                with contextlib.redirect_stdout(io.StringIO()):
                    ort.preload_dlls()
            except Exception:  # pragma: no cover - best effort only
                pass
        retried = False
        try:
            sess = ort.InferenceSession(model, sess_options=_session_options(threads),
                                        providers=_with_options(req))
        except Exception as e:  # a GPU provider that throws instead of falling back: retry on CPU, loudly
            if not any(_provider_name(p) in GPU_PROVIDERS for p in req):
                raise
            msg = (f"DWPose: {name}: creating the session with {[_provider_name(p) for p in req]} failed "
                   f"({type(e).__name__}: {e}); retrying with CPUExecutionProvider")
            log.warning(msg)
            sess = ort.InferenceSession(model, sess_options=_session_options(threads),
                                        providers=["CPUExecutionProvider"])
            retried = True
        _creations += 1
        got = list(sess.get_providers())
        info = SessionInfo(sess, name, req, got, list(sess.get_inputs()), list(sess.get_outputs()))
        if retried:
            info.warning = msg
        _sessions[key] = info
        dropped = [_provider_name(p) for p in req if _provider_name(p) in GPU_PROVIDERS
                   and _provider_name(p) not in got]
        if dropped and not retried:
            why = explain_gpu_fallback(req, got)
            msg = (f"DWPose: {name}: requested {dropped[0]} but the session runs on {got[0]} "
                   f"(expect ~1-2 s per frame instead of milliseconds). Why: {why}")
            log.warning(msg)
            info.warning = msg
        if key_model not in _logged:
            _logged.add(key_model)
            log.info("DWPose: %s runs on %s (inputs %s, outputs %s)", name, got[0],
                     [(i.name, i.shape, i.type) for i in info.inputs],
                     [(o.name, o.shape, o.type) for o in info.outputs])
        return info


_pool = None


def cpu_map(fn, items):
    """``list(map(fn, items))`` on a small shared thread pool (OpenCV / NumPy release the GIL), so frame
    pre-processing uses several cores while the GPU waits less."""
    global _pool
    items = list(items)
    if len(items) < 2:
        return [fn(i) for i in items]
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 2) - 1)),
                                   thread_name_prefix="dwpose-prep")
    return list(_pool.map(fn, items))


def session_creations() -> int:
    """How many ORT sessions this process created (tests use it to prove sessions are reused)."""
    return _creations


def release_sessions(models) -> int:
    """Drop the cached sessions of these model files (any providers / threads), so ONNX Runtime frees them
    once no caller holds them any more. Returns how many were dropped."""
    models = set(models)
    with _lock:
        gone = [k for k in _sessions if k[0] in models]
        for k in gone:
            del _sessions[k]
    return len(gone)


def clear_session_cache() -> None:
    with _lock:
        _sessions.clear()
        _logged.clear()


def input_dtype(info: SessionInfo):
    t = info.inputs[0].type
    return {"tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
            "tensor(double)": np.float64}.get(t, np.float32)


def dim_is_dynamic(d) -> bool:
    return not isinstance(d, int) or d <= 0


class OnnxBatchModel:
    """A model on a cached ORT session whose first input is an image batch [N, C, H, W].

    Static or dynamic batch: ``max_batch`` inputs per run when the batch dim is dynamic, else the model's
    fixed batch, with a short last batch zero-padded (callers keep only the first rows)."""

    def __init__(self, model, providers=None, threads=None, max_batch: int = 8):
        self.info = get_session(model, providers, threads)
        inp = self.info.inputs[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape)
        self.dtype = input_dtype(self.info)
        self.batch_dynamic = dim_is_dynamic(self.input_shape[0])
        self.fixed_batch = None if self.batch_dynamic else int(self.input_shape[0])
        self.max_batch = max_batch if self.batch_dynamic else self.fixed_batch

    @property
    def provider(self) -> str:
        return self.info.provider

    def batches(self, items):
        """``items`` in consecutive slices of at most max_batch."""
        step = max(1, self.max_batch)
        for start in range(0, len(items), step):
            yield items[start:start + step]

    def run_batch(self, x: np.ndarray) -> list:
        """All outputs for one batch x (at most max_batch rows), padded to a static batch when needed."""
        if self.fixed_batch and len(x) < self.fixed_batch:
            x = np.concatenate([x, np.zeros((self.fixed_batch - len(x),) + x.shape[1:], x.dtype)])
        return self.info.session.run(None, {self.input_name: x})
