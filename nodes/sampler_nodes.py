"""The official SteadyDancer sampler and the TurboDiffusion rCM few-step sampler.

Both return a ComfyUI LATENT in ComfyUI's Wan2.1 convention (raw VAE latent, i.e. *de*-normalized with
steadydancer/sampling/latents.py), so the native VAEDecode turns it into frames.
"""
from __future__ import annotations

import torch

from . import comfy_bridge as cb
from .frames import CATEGORY, COND_TYPE, CONTEXT_TYPE, MODEL_TYPE, tooltip
from .model_nodes import _CACHE, offload, on_device

MAX_SEED = 0xFFFFFFFFFFFFFFFF


def _windows(bundle, context, unique_id):
    """Number of context windows for this conditioning (1 = the plain path), with a note for long videos
    sampled without windows."""
    from ..steadydancer.sampling import context_windows as cw

    T = bundle.cond.latent_shape[1]
    wins = cw.plan(context, T)
    if wins is None and context is None and T > cw.DEFAULT_WINDOW:
        cb.node_message(unique_id, f"{bundle.length} frames run as one window (the model was trained on 81); connect "
                                   "a SteadyDancer Context Windows node for long videos.")
    return len(wins) if wins else 1


def _run(handle, bundle, steps_total, sample_fn, unique_id=None, window_passes=None, dist_spec=None):
    """Shared plumbing: load/place the model, progress + previews + interrupt per step, offload after.

    ``window_passes``: with context windows, the total number of window passes (DiT passes x windows); the
    progress bar then counts window passes and Cancel is checked after every one (within one window pass).
    ``dist_spec`` = (sampler "module:function", kwargs): the same run on the Multi-GPU node's worker pool (its
    progress counts steps: the workers report once per step)."""
    from ..steadydancer.sampling import latents

    if handle is None or not hasattr(handle, "materialize"):
        raise ValueError("model: connect a SteadyDancer Model Loader (or LoRA) output")
    if bundle is None or not hasattr(bundle, "cond"):
        raise ValueError("conditioning: connect the SteadyDancer Conditioning output")
    cb.check_interrupt()
    device = cb.torch_device()
    multi_gpu = bool(getattr(handle, "multi_gpu", ()))
    if multi_gpu:
        window_passes = None  # the pool's workers report per step, not per window pass
    pbar = cb.Progress(window_passes or steps_total)
    previewer = cb.wan21_previewer(device)

    def callback(step, total, x0):
        cb.check_interrupt()  # raised here, the sampler stops after this step
        preview = cb.preview_image(previewer, x0)
        pbar.update_absolute(pbar.current if window_passes else step + 1, preview=preview)

    def window_callback(passes):
        pbar.update(passes)
        cb.check_interrupt()  # raised here, the sampler stops after this window pass

    with _CACHE.using():  # ComfyUI's memory hooks leave the model alone while it samples
        module = handle.materialize(device)
        on_device(module, device)
        try:
            if multi_gpu:
                from .multigpu_nodes import sample_multi_gpu
                x = sample_multi_gpu(handle, module, device, dist_spec, bundle.cond, callback)
            else:
                x = sample_fn(module, bundle.cond, device, callback, window_callback)
        finally:
            if handle.options.offload_after:
                offload(module)
    samples = latents.denormalize(x.float()).to(cb.intermediate_device())
    return ({"samples": samples},)


CONTEXT_INPUT = (CONTEXT_TYPE, tooltip("Optional: context windows for long videos (SteadyDancer Context Windows node)."))


class _SamplerNode:
    """What both sampler nodes declare alike: one Wan2.1 LATENT out (see _run), computed by ``sample``."""
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Wan2.1 video latent; decode with the native VAE Decode node.",)
    FUNCTION = "sample"


class SteadyDancerSampler(_SamplerNode):
    DESCRIPTION = ("The official SteadyDancer sampler: UniPC flow matching (40 steps, shift 5) with text CFG and "
                   "pose guidance (negative poses) in a window of the schedule. Best quality, ~2-3 model passes "
                   "per step.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, tooltip("SteadyDancer model (loader / LoRA output).")),
                "conditioning": (COND_TYPE, tooltip("From the SteadyDancer Conditioning node.")),
                "seed": ("INT", tooltip("Noise seed (noise is drawn on the CPU, so a seed gives the same video on any GPU).",
                                        default=106060, min=0, max=MAX_SEED, control_after_generate=True)),
                "steps": ("INT", tooltip("Sampling steps (official 40).", default=40, min=1, max=200)),
                "shift": ("FLOAT", tooltip("Flow-matching sigma shift (official: 3.0 at 480x832 / 832x480, 5.0 at larger sizes).",
                                           default=5.0, min=0.1, max=100.0, step=0.1)),
                "text_guidance": ("FLOAT", tooltip("Text CFG scale (official 5.0; 1.0 = off, one pass fewer per step).",
                                                   default=5.0, min=0.0, max=30.0, step=0.1)),
                "pose_guidance": ("FLOAT", tooltip("Pose guidance scale against the negative poses (paper/README 1.0; 0 = off). "
                                                   "Needs negative pose frames on the conditioning node.",
                                                   default=1.0, min=0.0, max=30.0, step=0.1)),
                "pose_guidance_start": ("FLOAT", tooltip("Pose guidance runs on steps with start < step/steps < end (official 0.1).",
                                                         default=0.1, min=0.0, max=1.0, step=0.01)),
                "pose_guidance_end": ("FLOAT", tooltip("End of the pose guidance window (official 0.4).",
                                                       default=0.4, min=0.0, max=1.0, step=0.01)),
                "solver": (["unipc", "euler"], tooltip("unipc = the official solver; euler = plain flow Euler.", default="unipc")),
            },
            "optional": {"context": CONTEXT_INPUT},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(self, model, conditioning, seed, steps, shift, text_guidance, pose_guidance, pose_guidance_start,
               pose_guidance_end, solver, context=None, unique_id=None):
        from ..steadydancer.sampling import official as sampling

        if pose_guidance != 0 and not conditioning.cond.has_negative_pose:
            cb.node_message(unique_id, "pose guidance needs negative pose frames on the conditioning node; "
                                       "running without pose guidance.")
            pose_guidance = 0.0
        guidance = sampling.Guidance(float(text_guidance), float(pose_guidance), float(pose_guidance_start),
                                     float(pose_guidance_end))

        kw = dict(seed=int(seed), steps=int(steps), shift=float(shift), guidance=guidance, solver=solver,
                  context=context)

        def fn(module, cond, device, callback, window_callback):
            return sampling.sample_official(module, cond, callback=callback, device=device,
                                            window_callback=window_callback, **kw)

        n = _windows(conditioning, context, unique_id)
        passes = sampling.count_passes(int(steps), guidance) * n if n > 1 else None
        return _run(model, conditioning, int(steps), fn, unique_id, passes,
                    ("steadydancer.sampling.official:sample_official", kw))


class SteadyDancerTurboSampler(_SamplerNode):
    DESCRIPTION = ("Few-step sampler (1-8 steps, one model pass per step, no CFG) in TurboDiffusion's rCM style. "
                   "Use with a step-distill LoRA (lightx2v Wan2.1-I2V 480p cfg step distill) on the model.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, tooltip("SteadyDancer model with a step-distill LoRA applied.")),
                "conditioning": (COND_TYPE, tooltip("From the SteadyDancer Conditioning node (negative prompt/poses unused).")),
                "seed": ("INT", tooltip("Noise seed (CPU generator: the same video on any GPU).",
                                        default=42, min=0, max=MAX_SEED, control_after_generate=True)),
                "steps": ("INT", tooltip("Steps, 1-8 (4 is the distilled default).", default=4, min=1, max=8)),
                "schedule": (["shift", "rcm"], tooltip(
                    "shift: sigma = shift*u/(1+(shift-1)*u) on a uniform grid (what the lightx2v step-distill LoRA "
                    "was trained for); rcm: TurboDiffusion's TrigFlow times (for rCM-distilled weights).",
                    default="shift")),
                "shift": ("FLOAT", tooltip("Sigma shift for the 'shift' schedule (lightx2v: 5.0).",
                                           default=5.0, min=0.1, max=100.0, step=0.1)),
                "sigma_max": ("FLOAT", tooltip("Starting EDM sigma for the 'rcm' schedule (TurboDiffusion I2V: 200; larger = "
                                               "less diversity, maybe better quality).",
                                               default=200.0, min=1.0, max=5000.0, step=1.0)),
                "mode": (["sde", "ode"], tooltip("sde: re-noise each step (TurboDiffusion default, more robust); "
                                                 "ode: Euler (sharper, less robust).", default="sde")),
            },
            "optional": {"context": CONTEXT_INPUT},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(self, model, conditioning, seed, steps, schedule, shift, sigma_max, mode, context=None, unique_id=None):
        from ..turbo import rcm

        kw = dict(seed=int(seed), steps=int(steps), sigma_max=float(sigma_max), mode=mode, schedule=schedule,
                  shift=float(shift), context=context)

        def fn(module, cond, device, callback, window_callback):
            return rcm.sample_rcm(module, cond, callback=callback, device=device, window_callback=window_callback, **kw)

        n = _windows(conditioning, context, unique_id)
        return _run(model, conditioning, int(steps), fn, unique_id, int(steps) * n if n > 1 else None,
                    ("turbo.rcm:sample_rcm", kw))
