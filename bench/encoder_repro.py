#!/usr/bin/env python3
"""Does core Save Video give the same video twice from the same frames? Encodes one frame batch N times through
ComfyUI's own video writer (``VideoFromComponents.save_to``, what core Create Video + Save Video run; libx264 from
PyAV's FFmpeg), decodes each file (PyAV) and compares every run with the first: how many runs differ, in how many
frames, by how much, and how many distinct files the runs wrote.

    python bench/encoder_repro.py --comfyui /path/to/ComfyUI [--frames DIR [--pattern 'frames_*.png']] [--runs 8] [--size 832x480]

Without ``--frames`` the frames are seeded uniform noise (81 at --size), the hardest content for the encoder and
close to what a random-weight model decodes to; with it, the PNGs of a folder (e.g. the ``frames_*`` that
``bench/comfy_e2e.py --save-intermediates`` keeps). Prints a table; ``--json`` prints the numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import tempfile
import time

import numpy as np

BENCH = pathlib.Path(__file__).resolve().parent


def load_frames(args):
    if args.frames:
        from PIL import Image

        paths = sorted(pathlib.Path(args.frames).glob(args.pattern))
        if not paths:
            raise SystemExit(f"--frames {args.frames}: no files matching {args.pattern}")
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]), f"{len(paths)} PNGs of {args.frames}"
    w, h = (int(x) for x in args.size.lower().split("x"))
    rng = np.random.default_rng(args.seed)
    return rng.integers(0, 256, size=(args.count, h, w, 3), dtype=np.uint8), f"{args.count} noise frames {w}x{h}"


def save_core(images, fps, path):
    """Core Create Video -> Save Video's writer (comfy_api's VideoFromComponents.save_to with the node's defaults:
    h264 in mp4) on an IMAGE batch (float [N, H, W, 3] in 0..1). ComfyUI must be importable."""
    from fractions import Fraction

    from comfy_api.latest import InputImpl, Types

    comp = Types.VideoComponents(images=images, frame_rate=Fraction(round(fps * 1000), 1000))
    InputImpl.VideoFromComponents(comp).save_to(str(path))


def encode_core(frames, fps, path):
    """``save_core`` of uint8 frames [N, H, W, 3]."""
    import torch

    save_core(torch.from_numpy(frames).float() / 255.0, fps, path)


def series(name, encode, frames, runs, tmp):
    import hashlib

    import video_diff  # decoding and the rel. L2 / PSNR of two videos, as bench/video_diff.py reports them

    ref, rows, secs, files = None, [], [], {}
    for i in range(runs):
        path = pathlib.Path(tmp) / f"{name}_{i}.mp4"
        t = time.perf_counter()
        encode(path)
        secs.append(time.perf_counter() - t)
        h = hashlib.sha256(path.read_bytes()).hexdigest()
        files[h] = files.get(h, 0) + 1
        dec = video_diff.frames(path)  # float64, 0..1 in steps of 1/255
        if ref is None:
            ref = dec
            continue
        d = video_diff.diff(dec, ref)
        per = np.abs(dec - ref).reshape(len(dec), -1).max(axis=1)
        rows.append({"frames_differing": int(np.count_nonzero(per)), "max_abs_levels": round(d["max_abs"] * 255),
                     "rel_l2": d["rel_l2"], "psnr_db": d["psnr_db"]})
    return {"name": name, "runs": runs, "runs_differing": sum(r["frames_differing"] > 0 for r in rows),
            "distinct_files": sorted(files.values(), reverse=True),
            "worst": max(rows, key=lambda r: r["rel_l2"]) if rows else None, "encode_s": sorted(secs)[len(secs) // 2],
            "all": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", required=True, help="ComfyUI checkout (its comfy_api writes the videos)")
    ap.add_argument("--frames", help="folder of PNG frames (default: seeded noise frames)")
    ap.add_argument("--pattern", default="*.png", help="with --frames: which files (e.g. 'frames_*.png')")
    ap.add_argument("--size", default="832x480")
    ap.add_argument("--count", type=int, default=81)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fps", type=float, default=16.0)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(BENCH))
    import _e2e_files as F

    F._comfy(args.comfyui)
    import av

    frames, what = load_frames(args)
    with tempfile.TemporaryDirectory() as tmp:
        res = [series("core Save Video", lambda p: encode_core(frames, args.fps, p), frames, args.runs, tmp)]
    if args.json:
        print(json.dumps({"frames": what, "pyav": av.__version__, "series": res}))
        return 0
    print(f"{what}; PyAV {av.__version__}, encoder {av.codec.Codec('h264', 'w').name}; each run compared with "
          f"the first of its series (decoded frames)")
    print("| writer | runs | distinct files (runs each) | runs differing from the first | worst run: frames "
          "differing | max abs (0-255) | rel. L2 | PSNR dB | encode s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in res:
        w = r["worst"] or {}
        psnr = w.get("psnr_db")
        print(f"| {r['name']} | {r['runs']} | {len(r['distinct_files'])} ({', '.join(map(str, r['distinct_files']))}) "
              f"| {r['runs_differing']} of {r['runs'] - 1} | {w.get('frames_differing', '')}"
              f" | {w.get('max_abs_levels', '')} | {w.get('rel_l2', 0):.3g} | "
              f"{'inf' if psnr is None or math.isinf(psnr) else f'{psnr:.1f}'} | {r['encode_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
