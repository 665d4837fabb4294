"""Attention backends at SteadyDancer's self-attention shape: time and error of each kernel against dense
attention, on random q/k/v and on the random-weight model (issue 15: the 8-bit SageAttention 2 backend).

    python bench/attention_backends.py --out OUTDIR                       # from the repo root, one H100/H200
    python bench/attention_backends.py --sections model --layers 40 --no-sparse --out OUTDIR   # whole 14B DiT
    python bench/attention_backends.py --device cpu --tiny                # smoke test of the script
(SageAttention rows need ``sageattention`` importable, e.g. PYTHONPATH=<its --target dir>.)

Shape: 832x480x81 + SteadyDancer's 2 reference frames = 23 latent frames x 30 x 52 patches = 35,880 tokens,
40 heads x 128, bf16 (``--tokens/--heads/--head-dim`` change it).

Backends: ``sdpa`` (PyTorch's pick), ``flash`` / ``cudnn`` / ``efficient`` (one SDPA kernel forced), and our
registry's ``auto`` (cuDNN on Hopper), ``flash_attn`` and ``sage`` (SageAttention 2, ``sageattention`` package;
a row says so when it is not importable), ``flex_sparse:0.15`` / ``:0.10`` (top-k sparse, for comparison).

Sections (``--sections``, default qkv,model):
  qkv    random N(0, 1) q/k/v [1, L, H, D]: median ms of ``--reps`` calls (CUDA events, after one warm-up),
         TFLOP/s (4 L^2 H D), relative L2 error against PyTorch SDPA in bf16 and against an fp32 reference
         (the memory-efficient SDPA kernel on fp32 inputs; math attention at 35,880 tokens would need 200 GB).
  model  SteadyDancerDiT.full_14b() cut to ``--layers`` blocks (default 1; 40 = the whole model), random bf16
         weights (steadydancer/model/random_init.py), the bench's random inputs (bench/_dit.py): one forward per
         backend (self-attention on that backend, cross-attention dense as in the pack), its time, and the
         output's relative L2 error against the same model on SDPA bf16 and on fp32-accurate attention.
Random weights make attention nearly uniform (the worst case for top-k sparse; q/k with no outliers for Sage).
Output: a table on stdout; with ``--out``, results.jsonl and table.txt there.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from _common import cuda_time, free_cuda, median, record, rel_l2  # noqa: E402

C.import_pack()  # steadydancer_turbo = this checkout (an installed or PYTHONPATH copy wins if already imported)

REF = "bench_fp32_reference"


def _forced(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernel = getattr(SDPBackend, backend_name)

    def fn(q, k, v):
        with sdpa_kernel([kernel]):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)

    return fn


def _fp32_reference(q, k, v):
    """fp32-accurate attention: the memory-efficient kernel on fp32 inputs on CUDA (math on CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernels = [SDPBackend.EFFICIENT_ATTENTION] if q.is_cuda else [SDPBackend.MATH]
    with sdpa_kernel(kernels):
        out = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)))
    return out.transpose(1, 2).to(q.dtype)


def backends() -> list[tuple[str, object]]:
    """(name, fn or None with the reason in a row) for every backend of the table."""
    from steadydancer_turbo.steadydancer.kernels.attention import (available_backends, get_backend,
                                                                   is_registered, register_backend)
    from steadydancer_turbo.steadydancer.weights import speed_options as accel
    if not is_registered(REF):
        register_backend(REF, _fp32_reference, doc="bench only: fp32 attention")
    out = [("sdpa", get_backend("sdpa"))]
    out += [(n.lower(), _forced(k)) for n, k in (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION"),
                                                 ("efficient", "EFFICIENT_ATTENTION"))]
    avail = available_backends()
    for name in ("auto", "flash_attn", "sage"):
        out.append((name, get_backend(name) if name in avail else None))
    if ARGS.sparse:
        for topk in (0.15, 0.10):
            name = accel.sparse(topk)
            out.append((name, get_backend(name) if name in available_backends() else None))
    return out


def _why_missing(name: str) -> str:
    if name == "sage":
        from steadydancer_turbo.steadydancer.kernels.backends import sage_problem
        return sage_problem() or "not available"
    return f"{name}: package not importable / not available here"


# ------------------------------------------------------------------------------------------------------- sections
def section_qkv():
    L, H, D = ARGS.tokens, ARGS.heads, ARGS.head_dim
    g = torch.Generator(device=C.DEV).manual_seed(0)
    q, k, v = (torch.randn(1, L, H, D, device=C.DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
    ref32 = _fp32_reference(q, k, v)
    sdpa_out = None
    flops = 4 * L * L * H * D
    for name, fn in backends():
        if fn is None:
            record(section="qkv", backend=name, L=L, skipped=_why_missing(name))
            continue
        try:
            t, _, o = cuda_time(lambda: fn(q, k, v), ARGS.reps)
            if name == "sdpa":
                sdpa_out = o
            record(section="qkv", backend=name, L=L, heads=H, head_dim=D, ms=median(t) * 1e3,
                   tflops=flops / median(t) / 1e12, rel_l2_vs_sdpa=rel_l2(o, sdpa_out),
                   rel_l2_vs_fp32=rel_l2(o, ref32), finite=bool(torch.isfinite(o).all()))
            del o
        except Exception as e:  # a kernel that refuses the shape / device is a row, not the end of the run
            record(section="qkv", backend=name, L=L, error=f"{type(e).__name__}: {e}"[:300],
                   tb=traceback.format_exc()[-800:])
        free_cuda()
    del q, k, v, ref32, sdpa_out
    free_cuda()


def section_model():
    from _dit import ours_inputs

    from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
    from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT
    from steadydancer_turbo.steadydancer.weights import speed_options as accel

    cfg = SteadyDancerConfig.tiny() if ARGS.tiny else SteadyDancerConfig.full_14b()
    cfg = cfg.replace(num_layers=ARGS.layers)
    model = C.random_model(lambda: SteadyDancerDiT(cfg, attention="sdpa"))
    inp = ours_inputs("480p", torch.Generator(device=C.DEV).manual_seed(1))
    L = C.tokens("480p", 2)

    def forward():
        with torch.no_grad():
            return model(**inp)

    outs = {}
    for name in (REF, "sdpa"):
        backends()  # registers the reference backend
        accel.use_attention(model, name)
        outs[name] = forward().float()
    for name, fn in backends():
        if fn is None:
            record(section="model", backend=name, layers=cfg.num_layers, L=L, skipped=_why_missing(name))
            continue
        try:
            if name in ("flash", "cudnn", "efficient"):  # forced SDPA kernels: a bench-local registry entry
                from steadydancer_turbo.steadydancer.kernels.attention import is_registered, register_backend
                reg = f"bench_{name}"
                if not is_registered(reg):
                    register_backend(reg, fn, doc=f"bench only: SDPA {name} kernel forced")
                accel.use_attention(model, reg)
            else:
                accel.use_attention(model, name)
            t, peak, o = cuda_time(forward, ARGS.model_reps)
            record(section="model", backend=name, layers=cfg.num_layers, L=L, ms=median(t) * 1e3,
                   peak_gib=peak / 2**30, rel_l2_vs_sdpa=rel_l2(o, outs["sdpa"]),
                   rel_l2_vs_fp32_attention=rel_l2(o, outs[REF]), finite=bool(torch.isfinite(o).all()))
            del o
        except Exception as e:
            record(section="model", backend=name, layers=cfg.num_layers, L=L,
                   error=f"{type(e).__name__}: {e}"[:300], tb=traceback.format_exc()[-800:])
        free_cuda()
    del model, inp, outs
    free_cuda()


SECTIONS = {"qkv": section_qkv, "model": section_model}


def print_table():
    env = C.ENV
    lines = [f"card={env.get('card')} torch={env.get('torch')} cuda={env.get('cuda')} cudnn={env.get('cudnn')} "
             f"date={env.get('date')} tokens={ARGS.tokens} heads={ARGS.heads}x{ARGS.head_dim} bf16"]
    lines.append(f"{'section':8s} {'backend':18s} {'ms':>9s} {'TFLOP/s':>8s} {'relL2 vs sdpa':>14s} "
                 f"{'relL2 vs fp32':>14s}")
    for r in C.RESULTS:
        if r.get("section") not in SECTIONS:
            continue
        if "skipped" in r or "error" in r:
            lines.append(f"{r['section']:8s} {r['backend']:18s} {'-':>9s}  {r.get('skipped') or 'ERROR ' + r['error']}")
            continue
        fp32 = r.get("rel_l2_vs_fp32", r.get("rel_l2_vs_fp32_attention"))
        lines.append(f"{r['section']:8s} {r['backend']:18s} {r['ms']:9.2f} {r.get('tflops', float('nan')):8.1f} "
                     f"{r['rel_l2_vs_sdpa']:14.5f} {fp32:14.5f}")
    C.write_table(lines)


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--sections", default="qkv,model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and model (smoke test, e.g. on CPU)")
    ap.add_argument("--tokens", type=int, default=35880)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=1, help="model section: blocks of the 14B DiT (40 = all)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--model-reps", type=int, default=3)
    ap.add_argument("--no-sparse", dest="sparse", action="store_false", help="leave out the flex_sparse rows")
    ARGS = ap.parse_args()
    C.DEV = ARGS.device
    C.ARGS = argparse.Namespace(budget=1e9, out=ARGS.out, tiny=ARGS.tiny)  # _common's record / write_table
    if ARGS.tiny:
        C.use_tiny_sizes()
        ARGS.tokens, ARGS.heads, ARGS.head_dim = 500, 2, 64
    if ARGS.out:
        os.makedirs(ARGS.out, exist_ok=True)
    C.section_env()
    for name in ARGS.sections.split(","):
        SECTIONS[name]()
    print_table()


if __name__ == "__main__":
    main()
