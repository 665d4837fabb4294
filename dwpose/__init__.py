"""DWPose core: whole-body pose extraction (YOLOX + DWPose on ONNX Runtime), OpenPose rendering,
SteadyDancer pose retargeting and negative poses. Plain NumPy / OpenCV / ONNX Runtime; never imports ComfyUI.

Typical use from the node layer (IMAGE tensors [B,H,W,3] float 0..1 -> ``(image*255).byte().numpy()``
or pass the float array, which is truncated the same way)::

    from ..dwpose import DWPose, find_model_file, render_poses, to_pose_keypoint, align_poses, negative_poses

    det = find_model_file("yolox_l.onnx", folders)          # folders: ComfyUI "dwpose" folder(s), then
    est = find_model_file("dw-ll_ucoco_384.onnx", folders)   # comfyui_controlnet_aux ckpts; error names file+folder
    dw = DWPose(det, est, providers="auto")                  # sessions cached per file; CUDA else CPU, logged once
    dw.providers                                             # {"detector": "CUDAExecutionProvider", "pose": ...}
    poses = dw(frames_uint8)                                 # list[FramePose], one per frame; no-person frames
                                                             # have people == [] (+ one summary log warning)
    ref = dw(ref_image_uint8[None])[0]

    aligned = align_poses(ref, poses)                        # SteadyDancer retarget; FramePose sized like ref
    negative = negative_poses(aligned, seed=seed)            # per-frame aspect U(0.6,1.4), scale U(0.7,1.3)

    # SteadyDancer conditioning frames: body + hands, no face, drawn at 2x then resized to (W, H):
    pos = render_poses(aligned, W, H, body=True, hands=True, face=False, supersample=2)   # [F,H,W,3] uint8
    neg = render_poses(negative, W, H, face=False, supersample=2, as_float=True)          # float32 0..1
    json_frames = [to_pose_keypoint(p) for p in poses]       # POSE_KEYPOINT list (one dict per frame)

Public API
----------
- ``DWPose(detector, estimator, providers=None, threads=None, folders=None, det_batch=8, pose_batch=32)``:
  callable on frames -> ``list[FramePose]``; ``all_people=True`` keeps everyone (best detector score first);
  ``.providers``; ``.last_missing`` (frame indices without a person). Model arguments: path, file name
  (looked up in ``folders``) or serialized ONNX bytes.
- ``YoloxDetector``, ``PoseEstimator``: the two stages alone (input size, batch mode and dtype read from
  the model; a dynamic batch axis is used for batching, a fixed one is padded).
- ``FramePose(width, height, people)``, ``Person(body[18,3], left_hand[21,3], right_hand[21,3], face[68,3],
  score, bbox)``: x, y normalized to the frame, third column the model's real confidence;
  ``present(points, threshold)``; ``KEYPOINT_THRESHOLD`` = 0.3 (SteadyDancer's preprocessing uses 0.35).
- ``to_pose_keypoint(frame, include_body, include_hands, include_face, normalized=True,
  binary_confidence=False)`` / ``from_pose_keypoint(dict)``: the OpenPose JSON layout of comfyui_controlnet_aux
  (``people`` / ``pose_keypoints_2d`` / ``face_keypoints_2d`` (70) / ``hand_left_keypoints_2d`` /
  ``hand_right_keypoints_2d`` / ``canvas_width`` / ``canvas_height``). comfyui_controlnet_aux itself writes
  pixels and c = 1.0 (its reader drops points with c < 1): pass ``normalized=False, binary_confidence=True``
  for a strict copy of its output.
- ``draw_pose(pose, width, height, body, hands, face, threshold, swap_rb)`` -> HxWx3 uint8;
  ``render_poses(poses, width, height, body, hands, face, supersample, resize, swap_rb, as_float, threads,
  progress)``
  -> [F,H,W,3]. Standard OpenPose colours / widths; ``swap_rb=True`` reproduces SteadyDancer's R/B-swapped files.
- ``compute_alignment(ref, driving)`` -> ``Alignment`` (ratios, offset); ``align_poses(ref, driving)``;
  ``negative_poses(poses, seed)``; ``negative_factors(n, seed)``.
- ``steadydancer_pose_frames(ref, driving, width, height, seed=0, align=True, threshold=0.35, swap_rb=False,
  as_float=False)`` -> (positive frames, negative frames, aligned poses, negative poses): retarget + negative
  poses + body/hands drawing at 2x then resize, in one call (``STEADYDANCER_THRESHOLD`` = 0.35).
- ``find_model_file(name, folders, target_folder=None)`` (raises ``ModelNotFoundError``); ``MODEL_FILES``
  (names, URLs), ``DEFAULT_DETECTOR``, ``DEFAULT_ESTIMATOR``.
- Runtime: ``get_session``, ``default_providers``, ``available_providers``, ``session_creations``,
  ``release_sessions`` (of given model files), ``clear_session_cache``. A requested GPU provider that the session does not get is logged (one
  warning, ``steadydancer_turbo.dwpose`` logger) saying why (missing CUDA/cuDNN library, CPU-only package, both packages installed).
"""
from .detector import YoloxDetector, anchor_grid, decode_people, letterbox, nms
from .draw import COLORS, HAND_EDGE_COLORS, LIMB_COLORS, LIMBS, draw_pose, render_poses, resize_frame
from .estimator import PoseEstimator, bbox_center_scale, crop_matrix, crop_person, fix_aspect, input_to_image, \
    normalize_crops, simcc_decode, warp_person
from .keypoints import KEYPOINT_THRESHOLD, OPENPOSE_FROM_COCO, FramePose, Person, from_pose_keypoint, \
    person_from_wholebody, present, to_pose_keypoint, wholebody_to_openpose
from .models import DEFAULT_DETECTOR, DEFAULT_ESTIMATOR, MODEL_FILES, ModelNotFoundError, find_model_file
from .pipeline import STEADYDANCER_THRESHOLD, DWPose, as_uint8_frames, steadydancer_pose_frames
from .retarget import Alignment, align_person, align_poses, compute_alignment, negative_factors, negative_poses
from .runtime import (available_providers, clear_session_cache, default_providers, get_session, release_sessions,
                      session_creations)

__all__ = [
    "DWPose", "YoloxDetector", "PoseEstimator", "FramePose", "Person", "present", "KEYPOINT_THRESHOLD",
    "to_pose_keypoint", "from_pose_keypoint", "person_from_wholebody", "wholebody_to_openpose",
    "OPENPOSE_FROM_COCO", "draw_pose", "render_poses", "resize_frame", "COLORS", "LIMB_COLORS", "LIMBS",
    "HAND_EDGE_COLORS", "compute_alignment", "align_poses", "align_person", "Alignment", "negative_poses",
    "negative_factors", "find_model_file", "ModelNotFoundError", "MODEL_FILES", "DEFAULT_DETECTOR",
    "DEFAULT_ESTIMATOR", "get_session", "default_providers", "available_providers", "session_creations",
    "clear_session_cache", "release_sessions", "letterbox", "anchor_grid", "decode_people", "nms", "bbox_center_scale",
    "fix_aspect", "crop_matrix", "crop_person", "input_to_image", "simcc_decode", "as_uint8_frames",
    "steadydancer_pose_frames", "STEADYDANCER_THRESHOLD", "warp_person", "normalize_crops",
]
