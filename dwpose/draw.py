"""OpenPose stick-figure rendering (the ControlNet / DWPose / comfyui_controlnet_aux look).

Colours are RGB on the canvas (as ComfyUI shows them):
- body: 17 limbs, each a filled ``cv2.ellipse2Poly`` of half-width 4 px around the segment in 60 % of
  the limb colour (floored: 255 -> 153, 170 -> 102, 85 -> 51), then every present joint as a filled
  circle of radius 4 in the full joint colour; all people's limbs first, then joints (DWPose order);
- hands: 20 edges as ``cv2.line`` thickness 2, edge e in HSV(e/20, 1, 1) * 255, then each point as a
  filled blue (0, 0, 255) circle of radius 4; an edge/point is skipped when a pixel coordinate is <= 0.01;
- face: OpenPose's 70 face points as comfyui_controlnet_aux builds them: DWPose's 68 landmarks plus the body's two
  eye points (body 14, 15), each a filled white circle of radius 3 (same 0.01 rule); nothing (eyes included) when
  no landmark is present.
SteadyDancer's own preprocessing writes its frames with red and blue swapped (``swap_rb=True``
reproduces that); the pose frames it conditions on are drawn at twice the generation size without the
face, then resized (PIL bicubic) to the generation size: ``render_poses(..., supersample=2)``.
"""
from __future__ import annotations

import colorsys
import math

import cv2
import numpy as np

from .keypoints import KEYPOINT_THRESHOLD, FramePose, Person, present

# OpenPose-18 limbs (0-based) and the 18 standard colours (RGB)
LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
         (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]
COLORS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
          (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
          (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]
LIMB_COLORS = [tuple(int(c * 0.6) for c in COLORS[i]) for i in range(17)]
HAND_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11),
              (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]
# float colours as the reference passes them to cv2 (OpenCV rounds them half-to-even)
HAND_EDGE_COLORS = [tuple(v * 255.0 for v in colorsys.hsv_to_rgb(e / 20.0, 1.0, 1.0)) for e in range(20)]
HAND_POINT_COLOR = (0, 0, 255)
FACE_COLOR = (255, 255, 255)
STICK_WIDTH = 4
JOINT_RADIUS = 4
HAND_LINE_WIDTH = 2
HAND_POINT_RADIUS = 4
FACE_RADIUS = 3
EPS = 0.01


def _people(pose):
    if isinstance(pose, FramePose):
        return pose.people
    if isinstance(pose, Person):
        return [pose]
    return list(pose or [])


def _sane(px, py, w, h):
    lim = 8 * max(w, h)
    return abs(px) < lim and abs(py) < lim


def draw_pose(pose, width: int, height: int, body: bool = True, hands: bool = True, face: bool = False,
              threshold: float = KEYPOINT_THRESHOLD, swap_rb: bool = False,
              stick_width: int = STICK_WIDTH) -> np.ndarray:
    """Draw a ``FramePose`` / ``Person`` / list of people on a black ``height`` x ``width`` RGB uint8 canvas."""
    canvas = np.zeros((int(height), int(width), 3), dtype=np.uint8)
    people = _people(pose)
    W, H = float(width), float(height)
    if body:
        for p in people:
            b = np.asarray(p.body, np.float64)
            ok = present(b, threshold)
            for i, (a, c) in enumerate(LIMBS):
                if not (ok[a] and ok[c]):
                    continue
                xa, ya, xc, yc = b[a, 0] * W, b[a, 1] * H, b[c, 0] * W, b[c, 1] * H
                if not (_sane(xa, ya, W, H) and _sane(xc, yc, W, H)):
                    continue
                length = math.hypot(xa - xc, ya - yc)
                angle = math.degrees(math.atan2(ya - yc, xa - xc))
                poly = cv2.ellipse2Poly((int((xa + xc) / 2), int((ya + yc) / 2)), (int(length / 2), stick_width),
                                        int(angle), 0, 360, 1)
                cv2.fillConvexPoly(canvas, poly, LIMB_COLORS[i])
        for p in people:
            b = np.asarray(p.body, np.float64)
            ok = present(b, threshold)
            for j in range(18):
                if ok[j] and _sane(b[j, 0] * W, b[j, 1] * H, W, H):
                    cv2.circle(canvas, (int(b[j, 0] * W), int(b[j, 1] * H)), JOINT_RADIUS, COLORS[j], thickness=-1)
    if hands:
        for p in people:
            for hand in (p.left_hand, p.right_hand):
                h = np.asarray(hand, np.float64)
                ok = present(h, threshold)
                pts = [(int(x * W), int(y * H)) if (k and _sane(x * W, y * H, W, H)) else None
                       for (x, y, _), k in zip(h, ok)]
                for e, (a, c) in enumerate(HAND_EDGES):
                    pa, pc = pts[a], pts[c]
                    if pa and pc and min(pa[0], pa[1], pc[0], pc[1]) > EPS:
                        cv2.line(canvas, pa, pc, HAND_EDGE_COLORS[e], thickness=HAND_LINE_WIDTH)
                for q in pts:
                    if q and q[0] > EPS and q[1] > EPS:
                        cv2.circle(canvas, q, HAND_POINT_RADIUS, HAND_POINT_COLOR, thickness=-1)
    if face:
        for p in people:
            f = np.asarray(p.face, np.float64)
            if not present(f, threshold).any():
                continue
            f = np.concatenate([f, np.asarray(p.body, np.float64)[[14, 15]]])  # 68 landmarks + the two eyes = 70
            ok = present(f, threshold)
            for (x, y, _), k in zip(f, ok):
                if not k or not _sane(x * W, y * H, W, H):
                    continue
                q = (int(x * W), int(y * H))
                if q[0] > EPS and q[1] > EPS:
                    cv2.circle(canvas, q, FACE_RADIUS, FACE_COLOR, thickness=-1)
    if swap_rb:
        canvas = np.ascontiguousarray(canvas[..., ::-1])
    return canvas


def resize_frame(img: np.ndarray, width: int, height: int, method: str = "bicubic") -> np.ndarray:
    """Resize an RGB uint8 frame; "bicubic" uses PIL (as SteadyDancer's ``generate_dancer.py``), else cv2."""
    if img.shape[1] == width and img.shape[0] == height:
        return img
    if method == "bicubic":
        from PIL import Image

        return np.asarray(Image.fromarray(img).resize((int(width), int(height)), Image.Resampling.BICUBIC))
    interp = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC,
              "nearest": cv2.INTER_NEAREST}[method]
    return cv2.resize(img, (int(width), int(height)), interpolation=interp)


def render_poses(poses, width: int, height: int, body: bool = True, hands: bool = True, face: bool = False,
                 supersample: float = 1, resize: str = "bicubic", threshold: float = KEYPOINT_THRESHOLD,
                 swap_rb: bool = False, as_float: bool = False, stick_width: int = STICK_WIDTH) -> np.ndarray:
    """Draw a sequence of poses -> [F, height, width, 3] (uint8, or float32 0..1 with ``as_float``).

    With ``supersample=2`` each frame is drawn at twice the size and resized down (SteadyDancer). A frame
    with no person (``None`` or no people) renders black.
    """
    dw, dh = int(round(width * supersample)), int(round(height * supersample))
    out = np.zeros((len(poses), int(height), int(width), 3), dtype=np.uint8)
    for i, pose in enumerate(poses):
        if pose is None or not _people(pose):
            continue
        img = draw_pose(pose, dw, dh, body, hands, face, threshold, swap_rb, stick_width)
        out[i] = resize_frame(img, width, height, resize)
    if as_float:
        return out.astype(np.float32) / 255.0
    return out
