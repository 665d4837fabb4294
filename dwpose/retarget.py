"""SteadyDancer pose alignment (retargeting) and negative poses for pose guidance.

Alignment follows the official ``preprocess/pose_align.py`` (from MusePose):

- work in "metric" coordinates: normalized x times the image's own W/H, y unchanged (units of image height);
- ten bone-length ratios reference / driving, from the first driving frame:
  neck L(0,1); face_left L(16,14)+L(14,0); face_right L(17,15)+L(15,0); shoulder L(2,5);
  arm_upper mean(L(2,3), L(5,6)) ratios; arm_lower mean(L(3,4), L(6,7)); hand = (arm_upper+arm_lower)/2
  (the finger-ratio loop of the official code runs zero times); body_len L(1, mid(8,11));
  leg_upper mean(L(8,9), L(11,12)); leg_lower mean(L(9,10), L(12,13)); NaN -> 1, then an infinite ratio
  -> the mean of the finite ones (the official code intends this but edits a list it never reads);
- every frame: each joint is re-attached to its parent's new position with its original offset from
  the parent scaled by its bone's ratio, down the chain: nose about the neck; 14,16 / 15,17 about the
  nose; shoulders 2,5 and hips 8,11 about the neck; elbow, wrist, then all 21 hand points about the wrist
  (right hand on 4, left hand on 7); knee, ankle; then everything is translated by (reference neck -
  first-frame neck) and x divided by the reference W/H -> coordinates normalized to the reference image.

Where the official code is fragile this version is robust:
- each bone (per side) takes its ratio from the first driving frame where both its ends are present;
  a paired ratio averages the sides that exist; a bone never seen gets NaN -> 1;
- a missing point stays missing (confidence 0, coordinates 0) and is never used as a parent; a present
  point whose parent is missing moves with its nearest present ancestor;
- the neck offset comes from the first frame with a neck; nothing non-finite is ever returned.
- faces (not drawn by SteadyDancer): translated with the nose instead of only the global offset, so an
  optional face stays on the head.

Negative poses (``pose_align_withdiffaug.py`` + ``utils_aug.pose_aug_diff``): per frame, draws as the
official code from Python's ``random`` (offset_x, offset_y [unused], scale U(0.7,1.3), aspect U(0.6,1.4)),
then body and hands x *= aspect, *= scale, translated so the neck stays put; the face only translated by that
same shift (not scaled), as the official code does. Reproducible from ``seed``.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import numpy as np

from .keypoints import KEYPOINT_THRESHOLD, FramePose, Person, present

log = logging.getLogger("steadydancer_turbo.dwpose")

# global point index layout used here: body 0-17, left hand 18-38, right hand 39-59, face 60-127
LH0, RH0, FACE0, NPTS = 18, 39, 60, 128
SCALE_NAMES = ["neck", "face_left", "face_right", "shoulder", "arm_upper", "arm_lower", "hand", "body_len",
               "leg_upper", "leg_lower"]


def _tree():
    """(child, parent, scale name or None for a rigid translation), in the official order."""
    t = [(0, 1, "neck"), (14, 0, "face_left"), (16, 0, "face_left"), (15, 0, "face_right"),
         (17, 0, "face_right"), (2, 1, "shoulder"), (5, 1, "shoulder"),
         (3, 2, "arm_upper"), (4, 3, "arm_lower")]
    t += [(RH0 + k, 4, "hand") for k in range(21)]
    t += [(6, 5, "arm_upper"), (7, 6, "arm_lower")]
    t += [(LH0 + k, 7, "hand") for k in range(21)]
    t += [(8, 1, "body_len"), (11, 1, "body_len"), (9, 8, "leg_upper"), (10, 9, "leg_lower"),
          (12, 11, "leg_upper"), (13, 12, "leg_lower")]
    t += [(FACE0 + k, 0, None) for k in range(68)]
    return t


TREE = _tree()
PARENT = {c: p for c, p, _ in TREE}

# measures: name -> list of sides; each side = list of segments whose lengths are summed.
# A segment end "mid811" is the hip midpoint.
MEASURES = {
    "neck": [[(0, 1)]],
    "face_left": [[(16, 14), (14, 0)]],
    "face_right": [[(17, 15), (15, 0)]],
    "shoulder": [[(2, 5)]],
    "arm_upper": [[(2, 3)], [(5, 6)]],
    "arm_lower": [[(3, 4)], [(6, 7)]],
    "body_len": [[(1, "mid811")]],
    "leg_upper": [[(8, 9)], [(11, 12)]],
    "leg_lower": [[(9, 10)], [(12, 13)]],
}


def _stack(person: Person) -> np.ndarray:
    return np.concatenate([person.body, person.left_hand, person.right_hand, person.face]).astype(np.float64)


def _unstack(pts: np.ndarray, like: Person) -> Person:
    return Person(pts[:18].copy(), pts[LH0:RH0].copy(), pts[RH0:FACE0].copy(), pts[FACE0:].copy(),
                  like.score, like.bbox)


def _metric(person: Person, aspect: float, threshold: float):
    pts = _stack(person)
    ok = present(pts, threshold)
    xy = pts[:, :2].copy()
    xy[:, 0] *= aspect
    return xy, ok, pts[:, 2]


def _side_length(xy, ok, side):
    total = 0.0
    for a, b in side:
        if b == "mid811":
            if not (ok[a] and ok[8] and ok[11]):
                return None
            pb = (xy[8] + xy[11]) / 2
        else:
            if not (ok[a] and ok[b]):
                return None
            pb = xy[b]
        total += float(np.linalg.norm(xy[a] - pb))
    return total


@dataclass
class Alignment:
    """Ratios and offset that map a driving video's poses onto a reference pose."""

    scales: dict
    offset: np.ndarray  # reference neck - driving neck (metric coordinates)
    ref_aspect: float
    video_aspect: float
    ref_size: tuple  # (width, height) of the reference image
    source_frames: dict = field(default_factory=dict)  # scale name -> driving frame(s) used
    raw_scales: dict = field(default_factory=dict)


def _first_person(pose):
    if pose is None:
        return None
    if isinstance(pose, Person):
        return pose
    return pose.people[0] if pose.people else None


def compute_alignment(ref: FramePose, driving: list, threshold: float = KEYPOINT_THRESHOLD) -> Alignment:
    """Bone ratios reference / driving (first frame where each bone is visible) and the neck offset."""
    ref_p = _first_person(ref)
    if ref_p is None:
        raise ValueError("DWPose retarget: no person was detected in the reference image")
    ref_aspect = ref.width / float(ref.height)
    drv_size = next(((f.width, f.height) for f in driving if f is not None), (ref.width, ref.height))
    video_aspect = drv_size[0] / float(drv_size[1])
    rxy, rok, _ = _metric(ref_p, ref_aspect, threshold)
    drv = []
    for f in driving:
        p = _first_person(f)
        drv.append(None if p is None else _metric(p, video_aspect, threshold))

    raw, used = {}, {}
    for name, sides in MEASURES.items():
        ratios, frames = [], []
        for side in sides:
            lr = _side_length(rxy, rok, side)
            if lr is None:
                continue
            for t, d in enumerate(drv):
                if d is None:
                    continue
                ld = _side_length(d[0], d[1], side)
                if ld is None:
                    continue
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratios.append(np.float64(lr) / np.float64(ld))
                frames.append(t)
                break
        raw[name] = float(np.mean(ratios)) if ratios else float("nan")
        used[name] = frames
    raw["hand"] = (raw["arm_upper"] + raw["arm_lower"]) / 2
    used["hand"] = used["arm_upper"] + used["arm_lower"]
    scales = {k: (1.0 if np.isnan(raw[k]) else raw[k]) for k in SCALE_NAMES}
    finite = [v for v in scales.values() if np.isfinite(v)]
    fill = float(np.mean(finite)) if finite else 1.0
    scales = {k: (v if np.isfinite(v) else fill) for k, v in scales.items()}

    offset = np.zeros(2)
    if rok[1]:
        for d in drv:
            if d is not None and d[1][1]:
                offset = rxy[1] - d[0][1]
                break
        else:
            log.warning("DWPose retarget: the driving video never shows a neck (both shoulders); "
                        "poses are not moved onto the reference's neck")
    else:
        log.warning("DWPose retarget: the reference pose has no neck (both shoulders needed); "
                    "poses are not moved onto the reference's neck")
    missing = [k for k in MEASURES if not used[k]]
    if missing:
        log.info("DWPose retarget: no ratio for %s (bone not visible in reference or video): using 1", missing)
    return Alignment(scales, offset, ref_aspect, video_aspect, (ref.width, ref.height), used, raw)


def align_person(person: Person, al: Alignment, threshold: float = KEYPOINT_THRESHOLD) -> Person:
    """Retarget one driving person with ``al``; returns coordinates normalized to the reference image."""
    xy, ok, conf = _metric(person, al.video_aspect, threshold)
    new = xy.copy()
    disp = np.zeros_like(xy)  # displacement of each point (missing points: that of their nearest present ancestor)
    for c, p, s in TREE:
        if ok[c] and ok[p] and s is not None:
            new[c] = new[p] + al.scales[s] * (xy[c] - xy[p])
        else:
            new[c] = xy[c] + disp[p]
        disp[c] = new[c] - xy[c]
    new += al.offset
    new[:, 0] /= al.ref_aspect
    out = np.zeros((NPTS, 3))
    good = ok & np.isfinite(new).all(1)
    out[good, :2] = new[good]
    out[good, 2] = conf[good]
    return _unstack(out, person)


def align_poses(ref: FramePose, driving: list, threshold: float = KEYPOINT_THRESHOLD,
                alignment: Alignment | None = None) -> list:
    """Retarget the first person of every driving frame onto ``ref``'s body (see module docstring).

    Returns one ``FramePose`` per input frame sized like the reference; frames without a person stay empty.
    """
    al = alignment or compute_alignment(ref, driving, threshold)
    out = []
    for f in driving:
        p = _first_person(f)
        people = [] if p is None else [align_person(p, al, threshold)]
        out.append(FramePose(ref.width, ref.height, people))
    return out


def negative_person(person: Person, scale: float, aspect: float, threshold: float = KEYPOINT_THRESHOLD) -> Person:
    """Body and hands: x *= aspect * scale, y *= scale about the neck (or the mean present body point without a
    neck). The face is not scaled: it moves by the shift that keeps the neck in place, ``anchor * (1 - factor)``
    (the official ``pose_aug_diff`` adds the same ``_offset`` to ``faces`` without scaling them)."""
    pts = _stack(person)
    ok = present(pts, threshold)
    if ok[1]:
        anchor = pts[1, :2].copy()
    elif ok[:18].any():
        anchor = pts[:18][ok[:18], :2].mean(0)
    else:
        return person.copy()
    factor = np.array([aspect * scale, scale])
    out = np.zeros_like(pts)
    out[ok, :2] = anchor + factor * (pts[ok, :2] - anchor)
    face = ok.copy()
    face[:FACE0] = False
    out[face, :2] = pts[face, :2] + anchor * (1.0 - factor)  # shifted with the neck, not scaled
    out[ok, 2] = pts[ok, 2]
    return _unstack(out, person)


def negative_factors(n_frames: int, seed: int, scale_range=(0.7, 1.3), aspect_range=(0.6, 1.4),
                     offset_range=((-0.2, 0.2), (-0.2, 0.2))):
    """Per-frame (scale, aspect), drawn like the official code: 4 ``random.uniform`` calls a frame."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_frames):
        rng.uniform(*offset_range[0])  # drawn but unused by the official code; kept for the same stream
        rng.uniform(*offset_range[1])
        s = rng.uniform(*scale_range)
        a = rng.uniform(*aspect_range)
        out.append((s, a))
    return out


def negative_poses(poses: list, seed: int = 0, scale_range=(0.7, 1.3), aspect_range=(0.6, 1.4),
                   threshold: float = KEYPOINT_THRESHOLD) -> list:
    """Independent random x-aspect and scale per frame, anchored at the neck; same seed -> same poses."""
    factors = negative_factors(len(poses), seed, scale_range, aspect_range)
    out = []
    for f, (s, a) in zip(poses, factors):
        if f is None:
            out.append(None)
            continue
        out.append(FramePose(f.width, f.height, [negative_person(p, s, a, threshold) for p in f.people]))
    return out
