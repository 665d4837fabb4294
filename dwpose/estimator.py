"""DWPose / RTMPose whole-body estimator (SimCC head), top-down on detector boxes.

Facts (DWPose ``onnxpose.py`` = comfyui_controlnet_aux ``dw_onnx/cv_ox_pose.py`` = rtmlib ``rtmpose.py``):
- box -> center, scale = box size * 1.25; scale widened/heightened to the model's w/h aspect;
- crop with the no-rotation affine that maps the scaled box onto the (w, h) input: warpAffine,
  bilinear, constant 0 border; then (pixel - mean) / std with ImageNet RGB mean (123.675, 116.28, 103.53)
  and std (58.395, 57.12, 57.375), NCHW float32;
- outputs simcc_x [N, K, w*2] and simcc_y [N, K, h*2] (split ratio 2.0, raw logits, no softmax);
  decode: per-axis argmax; score = min(max_x, max_y); location -1 where score <= 0; / 2.0; then
  p_img = p_in / (w, h) * scale + center - scale / 2.
- No box in a frame: the reference implementations run on the whole frame; our pipeline instead reports
  "no person" (see pipeline.py), but ``estimate`` accepts whole-frame boxes.
"""
from __future__ import annotations

import os

import cv2
import numpy as np

from .runtime import OnnxBatchModel, cpu_map, dim_is_dynamic

MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
BBOX_PADDING = 1.25
SIMCC_SPLIT_RATIO = 2.0


def bbox_center_scale(box, padding: float = BBOX_PADDING):
    """xyxy box -> (center (2,), scale (2,) = (w, h) * padding)."""
    x1, y1, x2, y2 = [float(v) for v in box[:4]]
    return np.array([(x1 + x2) * 0.5, (y1 + y2) * 0.5]), np.array([(x2 - x1) * padding, (y2 - y1) * padding])


def fix_aspect(scale, aspect: float):
    """Grow the (w, h) scale to the w/h ``aspect`` (the larger side wins)."""
    w, h = float(scale[0]), float(scale[1])
    if w > h * aspect:
        return np.array([w, w / aspect])
    return np.array([h * aspect, h])


def crop_matrix(center, scale, input_wh):
    """2x3 affine taking frame pixels to model-input pixels (no rotation; scale already at model aspect)."""
    in_w, in_h = input_wh
    k = in_w / float(scale[0])
    return np.array([[k, 0.0, in_w * 0.5 - k * center[0]],
                     [0.0, k, in_h * 0.5 - k * center[1]]], dtype=np.float64)


def input_to_image(points, center, scale, input_wh):
    """Model-input pixel coordinates (..., 2) -> frame pixels (the inverse of ``crop_matrix``)."""
    wh = np.asarray(input_wh, dtype=np.float64)
    return np.asarray(points, dtype=np.float64) / wh * scale + center - scale / 2.0


def warp_person(frame, box, input_wh, padding: float = BBOX_PADDING):
    """Frame + box -> (uint8 HxWx3 crop at the model's input size, center, scale)."""
    center, scale = bbox_center_scale(box, padding)
    scale = fix_aspect(scale, input_wh[0] / input_wh[1])
    m = crop_matrix(center, scale, input_wh)
    crop = cv2.warpAffine(frame, m, (int(input_wh[0]), int(input_wh[1])), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return crop, center, scale


def normalize_crops(crops: np.ndarray, dtype=np.float32) -> np.ndarray:
    """uint8 [N,h,w,3] RGB crops -> (crop - mean) / std as [N,3,h,w] (one vectorized pass for the batch)."""
    x = np.asarray(crops, dtype=np.float32) - MEAN
    x *= 1.0 / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=dtype)


def crop_person(frame, box, input_wh, padding: float = BBOX_PADDING):
    """Frame + box -> (normalized CHW float32 crop, center, scale)."""
    crop, center, scale = warp_person(frame, box, input_wh, padding)
    return normalize_crops(crop[None])[0], center, scale


def simcc_decode(simcc_x, simcc_y, split_ratio: float = SIMCC_SPLIT_RATIO):
    """[N,K,Lx], [N,K,Ly] -> locations [N,K,2] in model-input pixels and scores [N,K] (min of the maxima)."""
    sx = np.asarray(simcc_x, dtype=np.float32)
    sy = np.asarray(simcc_y, dtype=np.float32)
    locs = np.stack([sx.argmax(-1), sy.argmax(-1)], -1).astype(np.float64)
    vals = np.minimum(sx.max(-1), sy.max(-1)).astype(np.float64)
    locs[vals <= 0] = -1.0
    return locs / split_ratio, vals


def guess_input_wh(path: str):
    """Input (w, h) guessed from the file name, when the model's spatial dims are symbolic."""
    name = os.path.basename(str(path))
    if "384" in name:
        return (288, 384)
    return (192, 256)


class PoseEstimator(OnnxBatchModel):
    """Whole-body SimCC pose model on an ONNX Runtime session (created once, cached)."""

    def __init__(self, model, providers=None, threads=None, max_batch: int = 32):
        super().__init__(model, providers, threads, max_batch)
        h, w = self.input_shape[2], self.input_shape[3]
        if dim_is_dynamic(h) or dim_is_dynamic(w):
            self.input_wh = guess_input_wh(model if isinstance(model, str) else "")
        else:
            self.input_wh = (int(w), int(h))
        names = [o.name for o in self.info.outputs]
        if "simcc_x" in names and "simcc_y" in names:
            self.out_idx = (names.index("simcc_x"), names.index("simcc_y"))
        else:
            self.out_idx = (0, 1)

    def run_crops(self, crops: np.ndarray):
        """[N,h,w,3] uint8 crops -> simcc_x, simcc_y (float32), normalized and batched as the model allows."""
        xs, ys = [], []
        for chunk in self.batches(crops):
            x = normalize_crops(chunk, self.dtype)
            n = len(x)
            outs = self.run_batch(x)
            xs.append(np.asarray(outs[self.out_idx[0]][:n], dtype=np.float32))
            ys.append(np.asarray(outs[self.out_idx[1]][:n], dtype=np.float32))
        if not xs:
            return np.zeros((0, 0, 0), np.float32), np.zeros((0, 0, 0), np.float32)
        return np.concatenate(xs), np.concatenate(ys)

    def __call__(self, items):
        """``items``: list of (frame HxWx3 uint8 RGB, box xyxy). Returns keypoints [N,K,2] frame px, scores [N,K]."""
        if len(items) == 0:
            return np.zeros((0, 133, 2)), np.zeros((0, 133))
        warped = cpu_map(lambda it: warp_person(it[0], it[1], self.input_wh), items)
        crops = np.stack([w[0] for w in warped])
        centers = np.stack([w[1] for w in warped])[:, None]
        scales = np.stack([w[2] for w in warped])[:, None]
        sx, sy = self.run_crops(crops)
        locs, vals = simcc_decode(sx, sy)
        return input_to_image(locs, centers, scales, self.input_wh), vals
