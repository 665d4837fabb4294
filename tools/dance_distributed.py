#!/usr/bin/env python3
"""Headless multi-GPU SteadyDancer DiT sampling under torchrun (one process per GPU, NCCL; gloo on CPU).

    torchrun --nproc-per-node 8 tools/dance_distributed.py --layout 2x4 --sampler official --steps 40 \
        --weights /models/diffusion_models/SteadyDancer-14B-fp8.safetensors --cond cond.pt --out latent.pt
    torchrun --nproc-per-node 4 tools/dance_distributed.py --sampler rcm --steps 4 --fp8 --sparse-topk 0.1 \
        --compile --out latent.pt                                   # random weights and conditioning
    torchrun --nproc-per-node 2 tools/dance_distributed.py --config tiny --height 64 --width 96 --frames 9 \
        --steps 3 --out /tmp/x.pt                                   # CPU smoke test (gloo)

``--layout GxS``: G guidance groups x S sequence (Ulysses) ranks, G*S = world size; ``seq`` (default) = 1 x
world, ``cfg`` = world x 1. S must divide the model's 40 attention heads (2, 4, 5, 8). The guidance axis only
helps the official sampler (its 2-3 passes per step are batched and split over the groups); the rCM turbo
sampler has one pass per step, so use ``seq`` for it. Any token count works: the last rank's slice is padded and
the padding is never attended (see steadydancer/parallel/distributed.py).

Weights: ``--weights FILE`` (bf16/fp16, fp8 or GGUF; every rank loads its own copy with the pack's loader) or
random bf16 weights generated on each GPU from the same seed (``--config full|tiny``). Conditioning: ``--cond
FILE`` (``torch.save`` of a dict with the SteadyDancerConditioning fields: context, context_null, clip_fea,
clip_fea_c, y, cond_pos, cond_neg, ref_x, ref_c) or random conditioning of the requested size (CPU seeded, so
identical on every rank). The output is the final normalized latent [1, 16, T, H/8, W/8] (rank 0 saves it;
decode it with the Wan VAE, e.g. in ComfyUI). At the end every rank's latent is compared with rank 0's.
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time

import torch
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[1]


def import_pack():
    """``steadydancer_turbo`` from this checkout without running the pack's ComfyUI ``__init__``."""
    name = "steadydancer_turbo"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        sys.modules[name] = importlib.util.module_from_spec(spec)


import_pack()
from steadydancer_turbo.steadydancer.weights import speed_options as accel  # noqa: E402
from steadydancer_turbo.steadydancer.parallel import launch as dist_launch  # noqa: E402
from steadydancer_turbo.steadydancer.parallel import distributed as D  # noqa: E402
from steadydancer_turbo.steadydancer.sampling.conditioning import (  # noqa: E402
    SteadyDancerConditioning, build_i2v_mask, build_ref_c, build_ref_x, build_y, latent_frames)
from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig  # noqa: E402
from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT  # noqa: E402
from steadydancer_turbo.steadydancer.model.random_init import randomize_  # noqa: E402
from steadydancer_turbo.steadydancer.sampling.official import Guidance, sample_official  # noqa: E402
from steadydancer_turbo.turbo.rcm import sample_rcm  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", default="seq", help="GxS, seq, cfg (default seq)")
    p.add_argument("--sampler", choices=["official", "rcm"], default="official")
    p.add_argument("--steps", type=int, default=None, help="default 40 (official) / 4 (rcm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=None, help="model file; default random weights")
    p.add_argument("--config", choices=["full", "tiny"], default="full", help="random-weight model size")
    p.add_argument("--cond", default=None, help="torch.save'd conditioning dict; default random")
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--text-scale", type=float, default=5.0)
    p.add_argument("--pose-scale", type=float, default=1.0)
    p.add_argument("--attention", default="auto")
    p.add_argument("--fp8", action="store_true", help="fp8 matmuls for the block Linears (sm_89+)")
    p.add_argument("--sparse-topk", type=float, default=None, help="top-k block-sparse self-attention, e.g. 0.1")
    p.add_argument("--compile", action="store_true", help="torch.compile the blocks")
    p.add_argument("--force-sequence", action="store_true",
                   help="run the Ulysses code path even with one sequence rank (a check of the code path)")
    p.add_argument("--timeout", type=float, default=900, help="collective timeout (s)")
    p.add_argument("--out", default=None, help="rank 0 saves the final latent here")
    return p


# ---------------------------------------------------------------------------------------------------- model
def model_config(kind: str) -> SteadyDancerConfig:
    if kind == "tiny":
        return SteadyDancerConfig.tiny(dim=256, ffn_dim=320, num_heads=8, text_dim=64, freq_dim=64, clip_dim=64)
    return SteadyDancerConfig.full_14b()


def build_model(args, device) -> SteadyDancerDiT:
    if args.weights:
        from steadydancer_turbo.steadydancer.weights.loader import load_steadydancer
        model = load_steadydancer(args.weights, compute_dtype=torch.bfloat16, device=device, fp8_matmul=args.fp8,
                                  attention="sdpa")
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = SteadyDancerDiT(model_config(args.config), attention="sdpa")
        finally:
            torch.set_default_dtype(old)
        model.requires_grad_(False)
        randomize_(model, seed=1234)
        model.compute_dtype = dtype
        if args.fp8:
            accel.use_fp8(model, act_scaling="tensor", fast_accum=True)
    accel.use_attention(model, accel.sparse(args.sparse_topk) if args.sparse_topk else args.attention)
    if args.compile:
        accel.compile_blocks(model)
    return model


def random_conditioning(cfg: SteadyDancerConfig, height: int, width: int, frames: int,
                        seed: int = 0) -> SteadyDancerConditioning:
    """Random conditioning of the real shapes (CPU generator: identical on every rank)."""
    g = torch.Generator().manual_seed(seed)
    T, h, w = latent_frames(frames), height // 8, width // 8

    def r(*shape):
        return torch.randn(*shape, generator=g)

    img = torch.cat([r(1, 16, 1, h, w), torch.zeros(1, 16, T - 1, h, w)], 2)
    return SteadyDancerConditioning(
        context=r(1, 77, cfg.text_dim), context_null=r(1, 40, cfg.text_dim),
        clip_fea=r(1, cfg.clip_tokens, cfg.clip_dim), clip_fea_c=r(1, cfg.clip_tokens, cfg.clip_dim),
        y=build_y(build_i2v_mask(frames, h, w), img), cond_pos=r(1, 16, T, h, w), cond_neg=r(1, 16, T, h, w),
        ref_x=build_ref_x(r(1, 16, 1, h, w)), ref_c=build_ref_c(r(1, 16, 1, h, w)))


def load_conditioning(args, cfg) -> SteadyDancerConditioning:
    if args.cond:
        return SteadyDancerConditioning(**torch.load(args.cond, map_location="cpu"))
    if args.height % 16 or args.width % 16:
        raise SystemExit("--height and --width must be multiples of 16 (latent / 8, patch 2)")
    return random_conditioning(cfg, args.height, args.width, args.frames, seed=args.seed + 1)


def tokens_of(cond: SteadyDancerConditioning) -> int:
    _, T, h, w = cond.latent_shape
    return (T + 2) * (h // 2) * (w // 2)


# ---------------------------------------------------------------------------------------------------- run
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_sampler(call, cond, args, device, steps, on_step=None):
    def cb(i, n, x0):
        if on_step is not None:
            on_step(i, n)

    if args.sampler == "official":
        g = Guidance(text_scale=args.text_scale, pose_scale=args.pose_scale)
        return sample_official(call, cond.to(device), seed=args.seed, steps=steps, guidance=g, batch_passes=True,
                               callback=cb, device=device)
    return sample_rcm(call, cond.to(device), seed=args.seed, steps=steps, callback=cb, device=device)


def ranks_agree(x: torch.Tensor) -> float:
    """Largest |x - x on rank 0| over all ranks (0.0: every rank holds the same latent)."""
    ref = x.clone()
    dist.broadcast(ref, 0)
    d = (x - ref).abs().max().to(torch.float64)
    dist.all_reduce(d, op=dist.ReduceOp.MAX)
    return d.item()


def setup(args):
    """init the process group (torchrun env, or a 1-rank group), the layout and its groups."""
    rank, world, _ = dist_launch.from_env()
    port = None if "MASTER_ADDR" in __import__("os").environ else dist_launch.free_port()
    device = dist_launch.init_rank(rank, world, port=port, timeout_s=args.timeout)
    layout = D.Layout.parse(args.layout, world)
    ctx = D.init_parallel(layout)
    return device, ctx


def main(argv=None):
    args = parser().parse_args(argv)
    device, ctx = setup(args)
    log = print if ctx.is_main else (lambda *a, **k: None)
    try:
        info = D.runtime_info()
        model = build_model(args, device)
        cond = load_conditioning(args, model.config)
        L = tokens_of(cond)
        log(f"world {info['world']} ({info['backend']}, NCCL {info['nccl']}), layout {ctx.layout} "
            f"(guidance x sequence), {L} tokens: {D.check_tokens(L, ctx.layout.sequence)}")
        call = D.parallelize(model, ctx, force_sequence=args.force_sequence)
        steps = args.steps or (40 if args.sampler == "official" else 4)
        t0 = time.perf_counter()

        def on_step(i, n):
            sync(device)
            log(f"step {i + 1}/{n}  {time.perf_counter() - t0:8.1f} s", flush=True)

        latent = run_sampler(call, cond, args, device, steps, on_step)
        sync(device)
        log(f"{args.sampler} {steps} steps: {time.perf_counter() - t0:.1f} s")
        diff = ranks_agree(latent)
        log(f"largest difference of any rank's latent from rank 0's: {diff:.3g}")
        if args.out and ctx.is_main:
            torch.save(latent.cpu(), args.out)
            log(f"saved {tuple(latent.shape)} latent to {args.out}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
