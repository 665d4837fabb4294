"""Long videos: the context-window options node (taken by both samplers) and the colour-drift guard."""
from __future__ import annotations

from . import comfy_bridge as cb
from .frames import CATEGORY, CONTEXT_TYPE, tooltip


class SteadyDancerContextOptions:
    DESCRIPTION = ("Context windows for long videos: the samplers denoise overlapping windows of the video at every "
                   "step and blend the overlaps, so any 4n+1 length (e.g. 161, 321, 481 frames) comes out with exactly "
                   "that many frames. Only the first window is tied to the reference image as its first frame; every "
                   "window sees the reference image and the first pose as reference tokens. Connect it to a sampler's "
                   "'context' input; lengths up to one window run exactly as without it.")
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = (CONTEXT_TYPE,)
    RETURN_NAMES = ("context",)
    OUTPUT_TOOLTIPS = ("Context-window settings for the SteadyDancer samplers and the Colour Guard.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "window_frames": ("INT", tooltip("Frames per window (4n+1). 81 = what the model was trained on.",
                                                 default=81, min=5, max=1025, step=4)),
                "overlap_frames": ("INT", tooltip("Frames shared by neighbouring windows (multiple of 4, less than the "
                                                  "window). More overlap = smoother seams, no extra cost until a window "
                                                  "more is needed. Windows are spread evenly, so real overlaps can be larger.",
                                                  default=16, min=4, max=1020, step=4)),
                "fusion": (["linear", "cosine"], tooltip("How overlapping windows are blended (weights sum to 1 on every "
                                                         "frame).", default="linear")),
                "noise": (["freenoise", "independent"], tooltip(
                    "freenoise: later frames reuse shuffled copies of the first window's noise (steadier content across "
                    "windows); independent: fresh noise per frame. Either way the first window's noise is the same as a "
                    "one-window run with the same seed.", default="freenoise")),
                "anchor_frames": ("INT", tooltip(
                    "0 = off. Each window after the first takes its first N frames (multiple of 4, at most the overlap) "
                    "as known frames from the previous window's current estimate, at every step. May reduce seams; no "
                    "extra model passes.", default=0, min=0, max=1020, step=4)),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def build(self, window_frames, overlap_frames, fusion, noise, anchor_frames, unique_id=None):
        from ..steadydancer.sampling.context_windows import ContextOptions

        opts, notes = ContextOptions.from_pixel_frames(int(window_frames), int(overlap_frames), int(anchor_frames),
                                                       fusion=fusion, noise=noise)
        for n in notes:
            cb.node_message(unique_id, n)
        return (opts,)


class SteadyDancerColourGuard:
    DESCRIPTION = ("Colour-drift guard for long videos: gives each context window's decoded frames the reference "
                   "image's colour statistics (per-channel mean and spread), blended across the overlaps. Put it between "
                   "VAE Decode and Create Video. Strength 0 = off (frames pass through unchanged).")
    CATEGORY = f"{CATEGORY}/video"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    OUTPUT_TOOLTIPS = ("The colour-corrected frames.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", tooltip("Decoded video frames (VAE Decode output).")),
                "reference_image": ("IMAGE", tooltip("The reference image the video was made from (first image used).")),
                "strength": ("FLOAT", tooltip("0 = off; 1 = full match to the reference's colour statistics.",
                                              default=0.0, min=0.0, max=1.0, step=0.05)),
            },
            "optional": {
                "context": (CONTEXT_TYPE, tooltip("The Context Windows options the video was sampled with (without it the "
                                                  "whole clip is treated as one window).")),
            },
        }

    def apply(self, images, reference_image, strength, context=None):
        from ..steadydancer.sampling.colour_guard import colour_guard

        if float(strength) == 0.0:
            return (images,)
        return (colour_guard(images, reference_image, context, float(strength)).to(images.device),)


class SteadyDancerApplyContextWindows:
    DESCRIPTION = ("Puts the Context Windows options on a SteadyDancer MODEL, for core samplers (KSampler, "
                   "SamplerCustomAdvanced with the SteadyDancer or core pieces): every model call then runs on the "
                   "windows and blends them. The SteadyDancer one-node samplers take the options on their 'context' "
                   "input instead (and also start from the windowed FreeNoise draw and count window passes).")
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model, running on context windows.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", tooltip("SteadyDancer model (loader / LoRA output).")),
                "context": (CONTEXT_TYPE, tooltip("From the SteadyDancer Context Windows node.")),
            }
        }

    def apply(self, model, context):
        from . import native_model

        if not native_model.is_steadydancer(model):
            raise ValueError("model: connect a SteadyDancer Model Loader output (or a LoRA node after it)")
        return (native_model.with_context(model, context),)


class SteadyDancerContextNoise:
    DESCRIPTION = ("Start noise for SamplerCustomAdvanced on a windowed MODEL (long videos): the context windows' own "
                   "draw, as the SteadyDancer one-node samplers make it (the first window's frames = core RandomNoise "
                   "with the same seed; later frames FreeNoise or independent, as set on the Context Windows node). "
                   "Core RandomNoise would give plain noise over all frames and ignore the 'noise' option. A video "
                   "that fits in one window gets exactly RandomNoise's noise.")
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = ("NOISE",)
    RETURN_NAMES = ("noise",)
    OUTPUT_TOOLTIPS = ("Noise for SamplerCustomAdvanced (its seed also seeds the rCM sampler's re-noising).",)
    FUNCTION = "get"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "noise_seed": ("INT", tooltip("Noise seed (drawn on the CPU: the same video on any GPU).", default=0,
                                              min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True)),
                "context": (CONTEXT_TYPE, tooltip("From the SteadyDancer Context Windows node (the same options as "
                                                  "on the model).")),
            }
        }

    def get(self, noise_seed, context):
        from .native_sampling import WindowedNoise

        return (WindowedNoise(noise_seed, context),)
