#!/usr/bin/env python3
"""Multi-GPU timing of one SteadyDancer video (random 14B weights), under torchrun, one process per GPU:

    torchrun --nproc-per-node 1 bench/distributed_bench.py --steps 3 --out /tmp/dist1      # one GPU, minutes
    torchrun --nproc-per-node 8 bench/distributed_bench.py --layouts 1x8,2x4 --steps 40 \
        --baseline official=<1-GPU 40-step s>,turbo=<1-GPU turbo s> --out /tmp/dist8

Cases (``--cases``):
  official  1280x720x81 (82,800 tokens with the 2 reference frames), official UniPC sampler with text CFG 5 and
            pose guidance 1 (window 0.1-0.4): 40 steps = 91 passes; the passes of a step are batched
            (``batch_passes=True``), so a guidance axis splits them. Dense bf16, attention "auto" (cuDNN on
            Hopper), eager. ``--steps N`` < 40 runs the N-step schedule (N >= 3 has both 2- and 3-pass steps),
            times every step, and EXTRAPOLATES the 40-step time as 29 x (mean 2-pass step) + 11 x (mean 3-pass
            step); the table marks it "extrap". ``--steps 40`` measures the whole run.
  turbo     1280x720x81, rCM 4 steps (one pass per step), fp8 matmuls + top-k 0.1 sparse attention + compiled
            blocks (the Model Loader's turbo path); always 4 steps measured after one compile warm-up run.
            Always run on the pure sequence layout 1 x world (one pass per step: no guidance axis); on one GPU
            both 1x1 (plain) and 1x1s (the Ulysses path, compiled functional all-to-alls on NCCL).

Before timing, ``--verify`` (default on) runs one batch-2 forward through the parallel callable and through the
plain model on every rank and prints the relative error (GPU parity of the distributed forward), and every
case checks that all ranks end with the same latent. With one GPU, layout ``1x1s`` runs the Ulysses code path on
a one-rank group (all-to-alls of one rank, compiled functional collectives included) as a code-path check.

Prints a table: case, world, layout (guidance x sequence), GPU, NCCL, tokens per rank, steps run, measured
seconds, 40-step (or 4-step) seconds with "meas"/"extrap", speed-up against ``--baseline`` and peak memory.
Results also go to ``OUT/results.jsonl`` (rank 0). Record runs in bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
import dance_distributed as DD  # noqa: E402  (also registers the pack as steadydancer_turbo)

from steadydancer_turbo.steadydancer.weights import speed_options as accel  # noqa: E402
from steadydancer_turbo.steadydancer.parallel import distributed as D  # noqa: E402
from steadydancer_turbo.steadydancer.sampling.official import Guidance  # noqa: E402

KW = ("context", "clip_fea", "clip_fea_c", "y", "cond", "ref_x", "ref_c")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="official,turbo")
    p.add_argument("--layouts", default=None,
                   help="comma list of GxS for the official case (default: 1xW, plus 2x(W/2) for even W; "
                        "1x1s on one GPU adds the Ulysses code path on one rank)")
    p.add_argument("--steps", type=int, default=40, help="official steps to run (< 40: extrapolated)")
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--config", choices=["full", "tiny"], default="full", help="tiny: CPU smoke test of the script")
    p.add_argument("--turbo-topk", type=float, default=0.1)
    p.add_argument("--no-verify", action="store_true")
    p.add_argument("--baseline", default="", help="case=seconds,... (one-GPU times) for the speed-up column")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def default_layouts(world: int) -> list:
    out = [f"1x{world}"]
    if world % 2 == 0:
        out.append(f"2x{world // 2}")
    if world == 1:
        out.append("1x1s")
    return out


def verify(model, call, cond, dev) -> float:
    """Relative max error of one batch-2 forward, parallel callable vs the plain model on this rank."""
    kw = cond.to(dev).batched_kwargs([("pos", "pos"), ("neg", "pos")])
    g = torch.Generator().manual_seed(5)
    x = torch.randn((2, *cond.latent_shape), generator=g).to(dev)
    t = torch.tensor([999, 700], device=dev)
    args = [kw[k] for k in KW]
    with torch.no_grad():
        got = call(x, t, *args)
        sp = model.sequence_parallel
        D.disable_sequence_parallel(model)
        try:
            ref = model(x, t, *args)
        finally:
            if sp is not None:
                D.enable_sequence_parallel(model, sp.group)
    rel = ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).reshape(1)
    dist.all_reduce(rel, op=dist.ReduceOp.MAX)
    return rel.item()


def timed_run(call, cond, sampler, steps, dev, warm: bool):
    """(total s, per-step seconds) of one sampler run; ``warm``: one untimed run of the same kind first."""
    a = argparse.Namespace(sampler=sampler, text_scale=5.0, pose_scale=1.0, seed=0)
    if warm:
        DD.run_sampler(call, cond, a, dev, steps if sampler == "rcm" else 1)
    sync(dev)
    dist.barrier()
    marks = []
    t0 = time.perf_counter()

    def on_step(i, n):
        sync(dev)
        marks.append(time.perf_counter())

    latent = DD.run_sampler(call, cond, a, dev, steps, on_step)
    sync(dev)
    total = time.perf_counter() - t0
    per = [b - a_ for a_, b in zip([t0] + marks[:-1], marks)]
    return total, per, latent


def extrapolate(per, steps: int, full: int = 40) -> float:
    """40-step time from an N-step run: mean time of the N-step run's k-pass steps x number of k-pass steps at 40."""
    g = Guidance()
    by = {}
    for i, t in enumerate(per):
        by.setdefault(len(g.passes(i, steps)), []).append(t)
    mean = {k: sum(v) / len(v) for k, v in by.items()}
    if 3 not in mean:  # N < 3: no pose-guidance step measured; assume 1.5x a 2-pass step (labelled extrap)
        mean[3] = 1.5 * mean[2]
    return sum(mean[len(g.passes(i, full))] for i in range(full))


def main(argv=None):
    args = parse(argv)
    targs = argparse.Namespace(layout=f"1x{DD.dist_launch.from_env()[1]}", timeout=args.timeout)
    dev, ctx0 = DD.setup(targs)
    world, main_rank = dist.get_world_size(), dist.get_rank() == 0
    log = print if main_rank else (lambda *a, **k: None)
    info = D.runtime_info()
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    base = {k: float(v) for k, v in (kv.split("=") for kv in args.baseline.split(",") if kv)}
    rows = []
    out = pathlib.Path(args.out) if args.out else None
    if out and main_rank:
        out.mkdir(parents=True, exist_ok=True)
    try:
        margs = argparse.Namespace(weights=None, config=args.config, fp8=False, sparse_topk=None, attention="auto",
                                   compile=False)
        t0 = time.perf_counter()
        model = DD.build_model(margs, dev)
        cond = DD.random_conditioning(model.config, args.height, args.width, args.frames, seed=1)
        L = DD.tokens_of(cond)
        log(f"{gpu} x{world}, NCCL {info['nccl']}, torch {info['torch']}; model built in "
            f"{time.perf_counter() - t0:.1f} s; {L} tokens", flush=True)
        cases = args.cases.split(",")
        groups = {}

        def layout_ctx(name):
            lay = D.Layout.parse(name.rstrip("s"), world)
            if str(lay) not in groups:
                groups[str(lay)] = ctx0 if lay == ctx0.layout else D.init_parallel(lay)
            return groups[str(lay)], name.endswith("s")

        def record(case, layout, ctx, steps, total, est, kind, extra):
            r = dict(case=case, world=world, layout=layout, gpu=gpu, nccl=info["nccl"], torch=info["torch"],
                     tokens=L, tokens_per_rank=D.check_tokens(L, ctx.layout.sequence)["per_rank"], steps=steps,
                     measured_s=round(total, 2), est_s=round(est, 2), est_kind=kind,
                     speedup=round(base[case] / est, 2) if case in base else None,
                     peak_gb=round(torch.cuda.max_memory_allocated(dev) / 2**30, 1) if dev.type == "cuda" else None,
                     date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra)
            rows.append(r)
            log(json.dumps(r), flush=True)
            if out and main_rank:
                with open(out / "results.jsonl", "a") as f:
                    f.write(json.dumps(r) + "\n")

        if "official" in cases:
            for name in (args.layouts.split(",") if args.layouts else default_layouts(world)):
                ctx, force = layout_ctx(name)
                call = D.parallelize(model, ctx, force_sequence=force)
                extra = {}
                if not args.no_verify and (call is not model or model.sequence_parallel is not None):
                    extra["verify_rel"] = verify(model, call, cond, dev)
                    log(f"[{name}] parallel vs plain forward on every rank: rel {extra['verify_rel']:.3g}")
                total, per, latent = timed_run(call, cond, "official", args.steps, dev, warm=True)
                extra["ranks_agree"] = DD.ranks_agree(latent) == 0.0
                extra["latent_absmean"] = latent.abs().mean().item()
                if args.steps >= 40:
                    est, kind = total, "meas"
                else:
                    est, kind = extrapolate(per, args.steps), "extrap"
                extra["step_s"] = [round(p, 2) for p in per]
                record("official", name, ctx, args.steps, total, est, kind, extra)
                if out and main_rank:
                    torch.save(latent.cpu(), out / f"official_{name}_{args.steps}steps.pt")
            D.disable_sequence_parallel(model)
        if "turbo" in cases:
            on_gpu = dev.type == "cuda"  # CPU smoke runs: eager bf16-free path (inductor has no CPU flex kernel)
            if on_gpu:
                accel.use_fp8(model, act_scaling="tensor", fast_accum=True)
            accel.use_attention(model, accel.sparse(args.turbo_topk))
            if on_gpu:
                accel.compile_blocks(model)
            for name in ([f"1x{world}"] if world > 1 else ["1x1", "1x1s"]):
                ctx, force = layout_ctx(name)
                call = D.parallelize(model, ctx, force_sequence=force)
                t1 = time.perf_counter()
                total, per, latent = timed_run(call, cond, "rcm", 4, dev, warm=True)
                extra = dict(warmup_compile_s=round(time.perf_counter() - t1 - total, 1),
                             ranks_agree=DD.ranks_agree(latent) == 0.0, step_s=[round(p, 2) for p in per],
                             config=f"fp8 + top-k {args.turbo_topk} + compiled" if on_gpu else "top-k eager (CPU)")
                record("turbo", name, ctx, 4, total, total, "meas", extra)
                if out and main_rank:
                    torch.save(latent.cpu(), out / f"turbo_{name}.pt")
    finally:
        if main_rank and rows:
            hdr = ("case", "world", "layout", "gpu", "nccl", "tokens_per_rank", "steps", "measured_s", "est_s",
                   "est_kind", "speedup", "peak_gb")
            print("\n| " + " | ".join(hdr) + " |\n|" + "---|" * len(hdr))
            for r in rows:
                print("| " + " | ".join(str(r.get(h)) for h in hdr) + " |")
            print("est_s: 40-step official (meas = measured, extrap = from the timed steps) / 4-step turbo; "
                  "layout = guidance x sequence ('s': Ulysses path on one rank)")
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
