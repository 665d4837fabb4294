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

Speed (issue 15; ``bench/pose_draw_speed.py``): ``render_poses`` gives the numbers of drawing, swapping and resizing
each whole frame, bit for bit, but swaps the colours while drawing, resizes only bands around the figure and draws
frames on a thread pool (cv2 and PIL release the GIL), writing float32 output directly.
"""
from __future__ import annotations

import colorsys
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

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
# drawing threads at most: the frames' Python and GIL hand-offs outweigh more threads. Retarget Poses at 832x480, 81 frames,
# on a 16-core H200 host (bench/pose_draw_speed.py --threads, run 24): 1 thread 1065 ms, 2: 809, 4: 671, 8: 841,
# 16: 1259; on a 2-core box 4-16 threads were twice as slow as 2
MAX_THREADS = 4
BICUBIC_SUPPORT = 2  # PIL's bicubic filter support, in output pixels when downscaling
BAND = 32  # output rows resized at a time around the figure


def _bgr(colors):
    return [(c[2], c[1], c[0]) for c in colors]


# swap_rb draws with red and blue exchanged: cv2 fills each channel on its own, so this is the swapped canvas
# bit for bit, without a copy of it
_PALETTES = {False: (COLORS, LIMB_COLORS, HAND_EDGE_COLORS, HAND_POINT_COLOR, FACE_COLOR),
             True: (_bgr(COLORS), _bgr(LIMB_COLORS), _bgr(HAND_EDGE_COLORS), _bgr([HAND_POINT_COLOR])[0],
                    FACE_COLOR)}


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
    joint_colors, limb_colors, edge_colors, point_color, face_color = _PALETTES[bool(swap_rb)]
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
                cv2.fillConvexPoly(canvas, poly, limb_colors[i])
        for p in people:
            b = np.asarray(p.body, np.float64)
            ok = present(b, threshold)
            for j in range(18):
                if ok[j] and _sane(b[j, 0] * W, b[j, 1] * H, W, H):
                    cv2.circle(canvas, (int(b[j, 0] * W), int(b[j, 1] * H)), JOINT_RADIUS, joint_colors[j],
                               thickness=-1)
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
                        cv2.line(canvas, pa, pc, edge_colors[e], thickness=HAND_LINE_WIDTH)
                for q in pts:
                    if q and q[0] > EPS and q[1] > EPS:
                        cv2.circle(canvas, q, HAND_POINT_RADIUS, point_color, thickness=-1)
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
                    cv2.circle(canvas, q, FACE_RADIUS, face_color, thickness=-1)
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


def default_threads(n_frames: int | None = None) -> int:
    """Drawing threads: the CPUs this process may run on (``os.cpu_count()`` where that is unknown), at most
    ``MAX_THREADS`` and at most one per frame."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    n = max(1, min(n, MAX_THREADS))
    return n if n_frames is None else max(1, min(n, int(n_frames)))


def _content_box(img: np.ndarray):
    """(x0, y0, x1, y1), ends exclusive, of the nonzero pixels of a contiguous HxWx3 uint8 canvas; None if black."""
    h, w = img.shape[:2]
    x, y, bw, bh = cv2.boundingRect(img.reshape(h, w * 3))  # one byte column per channel
    if bw == 0 or bh == 0:
        return None
    return x // 3, y, (x + bw - 1) // 3 + 1, y + bh


@functools.lru_cache(maxsize=32)
def _pil_pass_order(src_w: int, src_h: int, width: int, height: int):
    """"hv" or "vh": the order of the two passes of PIL's bicubic resize of a src_w x src_h RGB image to width x
    height (Pillow 13 runs tall images vertically first, older ones always horizontally first), found once per
    size by resizing a test image whole and pass by pass; None if that cannot tell (then whole frames are resized)."""
    from PIL import Image

    bic = Image.Resampling.BICUBIC
    a = np.zeros((src_h, src_w, 3), np.uint8)
    h, w = min(src_h, 64), min(src_w, 64)
    y, x = (src_h - h) // 2, (src_w - w) // 2
    a[y:y + h, x:x + w] = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(a)
    whole = np.asarray(im.resize((width, height), bic))
    hv = np.asarray(im.resize((width, src_h), bic).resize((width, height), bic))
    vh = np.asarray(im.resize((src_w, height), bic).resize((width, height), bic))
    if np.array_equal(hv, vh):  # the test cannot tell the orders apart
        return None
    return "hv" if np.array_equal(whole, hv) else "vh" if np.array_equal(whole, vh) else None


def _downscale_content(img: np.ndarray, width: int, height: int, k: int, band: int = BAND) -> list:
    """PIL bicubic resize of a (k*height) x (k*width) canvas to width x height, computed only around its content:
    a list of (x0, y0, patch), the resized frame being black outside the patches (none for a black canvas).

    Bit-identical to resizing the whole canvas. PIL resizes in two passes, each rounding to uint8 (rows then
    columns, or the other way round: ``_pil_pass_order``, done here as two one-axis resizes in that order); output
    pixel (x, y) takes the input pixels within 2k of its centre (k*(x + 0.5), k*(y + 0.5)), weighted by numbers
    that depend only on that centre and on where the image ends. So, per band of ``band`` output rows: (1) outside
    the columns of the content of the band's canvas rows and their neighbour bands' (which hold every input row
    the band reads) widened by 4 output pixels, a pixel sees only zeros and is exactly 0; (2) resizing ``box``
    (integer corners, k*patch size: scale exactly k, the same centres) of a crop with 2k + 2 pixels of margin
    around it reads the same pixels with the same weights, the windows being clipped only where the crop edge is
    the canvas edge, as they are on the whole canvas."""
    from PIL import Image

    order = _pil_pass_order(img.shape[1], img.shape[0], width, height)
    if order is None:
        return [(0, 0, resize_frame(img, width, height, "bicubic"))] if _content_box(img) else []
    s = band * k  # canvas rows of one band
    strips = [_content_box(img[j:j + s]) for j in range(0, img.shape[0], s)]
    m, pad, bic = BICUBIC_SUPPORT + 2, BICUBIC_SUPPORT * k + 2, Image.Resampling.BICUBIC
    out = []
    for j in range(len(strips)):
        near = [b for b in strips[max(0, j - 1):j + 2] if b is not None]
        if not near:
            continue
        x0, x1 = max(0, min(b[0] for b in near) // k - m), min(width, (max(b[2] for b in near) - 1) // k + m + 1)
        y0, y1 = j * band, min(height, (j + 1) * band)
        cx0, cy0 = max(0, x0 * k - pad), max(0, y0 * k - pad)
        cx1, cy1 = min(img.shape[1], x1 * k + pad), min(img.shape[0], y1 * k + pad)
        im = Image.fromarray(np.ascontiguousarray(img[cy0:cy1, cx0:cx1]))
        cw, ch, pw, ph = cx1 - cx0, cy1 - cy0, x1 - x0, y1 - y0
        bx0, bx1, by0, by1 = x0 * k - cx0, x1 * k - cx0, y0 * k - cy0, y1 * k - cy0
        if order == "hv":
            im = im.resize((pw, ch), bic, box=(bx0, 0, bx1, ch)).resize((pw, ph), bic, box=(0, by0, pw, by1))
        else:
            im = im.resize((cw, ph), bic, box=(0, by0, cw, by1)).resize((pw, ph), bic, box=(bx0, 0, bx1, ph))
        out.append((x0, y0, np.asarray(im)))
    return out


def _for_each(fn, n: int, threads, progress, chunk: int) -> None:
    """fn(0) .. fn(n - 1) on ``threads`` threads; ``progress(done)`` on this thread, in order, every ``chunk``
    finished items and at the end. Whatever fn or progress raises stops the rest (items not started are skipped)
    and propagates."""
    threads = default_threads(n) if threads is None else max(1, min(int(threads), max(1, n)))
    chunk = max(1, int(chunk))

    def report(done):
        if progress is not None and (done % chunk == 0 or done == n):
            progress(done)

    if threads == 1 or n <= 1:
        for i in range(n):
            fn(i)
            report(i + 1)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="steadydancer-draw") as pool:
        futures = [pool.submit(fn, i) for i in range(n)]
        try:
            for i, f in enumerate(futures):
                f.result()
                report(i + 1)
        finally:
            for f in futures:
                f.cancel()


def render_poses(poses, width: int, height: int, body: bool = True, hands: bool = True, face: bool = False,
                 supersample: float = 1, resize: str = "bicubic", threshold: float = KEYPOINT_THRESHOLD,
                 swap_rb: bool = False, as_float: bool = False, stick_width: int = STICK_WIDTH,
                 threads: int | None = None, progress=None, chunk: int = 8) -> np.ndarray:
    """Draw a sequence of poses -> [F, height, width, 3] (uint8, or float32 0..1 with ``as_float``).

    With ``supersample=2`` each frame is drawn at twice the size and resized down (SteadyDancer). A frame
    with no person (``None`` or no people) renders black.

    The numbers are those of drawing each frame on its own canvas, resizing it whole and, for ``as_float``,
    ``astype(float32) / 255``, bit for bit; but only the region around the figure is resized and written (an
    integer ``supersample`` with bicubic: see ``_downscale_content``; other resizes do whole frames), and frames
    are drawn on ``threads`` threads (default ``default_threads``: cv2 and PIL release the GIL). A frame depends
    on its pose only, so the thread count changes nothing but the speed. ``progress(done)`` is called on the
    calling thread every ``chunk`` frames, in frame order; an exception it raises (ComfyUI's interrupt) stops
    the drawing and propagates.
    """
    width, height, n = int(width), int(height), len(poses)
    dw, dh = int(round(width * supersample)), int(round(height * supersample))
    out = np.zeros((n, height, width, 3), dtype=np.float32 if as_float else np.uint8)
    k = dw // width if width > 0 and height > 0 and dw % width == 0 and dh == height * (dw // width) else 0

    if k > 1 and resize == "bicubic":
        _pil_pass_order(dw, dh, width, height)  # once, here, not in every worker

    def frame(i):
        pose = poses[i]
        if pose is None or not _people(pose):
            return
        img = draw_pose(pose, dw, dh, body, hands, face, threshold, swap_rb, stick_width)
        if k == 1:
            box = _content_box(img)
            patches = [] if box is None else [(box[0], box[1], img[box[1]:box[3], box[0]:box[2]])]
        elif k > 1 and resize == "bicubic":
            patches = _downscale_content(img, width, height, k)
        else:
            patches = [(0, 0, resize_frame(img, width, height, resize))]
        for x0, y0, patch in patches:
            dst = out[i, y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]]
            if as_float:
                np.divide(patch, 255.0, out=dst, dtype=np.float32)  # = astype(float32) / 255.0 (0 stays 0.0)
            else:
                dst[...] = patch

    _for_each(frame, n, threads, progress, chunk)
    return out
