"""Frame-rate resampling of a driving video so motion keeps its speed at the model's 16 fps."""
from __future__ import annotations

from . import comfy_bridge as cb
from .frames import CATEGORY, adjust_length, resample_indices, tooltip


class SteadyDancerResampleFrames:
    DESCRIPTION = ("Resamples a driving video's frames to the output frame rate (SteadyDancer / Wan make 16 fps), so "
                   "a 30 fps dance is not played back at half speed, and optionally trims to a 4n+1 frame count.")
    CATEGORY = f"{CATEGORY}/video"
    RETURN_TYPES = ("IMAGE", "FLOAT", "INT")
    RETURN_NAMES = ("images", "fps", "frame_count")
    OUTPUT_TOOLTIPS = ("The resampled frames.", "The output frame rate (for Create Video).", "Number of frames.")
    FUNCTION = "resample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", tooltip("Driving video frames (e.g. Get Video Components 'images').")),
                "source_fps": ("FLOAT", tooltip("Frame rate of the input (connect Get Video Components 'fps').",
                                                default=30.0, min=0.01, max=1000.0, step=0.01, forceInput=True)),
                "target_fps": ("FLOAT", tooltip("Output frame rate; SteadyDancer/Wan generate at 16 fps.",
                                                default=16.0, min=1.0, max=120.0, step=1.0)),
                "max_frames": ("INT", tooltip("Keep at most this many output frames (0 = all). 81 = 5 s at 16 fps, the "
                                              "length the model was trained on.", default=81, min=0, max=100000)),
                "make_4n_plus_1": ("BOOLEAN", tooltip("Trim to the nearest lower 4n+1 frame count the model needs.",
                                                      default=True)),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def resample(self, images, source_fps, target_fps, max_frames, make_4n_plus_1, unique_id=None):
        n_src = int(images.shape[0])
        if n_src == 0:
            raise ValueError("no frames to resample")
        idx = resample_indices(n_src, float(source_fps), float(target_fps), int(max_frames))
        if make_4n_plus_1:
            n, msg = adjust_length(len(idx))
            if msg:
                cb.node_message(unique_id, msg)
            idx = idx[:n]
        return (images[idx], float(target_fps), len(idx))
