#!/usr/bin/env python3
"""How much of core Save Video's time is the content (issue 15): ComfyUI's own h264 encode (the object the core
SaveVideo node writes, ``VideoFromComponents.save_to`` with the node's defaults: mp4, codec auto = h264, no
crf; ``bench/encoder_repro.save_core``) of one 81-frame video of each kind:

- ``noise``: uniform random frames, what a random-weight DiT decodes to (the end-to-end bench's content);
- ``smoothed noise``: the same noise under a 9x9 box blur;
- ``figure``: the end-to-end bench's driving video (``_e2e_files.person_frame``: a moving figure on a plain
  background), the closest to a dance video here;
- ``gradient``: a smooth moving colour gradient.

Per row the best of ``--reps`` encodes (seconds) and the file size. CPU only; it runs where ComfyUI's Python runs:

    /path/to/comfy-venv/bin/python bench/save_video_content.py --comfyui /path/to/ComfyUI [--size 832x480]
"""
import argparse
import math
import os
import pathlib
import platform
import sys
import tempfile
import time
BENCH = pathlib.Path(__file__).resolve().parent


def contents(n, w, h):
    import numpy as np
    import torch

    import _e2e_files as F  # bench/ is on sys.path (main)

    g = torch.Generator().manual_seed(0)
    noise = torch.rand(n, h, w, 3, generator=g)
    yield "noise", noise
    yield "smoothed noise", torch.nn.functional.avg_pool2d(noise.permute(0, 3, 1, 2), 9, 1, 4).permute(0, 2, 3, 1)
    yield "figure", torch.from_numpy(np.stack([F.person_frame(w, h, i / 24) for i in range(n)])).float() / 255
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    yield "gradient", torch.stack([torch.stack([(xx + i / n) % 1, yy, 0.5 + 0.5 * torch.sin(6 * xx + i / 8)], -1)
                                   for i in range(n)])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--size", default="832x480")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    sys.path.insert(0, str(args.comfyui))
    sys.path.insert(0, str(BENCH))
    import torch
    from encoder_repro import save_core

    print(f"ComfyUI {args.comfyui}, torch {torch.__version__}, {os.cpu_count()} CPUs ({platform.processor() or '?'}), "
          f"{args.frames} frames {w}x{h} @ 16 fps, best of {args.reps}")
    print("\n| content | encode s | file MB |\n|---|---:|---:|")
    with tempfile.TemporaryDirectory() as d:
        for name, frames in contents(args.frames, w, h):
            best = math.inf
            path = os.path.join(d, "v.mp4")
            for _ in range(args.reps):
                t = time.perf_counter()
                save_core(frames, 16, path)
                best = min(best, time.perf_counter() - t)
            print(f"| {name} | {best:.2f} | {os.path.getsize(path) / 1e6:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
