"""ComfyUI V1 node classes (thin adapters over the core packages). Ids are prefixed ``SteadyDancer``.
May import: the core (steadydancer/, turbo/, dwpose/); ComfyUI only through comfy_bridge.py.
"""
from . import comfy_bridge
from .conditioning_nodes import SteadyDancerConditioning
from .context_nodes import (SteadyDancerApplyContextWindows, SteadyDancerColourGuard, SteadyDancerContextNoise,
                            SteadyDancerContextOptions)
from .model_nodes import SteadyDancerLoraLoader, SteadyDancerModelLoader
from .multigpu_nodes import SteadyDancerMultiGPU
from .pose_nodes import SteadyDancerPoseExtract, SteadyDancerPoseRetarget
from .sampler_nodes import (SteadyDancerGuider, SteadyDancerOfficialSigmas, SteadyDancerSampler,
                            SteadyDancerSamplerRCM, SteadyDancerSamplerUniPC, SteadyDancerTurboSampler,
                            SteadyDancerTurboSigmas)
from .video_nodes import SteadyDancerResampleFrames

comfy_bridge.register_model_folders()
if comfy_bridge.HAVE_COMFY:
    from .native_model import register_lora_adapter
    register_lora_adapter()

NODE_CLASS_MAPPINGS = {
    "SteadyDancerPoseExtract": SteadyDancerPoseExtract,
    "SteadyDancerPoseRetarget": SteadyDancerPoseRetarget,
    "SteadyDancerResampleFrames": SteadyDancerResampleFrames,
    "SteadyDancerModelLoader": SteadyDancerModelLoader,
    "SteadyDancerLoraLoader": SteadyDancerLoraLoader,
    "SteadyDancerMultiGPU": SteadyDancerMultiGPU,
    "SteadyDancerConditioning": SteadyDancerConditioning,
    "SteadyDancerSampler": SteadyDancerSampler,
    "SteadyDancerTurboSampler": SteadyDancerTurboSampler,
    "SteadyDancerContextOptions": SteadyDancerContextOptions,
    "SteadyDancerColourGuard": SteadyDancerColourGuard,
    "SteadyDancerApplyContextWindows": SteadyDancerApplyContextWindows,
    "SteadyDancerContextNoise": SteadyDancerContextNoise,
    "SteadyDancerOfficialSigmas": SteadyDancerOfficialSigmas,
    "SteadyDancerTurboSigmas": SteadyDancerTurboSigmas,
    "SteadyDancerGuider": SteadyDancerGuider,
    "SteadyDancerSamplerUniPC": SteadyDancerSamplerUniPC,
    "SteadyDancerSamplerRCM": SteadyDancerSamplerRCM,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "SteadyDancerPoseExtract": "SteadyDancer Pose Extract (DWPose)",
    "SteadyDancerPoseRetarget": "SteadyDancer Retarget Poses",
    "SteadyDancerResampleFrames": "SteadyDancer Resample Frames (fps)",
    "SteadyDancerModelLoader": "SteadyDancer Model Loader",
    "SteadyDancerLoraLoader": "SteadyDancer LoRA",
    "SteadyDancerMultiGPU": "SteadyDancer Multi-GPU",
    "SteadyDancerConditioning": "SteadyDancer Conditioning",
    "SteadyDancerSampler": "SteadyDancer Sampler (official)",
    "SteadyDancerTurboSampler": "SteadyDancer Turbo Sampler",
    "SteadyDancerContextOptions": "SteadyDancer Context Windows (long video)",
    "SteadyDancerColourGuard": "SteadyDancer Colour Guard (long video)",
    "SteadyDancerApplyContextWindows": "SteadyDancer Context Windows on Model (core samplers)",
    "SteadyDancerContextNoise": "SteadyDancer Noise (context windows)",
    "SteadyDancerOfficialSigmas": "SteadyDancer Sigmas (official)",
    "SteadyDancerTurboSigmas": "SteadyDancer Sigmas (turbo / rCM)",
    "SteadyDancerGuider": "SteadyDancer Guider (text + pose CFG)",
    "SteadyDancerSamplerUniPC": "SteadyDancer Sampler UniPC (official)",
    "SteadyDancerSamplerRCM": "SteadyDancer Sampler rCM (turbo)",
}
