"""Multi-GPU node: the SteadyDancer samplers run one video on several GPUs of this machine.

The node only marks the model handle (``multi_gpu = (gpus, layout)``); the samplers then run through a persistent
``steadydancer.parallel.pool.WorkerPool``: this ComfyUI process is rank 0 on its own GPU, one worker process per
extra GPU loads the same model recipe (file, load options, LoRAs, attention, compile) itself and joins an NCCL
group. The pool is kept for the session and rebuilt only when the recipe, GPU count or layout changes; it is
shut down when the model is unloaded (Unload models, another model, a LoRA change that reloads) and at exit.
Progress, previews and interrupt work as on one GPU (rank 0's callback; every rank stops after the step).
"""
from __future__ import annotations

import dataclasses
import logging
import threading

import torch

from . import comfy_bridge as cb
from .frames import CATEGORY, MODEL_TYPE, tooltip
from .model_nodes import _CACHE

log = logging.getLogger("steadydancer_turbo")

LAYOUTS = ["sequence", "guidance x sequence"]
HEADS = 40  # SteadyDancer-14B attention heads: the sequence-parallel size must divide them


def layout_for(gpus: int, layout: str):
    """(guidance, sequence) for the node's choices; ValueError with what to pick instead."""
    from ..steadydancer.parallel.distributed import Layout
    gpus = int(gpus)
    if layout == "guidance x sequence":
        if gpus % 2:
            raise ValueError(f"'guidance x sequence' splits the GPUs into 2 guidance groups: use an even GPU count, "
                             f"not {gpus}")
        lay = Layout(2, gpus // 2)
    elif layout == "sequence":
        lay = Layout(1, gpus)
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    if HEADS % lay.sequence:
        ok = [n for n in range(2, 9) if HEADS % n == 0]
        raise ValueError(f"{lay.sequence} sequence-parallel GPUs do not divide the model's {HEADS} attention heads; "
                         f"use {', '.join(map(str, ok))} GPUs for 'sequence'")
    return lay


class SteadyDancerMultiGPU:
    DESCRIPTION = ("Run the SteadyDancer samplers on several GPUs of this machine (one video split across them). "
                   "Extra GPUs get one worker process each that loads the same model; they stay up for the session.")
    CATEGORY = f"{CATEGORY}/model"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model, sampled on the chosen GPUs.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, tooltip("SteadyDancer model (loader / LoRA output).")),
                "gpus": ("INT", tooltip(
                    "GPUs to use, this ComfyUI GPU included (the others are the next CUDA devices). Each holds a "
                    "full copy of the model (fp8: ~17 GB, bf16: ~33 GB).", default=2, min=1, max=8)),
                "layout": (LAYOUTS, tooltip(
                    "sequence: the video's tokens are split over all GPUs (both samplers; 2, 4, 5 or 8 GPUs). "
                    "guidance x sequence: the official sampler's guidance passes run on 2 GPU groups at once and "
                    "the tokens are split inside each group (even GPU counts; fewer all-to-alls, good on PCIe "
                    "cards; no gain for the turbo sampler, which has one pass per step).", default="sequence")),
            }
        }

    def apply(self, model, gpus, layout):
        if model is None or not hasattr(model, "materialize"):
            raise ValueError("model: connect a SteadyDancer Model Loader (or LoRA) output")
        gpus = int(gpus)
        if gpus == 1:
            return (dataclasses.replace(model, multi_gpu=()),)
        layout_for(gpus, layout)
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n < gpus:
            raise ValueError(f"{gpus} GPUs requested, this machine shows {n} CUDA GPU(s)"
                             + (" (CUDA_VISIBLE_DEVICES limits them)" if n else ""))
        return (dataclasses.replace(model, multi_gpu=(gpus, layout)),)


# ---------------------------------------------------------------------------------------------------- the pool
_LOCK = threading.RLock()
_STATE = {"key": None, "pool": None}


def shutdown_pool() -> None:
    with _LOCK:
        pool = _STATE["pool"]
        _STATE.update(key=None, pool=None)
        if pool is not None:
            log.info("SteadyDancer: stopping the multi-GPU workers")
            pool.shutdown()


_CACHE.on_clear.append(shutdown_pool)


def devices_for(gpus: int, rank0: torch.device) -> list:
    """Rank 0 on ComfyUI's GPU, then the other CUDA devices in order."""
    r0 = rank0.index or 0
    others = [i for i in range(torch.cuda.device_count()) if i != r0]
    if len(others) < gpus - 1:
        raise ValueError(f"{gpus} GPUs requested, this machine shows {len(others) + 1} CUDA GPU(s)")
    return [f"cuda:{r0}"] + [f"cuda:{i}" for i in others[: gpus - 1]]


def recipe_for(handle) -> dict:
    o = handle.options
    return dict(path=handle.path, loras=list(handle.loras), attention=o.attention_backend(), compile=o.compile,
                load=dict(compute_dtype=o.compute_dtype, storage=o.weight_storage, block_swap=int(o.block_swap),
                          vram_budget_gb=float(o.vram_budget_gb) or None, fp8_matmul=bool(o.fp8_matmul),
                          attention=o.attention_backend()))


def pool_for(handle, module, device):
    from ..steadydancer.parallel.pool import WorkerPool, WorkerPoolError
    gpus, layout = handle.multi_gpu
    key = (handle.path, handle.options.load_key(), handle.loras, handle.options.attention_backend(),
           handle.options.compile, gpus, layout, str(device))
    with _LOCK:
        pool = _STATE["pool"]
        if pool is not None and _STATE["key"] == key and pool.alive:
            return pool
        shutdown_pool()
        if device.type != "cuda":
            raise RuntimeError("SteadyDancer multi-GPU needs ComfyUI running on a CUDA GPU")
        pool = WorkerPool(devices_for(gpus, device), layout_for(gpus, layout),
                          ("steadydancer.parallel.pool", "load_recipe", (recipe_for(handle),)))
        log.info("SteadyDancer: starting %d multi-GPU worker(s) on %s (layout %s)", gpus - 1,
                 ", ".join(pool.devices[1:]), pool.layout)
        try:
            pool.start(module)
        except WorkerPoolError as e:
            raise RuntimeError(f"SteadyDancer multi-GPU: {e}") from None
        for note in pool.notes:
            log.warning("SteadyDancer multi-GPU: %s", note)
        _STATE.update(key=key, pool=pool)
        return pool


def sample_multi_gpu(handle, module, device, spec, cond, callback):
    """``spec`` = (sampler "module:function", keyword arguments) from the sampler node."""
    from ..steadydancer.parallel.pool import WorkerPoolError
    pool = pool_for(handle, module, device)
    sampler, kw = spec
    try:
        return pool.sample(sampler, cond, callback, model=module, **kw)
    except WorkerPoolError as e:
        with _LOCK:
            _STATE.update(key=None, pool=None)  # torn down by the pool itself
        raise RuntimeError(f"SteadyDancer multi-GPU: {e}") from None
