"""The Multi-GPU node: one SteadyDancer video on several GPUs of this machine, from the node graph.
The work is in nodes/native_multigpu.py (ComfyUI side) and steadydancer/parallel/ (core)."""
from __future__ import annotations

from . import comfy_bridge as cb
from .frames import CATEGORY, MODEL_TYPE, tooltip

LAYOUTS = ["sequence", "2 x sequence", "3 x sequence"]


class SteadyDancerMultiGPU:
    DESCRIPTION = ("Runs the SteadyDancer MODEL on several GPUs of this machine: ComfyUI's GPU plus one worker "
                   "process per extra GPU, started here and kept for the session. Each DiT pass splits the video's "
                   "tokens over the GPUs (sequence parallel); the workers get the weights from ComfyUI's loaded "
                   "model, LoRAs included (again after a LoRA or strength change), never from the file. Place it "
                   "after the loader and LoRA nodes, before the sampler. Workers stop on Unload models, when the "
                   "model is freed, or when ComfyUI exits.")
    CATEGORY = f"{CATEGORY}/model"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model; any sampler that gets it runs each DiT pass on all the GPUs.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, tooltip("A SteadyDancer model (loader, LoRA nodes).")),
                "gpus": ("INT", tooltip(
                    "GPUs to use, ComfyUI's own GPU included (the others in index order). Per sequence group "
                    "it must divide the 40 attention heads: 2, 4, 5, 8 (10, 20...).", default=2, min=2, max=16)),
                "layout": (LAYOUTS, tooltip(
                    "sequence = every GPU takes a slice of the tokens of each pass (best with NVLink; works for "
                    "every sampler). 'G x sequence' = the passes of one step that the sampler batches "
                    "(cond / uncond / pose-uncond) go to G groups of GPUs, tokens split inside each group "
                    "(fewer all-to-alls, for PCIe cards; no gain for the one-pass turbo sampler).",
                    default="sequence")),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def apply(self, model, gpus, layout, unique_id=None):
        from . import native_model
        if not native_model.is_steadydancer(model):
            raise ValueError("model: connect a SteadyDancer Model Loader output (or a LoRA node after it)")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        cb.need_comfy("The SteadyDancer Multi-GPU node")
        from . import native_multigpu as nmg
        try:
            out, notes = nmg.make_multigpu_model(model, int(gpus), layout)
        except nmg.MultiGPUError as e:
            raise RuntimeError(f"SteadyDancer Multi-GPU: {e}") from None
        if notes:
            cb.node_message(unique_id, "; ".join(notes))
        return (out,)
