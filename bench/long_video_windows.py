"""Long-video benchmark (issue 12): turbo 4 steps at 480p for 81, 161 and 321 frames with context windows
(21 latent = 81 frames, overlap 4 latent = 16 frames), full-size random SteadyDancer-14B, the fastest settings
(fp8 matmuls, flex top-k 0.10 sparse self-attention, compiled blocks: the Model Loader's turbo path, see
bench/RESULTS.md run 9), one GPU, one process, inside one 10-minute call including the compile.

    PYTHONPATH=.. python bench/long_video_windows.py --out OUTDIR           # GPU (H100 / H200)
    python bench/long_video_windows.py --tiny --device cpu                  # CPU smoke test of the script

For each length: one untimed warm-up run of the whole sampler (the first also compiles), then ``--reps`` timed
runs of ``turbo.rcm.sample_rcm(..., context=ContextOptions())``. Per run: DiT time = sum of the CUDA-event
times of every window forward (what the windows cost), sampler time = wall clock of the whole call (adds the
slicing, fusion and CPU noise draws), peak VRAM = torch.cuda.max_memory_allocated over the run (weights
included). Targets: DiT time <= 1.1 x windows x the 81-frame DiT time, peak VRAM within 10 % of the 81-frame
run. Weights are random (bench/_common.py's ``random_model``: built on the GPU in bf16, then fp8).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common  # noqa: E402  (random_model, the bench utilities)
import loader_formats  # noqa: E402  (_import_pack: the pack from this checkout, without the node layer)

RES = {"480p": (832, 480)}


def log(*a):
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


T0 = time.time()


def build(args):
    loader_formats._import_pack()
    from steadydancer_turbo.steadydancer.weights import speed_options as accel
    from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
    from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT

    _common.DEV = args.device
    cfg = SteadyDancerConfig.tiny() if args.tiny else SteadyDancerConfig.full_14b()
    t = time.time()
    model = _common.random_model(lambda: SteadyDancerDiT(cfg, attention="sdpa"))
    cuda = args.device == "cuda"
    if cuda:  # accel.optimize's fp8 mode (per-tensor scale, fast accumulation); compile as the Model Loader does it
        accel.optimize(model, fp8=not args.no_fp8, sparse_topk=args.topk or None, compile=False)
        if not args.no_compile:
            accel.compile_blocks(model, fullgraph=False)
    log(f"model built ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params) in {time.time() - t:.1f} s;"
        f" fp8={cuda and not args.no_fp8} topk={args.topk if cuda else None} compile={cuda and not args.no_compile}")
    return model, cfg


def make_cond(cfg, frames, lat_h, lat_w, device):
    from steadydancer_turbo.steadydancer.sampling import conditioning as sdc

    g = torch.Generator(device="cpu").manual_seed(frames)
    T = sdc.latent_frames(frames)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    img = torch.cat([r(1, 16, 1, lat_h, lat_w), torch.zeros(1, 16, T - 1, lat_h, lat_w)], 2)
    cond = sdc.SteadyDancerConditioning(
        context=r(1, cfg.text_len, cfg.text_dim), context_null=r(1, 16, cfg.text_dim),
        clip_fea=r(1, cfg.clip_tokens, cfg.clip_dim), clip_fea_c=r(1, cfg.clip_tokens, cfg.clip_dim),
        y=sdc.build_y(sdc.build_i2v_mask(frames, lat_h, lat_w), img), cond_pos=r(1, 16, T, lat_h, lat_w),
        ref_x=sdc.build_ref_x(r(1, 16, 1, lat_h, lat_w)), ref_c=sdc.build_ref_c(r(1, 16, 1, lat_h, lat_w)))
    return cond.to(device=device)


class Timed:
    """The model callable with CUDA-event timing of every forward (host clock on CPU)."""

    def __init__(self, model, cuda):
        self.model, self.cuda, self.events, self.host = model, cuda, [], []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *a):
        if self.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out = self.model(*a)
            e.record()
            self.events.append((s, e))
        else:
            t = time.perf_counter()
            out = self.model(*a)
            self.host.append(time.perf_counter() - t)
        return out

    def total(self):
        if self.cuda:
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in self.events) / 1e3, len(self.events)
        return sum(self.host), len(self.host)


def run_length(model, cfg, frames, args, lat):
    from steadydancer_turbo.steadydancer.sampling import context_windows as cw
    from steadydancer_turbo.turbo.rcm import sample_rcm

    cuda = args.device == "cuda"
    opts = cw.ContextOptions(window=args.window, overlap=args.overlap)
    cond = make_cond(cfg, frames, *lat, args.device)
    T = cond.latent_shape[1]
    windows = len(opts.windows(T)) if opts.active(T) else 1
    rows = []
    for rep in range(1 + args.reps):
        timed = Timed(model, cuda)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with torch.no_grad():
            x = sample_rcm(timed, cond, seed=0, steps=args.steps, schedule="shift", context=opts, device=args.device)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        dit, forwards = timed.total()
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        row = dict(frames=frames, latent_frames=T, windows=windows, forwards=forwards, dit_s=dit, sampler_s=wall,
                   peak_gib=peak / 2**30, finite=bool(torch.isfinite(x).all()), warmup=rep == 0,
                   shape=list(x.shape))
        log(json.dumps(row))
        if rep:
            rows.append(row)
        del x
    best = min(rows, key=lambda r: r["dit_s"])
    best["reps"] = [r["dit_s"] for r in rows]
    return best


def main():
    global T0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="81,161,321", help="pixel frames (4n+1), the first is the baseline")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--window", type=int, default=21, help="latent frames (21 = 81 frames)")
    ap.add_argument("--overlap", type=int, default=4, help="latent frames (4 = 16 frames)")
    ap.add_argument("--topk", type=float, default=0.1, help="flex top-k sparse self-attention (0 = dense)")
    ap.add_argument("--no-fp8", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--reps", type=int, default=1, help="timed runs per length after one warm-up")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny model and latent (smoke test)")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    args = ap.parse_args()
    T0 = time.time()
    cuda = args.device == "cuda"
    if cuda:
        log(f"{torch.cuda.get_device_name()} torch {torch.__version__} CUDA {torch.version.cuda}")
    model, cfg = build(args)
    w, h = RES["480p"]
    lat = (4, 4) if args.tiny else (h // 8, w // 8)
    lengths = [int(v) for v in args.lengths.split(",")]
    results = []
    for frames in lengths:
        results.append(run_length(model, cfg, frames, args, lat))
    base = results[0]
    lines = [f"long-video bench: turbo {args.steps} steps, {'tiny' if args.tiny else '480p 832x480'}, window "
             f"{args.window} latent, overlap {args.overlap}, fp8={cuda and not args.no_fp8}, "
             f"topk={args.topk if cuda else None}, compile={cuda and not args.no_compile}, {args.device}"
             f"{' ' + torch.cuda.get_device_name() if cuda else ''}",
             "| frames | latent | windows | DiT forwards | DiT s | sampler s | DiT / (windows x 81-frame DiT) | "
             "peak VRAM GiB | peak / 81-frame peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = r["dit_s"] / (r["windows"] * base["dit_s"] / base["windows"])
        vram = r["peak_gib"] / base["peak_gib"] if base["peak_gib"] else float("nan")
        r.update(ratio=ratio, vram_ratio=vram)
        lines.append(f"| {r['frames']} | {r['latent_frames']} | {r['windows']} | {r['forwards']} | {r['dit_s']:.2f} | "
                     f"{r['sampler_s']:.2f} | {ratio:.3f} {'ok' if ratio <= 1.1 else 'OVER 1.1'} | "
                     f"{r['peak_gib']:.2f} | {vram:.3f} {'ok' if not vram == vram or vram <= 1.1 else 'OVER 1.1'} |")
    table = "\n".join(lines)
    print(table, flush=True)
    log("done")
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "long_video_table.md").write_text(table + "\n")
        (out / "long_video_results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
