"""The native MODEL on several GPUs: ComfyUI's process is rank 0, one worker process per extra GPU
(steadydancer/parallel/pool.py, serving mode) holds a replica of the DiT built from rank 0's tensors
(steadydancer/parallel/replica.py).

Bridge-side module (ComfyUI objects are used only inside ComfyUI: ModelPatcher wrappers / callbacks, patches):

- ``MultiGPU`` (one per Multi-GPU node output, shared by every clone of that MODEL): devices, layout, the pool.
  ``start()`` runs at the node (workers spawned, GPUs checked, process group joined: a missing or busy GPU is an
  error or a note at that node). The pool outlives runs; it is shut down when every MODEL holding it is freed
  (ComfyUI's cache cleared, POST /free with free_memory), on "Unload models" (POST /free unload_models: the
  model's ON_DETACH callback inside ``unload_all_models``), when another Multi-GPU node starts a pool (one
  ``torch.distributed`` group per process), and at exit (the workers also exit when this process dies).
- ``sampler_sample``: a SAMPLER_SAMPLE wrapper, so it runs inside every sampler (our samplers,
  SamplerCustomAdvanced, KSampler) after ComfyUI loaded and patched the model. It describes the DiT as it is
  loaded (``replica.describe``: fp8 / GGUF layers in their stored form; layers carrying a ComfyUI patch that
  is applied per call travel *resolved*, as the float weight their forward computes), sends the weights again
  only when the patcher's ``patches_uuid`` (a LoRA, a strength change), the base model or the structure changed,
  binds rank 0's replica to rank 0's tensors for the run and puts the served forward into
  ``transformer_options[MULTIGPU_RUN_KEY]``; the DiT call (native_model) then runs it instead of the local DiT.
  Float weights that ComfyUI left unpatched in RAM (a partial load) are patched with ComfyUI's own
  ``patch_weight_to_device(..., return_weight=True)``, as a full load would patch them.
- Interrupt: rank 0's replica has plain torch layers (no per-op interrupt check, which would leave the
  workers inside a collective), so Cancel takes effect after the current DiT pass, at ComfyUI's next check
  (the step callback); the pool stays usable. Progress is ComfyUI's own (rank 0 runs the sampler).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import weakref

import torch

from ..steadydancer.parallel import distributed as D
from ..steadydancer.parallel import replica
from ..steadydancer.parallel.pool import WorkerPool, WorkerPoolError
from ..steadydancer.weights.quant import _Patched
from .native_model import MULTIGPU_RUN_KEY

log = logging.getLogger("steadydancer_turbo")

WRAPPER_KEY = "steadydancer_multigpu"
CPU_TEST_ENV = "STEADYDANCER_MULTIGPU_CPU"  # tests only: rank 0 on the CPU may use CPU worker ranks (gloo)
_current = None  # weakref to the MultiGPU whose pool is running (one torch.distributed group per process)


class MultiGPUError(RuntimeError):
    """A Multi-GPU set-up that cannot run (message for the node, no traceback needed)."""


def choose_devices(load_device, gpus: int, cuda_count: int, cpu_test: bool = False) -> list:
    """Rank 0 = ComfyUI's device for the model, then the other visible CUDA devices in index order."""
    gpus = int(gpus)
    dev = torch.device(load_device)
    if dev.type == "cpu":
        if cpu_test:
            return ["cpu"] * gpus
        raise MultiGPUError("Multi-GPU needs NVIDIA GPUs; ComfyUI runs this model on the CPU")
    if dev.type != "cuda":
        raise MultiGPUError(f"Multi-GPU needs CUDA GPUs (NCCL); ComfyUI runs this model on {dev}")
    first = dev.index or 0
    others = [i for i in range(cuda_count) if i != first]
    if gpus - 1 > len(others):
        raise MultiGPUError(f"{gpus} GPUs asked for, this machine shows {cuda_count} (CUDA_VISIBLE_DEVICES / "
                            f"--cuda-device limit what ComfyUI sees)")
    return [f"cuda:{first}"] + [f"cuda:{i}" for i in others[: gpus - 1]]


def parse_layout(layout: str, gpus: int, num_heads: int) -> D.Layout:
    """``"sequence"`` (1 x N) or ``"G x sequence"`` (G guidance groups of N / G GPUs)."""
    gpus = int(gpus)
    g = 1 if layout == "sequence" else int(layout.split("x")[0])
    if gpus % g:
        raise MultiGPUError(f"layout {layout!r} needs a GPU count divisible by {g}, got {gpus}")
    s = gpus // g
    if num_heads % s:
        ok = [n * g for n in range(1, num_heads + 1) if num_heads % n == 0 and 2 <= n * g <= 16]
        hint = (f"with layout {layout!r} use {', '.join(map(str, ok[:8]))} GPUs" if ok else
                "this model cannot split its heads: use layout '2 x sequence' with 2 GPUs or '3 x sequence' with 3")
        raise MultiGPUError(f"{s} GPUs per sequence group do not divide the model's {num_heads} attention heads; "
                            f"{hint}")
    return D.Layout(g, s)


def _in_unload_all() -> bool:
    """Whether this call comes from ``comfy.model_management.unload_all_models`` ("Unload models" / POST /free),
    not from an eviction to make room for another model."""
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_name == "unload_all_models" and "model_management" in f.f_code.co_filename:
            return True
        f = f.f_back
    return False


def _stop(box: list, why: str) -> None:
    pool = box[0]
    if pool is not None:
        box[0] = None
        log.info("SteadyDancer Multi-GPU: stopping the %d worker(s) (%s)", len(pool.procs), why)
        pool.shutdown()


class MultiGPU:
    def __init__(self, devices, layout: D.Layout, threads=None):
        self.devices, self.layout, self.threads = list(devices), layout, threads
        self._box = [None]           # the pool (in a box: the finalizer must not hold self)
        self.key = self.spec = self.r0 = None
        self.notes: list = []
        self._lock = threading.Lock()
        weakref.finalize(self, _stop, self._box, "the Multi-GPU model was freed")

    @property
    def pool(self):
        return self._box[0]

    def start(self) -> list:
        """Start the workers if they are not running. Returns notes (e.g. a GPU already in use)."""
        global _current
        if self.pool is not None and self.pool.alive:
            return []
        other = _current() if _current is not None else None
        if other is not None and other is not self:
            other.shutdown("another Multi-GPU model starts its workers")
        self.shutdown("restart")
        pool = WorkerPool(self.devices, self.layout, None, threads=self.threads)
        try:
            pool.start(None)
        except WorkerPoolError as e:
            raise MultiGPUError(str(e)) from None
        self._box[0], _current = pool, weakref.ref(self)
        self.key = None
        log.info("SteadyDancer Multi-GPU: %d ranks on %s, layout %s (guidance x sequence)", len(self.devices),
                 ", ".join(self.devices), self.layout)
        return list(pool.notes)

    def shutdown(self, why: str = "shutdown") -> None:
        _stop(self._box, why)
        self.key = None

    # ------------------------------------------------------------------ ComfyUI hooks
    def on_detach(self, patcher, unpatch_all=True) -> None:
        if _in_unload_all():
            self.shutdown("Unload models")

    def sampler_sample(self, executor, guider, sigmas, extra_args, *args, **kwargs):
        with self._lock:
            served = self._prepare(guider.model_patcher)
            opts = extra_args["model_options"].setdefault("transformer_options", {})
            opts[MULTIGPU_RUN_KEY] = served
            try:
                return executor(guider, sigmas, extra_args, *args, **kwargs)
            finally:
                opts.pop(MULTIGPU_RUN_KEY, None)
                replica.release(self.r0, self.spec)

    def _prepare(self, patcher):
        if getattr(patcher, "hook_patches", None):  # weights that change during the run: the workers would not follow
            raise MultiGPUError("ComfyUI weight hooks (hooked / scheduled LoRAs on the conditioning) are not supported "
                                "on the Multi-GPU model; apply LoRAs to the model with a LoRA loader node")
        dit = patcher.model.diffusion_model
        device = torch.device(self.devices[0])
        patches = patcher.patches
        resolved = []
        for name, m in dit.named_modules():
            if isinstance(m, _Patched) and f"diffusion_model.{name}.weight" in patches:
                if m.weight_patch_fn is None:
                    raise MultiGPUError(f"internal: the ComfyUI patch of {name} is not attached (model not loaded?)")
                resolved.append(name)
        spec = replica.describe(dit, resolved)

        def override(name, t):  # float weights ComfyUI did not patch in place (partial load: patched per call)
            key = f"diffusion_model.{name}"
            if key in patches and key not in patcher.backup:
                return patcher.patch_weight_to_device(key, device_to=device, return_weight=True)
            return t

        tensors = replica.values(dit, spec, override)
        fp = replica.fingerprint(spec)
        key = (weakref.ref(patcher.model), patcher.patches_uuid, fp)  # refs compare equal while both point to it
        self.start()
        if key != self.key:
            self.key = None
            sent = self.pool.load_weights(spec, tensors)
            self.key = key
            log.info("SteadyDancer Multi-GPU: weights sent to %d worker(s) (%.1f MiB, %d patched layers "
                     "resolved)", len(self.devices) - 1, sent / 2**20, len(resolved))
        if self.spec is None or replica.fingerprint(self.spec) != fp or self.r0 is None:
            self.r0, self.spec = replica.build(spec, device, allocate=False), spec
        replica.bind(self.r0, spec, tensors, device)
        return self.pool.served(self.r0)


def make_multigpu_model(model, gpus: int, layout: str, cuda_count=None):
    """A clone of MODEL ``model`` whose samplings run on ``gpus`` ranks. Returns (clone, notes)."""
    from .native_model import native
    pe = native().pe

    cuda_count = torch.cuda.device_count() if cuda_count is None else cuda_count
    cpu_test = os.environ.get(CPU_TEST_ENV) == "1"
    devices = choose_devices(model.load_device, gpus, cuda_count, cpu_test)
    lay = parse_layout(layout, gpus, model.model.diffusion_model.config.num_heads)
    state = MultiGPU(devices, lay, threads=1 if devices[0] == "cpu" else None)
    notes = state.start()
    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY, state.sampler_sample)
    m.add_callback_with_key(pe.CallbacksMP.ON_DETACH, WRAPPER_KEY, state.on_detach)
    return m, notes
