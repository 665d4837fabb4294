"""Sampling nodes: native SIGMAS / GUIDER / SAMPLER pieces for core SamplerCustomAdvanced, and the two one-node
samplers built from exactly those pieces (core SamplerCustomAdvanced runs them). All math is in the core
(steadydancer/sampling/official.py, turbo/rcm.py); the ComfyUI adapters are in nodes/native_sampling.py.

Outputs are ComfyUI LATENTs (raw Wan2.1 VAE latents; ComfyUI de-normalizes the model's result), so the native
VAEDecode turns them into frames.

Long videos: the optional ``context`` input (SteadyDancer Context Windows node) is put into the MODEL's
transformer_options (nodes/native_model.py ``with_context``); the DiT call then runs the core
``ContextWindowModel`` (steadydancer/sampling/context_windows.py) on every window and fuses them, and the start
noise is the core's FreeNoise draw (``WindowNoise``), so the result is the core ``sample_official`` /
``sample_rcm`` with ``context=``. The progress bar counts window passes (native_sampling.WindowProgress) and
Cancel is checked after every window pass. For core samplers: the Context Windows on Model node.
"""
from __future__ import annotations

import torch

from . import comfy_bridge as cb
from .frames import CATEGORY, CONTEXT_TYPE, MODEL_TYPE, tooltip

MAX_SEED = 0xFFFFFFFFFFFFFFFF
SAMPLING = f"{CATEGORY}/sampling"


def _check_model(model):
    from . import native_model
    if not native_model.is_steadydancer(model):
        raise ValueError("model: connect a SteadyDancer Model Loader output (a MODEL wrapping the SteadyDancer DiT)")


def _has_negative_pose(positive) -> bool:
    from . import native_model
    return any(native_model.KEY_POSE_NEG in c[1] for c in positive)


def official_sigmas(steps: int, shift: float, model=None) -> torch.Tensor:
    """The official shifted schedule (float32, final 0). ``shift`` 0: the MODEL's model_sampling shift
    (ModelSamplingSD3), default 5."""
    from ..steadydancer.sampling import official as sampling
    if shift <= 0:
        shift = 5.0
        if model is not None:
            shift = float(getattr(model.get_model_object("model_sampling"), "shift", 5.0))
    return sampling.official_schedule(int(steps), float(shift))[0]


def rcm_sigmas(steps: int, schedule: str, shift: float, sigma_max: float) -> torch.Tensor:
    from ..turbo import rcm
    return rcm.rcm_sigmas(int(steps), float(sigma_max), schedule=schedule, shift=float(shift)).float()


def guidance(text_guidance, pose_guidance, pose_start, pose_end, positive, unique_id=None):
    from ..steadydancer.sampling import official as sampling
    if pose_guidance != 0 and not _has_negative_pose(positive):
        cb.node_message(unique_id, "pose guidance needs negative pose frames on the conditioning node; "
                                   "running without pose guidance.")
        pose_guidance = 0.0
    return sampling.Guidance(float(text_guidance), float(pose_guidance), float(pose_start), float(pose_end))


_STEPS = ("INT", tooltip("Sampling steps (official 40).", default=40, min=1, max=200))
_SHIFT = ("FLOAT", tooltip("Flow-matching sigma shift (official: 3.0 at 480x832 / 832x480, 5.0 at larger sizes). "
                           "0 = the model's shift (set by ModelSamplingSD3; 5 otherwise).",
                           default=5.0, min=0.0, max=100.0, step=0.1))
_TEXT_G = ("FLOAT", tooltip("Text CFG scale (official 5.0; 1.0 = off, one pass fewer per step).",
                            default=5.0, min=0.0, max=30.0, step=0.1))
_POSE_G = ("FLOAT", tooltip("Pose guidance scale against the negative poses (paper/README 1.0; 0 = off). Needs negative "
                            "pose frames on the conditioning node.", default=1.0, min=0.0, max=30.0, step=0.1))
_POSE_S = ("FLOAT", tooltip("Pose guidance runs on steps with start < step/steps < end (official 0.1).",
                            default=0.1, min=0.0, max=1.0, step=0.01))
_POSE_E = ("FLOAT", tooltip("End of the pose guidance window (official 0.4).", default=0.4, min=0.0, max=1.0, step=0.01))
_SOLVER = (["unipc", "euler"], tooltip("unipc = the official solver; euler = plain flow Euler.", default="unipc"))
_RCM_STEPS = ("INT", tooltip("Steps, 1-8 (4 is the distilled default).", default=4, min=1, max=8))
_RCM_SCHED = (["shift", "rcm"], tooltip(
    "shift: sigma = shift*u/(1+(shift-1)*u) on a uniform grid (what the lightx2v step-distill LoRA was trained for); "
    "rcm: TurboDiffusion's TrigFlow times (for rCM-distilled weights).", default="shift"))
_RCM_SHIFT = ("FLOAT", tooltip("Sigma shift for the 'shift' schedule (lightx2v: 5.0).", default=5.0, min=0.1, max=100.0,
                               step=0.1))
_SIGMA_MAX = ("FLOAT", tooltip("Starting EDM sigma for the 'rcm' schedule (TurboDiffusion I2V: 200; larger = less "
                               "diversity, maybe better quality).", default=200.0, min=1.0, max=5000.0, step=1.0))
_MODE = (["sde", "ode"], tooltip("sde: re-noise each step (TurboDiffusion default, more robust); ode: Euler (sharper, "
                                 "less robust).", default="sde"))


def _rcm_timestep(schedule: str) -> str:
    return "bfloat16" if schedule == "rcm" else "float32"


# ---------------------------------------------------------------------------------------------- pieces
class SteadyDancerOfficialSigmas:
    DESCRIPTION = "The official SteadyDancer schedule (shifted flow sigmas starting at 0.999, final 0) as SIGMAS."
    CATEGORY = SAMPLING
    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("sigmas",)
    OUTPUT_TOOLTIPS = ("The official schedule (float32, descending, final 0), for SamplerCustomAdvanced.",)
    FUNCTION = "get"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": _STEPS, "shift": _SHIFT},
                "optional": {"model": ("MODEL", tooltip("Only read when shift is 0: its model_sampling shift."))}}

    def get(self, steps, shift, model=None):
        return (official_sigmas(steps, shift, model),)


class SteadyDancerTurboSigmas:
    DESCRIPTION = "Few-step sigmas: the lightx2v shift schedule or TurboDiffusion's rCM TrigFlow schedule."
    CATEGORY = SAMPLING
    RETURN_TYPES = ("SIGMAS",)
    RETURN_NAMES = ("sigmas",)
    OUTPUT_TOOLTIPS = ("Few-step sigmas (float32, final 0), for SamplerCustomAdvanced with the rCM sampler.",)
    FUNCTION = "get"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": _RCM_STEPS, "schedule": _RCM_SCHED, "shift": _RCM_SHIFT, "sigma_max": _SIGMA_MAX}}

    def get(self, steps, schedule, shift, sigma_max):
        return (rcm_sigmas(steps, schedule, shift, sigma_max),)


class SteadyDancerGuider:
    DESCRIPTION = ("SteadyDancer's dual guidance as a GUIDER: text CFG plus pose CFG (against the negative poses) inside "
                   "a window of the schedule; the passes of a step run as one batch when memory allows.")
    CATEGORY = SAMPLING
    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("guider",)
    OUTPUT_TOOLTIPS = ("Text + pose guidance for SamplerCustomAdvanced.",)
    FUNCTION = "get"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL_TYPE, tooltip("SteadyDancer model (loader / LoRA output).")),
            "positive": ("CONDITIONING", tooltip("positive from the SteadyDancer Conditioning node.")),
            "negative": ("CONDITIONING", tooltip("negative from the SteadyDancer Conditioning node.")),
            "text_guidance": _TEXT_G, "pose_guidance": _POSE_G,
            "pose_guidance_start": _POSE_S, "pose_guidance_end": _POSE_E},
            "hidden": {"unique_id": "UNIQUE_ID"}}

    def get(self, model, positive, negative, text_guidance, pose_guidance, pose_guidance_start, pose_guidance_end,
            unique_id=None):
        from . import native_sampling
        _check_model(model)
        g = guidance(text_guidance, pose_guidance, pose_guidance_start, pose_guidance_end, positive, unique_id)
        return (native_sampling.make_guider(model, positive, negative, g),)


class SteadyDancerSamplerUniPC:
    DESCRIPTION = ("The official flow-matching UniPC solver (order 2, bh2) as a SAMPLER; starts from the raw noise as the "
                   "official code. Use with the SteadyDancer sigmas and guider in SamplerCustomAdvanced.")
    CATEGORY = SAMPLING
    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("The official flow UniPC / Euler solver, for SamplerCustomAdvanced.",)
    FUNCTION = "get"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"solver": _SOLVER}}

    def get(self, solver):
        from . import native_sampling
        return (native_sampling.native().FlowSampler(solver),)


class SteadyDancerSamplerRCM:
    DESCRIPTION = ("TurboDiffusion's rCM few-step sampler (SDE re-noising or ODE) as a SAMPLER; one pass per step (pair "
                   "it with core BasicGuider, or CFGGuider at cfg 1).")
    CATEGORY = SAMPLING
    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("The rCM few-step sampler, for SamplerCustomAdvanced.",)
    FUNCTION = "get"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mode": _MODE, "timestep_rounding": (["bfloat16", "float32"], tooltip(
            "How the model sees 1000*sigma: bfloat16 as TurboDiffusion (rcm schedule), float32 for the shift schedule.",
            default="float32"))}}

    def get(self, mode, timestep_rounding):
        from . import native_sampling
        return (native_sampling.native().RCMSampler(mode, timestep_rounding),)


# ---------------------------------------------------------------------------------------------- one-node samplers
_LATENT_IN = ("LATENT", tooltip("latent from the SteadyDancer Conditioning node."))
CONTEXT_INPUT = (CONTEXT_TYPE, tooltip("Optional: context windows for long videos (SteadyDancer Context Windows node)."))


def _with_windows(model, latent, context, unique_id=None):
    """The MODEL with ``context`` in its transformer_options (or unchanged), with a note for a long video sampled
    without windows."""
    from ..steadydancer.sampling import context_windows as cw
    from . import native_model

    T = int(latent["samples"].shape[2])
    if context is None:
        if T > cw.DEFAULT_WINDOW:
            cb.node_message(unique_id, f"{cw.pixel_frames(T)} frames run as one window (the model was trained on 81); "
                                       "connect a SteadyDancer Context Windows node for long videos.")
        return model
    return native_model.with_context(model, context)


class SteadyDancerSampler:
    DESCRIPTION = ("The official SteadyDancer sampler in one node: UniPC flow matching (40 steps, shift 5) with text CFG "
                   "and pose guidance in a window of the schedule. Same as SamplerCustomAdvanced with the SteadyDancer "
                   "sigmas, guider and UniPC sampler.")
    CATEGORY = SAMPLING
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Wan2.1 video latent; decode with the native VAE Decode node.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, tooltip("SteadyDancer model (loader / LoRA output).")),
                "positive": ("CONDITIONING", tooltip("positive from the SteadyDancer Conditioning node.")),
                "negative": ("CONDITIONING", tooltip("negative from the SteadyDancer Conditioning node.")),
                "latent": _LATENT_IN,
                "seed": ("INT", tooltip("Noise seed (noise is drawn on the CPU, so a seed gives the same video on any GPU).",
                                        default=106060, min=0, max=MAX_SEED, control_after_generate=True)),
                "steps": _STEPS, "shift": _SHIFT, "text_guidance": _TEXT_G, "pose_guidance": _POSE_G,
                "pose_guidance_start": _POSE_S, "pose_guidance_end": _POSE_E, "solver": _SOLVER,
            },
            "optional": {"context": CONTEXT_INPUT},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(self, model, positive, negative, latent, seed, steps, shift, text_guidance, pose_guidance,
               pose_guidance_start, pose_guidance_end, solver, context=None, unique_id=None):
        from . import native_sampling
        _check_model(model)
        sigmas = official_sigmas(steps, shift, model)
        model = _with_windows(model, latent, context, unique_id)
        (guider,) = SteadyDancerGuider().get(model, positive, negative, text_guidance, pose_guidance,
                                             pose_guidance_start, pose_guidance_end, unique_id)
        (sampler,) = SteadyDancerSamplerUniPC().get(solver)
        return (native_sampling.sample_custom_advanced(guider, sampler, sigmas, latent, seed, context),)


class SteadyDancerTurboSampler:
    DESCRIPTION = ("Few-step sampler (1-8 steps, one model pass per step, no CFG) in TurboDiffusion's rCM style. "
                   "Use with a step-distill LoRA (lightx2v Wan2.1-I2V 480p cfg step distill) on the model. Same as "
                   "SamplerCustomAdvanced with the turbo sigmas, BasicGuider and the rCM sampler.")
    CATEGORY = SAMPLING
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("Wan2.1 video latent; decode with the native VAE Decode node.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, tooltip("SteadyDancer model with a step-distill LoRA applied.")),
                "positive": ("CONDITIONING", tooltip("positive from the SteadyDancer Conditioning node.")),
                "latent": _LATENT_IN,
                "seed": ("INT", tooltip("Noise seed (CPU generator: the same video on any GPU).",
                                        default=42, min=0, max=MAX_SEED, control_after_generate=True)),
                "steps": _RCM_STEPS, "schedule": _RCM_SCHED, "shift": _RCM_SHIFT, "sigma_max": _SIGMA_MAX,
                "mode": _MODE,
            },
            "optional": {"context": CONTEXT_INPUT},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(self, model, positive, latent, seed, steps, schedule, shift, sigma_max, mode, context=None,
               unique_id=None):
        from . import native_sampling
        _check_model(model)
        model = _with_windows(model, latent, context, unique_id)
        guider = native_sampling.basic_guider(model, positive)
        (sampler,) = SteadyDancerSamplerRCM().get(mode, _rcm_timestep(schedule))
        sigmas = rcm_sigmas(steps, schedule, shift, sigma_max)
        return (native_sampling.sample_custom_advanced(guider, sampler, sigmas, latent, seed, context),)
