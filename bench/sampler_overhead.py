"""Sampler overhead and pass batching, independent of the DiT.

Runs the official sampler (UniPC, text CFG + pose guidance) and the rCM sampler at a real latent size with a
stand-in model whose cost is one elementwise op, and reports host-side time per step (scheduler, guidance
math, noise, conditioning moves) and the number of forwards / passes. The DiT itself dominates real runs
(91 passes of a 14B model); this script shows the sampler adds little and how batching changes forwards.

    python bench/sampler_overhead.py --device cuda --size 1024x576 --frames 81
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from _common import import_pack  # noqa: E402

import_pack(run_init=True)

from steadydancer_turbo.steadydancer.sampling.conditioning import (  # noqa: E402
    SteadyDancerConditioning, build_i2v_mask, build_ref_c, build_ref_x, build_y, check_frame_count)
from steadydancer_turbo.steadydancer.sampling.official import Guidance, count_passes, sample_official  # noqa: E402
from steadydancer_turbo.turbo.rcm import sample_rcm  # noqa: E402


class CheapModel:
    def __init__(self):
        self.forwards = 0
        self.passes = 0

    def __call__(self, x, t, context, clip_fea, clip_fea_c, y, cond, ref_x, ref_c):
        self.forwards += 1
        self.passes += x.shape[0]
        return (0.1 * x + 0.01 * cond).float()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="1024x576", help="WxH pixels")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args()
    W, H = (int(v) for v in a.size.split("x"))
    h, w, T = H // 8, W // 8, check_frame_count(a.frames)
    dev = torch.device(a.device)
    r = lambda *s: torch.randn(*s, device=dev)  # noqa: E731
    cond = SteadyDancerConditioning(
        context=r(1, 120, 4096), context_null=r(1, 60, 4096), clip_fea=r(1, 257, 1280), clip_fea_c=r(1, 257, 1280),
        y=build_y(build_i2v_mask(a.frames, h, w, device=dev), r(1, 16, T, h, w)),
        cond_pos=r(1, 16, T, h, w), cond_neg=r(1, 16, T, h, w),
        ref_x=build_ref_x(r(1, 16, 1, h, w)), ref_c=build_ref_c(r(1, 16, 1, h, w)))
    print(f"device {dev}, latent 16x{T}x{h}x{w}")
    for solver in ("unipc", "euler"):
        for batch in (False, True):
            m = CheapModel()
            sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            sample_official(m, cond, seed=0, steps=a.steps, solver=solver, batch_passes=batch)
            sync()
            dt_s = time.perf_counter() - t0
            print(f"official {solver:5s} batch={batch!s:5s}: {a.steps} steps, {m.forwards} forwards, {m.passes} passes "
                  f"(expected {count_passes(a.steps, Guidance())}), {1000 * dt_s / a.steps:.2f} ms/step overhead")
    for mode in ("sde", "ode"):
        m = CheapModel()
        t0 = time.perf_counter()
        sample_rcm(m, cond, seed=0, steps=4, mode=mode)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        print(f"rcm {mode}: 4 steps, {m.passes} passes, {1000 * (time.perf_counter() - t0) / 4:.2f} ms/step overhead")


if __name__ == "__main__":
    main()
