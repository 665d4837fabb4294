#!/usr/bin/env python3
"""Difference of two saved videos (e.g. the official workflow with and without a step cache, same seed and
inputs): per-video relative L2, PSNR, mean / max absolute error in 0..1 pixel units, and the worst frame.

    python bench/video_diff.py A.mp4 B.mp4 [--json]

Both are decoded with PyAV (ComfyUI's own video library) to RGB. The saved videos are h264: the numbers include
the encoder's own loss on both sides, so a difference below ~45 dB PSNR is at the codec's noise level.
"""
import argparse
import json
import math
import sys

import numpy as np


def frames(path):
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.float64) / 255.0


def diff(a, b):
    if a.shape != b.shape:
        raise SystemExit(f"different videos: {a.shape} vs {b.shape} (frames, height, width, channels)")
    d = a - b
    mse = float(np.mean(d * d))
    per_frame = np.sqrt(np.mean(d * d, axis=(1, 2, 3)))
    return {"frames": int(a.shape[0]), "size": [int(a.shape[2]), int(a.shape[1])],
            "rel_l2": float(np.linalg.norm(d) / max(np.linalg.norm(b), 1e-12)),
            "psnr_db": (10 * math.log10(1.0 / mse)) if mse > 0 else float("inf"),
            "mean_abs": float(np.mean(np.abs(d))), "max_abs": float(np.max(np.abs(d))),
            "worst_frame": int(np.argmax(per_frame)), "worst_frame_rms": float(per_frame.max())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a")
    ap.add_argument("b", help="the reference")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    r = diff(frames(args.a), frames(args.b))
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{args.a} vs {args.b}: {r['frames']} frames {r['size'][0]}x{r['size'][1]}, rel. L2 {r['rel_l2']:.4f}, "
              f"PSNR {r['psnr_db']:.2f} dB, mean |d| {r['mean_abs']:.4f}, max |d| {r['max_abs']:.3f}, "
              f"worst frame {r['worst_frame']} (rms {r['worst_frame_rms']:.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
