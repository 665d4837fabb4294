#!/usr/bin/env python3
"""Timing of the ComfyUI Multi-GPU node path: the native MODEL sampled through ComfyUI's own sampling
(SamplerCustomAdvanced with the pack's GUIDER / SAMPLER, in ComfyUI's process as rank 0), on 1 GPU and through
the SteadyDancer Multi-GPU node on N GPUs (one worker process per extra GPU). Random 14B weights (bf16, seeded;
built on the GPU, then handed to ComfyUI in host RAM as the loader does), random conditioning of the real shapes.
Run it with ComfyUI's Python on the multi-GPU machine (no server needed):

    COMFYUI_PATH=/path/to/ComfyUI /path/to/ComfyUI/venv/bin/python bench/multigpu_node_bench.py \
        --gpus 1,2,4,8 --sampler official --steps 3 --layout sequence
    ... --sampler rcm --steps 4                        # turbo sampler, one pass per step

Without a ComfyUI install on the GPU machine, ``--host core`` times the same serving machinery (worker pool in
serving mode, replicas from rank 0's tensors by broadcast, one broadcast of the inputs per DiT call) driven by the
core samplers instead of ComfyUI's sampling code (no ComfyUI import; the pack's own Python suffices):

    python bench/multigpu_node_bench.py --host core --gpus 1,2,4,8 --sampler official --steps 3

(there the start-up column includes the weight broadcast; with ComfyUI the first sampling does).

For each GPU count it prints: the node's start-up (worker processes, NCCL), the first sampling (ComfyUI loads the
model on GPU 0, the weights go to the workers by broadcast, then the steps), then ``--repeat`` timed samplings,
their mean seconds per step, the speed-up over the 1-GPU row and the relative difference of the latent to the
1-GPU latent. ``--config tiny`` with ``--comfy-args --cpu`` and STEADYDANCER_MULTIGPU_CPU=1 is a CPU smoke run of
the script itself (CPU "GPUs", gloo). Record GPU runs in bench/RESULTS.md (machine kind, NCCL version, layout).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="1,2", help="comma list of GPU counts (1 = the plain MODEL, the reference)")
    p.add_argument("--layout", default="sequence", choices=["sequence", "2 x sequence", "3 x sequence"])
    p.add_argument("--sampler", default="official", choices=["official", "rcm"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--config", choices=["full", "tiny"], default="full")
    p.add_argument("--attention", default="auto")
    p.add_argument("--comfy-args", default="", help="ComfyUI flags, e.g. '--cpu' for the smoke run")
    p.add_argument("--host", choices=["comfyui", "core"], default="comfyui",
                   help="core: the serving pool driven by the core samplers (no ComfyUI needed)")
    p.add_argument("--out", default=None, help="append the rows as JSON lines to this file")
    return p.parse_args(argv)


def setup(args):
    if args.host == "core":
        sys.path.insert(0, str(ROOT / "tools"))
        import dance_distributed  # noqa: F401  (registers the pack as steadydancer_turbo, without ComfyUI)
        return
    comfy = pathlib.Path(os.environ["COMFYUI_PATH"]).resolve()
    sys.path.insert(0, str(comfy))
    sys.path.insert(0, str(ROOT / "tools"))
    import comfy.options
    comfy.options.enable_args_parsing()
    sys.argv = [sys.argv[0], *args.comfy_args.split()]
    from _common import import_pack

    import_pack(run_init=True)


def main(argv=None):
    args = parse(argv)
    setup(args)
    import torch

    import dance_distributed as DD
    from steadydancer_turbo.nodes import multigpu_nodes as mg
    from steadydancer_turbo.nodes import native_multigpu as nmg
    from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT
    from steadydancer_turbo.steadydancer.model.random_init import randomize_
    from steadydancer_turbo.steadydancer.parallel import distributed as D
    from steadydancer_turbo.steadydancer.parallel import replica
    from steadydancer_turbo.steadydancer.parallel.pool import WorkerPool
    from steadydancer_turbo.steadydancer.weights import speed_options as accel

    core = args.host == "core"
    if core:
        dev = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    else:
        import comfy.model_management as mm
        dev = mm.get_torch_device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = DD.model_config(args.config)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            dit = SteadyDancerDiT(cfg, attention="sdpa")
    finally:
        torch.set_default_dtype(old)
    dit.requires_grad_(False)
    randomize_(dit, seed=1234)
    dit.compute_dtype = dtype
    accel.use_attention(dit, args.attention)
    h, w = (args.height, args.width) if args.config == "full" else (64, 96)
    frames = args.frames if args.config == "full" else 9
    cond = DD.random_conditioning(cfg, h, w, frames)
    tokens = DD.tokens_of(cond)

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    if core:  # the serving pool on the core samplers
        run_args = argparse.Namespace(sampler=args.sampler, text_scale=5.0, pose_scale=1.0, seed=42)
        pools = []

        def make(n):
            if n == 1:
                return dit
            devices = [f"cuda:{i}" for i in range(n)] if dev.type == "cuda" else ["cpu"] * n
            pool = WorkerPool(devices, nmg.parse_layout(args.layout, n, cfg.num_heads), None,
                              threads=1 if dev.type == "cpu" else None)
            pool.start(None)
            pools.append(pool)
            spec = replica.describe(dit)
            tensors = replica.values(dit, spec)
            pool.load_weights(spec, tensors)
            r0 = replica.build(spec, dev, allocate=False)
            replica.bind(r0, spec, tensors, dev)
            return pool.served(r0)

        def sample(m):
            return timed(lambda: DD.run_sampler(m, cond, run_args, dev, args.steps))

        def done():
            while pools:
                pools.pop().shutdown()
    else:  # ComfyUI: the native MODEL through SamplerCustomAdvanced, the node for N > 1
        from steadydancer_turbo.nodes import conditioning_nodes as cn
        from steadydancer_turbo.nodes import native_model as nm
        from steadydancer_turbo.nodes import native_sampling as ns
        from steadydancer_turbo.nodes import sampler_nodes as sn
        from steadydancer_turbo.steadydancer.sampling import official as sampling

        model = nm.make_model_patcher(dit.to("cpu"))  # weights in host RAM, as the loader leaves them
        pos, neg = cn.native_conditioning(cond, [[cond.context, {}]], [[cond.context_null, {}]])
        latent = {"samples": torch.zeros(1, 16, cond.y.shape[2], h // 8, w // 8)}

        def make(n):
            return model if n == 1 else mg.SteadyDancerMultiGPU().apply(model, n, args.layout)[0]

        def sample(m):
            if args.sampler == "official":
                guider = ns.make_guider(m, pos, neg, sampling.Guidance(5.0, 1.0, 0.1, 0.4))
                sampler, sigmas = ns.native().FlowSampler("unipc"), sn.official_sigmas(args.steps, 5.0, m)
            else:
                guider = ns.basic_guider(m, pos)
                sampler, sigmas = ns.native().RCMSampler("sde"), sn.rcm_sigmas(args.steps, "rcm", 5.0, 80.0)
            out, t = timed(lambda: ns.sample_custom_advanced(guider, sampler, sigmas, latent, 42))
            return out["samples"], t

        def done():
            mm.unload_all_models()  # also stops this count's workers

    rows, ref, base_step = [], None, None
    info = D.runtime_info()
    print(f"# {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, torch {info['torch']}, "
          f"NCCL {info['nccl']}, {tokens} tokens, {args.sampler} {args.steps} steps, {h}x{w}x{frames}")
    print("| GPUs | layout | start s | first run s | run s | s/step | speed-up | rel. diff to 1 GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for n in [int(v) for v in args.gpus.split(",")]:
        m, start = timed(lambda: make(n))
        _, first = sample(m)
        times = []
        for _ in range(args.repeat):
            out, t = sample(m)
            times.append(t)
        run = sum(times) / len(times)
        step = run / args.steps
        if ref is None:
            ref, base_step = out, step
        diff = float((out.double() - ref.double()).abs().max() / ref.double().abs().max())
        row = dict(host=args.host, gpus=n, layout="-" if n == 1 else args.layout, start_s=start, first_s=first, run_s=run,
                   step_s=step, speedup=base_step / step, rel_diff=diff, tokens=tokens, sampler=args.sampler,
                   steps=args.steps, nccl=info["nccl"], size=f"{h}x{w}x{frames}")
        rows.append(row)
        print(f"| {n} | {row['layout']} | {start:.1f} | {first:.1f} | {run:.1f} | {step:.2f} | "
              f"{row['speedup']:.2f}x | {diff:.1e} |", flush=True)
        del m
        done()
    if args.out:
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
