"""Tiny ONNX models with the real DWPose models' I/O names, shapes and dtypes, built with onnx.helper.

- detector: input ``images`` float32 [B,3,640,640] (B = 1 like the real export, or symbolic) -> ``output``
  float32 [B,8400,85]. It emits planted raw YOLOX predictions, gated by the image: a frame whose
  letterboxed maximum is below ~128 (a black frame) gives all-zero predictions (no person).
- pose "reader": input ``input`` float32 [N,3,384,288] -> ``simcc_x`` [N,133,576], ``simcc_y`` [N,133,768].
  simcc_x = 4 + per-column maximum of the normalized crop (always > 0), each value repeated twice (split ratio 2), same for
  every keypoint; simcc_y likewise per row. A bright spot in the frame therefore decodes at the spot.
- pose "planted": constant SimCC maps (per-keypoint peaks) plus 0 * input, any batch.
Hand-written raw predictions and geometry live in the tests, independent of the code under test.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, inits):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()


def yolox_raw(boxes_640, obj, cls_probs, num_anchors=8400, input_hw=(640, 640)):
    """Raw [A,85] predictions planting boxes (xyxy in letterbox pixels) at stride-32 cells (hand decode)."""
    pred = np.zeros((num_anchors, 85), np.float32)
    # stride-32 level starts after the 80x80 and 40x40 cells
    s, base = 32, (input_hw[0] // 8) * (input_hw[1] // 8) + (input_hw[0] // 16) * (input_hw[1] // 16)
    ws = input_hw[1] // s
    used = set()
    for b, o, c in zip(boxes_640, obj, cls_probs):
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        w, h = b[2] - b[0], b[3] - b[1]
        gx, gy = int(cx // s), int(cy // s)
        while (gx, gy) in used:  # two boxes in one cell: use a neighbour cell, offsets absorb it
            gx += 1
        used.add((gx, gy))
        a = base + gy * ws + gx
        pred[a, 0], pred[a, 1] = cx / s - gx, cy / s - gy
        pred[a, 2], pred[a, 3] = np.log(w / s), np.log(h / s)
        pred[a, 4] = o
        pred[a, 5:] = c
    return pred


def gated_detector(raw, batch=1, input_hw=(640, 640)):
    """``images`` [B,3,H,W] -> ``output`` [B,A,85] = raw * clip((max(image) - 128) / 64, 0, 1)."""
    B = batch if batch else "batch"
    A = raw.shape[0]
    nodes = [
        helper.make_node("ReduceMax", ["images"], ["mx"], keepdims=1, axes=[1, 2, 3]),  # [B,1,1,1]
        helper.make_node("Sub", ["mx", "c128"], ["d"]),
        helper.make_node("Div", ["d", "c64"], ["q"]),
        helper.make_node("Clip", ["q", "zero", "one"], ["gate4"]),
        helper.make_node("Reshape", ["gate4", "shp"], ["gate"]),  # [B,1,1]
        helper.make_node("Mul", ["raw", "gate"], ["output"]),
    ]
    inits = [numpy_helper.from_array(raw[None].astype(np.float32), "raw"),
             numpy_helper.from_array(np.array(128, np.float32), "c128"),
             numpy_helper.from_array(np.array(64, np.float32), "c64"),
             numpy_helper.from_array(np.array(0, np.float32), "zero"),
             numpy_helper.from_array(np.array(1, np.float32), "one"),
             numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shp")]
    return _model(nodes, [helper.make_tensor_value_info("images", TensorProto.FLOAT, [B, 3, *input_hw])],
                  [helper.make_tensor_value_info("output", TensorProto.FLOAT, [B, A, 85])], inits)


def reading_pose(batch=None, input_hw=(384, 288), k=133):
    """``input`` [N,3,h,w] -> ``simcc_x`` [N,K,2w] (column maxima, each twice), ``simcc_y`` [N,K,2h]."""
    h, w = input_hw
    N = batch if batch else "batch"
    nodes = []
    for ax, red, L in (("x", [1, 2], w), ("y", [1, 3], h)):
        nodes += [
            helper.make_node("ReduceMax", ["input"], [f"m0{ax}"], keepdims=0, axes=red),  # [N,L]
            helper.make_node("Add", [f"m0{ax}", "four"], [f"m{ax}"]),  # > 0: black is 4 - 103.53/57.375
            helper.make_node("Reshape", [f"m{ax}", "s3"], [f"r{ax}"]),  # [N,L,1]
            helper.make_node("Concat", [f"r{ax}", f"r{ax}"], [f"c{ax}"], axis=2),  # [N,L,2]
            helper.make_node("Reshape", [f"c{ax}", "s2"], [f"u{ax}"]),  # [N,2L]
            helper.make_node("Unsqueeze", [f"u{ax}", "ax1"], [f"v{ax}"]),  # [N,1,2L]
            helper.make_node("Expand", [f"v{ax}", "kshape"], [f"simcc_{ax}"]),  # [N,K,2L]
        ]
    inits = [numpy_helper.from_array(np.array(4.0, np.float32), "four"),
             numpy_helper.from_array(np.array([0, -1, 1], np.int64), "s3"),
             numpy_helper.from_array(np.array([0, -1], np.int64), "s2"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array([1, k, 1], np.int64), "kshape")]
    return _model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [N, 3, h, w])],
                  [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [N, k, 2 * w]),
                   helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [N, k, 2 * h])], inits)


def planted_pose(simcc_x, simcc_y, batch=None, input_hw=(384, 288)):
    """Constant SimCC maps [K,Lx], [K,Ly] for every crop (+ 0 * sum(input) so the input is used)."""
    h, w = input_hw
    N = batch if batch else "batch"
    k = simcc_x.shape[0]
    nodes = [
        helper.make_node("ReduceSum", ["input", "axes"], ["s"], keepdims=1),  # [N,1,1,1]
        helper.make_node("Reshape", ["s", "shp"], ["s3"]),  # [N,1,1]
        helper.make_node("Mul", ["s3", "zero"], ["z"]),
        helper.make_node("Add", ["z", "cx"], ["simcc_x"]),
        helper.make_node("Add", ["z", "cy"], ["simcc_y"]),
    ]
    inits = [numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
             numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shp"),
             numpy_helper.from_array(np.array(0, np.float32), "zero"),
             numpy_helper.from_array(simcc_x[None].astype(np.float32), "cx"),
             numpy_helper.from_array(simcc_y[None].astype(np.float32), "cy")]
    return _model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [N, 3, h, w])],
                  [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [N, k, simcc_x.shape[1]]),
                   helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [N, k, simcc_y.shape[1]])], inits)
