"""Whole-body pose extraction over a batch of frames: detector -> top-down pose -> ``FramePose`` list."""
from __future__ import annotations

import logging

import numpy as np

from .detector import YoloxDetector
from .estimator import PoseEstimator
from .keypoints import MAX_MISSING_SHARE, FramePose, person_from_wholebody
from .models import DEFAULT_DETECTOR, DEFAULT_ESTIMATOR, find_model_file

log = logging.getLogger("steadydancer_turbo.dwpose")


def as_uint8_frames(frames):
    """[B,H,W,C] / [H,W,C] / list -> list of HxWx3 uint8 RGB arrays (float input: 0..1, truncated like
    comfyui_controlnet_aux's ``uint8(image*255)``; gray -> 3 channels; alpha dropped)."""
    if isinstance(frames, np.ndarray) and frames.ndim == 3:
        frames = frames[None]
    out = []
    for f in frames:
        f = np.asarray(f)
        if f.dtype != np.uint8:
            f = (np.clip(f.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
        if f.ndim == 2:
            f = f[..., None]
        if f.shape[2] == 1:
            f = np.repeat(f, 3, axis=2)
        elif f.shape[2] == 4:
            f = f[..., :3]
        out.append(np.ascontiguousarray(f))
    return out


def summarize_missing(missing: list, total: int) -> str:
    shown = ", ".join(str(i) for i in missing[:50]) + (" ..." if len(missing) > 50 else "")
    return (f"DWPose: no person detected in {len(missing)} of {total} frame(s): {shown} "
            f"(0-based frame numbers; these pose frames are black)")


class NoPersonError(ValueError):
    """Too many frames (or all) without a detected person: the pose video would be (partly) black."""

    __module__ = "steadydancer_turbo.dwpose.pipeline"  # readable in ComfyUI's error


def check_detections(missing: list, total: int, max_missing_share: float = MAX_MISSING_SHARE) -> None:
    """Raise :class:`NoPersonError` when no frame, or more than ``max_missing_share`` of the frames, has a person."""
    if total and len(missing) == total:
        raise NoPersonError(f"DWPose detected no person in any of the {total} frame(s): the pose frames would all be "
                            "black. Use a video/image where the whole person is visible and not tiny, and check the "
                            "detector file (yolox_l.onnx).")
    if total and len(missing) > max_missing_share * total:
        raise NoPersonError(f"{summarize_missing(missing, total)}; that is {len(missing) / total:.0%} of the frames, "
                            f"more than max_missing_share {max_missing_share:.0%}. Trim the video to where the person "
                            "is visible, or raise max_missing_share to accept black pose frames there.")


def _resolve(model, default, folders):
    """A model given as ONNX bytes passes through; a name/path is looked up (error names file and folder)."""
    if model is None:
        model = default
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    return find_model_file(str(model), folders)


class DWPose:
    """YOLOX detector + DWPose estimator. Sessions are created once per model file (see runtime.py).

    ``DWPose(detector_path, estimator_path, providers=None)``; ``providers``: None/"auto" (CUDA when
    ONNX Runtime offers it, else CPU), "cpu", "cuda", "tensorrt" or an ONNX Runtime provider list.
    """

    def __init__(self, detector=None, estimator=None, providers=None, threads=None, folders=None,
                 det_batch: int = 8, pose_batch: int = 32):
        detector = _resolve(detector, DEFAULT_DETECTOR, folders)
        estimator = _resolve(estimator, DEFAULT_ESTIMATOR, folders)
        self.detector = YoloxDetector(detector, providers, threads, max_batch=det_batch)
        self.estimator = PoseEstimator(estimator, providers, threads, max_batch=pose_batch)
        self.last_missing: list = []

    @property
    def provider_warnings(self) -> list:
        """Why a requested GPU provider is not used, per model (empty when it is or none was requested)."""
        out = []
        for m in (self.detector, self.estimator):
            if m.info.warning and m.info.warning not in out:
                out.append(m.info.warning)
        return out

    @property
    def providers(self) -> dict:
        """The provider each model really runs on, e.g. {"detector": "CUDAExecutionProvider", "pose": ...}."""
        return {"detector": self.detector.provider, "pose": self.estimator.provider}

    def __call__(self, frames, all_people: bool = False, chunk: int = 16, warn_missing: bool = True) -> list:
        """Frames (RGB uint8 [B,H,W,3] or 0..1 floats) -> one ``FramePose`` per frame.

        Only the most significant person (highest detector score) is kept unless ``all_people``.
        Frames with no person give ``FramePose`` with ``people == []`` and one summary warning (logged).
        """
        frames = as_uint8_frames(frames)
        results: list = []
        for start in range(0, len(frames), max(1, chunk)):
            part = frames[start:start + chunk]
            dets = self.detector(part)
            items, owners = [], []
            for i, (boxes, scores) in enumerate(dets):
                n = len(boxes) if all_people else min(1, len(boxes))
                for k in range(n):
                    items.append((part[i], boxes[k]))
                    owners.append((i, float(scores[k])))
            kpts, vals = self.estimator(items)
            poses = [FramePose(f.shape[1], f.shape[0], []) for f in part]
            for (i, sc), kp, v, (_, box) in zip(owners, kpts, vals, items):
                f = part[i]
                poses[i].people.append(person_from_wholebody(kp, v, f.shape[1], f.shape[0], sc, box))
            results.extend(poses)
        self.last_missing = [i for i, p in enumerate(results) if not p.people]
        if self.last_missing and warn_missing:
            msg = summarize_missing(self.last_missing, len(results))
            log.warning(msg)
        return results


STEADYDANCER_THRESHOLD = 0.35  # keypoint score threshold of SteadyDancer's preprocessing (DW/CNA use 0.3)


def steadydancer_pose_frames(ref, driving, width: int, height: int, seed: int = 0, align: bool = True,
                             threshold: float = STEADYDANCER_THRESHOLD, swap_rb: bool = False,
                             as_float: bool = False):
    """SteadyDancer conditioning frames from extracted poses.

    ``ref``: the reference image's ``FramePose`` (extracted at the generation size, as the official
    preprocessing does); ``driving``: the video's ``FramePose`` list. Returns ``(positive, negative,
    aligned_poses, negative_poses)``: frames [F, height, width, 3] drawn with body + hands, no face, at
    twice the size and resized (PIL bicubic), the negative ones with per-frame random aspect/scale from ``seed``.
    ``align=False`` skips the retargeting (driving poses drawn as extracted).
    """
    from .draw import render_poses
    from .retarget import align_poses, negative_poses

    aligned = align_poses(ref, driving, threshold) if align else list(driving)
    negative = negative_poses(aligned, seed=seed, threshold=threshold)
    kw = dict(body=True, hands=True, face=False, supersample=2, threshold=threshold, swap_rb=swap_rb,
              as_float=as_float)
    return (render_poses(aligned, width, height, **kw), render_poses(negative, width, height, **kw),
            aligned, negative)
