"""YOLOX person detector (``yolox_l.onnx``), the pre/post-processing of DWPose's ONNX path.

Facts (IDEA-Research/DWPose ``onnxdet.py`` = comfyui_controlnet_aux ``dw_onnx/cv_ox_det.py``):
- RGB uint8 frame resized by r = min(640/H, 640/W) (cv2 INTER_LINEAR, sizes truncated), pasted at the
  TOP-LEFT of a 640x640 canvas filled with 114; float32 0..255 NCHW, no mean/std.
- Output [N, 8400, 85] = (dx, dy, log w, log h, obj, cls[80]) per anchor, anchors row-major over the
  stride-8/16/32 grids; cx,cy = (d + grid) * stride, w,h = exp(.) * stride; obj/cls are already
  probabilities, score = obj * cls.
- Boxes / r back to frame pixels; class-aware NMS (IoU > 0.45 suppressed, "+1" pixel areas) over
  candidates with score > 0.1; people kept when score > 0.3. NMS is per class, so running it on the
  person class alone gives the same people.
"""
from __future__ import annotations

import cv2
import numpy as np

from .runtime import OnnxBatchModel, cpu_map, dim_is_dynamic

PAD_VALUE = 114
STRIDES = (8, 16, 32)
CANDIDATE_SCORE = 0.1
NMS_IOU = 0.45
PERSON_SCORE = 0.3


def letterbox(frame: np.ndarray, size=(640, 640), pad_value: int = PAD_VALUE):
    """Resize ``frame`` (HxWx3 uint8) into a ``size`` = (h, w) canvas at the top-left; return (canvas, r)."""
    h, w = frame.shape[:2]
    r = min(size[0] / h, size[1] / w)
    nw, nh = int(w * r), int(h * r)
    canvas = np.full((size[0], size[1], 3), pad_value, dtype=np.uint8)
    canvas[:nh, :nw] = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_LINEAR)
    return canvas, r


def anchor_grid(input_hw=(640, 640), strides=STRIDES):
    """(A,2) grid cell offsets and (A,) strides, row-major per stride level (y outer, x inner)."""
    grids, strd = [], []
    for s in strides:
        hs, ws = input_hw[0] // s, input_hw[1] // s
        yv, xv = np.meshgrid(np.arange(hs), np.arange(ws), indexing="ij")
        grids.append(np.stack([xv.ravel(), yv.ravel()], 1))
        strd.append(np.full(hs * ws, s))
    return np.concatenate(grids).astype(np.float64), np.concatenate(strd).astype(np.float64)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_thr: float = NMS_IOU) -> list[int]:
    """Greedy NMS, highest score first; a box is dropped when IoU > ``iou_thr``. Areas use the +1 convention."""
    boxes = np.asarray(boxes, dtype=np.float64)
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= iou_thr]
    return keep


def decode_people(pred: np.ndarray, ratio: float, input_hw=(640, 640), candidate_score=CANDIDATE_SCORE,
                  nms_iou=NMS_IOU, person_score=PERSON_SCORE, grid=None):
    """One image's raw output (A, 85) -> person boxes (K,4) xyxy in frame pixels and scores (K,), best first."""
    pred = np.asarray(pred, dtype=np.float64)
    score = pred[:, 4] * pred[:, 5]
    idx = np.nonzero(score > candidate_score)[0]
    if idx.size == 0:
        return np.zeros((0, 4)), np.zeros((0,))
    g, s = grid if grid is not None else anchor_grid(input_hw)
    p = pred[idx]
    cxy = (p[:, 0:2] + g[idx]) * s[idx, None]
    wh = np.exp(p[:, 2:4]) * s[idx, None]
    boxes = np.concatenate([cxy - wh / 2, cxy + wh / 2], 1) / ratio
    sc = score[idx]
    keep = nms(boxes, sc, nms_iou)
    boxes, sc = boxes[keep], sc[keep]
    ok = sc > person_score
    return boxes[ok], sc[ok]


class YoloxDetector(OnnxBatchModel):
    """YOLOX person detector on an ONNX Runtime session (created once, cached by path and providers)."""

    def __init__(self, model, providers=None, threads=None, max_batch: int = 8):
        super().__init__(model, providers, threads, max_batch)
        h, w = self.input_shape[2], self.input_shape[3]
        self.input_hw = (h if not dim_is_dynamic(h) else 640, w if not dim_is_dynamic(w) else 640)
        self.grid = anchor_grid(self.input_hw)

    def preprocess(self, frame):
        canvas, r = letterbox(frame, self.input_hw)
        return canvas.transpose(2, 0, 1), r

    def __call__(self, frames):
        """``frames``: list/array of HxWx3 uint8 RGB -> list of (boxes (K,4), scores (K,)) per frame."""
        out = []
        for chunk in self.batches(frames):
            tensors, ratios = zip(*cpu_map(self.preprocess, chunk))
            pred = self.run_batch(np.stack(tensors).astype(self.dtype))[0]
            for i, r in enumerate(ratios):
                out.append(decode_people(pred[i], r, self.input_hw, grid=self.grid))
        return out
