"""DWPose extraction and SteadyDancer pose retargeting nodes.

POSE_KEYPOINT is written like comfyui_controlnet_aux's DWPose node (pixel coordinates of the source frame,
confidence 1.0 for present points, canvas_width/height), so its consumers (OpenPose editors, pose savers) work
on ours and ours read theirs.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..dwpose.keypoints import MAX_MISSING_SHARE
from . import comfy_bridge as cb
from .frames import CATEGORY, FIT_MODES, POSE_TYPE, adjust_size, fit_geometry, resize_images, tooltip

log = logging.getLogger("steadydancer_turbo")

PROVIDERS = ["auto", "cuda", "cpu"]
CHUNK = 8


def _model_choices(kind: str) -> list[str]:
    """Known DWPose file names of this kind (always listed: a missing file gives a download hint when run)
    plus any other .onnx found in the registered dwpose folders."""
    try:
        from ..dwpose.models import MODEL_FILES  # the one list of known file names
        known = [n for n, f in MODEL_FILES.items() if f.kind == kind]
    except Exception as e:  # noqa: BLE001 - dwpose's dependencies missing: the node says so when run
        log.warning("SteadyDancer: DWPose core not importable (%s); listing only the .onnx files found", e)
        known = []
    found = []
    for name in cb.get_filename_list(cb.DWPOSE_FOLDER):
        base = name.replace("\\", "/").split("/")[-1]
        low = base.lower()
        ok = "yolo" in low if kind == "detector" else any(t in low for t in ("dw", "pose", "rtm", "ucoco"))
        if ok and base not in known and base not in found:
            found.append(base)
    return known + found


_PIPELINES: dict = {}


def _pipeline(detector: str, estimator: str, providers: str):
    """The DWPose pipeline for these files, cached. The files are looked up on every call (a few stat calls):
    a file deleted or moved since the last run gives the ModelNotFoundError with its download link instead of
    a run from the session still cached for it."""
    from ..dwpose.models import find_model_file
    from ..dwpose.pipeline import DWPose
    folders = cb.get_folder_paths(cb.DWPOSE_FOLDER)
    det, est = find_model_file(detector, folders), find_model_file(estimator, folders)
    key = (det, est, providers)
    if key not in _PIPELINES:
        # one pipeline at a time: the runtime caches sessions too, so drop the replaced pipeline's sessions there
        from ..dwpose.runtime import release_sessions
        for old_det, old_est, _ in _PIPELINES:
            release_sessions((old_det, old_est))
        _PIPELINES.clear()
        _PIPELINES[key] = DWPose(det, est, providers=None if providers == "auto" else providers)
    return _PIPELINES[key]


def _to_image(frames_uint8_or_float) -> torch.Tensor:
    """Drawn frames -> IMAGE [F, H, W, 3] float32 0..1. uint8 frames are converted in one pass with one float32
    allocation (``float()`` then an in-place ``/ 255``: the same float32 division as ``astype(float32) / 255``,
    bit for bit, without numpy's two full-video temporaries); float32 frames are wrapped without a copy."""
    a = np.asarray(frames_uint8_or_float)
    if a.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(a)).to(torch.float32).div_(255.0)
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


class SteadyDancerPoseExtract:
    DESCRIPTION = ("DWPose whole-body pose extraction (YOLOX person detector + DWPose estimator, ONNX Runtime) for "
                   "an image or video frame batch. Only the most prominent person per frame is kept.")
    CATEGORY = f"{CATEGORY}/pose"
    RETURN_TYPES = (POSE_TYPE, "IMAGE")
    RETURN_NAMES = ("poses", "pose_image")
    OUTPUT_TOOLTIPS = ("Keypoints per frame (OpenPose JSON layout, like comfyui_controlnet_aux).",
                       "The poses drawn on black (OpenPose colors).")
    FUNCTION = "extract"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", tooltip("Image or video frames to detect poses in.")),
                "detector": (_model_choices("detector"), tooltip(
                    "Person detector in models/dwpose (yolox_l.onnx from yzd-v/DWPose). comfyui_controlnet_aux "
                    "downloads are found too.")),
                "estimator": (_model_choices("pose"), tooltip(
                    "Whole-body pose model in models/dwpose: dw-ll_ucoco_384.onnx (official, 288x384) or "
                    "dw-ll_ucoco.onnx (smaller, 192x256).")),
                "body": ("BOOLEAN", tooltip("Detect and draw the 18 body points.", default=True)),
                "hands": ("BOOLEAN", tooltip("Detect and draw 2x21 hand points (SteadyDancer was trained with hands).", default=True)),
                "face": ("BOOLEAN", tooltip("Detect and draw face points (SteadyDancer was NOT trained with faces; keep off).", default=False)),
                "canvas_width": ("INT", tooltip("Width of the drawn pose image; 0 = the input's width.", default=0, min=0, max=8192, step=8)),
                "canvas_height": ("INT", tooltip("Height of the drawn pose image; 0 = the input's height.", default=0, min=0, max=8192, step=8)),
                "providers": (PROVIDERS, tooltip("ONNX Runtime device: auto = CUDA when onnxruntime-gpu can use it, else CPU.", default="auto")),
            },
            "optional": {
                "max_missing_share": ("FLOAT", tooltip(
                    "Fail when more than this share of the frames has no detected person (their pose frames would "
                    "be black). No person in any frame always fails. 1.0 = accept any number of empty frames.",
                    default=MAX_MISSING_SHARE, min=0.0, max=1.0, step=0.01)),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def extract(self, images, detector, estimator, body, hands, face, canvas_width, canvas_height, providers,
                max_missing_share=MAX_MISSING_SHARE, unique_id=None):
        from ..dwpose import draw, keypoints
        from ..dwpose.pipeline import as_uint8_frames, check_detections, summarize_missing

        dw = _pipeline(detector, estimator, providers)
        for warning in dw.provider_warnings:  # a requested GPU provider fell back to the CPU: say it on the node
            cb.node_message(unique_id, warning)
        frames = as_uint8_frames(images.cpu().numpy())
        n = len(frames)
        h, w = frames[0].shape[:2]
        cw, ch = int(canvas_width) or w, int(canvas_height) or h
        pbar = cb.Progress(n)
        poses = []
        for start in range(0, n, CHUNK):
            cb.check_interrupt()
            poses.extend(dw(frames[start:start + CHUNK], warn_missing=False))
            pbar.update_absolute(len(poses))
        missing = [i for i, p in enumerate(poses) if not p.people]
        check_detections(missing, n, float(max_missing_share))
        if missing:
            cb.node_message(unique_id, summarize_missing(missing, n))
        # normalized coordinates with the real confidences (the Retarget node applies SteadyDancer's 0.35 threshold)
        out = [keypoints.to_pose_keypoint(p, body, hands, face) for p in poses]
        img = draw.render_poses(poses, cw, ch, body=body, hands=hands, face=face)  # uint8: _to_image converts
        return (out, _to_image(img))


def refit_poses(frames, W: int, H: int, fit: str):
    """Normalized poses of a reference-sized canvas -> the same poses on a W x H canvas after ``fit``."""
    from ..dwpose import keypoints
    out = []
    for f in frames:
        if f is None:
            out.append(None)
            continue
        nw, nh, ox, oy = fit_geometry(f.width, f.height, W, H, fit)
        people = []
        for p in f.people:
            q = p.copy()
            for arr in (q.body, q.left_hand, q.right_hand, q.face):
                arr[:, 0] = (arr[:, 0] * nw + ox) / W
                arr[:, 1] = (arr[:, 1] * nh + oy) / H
            people.append(q)
        out.append(keypoints.FramePose(W, H, people))
    return out


def draw_pose_videos(aligned, negative, W: int, H: int, hands: bool, face: bool, swap_rb: bool, threshold: float):
    """The positive and negative pose videos as IMAGE tensors, drawn as SteadyDancer does (body + hands at twice
    the size, PIL bicubic down; ``dwpose.draw.render_poses``, frames on all CPU threads, float32 written directly).
    One progress bar over both videos, with ComfyUI's interrupt checked every CHUNK frames."""
    from ..dwpose import draw
    n = len(aligned)
    pbar = cb.Progress(n + len(negative))
    videos = []
    for offset, poses in ((0, aligned), (n, negative)):
        def progress(done, offset=offset):
            pbar.update_absolute(offset + done)
            cb.check_interrupt()
        cb.check_interrupt()
        img = draw.render_poses(poses, W, H, body=True, hands=hands, face=face, supersample=2, swap_rb=swap_rb,
                                threshold=threshold, as_float=True, progress=progress, chunk=CHUNK)
        videos.append(_to_image(img))  # float32 0..1 already: wrapped, not copied
    return tuple(videos)


class SteadyDancerPoseRetarget:
    DESCRIPTION = ("Prepares the reference image and the pose video at the generation size: retargets the driving "
                   "poses onto the reference person's body (SteadyDancer's official alignment: bone-length ratios "
                   "from the first driving frame, neck anchored to the reference), fits image and poses to width x "
                   "height the same way, and draws the randomly rescaled negative poses used by pose guidance.")
    CATEGORY = f"{CATEGORY}/pose"
    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE", POSE_TYPE)
    RETURN_NAMES = ("reference_image", "pose_frames", "negative_pose_frames", "aligned_poses")
    OUTPUT_TOOLTIPS = ("The reference image fitted to width x height (feed CLIP Vision Encode and the conditioning).",
                       "Aligned pose frames at width x height (feed the conditioning; first frame to CLIP Vision).",
                       "Negative pose frames for pose guidance.",
                       "Aligned keypoints (normalized to the width x height canvas, real confidences).")
    FUNCTION = "retarget"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "driving_poses": (POSE_TYPE, tooltip("Poses of the driving video (Pose Extract on the video frames).")),
                "reference_pose": (POSE_TYPE, tooltip("Pose of the reference image (Pose Extract on the image; first frame used).")),
                "reference_image": ("IMAGE", tooltip("The reference image the pose was extracted from.")),
                "width": ("INT", tooltip("Generation width; a multiple of 16 (others are rounded).", default=480, min=16, max=4096, step=16)),
                "height": ("INT", tooltip("Generation height; a multiple of 16 (others are rounded).", default=832, min=16, max=4096, step=16)),
                "fit": (FIT_MODES, tooltip("How the reference (and with it the poses) is fitted to width x height: crop (keep "
                                           "aspect, center-crop), pad (keep aspect, black bars), stretch.", default="crop")),
                "align": ("BOOLEAN", tooltip("Retarget to the reference body. Off = use the driving poses as they are "
                                             "(only placed on the reference canvas).", default=True)),
                "hands": ("BOOLEAN", tooltip("Draw hands (official: yes).", default=True)),
                "face": ("BOOLEAN", tooltip("Draw faces (official: no; the model was not trained with them).", default=False)),
                "colors": (["steadydancer", "openpose"], tooltip(
                    "steadydancer: red and blue swapped, as the official preprocessing writes its pose frames; "
                    "openpose: standard ControlNet colors (as kijai's workflows draw).", default="steadydancer")),
                "negative_seed": ("INT", tooltip("Seed of the random per-frame rescaling of the negative poses.",
                                                 default=0, min=0, max=0xFFFFFFFF, control_after_generate=False)),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def retarget(self, driving_poses, reference_pose, reference_image, width, height, fit, align, hands, face, colors,
                 negative_seed, unique_id=None):
        from ..dwpose import keypoints, retarget
        from ..dwpose.pipeline import STEADYDANCER_THRESHOLD as THRESHOLD  # official preprocessing's 0.35

        if not driving_poses:
            raise ValueError("driving_poses is empty: no frames came from the pose extractor")
        ref_list = reference_pose if isinstance(reference_pose, list) else [reference_pose]
        if not ref_list:
            raise ValueError("reference_pose is empty")
        ref = keypoints.from_pose_keypoint(ref_list[0])
        if not ref.people:
            raise ValueError("no person was detected in the reference image; use a clearer full-body photo")
        W, H, msg = adjust_size(width, height)
        if msg:
            cb.node_message(unique_id, msg)
        rh, rw = int(reference_image.shape[1]), int(reference_image.shape[2])
        if abs(rw / rh - ref.width / ref.height) > 0.02:
            cb.node_message(unique_id, f"reference_image is {rw}x{rh} but reference_pose came from a "
                                       f"{ref.width}x{ref.height} image; use the same image for both.")
        drv = [keypoints.from_pose_keypoint(d) for d in driving_poses]
        if not any(f.people for f in drv):
            raise ValueError(f"no person in any of the {len(drv)} driving pose frames: the pose video would be black")
        cb.check_interrupt()
        if align:
            aligned = retarget.align_poses(ref, drv, threshold=THRESHOLD)
        else:
            aligned = [keypoints.FramePose(ref.width, ref.height, [p.copy() for p in f.people[:1]]) for f in drv]
        neg = retarget.negative_poses(aligned, seed=int(negative_seed), threshold=THRESHOLD)
        aligned, neg = refit_poses(aligned, W, H, fit), refit_poses(neg, W, H, fit)
        pos_img, neg_img = draw_pose_videos(aligned, neg, W, H, hands, face, swap_rb=colors == "steadydancer",
                                            threshold=THRESHOLD)
        out = [keypoints.to_pose_keypoint(p, True, hands, face, threshold=THRESHOLD) for p in aligned]
        ref_img = resize_images(reference_image[:1], W, H, fit)
        return (ref_img, pos_img, neg_img, out)
