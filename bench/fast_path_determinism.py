#!/usr/bin/env python3
"""Is a DiT path reproducible bit for bit, within one process and across processes (a ComfyUI restart)? And
how far does a difference grow over a sampling loop of a random-weight model?

Full-width SteadyDancer blocks (dim 5120, 40 heads; ``--layers`` of the 40, default 8), random weights
(steadydancer/model/random_init.py, seed 0), 832x480x81 inputs from a fixed generator. ``--variant``:
``default`` = bf16, SDPA, eager (the shipped defaults); ``fast`` = the loader's fast options (fp8 matmul,
flex top-k 0.10, compiled blocks); ``fp8`` / ``flex`` / ``compiled`` = one of them alone, ``flex_compiled`` /
``fp8_compiled`` = two (``VARIANTS``); ``--flex-defaults``: PyTorch's flex kernel options instead of ours (no TMA
loads on Hopper). Each process runs one forward twice and a ``--steps``-step Euler flow loop
(x <- x + (s_next - s) * v(x), shift-5 sigmas) twice; ``--save F`` writes the results, ``--compare F`` (a second
process) reports the difference to them. A third loop starts from the noise rounded once to bf16 (~0.2%):
how much a tiny difference grows over the loop (random weights are not a contracting denoiser):

    python bench/fast_path_determinism.py --variant fast --save /tmp/fast.pt
    python bench/fast_path_determinism.py --variant fast --compare /tmp/fast.pt

``--batches 2,3,3,2`` runs the loop as the official guider calls the DiT: step i runs one batched forward of
``batches[i % n]`` conditions (the same latent with a different text context each, like cond / text-uncond /
pose-uncond) and steps with their CFG-like mix ``v0 + 4 (v0 - v1) [+ (v0 - v2)]``, so the compiled blocks see
batch 2 and 3 (recompiling once for a dynamic batch, as in ComfyUI); the forwards are at the largest batch.
Where the DiT runs a batch one item at a time (``SteadyDancerDiT.splits_batch``: ``fast``, ``flex_compiled``)
``--no-split`` keeps the forwards batched: the behaviour before that rule (issue 15, runs 22-23).
"""
import argparse
import dataclasses
import json
import sys
import time

import torch

import _common as C

C.import_pack()


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --variant -> speed_options.optimize arguments: the shipped defaults, the loader's fast options, and one or two
# of them alone (eager blocks unless compiled; SDPA unless top-k; bf16 linears unless fp8)
VARIANTS = {"default": {}, "fast": dict(fp8=True, sparse_topk=0.1, compile=True),
            "fp8": dict(fp8=True), "flex": dict(sparse_topk=0.1), "compiled": dict(compile=True),
            "flex_compiled": dict(sparse_topk=0.1, compile=True), "fp8_compiled": dict(fp8=True, compile=True)}


def build(args):
    from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
    from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT
    from steadydancer_turbo.steadydancer.weights import speed_options as accel

    cfg = SteadyDancerConfig.tiny() if args.tiny else dataclasses.replace(SteadyDancerConfig.full_14b(),
                                                                           num_layers=args.layers)
    model = C.random_model(lambda: SteadyDancerDiT(cfg, attention="sdpa"))
    if args.flex_defaults:
        from steadydancer_turbo.steadydancer.kernels import sparse_attention as sa
        sa.set_flex_kernel_options(None)  # PyTorch's flex kernel options (no TMA loads on Hopper)
    accel.optimize(model, **VARIANTS[args.variant])
    if args.no_split:
        model.batch_split = False  # batched forwards even where the DiT would run one item at a time
    return model


def inputs(batch=1):
    """The bench's 480p inputs (``_dit.ours_inputs``, generator seed 11) without the timestep, which the loops set;
    ``batch`` > 1: every input repeated to that batch, with a different random text context per item."""
    from _dit import ours_inputs

    g = torch.Generator(device=C.DEV).manual_seed(11)
    inp = ours_inputs("480p", g)
    inp.pop("timestep")
    if batch > 1:
        inp = {k: (v.expand(batch, *v.shape[1:]).contiguous() if k != "x" else v) for k, v in inp.items()}
        inp["context"] = torch.randn(inp["context"].shape, generator=g, device=C.DEV, dtype=inp["context"].dtype)
    return inp


@torch.no_grad()
def forward(model, inp, x, sigma, batch=1):
    t = torch.full((batch,), sigma * 1000.0, device=C.DEV)
    kw = {k: v[:batch] for k, v in inp.items() if k != "x"}
    return model(x=x.expand(batch, *x.shape[1:]), timestep=t, **kw).float()


def velocity(model, inp, x, sigma, batch):
    if batch == 1:
        return forward(model, inp, x, sigma)
    v = forward(model, inp, x, sigma, batch)
    mix = v[:1] + 4.0 * (v[:1] - v[1:2])
    return mix + (v[:1] - v[2:3]) if batch > 2 else mix


@torch.no_grad()
def loop(model, inp, steps, x=None, batches=(1,)):
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    s = 5.0 * s / (1 + 4.0 * s)
    x = inp["x"].clone() if x is None else x
    for i in range(steps):
        x = x + float(s[i + 1] - s[i]) * velocity(model, inp, x, float(s[i]), batches[i % len(batches)])
    return x


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", choices=tuple(VARIANTS), default="fast",
                    help="fp8 / flex / compiled: one of the fast options alone; flex_compiled / fp8_compiled: two")
    ap.add_argument("--flex-defaults", action="store_true", help="PyTorch's flex kernel options instead of ours "
                    "(no TMA loads on Hopper)")
    ap.add_argument("--no-split", action="store_true", help="batched forwards even where the DiT runs one item at "
                    "a time (SteadyDancerDiT.splits_batch: flex traced into compiled blocks on CUDA)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--save")
    ap.add_argument("--compare")
    ap.add_argument("--device", default="cuda", help="cpu: smoke-test the script (with --tiny, default variant)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batches", default="1", help="batch per step, cycled (e.g. 2,3,3,2: guidance passes)")
    args = ap.parse_args(argv)
    batches = tuple(int(b) for b in args.batches.split(","))
    if any(b < 1 or b > 3 for b in batches):
        raise SystemExit("--batches: each batch is 1, 2 or 3")
    C.DEV = args.device
    if args.tiny:
        C.use_tiny_sizes()
    t0 = time.time()
    model = build(args)
    bmax = max(batches)
    inp = inputs(bmax)
    f1 = forward(model, inp, inp["x"], 0.9, bmax)  # the first call compiles (fast)
    f2 = forward(model, inp, inp["x"], 0.9, bmax)
    l1 = loop(model, inp, args.steps, batches=batches)
    l2 = loop(model, inp, args.steps, batches=batches)
    xp = inp["x"].bfloat16().float()  # one bf16 rounding of the start noise (~0.2% rel.): how far does it grow?
    lp = loop(model, inp, args.steps, xp, batches=batches)
    if C.DEV == "cuda":
        torch.cuda.synchronize()
    tags = ("+flex_defaults" if args.flex_defaults else "") + ("+no_split" if args.no_split else "")
    row = dict(variant=args.variant + tags, split=model.splits_batch(C.DEV), layers=args.layers, steps=args.steps,
               batches=list(batches),
               card=torch.cuda.get_device_name() if C.DEV == "cuda" else C.DEV,
               torch=torch.__version__, s=round(time.time() - t0, 1),
               same_process_forward_equal=bool(torch.equal(f1, f2)), same_process_forward_rel=rel(f2, f1),
               same_process_loop_equal=bool(torch.equal(l1, l2)), same_process_loop_rel=rel(l2, l1),
               start_perturbation_rel=rel(xp, inp["x"]), perturbed_loop_rel=rel(lp, l1))
    if args.save:
        torch.save({"forward": f1.cpu(), "loop": l1.cpu()}, args.save)
    if args.compare:
        ref = torch.load(args.compare)
        row.update(other_process_forward_equal=bool(torch.equal(f1.cpu(), ref["forward"])),
                   other_process_forward_rel=rel(f1.cpu(), ref["forward"]),
                   other_process_loop_equal=bool(torch.equal(l1.cpu(), ref["loop"])),
                   other_process_loop_rel=rel(l1.cpu(), ref["loop"]))
    print("RESULT " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
