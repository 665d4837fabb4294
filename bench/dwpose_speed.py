"""DWPose extraction speed: detection + pose over a clip, CUDA provider vs CPU provider.

Runs the real pipeline (``steadydancer_turbo.dwpose.DWPose``: letterbox, YOLOX decode + NMS, affine crops,
batched pose model, SimCC decode) on random frames. The ONNX models are either the real files
(``--detector yolox_l.onnx --estimator dw-ll_ucoco_384.onnx``) or, by default, stand-ins built here with
random weights, the real I/O names/shapes/dtypes and about the real compute:

- detector: CSP-style SiLU conv backbone to stride 32 + per-level 3x3 heads at strides 8/16/32 ->
  ``images`` [1,3,640,640] -> ``output`` [1,8400,85]; ~79 GMAC, 45 M parameters (YOLOX-L: 155.6 GFLOPs = ~78 GMAC,
  54 M parameters). Its output is multiplied by 0 and a planted person box is added, so each frame has
  exactly one person and the pose stage gets a fixed workload.
- pose: SiLU conv backbone to stride 32 at 384x288 + 7x7 conv to 133 channels + SimCC linear heads ->
  ``input`` [N,3,384,288] (dynamic N) -> ``simcc_x`` [N,133,576], ``simcc_y`` [N,133,768]; ~9.6 GMAC, 25 M parameters
  (RTMPose-l / DWPose-l at 384x288).

Usage (GPU machine):  python bench/dwpose_speed.py               # 81 frames at 832x480, cuda then cpu
                      python bench/dwpose_speed.py --tiny --providers cpu   # seconds-long smoke test
The table says which provider each session really got; a CUDA row that ran on CPU is flagged.
Target: >= 30 frames/s (detection + pose) on one H100 with the CUDA provider.
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np


def _import_pack():
    from _common import import_pack

    import_pack(run_init=True)
    import steadydancer_turbo.dwpose as dwpose  # noqa: E402

    return dwpose


# ------------------------------------------------------------------ model builders
class _Net:
    """Tiny graph builder: conv + SiLU layers with random weights, counting multiply-accumulates."""

    def __init__(self, seed=0):
        self.nodes, self.inits, self.macs, self.params, self.n = [], [], 0, 0, 0
        self.rng = np.random.default_rng(seed)

    def _name(self, p):
        self.n += 1
        return f"{p}{self.n}"

    def const(self, arr, name=None):
        from onnx import numpy_helper

        name = name or self._name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def conv(self, x, cin, cout, k, stride, hw, act=True):
        """x [.., cin, H, W] -> [.., cout, H/stride, W/stride]; returns (name, new hw)."""
        from onnx import helper

        w = (self.rng.standard_normal((cout, cin, k, k), dtype=np.float32)
             * np.float32(np.sqrt(1.0 / (cin * k * k))))
        b = np.zeros(cout, np.float32)
        y = self._name("conv")
        self.nodes.append(helper.make_node("Conv", [x, self.const(w), self.const(b)], [y], kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[k // 2] * 4))
        oh, ow = (hw[0] + stride - 1) // stride, (hw[1] + stride - 1) // stride
        self.macs += oh * ow * cout * cin * k * k
        self.params += w.size + b.size
        if act:
            s, z = self._name("sig"), self._name("silu")
            self.nodes += [helper.make_node("Sigmoid", [y], [s]), helper.make_node("Mul", [y, s], [z])]
            y = z
        return y, (oh, ow)

    def stage(self, x, cin, cout, hw, blocks):
        """stride-2 3x3 conv, then ``blocks`` x (1x1 cout->cout/2, 3x3 cout/2->cout) with residual adds."""
        from onnx import helper

        x, hw = self.conv(x, cin, cout, 3, 2, hw)
        for _ in range(blocks):
            a, _ = self.conv(x, cout, cout // 2, 1, 1, hw)
            a, _ = self.conv(a, cout // 2, cout, 3, 1, hw)
            y = self._name("add")
            self.nodes.append(helper.make_node("Add", [x, a], [y]))
            x = y
        return x, hw


def _model_bytes(net, inputs, outputs):
    from onnx import helper

    g = helper.make_graph(net.nodes, "bench", inputs, outputs, initializer=net.inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def build_detector(input_hw=(640, 640), width=1.0, depth=1.0, planted=None, seed=0):
    """YOLOX-L-sized stand-in (width/depth multipliers shrink it for smoke tests)."""
    from onnx import TensorProto, helper

    net = _Net(seed)
    c = [max(8, int(v * width)) for v in (64, 128, 256, 512, 1024)]
    d = [max(1, int(round(v * depth))) for v in (3, 9, 9, 3)]
    x, hw = net.conv("images", 3, c[0], 3, 2, input_hw)  # stride 2
    feats = {}
    x, hw = net.stage(x, c[0], c[1], hw, d[0])  # 4
    x, hw = net.stage(x, c[1], c[2], hw, d[1])  # 8
    feats[8] = (x, c[2], hw)
    x, hw = net.stage(x, c[2], c[3], hw, d[2])  # 16
    feats[16] = (x, c[3], hw)
    x, hw = net.stage(x, c[3], c[4], hw, d[3])  # 32
    feats[32] = (x, c[4], hw)
    hc = max(8, int(256 * width))
    outs = []
    for s in (8, 16, 32):
        f, cf, fhw = feats[s]
        h, _ = net.conv(f, cf, hc, 1, 1, fhw)
        for _ in range(2):  # decoupled head: two 3x3 convs in each of the cls and reg branches
            h, _ = net.conv(h, hc, hc, 3, 1, fhw)
        h2, _ = net.conv(h, hc, hc, 3, 1, fhw)
        h2, _ = net.conv(h2, hc, hc, 3, 1, fhw)
        o, _ = net.conv(h2, hc, 85, 1, 1, fhw, act=False)
        r, t = net._name("r"), net._name("t")
        net.nodes += [helper.make_node("Reshape", [o, net.const(np.array([0, 85, -1], np.int64))], [r]),
                      helper.make_node("Transpose", [r], [t], perm=[0, 2, 1])]
        outs.append(t)
    cat, sig, z, out = net._name("cat"), net._name("sig"), net._name("z"), "output"
    net.nodes += [helper.make_node("Concat", outs, [cat], axis=1), helper.make_node("Sigmoid", [cat], [sig]),
                  helper.make_node("Mul", [sig, net.const(np.array(0, np.float32))], [z]),
                  helper.make_node("Add", [z, net.const(planted[None].astype(np.float32))], [out])]
    anchors = sum((input_hw[0] // s) * (input_hw[1] // s) for s in (8, 16, 32))
    model = _model_bytes(net, [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, *input_hw])],
                         [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, anchors, 85])])
    return model, net.macs, net.params


def build_pose(input_hw=(384, 288), width=1.0, depth=1.0, k=133, seed=1, planted=None):
    """DWPose-L-sized stand-in: conv backbone to stride 32, 7x7 conv to K maps, SimCC linear heads. ``planted``
    = (simcc_x [k, 2W], simcc_y [k, 2H]): the outputs become heads * 0 + planted (same cost, a fixed skeleton)."""
    from onnx import TensorProto, helper

    net = _Net(seed)
    c = [max(8, int(v * width)) for v in (64, 128, 256, 512, 1024)]
    d = [max(1, int(round(v * depth))) for v in (2, 4, 4, 1)]
    x, hw = net.conv("input", 3, c[0] // 2, 3, 2, input_hw)
    x, _ = net.conv(x, c[0] // 2, c[0], 3, 1, hw)
    for i in range(4):
        x, hw = net.stage(x, c[i], c[i + 1], hw, d[i])
    y, hw = net.conv(x, c[4], k, 7, 1, hw, act=False)
    flat = hw[0] * hw[1]
    hid = 256
    r, m1, sx, sy = net._name("r"), net._name("mm"), "simcc_x", "simcc_y"
    w1 = net.rng.standard_normal((flat, hid), dtype=np.float32) / np.float32(np.sqrt(flat))
    wx = net.rng.standard_normal((hid, input_hw[1] * 2), dtype=np.float32) / np.float32(np.sqrt(hid))
    wy = net.rng.standard_normal((hid, input_hw[0] * 2), dtype=np.float32) / np.float32(np.sqrt(hid))
    hx, hy = (sx, sy) if planted is None else (net._name("hx"), net._name("hy"))
    net.nodes += [helper.make_node("Reshape", [y, net.const(np.array([0, k, -1], np.int64))], [r]),
                  helper.make_node("MatMul", [r, net.const(w1)], [m1]),
                  helper.make_node("MatMul", [m1, net.const(wx)], [hx]),
                  helper.make_node("MatMul", [m1, net.const(wy)], [hy])]
    if planted is not None:
        zero = net.const(np.array(0, np.float32))
        for h, out, arr in ((hx, sx, planted[0]), (hy, sy, planted[1])):
            z = net._name("z")
            net.nodes += [helper.make_node("Mul", [h, zero], [z]),
                          helper.make_node("Add", [z, net.const(np.asarray(arr, np.float32)[None])], [out])]
    net.macs += k * (flat * hid + hid * input_hw[1] * 2 + hid * input_hw[0] * 2)
    net.params += w1.size + wx.size + wy.size
    model = _model_bytes(net, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, *input_hw])],
                         [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, ["N", k, input_hw[1] * 2]),
                          helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, ["N", k, input_hw[0] * 2])])
    return model, net.macs, net.params


def planted_person(frame_hw, input_hw=(640, 640)):
    """Raw YOLOX predictions with one confident person box in the middle of the frame."""
    h, w = frame_hw
    r = min(input_hw[0] / h, input_hw[1] / w)
    anchors = sum((input_hw[0] // s) * (input_hw[1] // s) for s in (8, 16, 32))
    pred = np.zeros((anchors, 85), np.float32)
    box = np.array([0.35 * w, 0.1 * h, 0.65 * w, 0.95 * h]) * r
    s = 32
    base = sum((input_hw[0] // t) * (input_hw[1] // t) for t in (8, 16))
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    gx, gy = int(cx // s), int(cy // s)
    a = base + gy * (input_hw[1] // s) + gx
    pred[a, :4] = [cx / s - gx, cy / s - gy, np.log((box[2] - box[0]) / s), np.log((box[3] - box[1]) / s)]
    pred[a, 4], pred[a, 5] = 0.95, 0.95
    return pred


# ------------------------------------------------------------------ timing
def run(dwpose, det, pose, providers, frames, repeats, label):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        dw = dwpose.DWPose(det, pose, providers=providers)
        t_load = time.perf_counter() - t0
    fallback = [str(w.message) for w in rec if "requested" in str(w.message)]
    dw(frames[:2], warn_missing=False)  # warm-up (CUDA kernels, cuDNN algorithm choice)
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = dw(frames, warn_missing=False)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    people = sum(len(f.people) for f in out)
    # stage split on the same frames
    t0 = time.perf_counter()
    dets = dw.detector(frames)
    t_det = time.perf_counter() - t0
    items = [(f, b[0][0]) for f, b in zip(frames, dets) if len(b[0])]
    t0 = time.perf_counter()
    dw.estimator(items)
    t_pose = time.perf_counter() - t0
    return {"label": label, "requested": providers, "got": dw.providers, "load_s": t_load, "fps": len(frames) / best,
            "det_ms": 1000 * t_det / len(frames), "pose_ms": 1000 * t_pose / max(1, len(items)), "people": people,
            "frames": len(frames), "fallback": fallback}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--cpu-frames", type=int, default=8, help="frames timed with the CPU provider (it is slow)")
    ap.add_argument("--providers", default="cuda,cpu", help="comma list of: cuda, cpu, tensorrt, auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--detector", help="real yolox_l.onnx (default: built stand-in)")
    ap.add_argument("--estimator", help="real dw-ll_ucoco_384.onnx (default: built stand-in)")
    ap.add_argument("--tiny", action="store_true", help="small stand-ins and frames: a CPU smoke test")
    ap.add_argument("--pose-batch", type=int, default=32)
    args = ap.parse_args(argv)

    dwpose = _import_pack()
    import onnxruntime as ort

    if args.tiny:
        args.frames, args.width, args.height = min(args.frames, 6), 208, 120
        args.cpu_frames = min(args.cpu_frames, 6)
        args.repeats = 1
    wmul, dmul = (0.125, 0.34) if args.tiny else (1.0, 1.0)
    print(f"onnxruntime {ort.__version__}; available providers: {ort.get_available_providers()}")
    t0 = time.perf_counter()
    det = args.detector or build_detector(width=wmul, depth=dmul, planted=planted_person((args.height, args.width)))
    pose = args.estimator or build_pose(width=wmul, depth=dmul)
    for name, m in (("detector", det), ("pose", pose)):
        if isinstance(m, tuple):
            print(f"{name} stand-in: {m[1] / 1e9:.1f} GMAC/image, {m[2] / 1e6:.1f} M parameters")
    det = det[0] if isinstance(det, tuple) else det
    pose = pose[0] if isinstance(pose, tuple) else pose
    print(f"models ready in {time.perf_counter() - t0:.1f} s")

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (args.frames, args.height, args.width, 3), dtype=np.uint8)
    rows = []
    for p in [s.strip() for s in args.providers.split(",") if s.strip()]:
        n = args.cpu_frames if p == "cpu" else args.frames
        rows.append(run(dwpose, det, pose, p, frames[:n], args.repeats, p))

    print()
    print(f"DWPose detection + pose, {args.width}x{args.height}, one person a frame")
    print(f"{'requested':<10} {'detector ran on':<28} {'pose ran on':<28} {'frames':>6} {'frames/s':>9} "
          f"{'det ms/fr':>9} {'pose ms/p':>9} {'load s':>7}")
    for r in rows:
        print(f"{r['label']:<10} {r['got']['detector']:<28} {r['got']['pose']:<28} {r['frames']:>6} "
              f"{r['fps']:>9.1f} {r['det_ms']:>9.1f} {r['pose_ms']:>9.1f} {r['load_s']:>7.1f}")
    for r in rows:
        if r["label"] in ("cuda", "tensorrt") and r["got"]["detector"] == "CPUExecutionProvider":
            print(f"\nWARNING: '{r['label']}' was requested but ran on CPU.")
            for msg in r["fallback"][:1]:
                print("  " + msg)
        if r["label"] in ("cuda", "tensorrt") and r["got"]["detector"] != "CPUExecutionProvider":
            ok = "meets" if r["fps"] >= 30 else "MISSES"
            print(f"\n{r['label']}: {r['fps']:.1f} frames/s {ok} the 30 frames/s target")
    return rows


if __name__ == "__main__":
    main()
