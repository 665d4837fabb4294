"""ComfyUI V1 node classes (thin adapters over the core packages). Ids are prefixed ``SteadyDancer``.
May import: the core (steadydancer/, turbo/, dwpose/); ComfyUI only through comfy_bridge.py.
"""
from . import comfy_bridge
from .conditioning_nodes import SteadyDancerConditioning
from .context_nodes import SteadyDancerColourGuard, SteadyDancerContextOptions
from .model_nodes import SteadyDancerLoraLoader, SteadyDancerModelLoader
from .multigpu_nodes import SteadyDancerMultiGPU
from .pose_nodes import SteadyDancerPoseExtract, SteadyDancerPoseRetarget
from .sampler_nodes import SteadyDancerSampler, SteadyDancerTurboSampler
from .video_nodes import SteadyDancerResampleFrames

comfy_bridge.register_model_folders()

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
}
