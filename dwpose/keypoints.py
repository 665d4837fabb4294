"""Pose containers, COCO-WholeBody 133 -> OpenPose layout, and the POSE_KEYPOINT dict ComfyUI nodes exchange.

Coordinates inside ``Person`` are normalized to the frame (x / width, y / height); the third column is
the model's real confidence. A point is *present* when its confidence >= the threshold (0.3, as
comfyui_controlnet_aux; SteadyDancer's preprocessing uses 0.35) and its coordinates are finite.

OpenPose conversion (DWPose / comfyui_controlnet_aux / SteadyDancer ``wholebody.py``): neck = mean of the
COCO shoulders 5 and 6, inserted at index 17 of the 133 points; then the first 18 are permuted with
``OPENPOSE_FROM_COCO`` (OpenPose index i takes COCO index ``OPENPOSE_FROM_COCO[i]``, 17 = the neck). Of
the resulting 134 points, 18-23 (feet) are dropped, 24-91 are the 68 face points, 92-112 the left hand
and 113-133 the right hand. The neck's confidence here is min(shoulder confidences) (the reference code
stores a 1/0 flag "both shoulders > 0.3"; the min keeps it present exactly when both shoulders are).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

KEYPOINT_THRESHOLD = 0.3
NECK_SHOULDER_THRESHOLD = 0.3  # the neck flag's own (strict) shoulder test in DWPose's wholebody.py
MAX_MISSING_SHARE = 0.25  # share of frames allowed without a detected person before pose extraction fails

# OpenPose-18 index -> COCO-WholeBody index (17 denotes the inserted neck)
OPENPOSE_FROM_COCO = [0, 17, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
OPENPOSE_BODY_NAMES = ["Nose", "Neck", "RShoulder", "RElbow", "RWrist", "LShoulder", "LElbow", "LWrist",
                       "RHip", "RKnee", "RAnkle", "LHip", "LKnee", "LAnkle", "REye", "LEye", "REar", "LEar"]
# slices into the 133 COCO-WholeBody keypoints (before the neck insertion)
COCO_FACE = slice(23, 91)
COCO_LEFT_HAND = slice(91, 112)
COCO_RIGHT_HAND = slice(112, 133)


def _empty(n):
    return np.zeros((n, 3), dtype=np.float64)


@dataclass
class Person:
    """One person: OpenPose-18 body, 21-point hands, 68-point face; each row (x, y, confidence), x,y in 0..1."""

    body: np.ndarray = field(default_factory=lambda: _empty(18))
    left_hand: np.ndarray = field(default_factory=lambda: _empty(21))
    right_hand: np.ndarray = field(default_factory=lambda: _empty(21))
    face: np.ndarray = field(default_factory=lambda: _empty(68))
    score: float = 0.0  # detector score
    bbox: tuple | None = None  # xyxy in frame pixels

    def parts(self):
        return {"body": self.body, "left_hand": self.left_hand, "right_hand": self.right_hand, "face": self.face}

    def copy(self) -> "Person":
        return Person(self.body.copy(), self.left_hand.copy(), self.right_hand.copy(), self.face.copy(),
                      self.score, self.bbox)


@dataclass
class FramePose:
    """All people found in one frame (best first) and the frame size in pixels."""

    width: int
    height: int
    people: list = field(default_factory=list)

    def copy(self) -> "FramePose":
        return FramePose(self.width, self.height, [p.copy() for p in self.people])


def present(points: np.ndarray, threshold: float = KEYPOINT_THRESHOLD) -> np.ndarray:
    """Boolean mask of points with confidence >= threshold and finite coordinates."""
    pts = np.asarray(points, dtype=np.float64)
    return (pts[..., 2] >= threshold) & np.isfinite(pts[..., :2]).all(-1) & np.isfinite(pts[..., 2])


def wholebody_to_openpose(keypoints: np.ndarray, scores: np.ndarray):
    """133 keypoints (..., 133, 2) + scores (..., 133) -> 134 points (..., 134, 3) in OpenPose order."""
    kp = np.concatenate([np.asarray(keypoints, np.float64), np.asarray(scores, np.float64)[..., None]], -1)
    neck = kp[..., [5, 6], :].mean(-2)
    # DWPose's wholebody.py (and SteadyDancer's copy of it): the neck's score is a flag, 1 when both shoulders score
    # > 0.3 (strictly; hard-coded there), else 0. So the neck passes any later threshold below 1 (SteadyDancer's 0.35
    # too) when both shoulders are in (0.3, 0.35], although the shoulders themselves are then dropped.
    neck[..., 2] = ((kp[..., 5, 2] > NECK_SHOULDER_THRESHOLD) & (kp[..., 6, 2] > NECK_SHOULDER_THRESHOLD)).astype(np.float64)
    full = np.insert(kp, 17, neck, axis=-2)
    full[..., :18, :] = full[..., OPENPOSE_FROM_COCO, :]
    return full


def person_from_wholebody(keypoints, scores, width: int, height: int, score: float = 0.0, bbox=None) -> Person:
    """One person's 133 keypoints (frame pixels) and scores -> a normalized ``Person``."""
    full = wholebody_to_openpose(keypoints, scores)
    full[:, 0] /= float(width)
    full[:, 1] /= float(height)
    return Person(body=full[:18].copy(), left_hand=full[92:113].copy(), right_hand=full[113:134].copy(),
                  face=full[24:92].copy(), score=float(score),
                  bbox=None if bbox is None else tuple(float(v) for v in bbox))


def _flat(points, threshold, scale_xy, binary):
    ok = present(points, threshold)
    out = []
    for (x, y, c), keep in zip(np.asarray(points, np.float64), ok):
        if keep:
            out += [float(x * scale_xy[0]), float(y * scale_xy[1]), 1.0 if binary else float(c)]
        else:
            out += [0.0, 0.0, 0.0]
    return out, bool(ok.any())


def to_pose_keypoint(frame: FramePose, include_body=True, include_hands=True, include_face=True,
                     normalized: bool = True, binary_confidence: bool = False,
                     threshold: float = KEYPOINT_THRESHOLD) -> dict:
    """``FramePose`` -> one POSE_KEYPOINT frame dict (the OpenPose JSON layout comfyui_controlnet_aux emits).

    ``{"people": [{"pose_keypoints_2d": 18*3, "face_keypoints_2d": 70*3 | None,
    "hand_left_keypoints_2d": 21*3 | None, "hand_right_keypoints_2d": 21*3 | None}], "canvas_width": W,
    "canvas_height": H}``. A missing point is ``0, 0, 0``; a hand/face part that is disabled or has no
    present point is ``None``; a disabled body is 54 zeros (all as comfyui_controlnet_aux). The face is
    OpenPose's 70 points: the 68 landmarks plus the body's eyes (OpenPose 14, 15), as comfyui_controlnet_aux.

    ``normalized=True`` writes x, y in 0..1 (this pack's convention); ``False`` writes frame pixels like
    comfyui_controlnet_aux. ``binary_confidence=True`` writes 1.0 for present points like
    comfyui_controlnet_aux, whose JSON reader drops every point with c < 1.0; the default writes the real
    confidence.
    """
    s = (1.0, 1.0) if normalized else (float(frame.width), float(frame.height))
    people = []
    for p in frame.people:
        body, _ = _flat(p.body if include_body else _empty(18), threshold, s, binary_confidence)
        entry = {"pose_keypoints_2d": body}
        face = None
        if include_face:
            face, anyf = _flat(np.concatenate([p.face, p.body[[14, 15]]]), threshold, s, binary_confidence)
            face = face if present(p.face, threshold).any() else None
        entry["face_keypoints_2d"] = face
        for key, hand in (("hand_left_keypoints_2d", p.left_hand), ("hand_right_keypoints_2d", p.right_hand)):
            vals, anyh = _flat(hand, threshold, s, binary_confidence) if include_hands else (None, False)
            entry[key] = vals if anyh else None
        people.append(entry)
    return {"people": people, "canvas_height": int(frame.height), "canvas_width": int(frame.width)}


def from_pose_keypoint(d: dict) -> FramePose:
    """POSE_KEYPOINT frame dict -> ``FramePose`` (pixel or normalized coordinates; detected per person).

    Coordinates are taken as pixels when any present coordinate exceeds 1 (comfyui_controlnet_aux output),
    else as normalized. Missing parts become zero-confidence arrays.
    """
    w, h = int(d.get("canvas_width", 1) or 1), int(d.get("canvas_height", 1) or 1)
    frame = FramePose(w, h, [])

    def arr(vals, n):
        if not vals:
            return _empty(n)
        a = np.asarray(vals, dtype=np.float64).reshape(-1, 3)[:n]
        if len(a) < n:
            a = np.concatenate([a, _empty(n - len(a))])
        return a

    for p in d.get("people", []) or []:
        parts = [arr(p.get("pose_keypoints_2d"), 18), arr(p.get("hand_left_keypoints_2d"), 21),
                 arr(p.get("hand_right_keypoints_2d"), 21), arr(p.get("face_keypoints_2d"), 68)]
        coords = np.concatenate([q[q[:, 2] > 0, :2] for q in parts]) if parts else np.zeros((0, 2))
        if coords.size and np.nanmax(np.abs(coords)) > 1.0 + 1e-6:
            for q in parts:
                q[:, 0] /= w
                q[:, 1] /= h
        frame.people.append(Person(*parts))
    return frame
