"""Attention backends at SteadyDancer's self-attention shape: time and error of each kernel against dense
attention, on random q/k/v and on the random-weight model (issue 15: the 8-bit SageAttention 2 backend).

    python bench/attention_backends.py --out OUTDIR                       # from the repo root, one H100/H200
    python bench/attention_backends.py --sections model --layers 40 --no-sparse --out OUTDIR   # whole 14B DiT
    python bench/attention_backends.py --sections qkv,int8 --out OUTDIR     # top-k rows: flex vs int8 kernel
    python bench/attention_backends.py --device cpu --tiny                # smoke test of the script
(SageAttention rows need ``sageattention`` importable, e.g. PYTHONPATH=<its --target dir>; the int8_sparse rows
need triton and a CUDA GPU of compute capability 8.9+, and say why they are skipped elsewhere.)

Shape: 832x480x81 + SteadyDancer's 2 reference frames = 23 latent frames x 30 x 52 patches = 35,880 tokens,
40 heads x 128, bf16 (``--tokens/--heads/--head-dim`` change it).

Backends: ``sdpa`` (PyTorch's pick), ``flash`` / ``cudnn`` / ``efficient`` (one SDPA kernel forced), and our
registry's ``auto`` (cuDNN on Hopper), ``flash_attn`` and ``sage`` (SageAttention 2, ``sageattention`` package;
a row says so when it is not importable), ``flex_sparse:0.15`` / ``:0.10`` (top-k sparse, exact on the kept
blocks) and ``int8_sparse:0.15`` / ``:0.10`` (the same blocks, our int8 Triton kernel; ``--backends`` picks rows).

Sections (``--sections``, default qkv,model; int8 on request):
  qkv    random N(0, 1) q/k/v [1, L, H, D]: median ms of ``--reps`` calls (CUDA events, after one warm-up),
         TFLOP/s (4 L^2 H D), relative L2 error against PyTorch SDPA in bf16 and against an fp32 reference
         (the memory-efficient SDPA kernel on fp32 inputs; math attention at 35,880 tokens would need 200 GB).
  model  SteadyDancerDiT.full_14b() cut to ``--layers`` blocks (default 1; 40 = the whole model), random bf16
         weights (steadydancer/model/random_init.py), the bench's random inputs (bench/_dit.py): one forward per
         backend (self-attention on that backend, cross-attention dense as in the pack), its time, and the
         output's relative L2 error against the same model on SDPA bf16 and on fp32-accurate attention.
  For int8_sparse rows both sections add ``vs flex``: the error against flex_sparse at the same top-k (the same
  kept blocks, exact attention on them in bf16), i.e. what the 8-bit kernel adds to the sparsity error.
  int8   the int8_sparse kernel's parts at top-k 0.10 and 0.15 (block selection, the Triton quantizers of Q and
         smoothed K, the same quantization as torch ops eager and compiled, the attention kernel alone, the whole
         backend) and a num_warps x num_stages sweep of the attention kernel at top-k 0.10; TFLOP/s counts the
         kept blocks only (4 L (K x 128) H D).
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
    for kernel, wanted in (("flex", ARGS.sparse), ("int8", ARGS.int8)):
        if wanted:
            for topk in (0.15, 0.10):
                name = accel.sparse(topk, kernel=kernel)
                out.append((name, get_backend(name) if name in available_backends() else None))
    if ARGS.backends:
        keep = set(ARGS.backends.split(","))
        out = [(n, f) for n, f in out if n in keep]
    return out


def _why_missing(name: str) -> str:
    from steadydancer_turbo.steadydancer.kernels import backends as B
    if name == "sage":
        return B.sage_problem() or "not available"
    if name.startswith("int8_sparse"):
        return B.int8_sparse_problem(C.DEV) or "not available"
    return f"{name}: package not importable / not available here"


def _vs_flex(name: str, out, flex_outs: dict) -> dict:
    """A flex_sparse row's output is kept in ``flex_outs``; an int8_sparse row gets ``rel_l2_vs_flex``, its error
    against the flex_sparse row with the same blocks (when that row ran)."""
    if name.startswith("flex_sparse"):
        flex_outs[name] = out
        return {}
    twin = _flex_twin(name)
    return {"rel_l2_vs_flex": rel_l2(out, flex_outs[twin])} if twin in flex_outs else {}


def _flex_twin(name: str) -> str | None:
    """The flex_sparse backend with the same blocks as int8_sparse backend ``name`` (None for other names)."""
    from steadydancer_turbo.steadydancer.kernels import backends as B
    s = B.sparse_settings(name)
    if not s or s["kernel"] != "int8":
        return None
    return B.sparse_backend(**dict(s, kernel="flex"))


# ------------------------------------------------------------------------------------------------------- sections
def section_qkv():
    L, H, D = ARGS.tokens, ARGS.heads, ARGS.head_dim
    g = torch.Generator(device=C.DEV).manual_seed(0)
    q, k, v = (torch.randn(1, L, H, D, device=C.DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
    ref32 = _fp32_reference(q, k, v)
    sdpa_out = None
    flex_outs = {}
    flops = 4 * L * L * H * D
    for name, fn in backends():
        if fn is None:
            record(section="qkv", backend=name, L=L, skipped=_why_missing(name))
            continue
        try:
            t, _, o = cuda_time(lambda: fn(q, k, v), ARGS.reps)
            if name == "sdpa":
                sdpa_out = o
            extra = _vs_flex(name, o, flex_outs)
            record(section="qkv", backend=name, L=L, heads=H, head_dim=D, ms=median(t) * 1e3,
                   tflops=flops / median(t) / 1e12, rel_l2_vs_sdpa=rel_l2(o, sdpa_out),
                   rel_l2_vs_fp32=rel_l2(o, ref32), finite=bool(torch.isfinite(o).all()), **extra)
            del o
        except Exception as e:  # a kernel that refuses the shape / device is a row, not the end of the run
            record(section="qkv", backend=name, L=L, error=f"{type(e).__name__}: {e}"[:300],
                   tb=traceback.format_exc()[-800:])
        free_cuda()
    del q, k, v, ref32, sdpa_out, flex_outs
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
            extra = _vs_flex(name, o.float(), outs)
            record(section="model", backend=name, layers=cfg.num_layers, L=L, ms=median(t) * 1e3,
                   peak_gib=peak / 2**30, rel_l2_vs_sdpa=rel_l2(o, outs["sdpa"]),
                   rel_l2_vs_fp32_attention=rel_l2(o, outs[REF]), finite=bool(torch.isfinite(o).all()), **extra)
            del o
        except Exception as e:
            record(section="model", backend=name, layers=cfg.num_layers, L=L,
                   error=f"{type(e).__name__}: {e}"[:300], tb=traceback.format_exc()[-800:])
        free_cuda()
    del model, inp, outs
    free_cuda()


def _torch_quant(x, block, mean=None):
    """The kernel's int8 block quantization as torch ops (rounds half to even: for timing only)."""
    b, n, h, d = x.shape
    nb = -(-n // block)
    xf = x.float()
    if mean is not None:
        xf = xf - mean[:, None]
    xp = F.pad(xf, (0, 0, 0, 0, 0, nb * block - n)).view(b, nb, block, h, d)
    scale = xp.abs().amax(dim=(2, 4), keepdim=True).clamp_min(1e-20) / 127
    x8 = (xp / scale).round().clamp(-127, 127).to(torch.int8)
    return x8.view(b, nb * block, h, d)[:, :n], scale.view(b, nb, h).transpose(1, 2)


def section_int8():
    from steadydancer_turbo.steadydancer.kernels import backends as B
    from steadydancer_turbo.steadydancer.kernels.attention import get_backend
    from steadydancer_turbo.steadydancer.kernels.sparse_attention import (SparseAttentionConfig, select_kv_blocks,
                                                                          sparse_attention)
    from steadydancer_turbo.steadydancer.weights import speed_options as accel

    problem = B.int8_sparse_problem(C.DEV)
    if problem:
        C.log(f"int8 section skipped: {problem}")
        record(section="int8", part="all", skipped=problem)
        return
    from steadydancer_turbo.steadydancer.kernels import int8_sparse as I8

    L, H, D = ARGS.tokens, ARGS.heads, ARGS.head_dim
    g = torch.Generator(device=C.DEV).manual_seed(0)
    q, k, v = (torch.randn(1, L, H, D, device=C.DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
    scale = D ** -0.5

    def timed(fn):
        t, _, o = cuda_time(fn, ARGS.reps)
        return median(t) * 1e3, o

    def torch_qk(quant):
        return quant(q, 128), quant(k, 128, k.mean(dim=1, dtype=torch.float32))

    compiled_quant = torch.compile(_torch_quant, dynamic=False)
    ms_q, (q8, qs) = timed(lambda: I8.quantize_blocks(q, 128))
    ms_k, (k8, ks) = timed(lambda: I8.quantize_blocks(k, 128, smooth=True))
    ms_te, _ = timed(lambda: torch_qk(_torch_quant))
    ms_tc, _ = timed(lambda: torch_qk(compiled_quant))
    record(section="int8", part="quantize Q and K", L=L, triton_q_ms=ms_q, triton_k_smooth_ms=ms_k,
           triton_qk_ms=ms_q + ms_k, torch_qk_eager_ms=ms_te, torch_qk_compiled_ms=ms_tc)
    opts = I8.kernel_options(q.device)
    for topk in (0.10, 0.15):
        cfg = SparseAttentionConfig(topk=topk)
        ms_sel, idx = timed(lambda: select_kv_blocks(q, k, cfg))
        kept = idx.shape[-1]
        ms_att, _ = timed(lambda: I8.attend_quantized(q8, qs, k8, ks, v, idx, 128, 128, scale, q.dtype,
                                                      opts["num_warps"], opts["num_stages"]))
        ms_op, o8 = timed(lambda: I8.int8_sparse_attention(q, k, v, idx))
        ms_be, _ = timed(lambda: get_backend(accel.sparse(topk, kernel="int8"))(q, k, v))
        ms_fx, of = timed(lambda: sparse_attention(q, k, v, cfg, kv_indices=idx))
        kept_flops = 4 * L * kept * 128 * H * D
        record(section="int8", part=f"top-k {topk:g}", L=L, kept=kept, select_ms=ms_sel, attn_kernel_ms=ms_att,
               attn_kernel_tflops=kept_flops / ms_att / 1e9, quant_plus_attn_ms=ms_op, backend_ms=ms_be,
               flex_same_blocks_ms=ms_fx, flex_tflops=kept_flops / ms_fx / 1e9, rel_l2_vs_flex=rel_l2(o8, of),
               options=opts)
        del o8, of
        if topk != 0.10:
            continue
        for nw in (4, 8):
            for ns in (2, 3, 4):
                try:
                    ms, _ = timed(lambda: I8.attend_quantized(q8, qs, k8, ks, v, idx, 128, 128, scale, q.dtype,
                                                              nw, ns))
                    used = I8._FITTED.get(I8.launch_key(q8, v, 128, 128, q.dtype, nw, ns))
                    record(section="int8", part="sweep top-k 0.1", num_warps=nw, num_stages=ns,
                           stages_used=used, attn_kernel_ms=ms, attn_kernel_tflops=kept_flops / ms / 1e9)
                except Exception as e:
                    record(section="int8", part="sweep top-k 0.1", num_warps=nw, num_stages=ns,
                           error=f"{type(e).__name__}: {e}"[:300])
        free_cuda()
    del q, k, v, q8, k8
    free_cuda()


SECTIONS = {"qkv": section_qkv, "model": section_model, "int8": section_int8}


def print_table():
    env = C.ENV
    lines = [f"card={env.get('card')} torch={env.get('torch')} cuda={env.get('cuda')} cudnn={env.get('cudnn')} "
             f"date={env.get('date')} tokens={ARGS.tokens} heads={ARGS.heads}x{ARGS.head_dim} bf16"]
    lines.append(f"{'section':8s} {'backend':18s} {'ms':>9s} {'TFLOP/s':>8s} {'relL2 vs sdpa':>14s} "
                 f"{'relL2 vs fp32':>14s}")
    lines[-1] += f" {'relL2 vs flex':>14s}"
    int8_rows = []
    for r in C.RESULTS:
        if r.get("section") == "int8":
            int8_rows.append(r)
            continue
        if r.get("section") not in SECTIONS:
            continue
        if "skipped" in r or "error" in r:
            lines.append(f"{r['section']:8s} {r['backend']:18s} {'-':>9s}  {r.get('skipped') or 'ERROR ' + r['error']}")
            continue
        fp32 = r.get("rel_l2_vs_fp32", r.get("rel_l2_vs_fp32_attention"))
        vs_flex = f"{r['rel_l2_vs_flex']:14.5f}" if "rel_l2_vs_flex" in r else ""
        lines.append(f"{r['section']:8s} {r['backend']:18s} {r['ms']:9.2f} {r.get('tflops', float('nan')):8.1f} "
                     f"{r['rel_l2_vs_sdpa']:14.5f} {fp32:14.5f} {vs_flex}".rstrip())
    if int8_rows:
        lines.append("int8_sparse parts (ms; TFLOP/s of the kept blocks):")
    skip = {"section", "part", "card", "torch", "date"}
    for r in int8_rows:
        vals = " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k not in skip)
        lines.append(f"  {r['part']}: {vals}")
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
    ap.add_argument("--no-int8", dest="int8", action="store_false", help="leave out the int8_sparse rows")
    ap.add_argument("--backends", default="", help="comma-separated row names to keep (default: all), e.g. "
                    "sdpa,auto,flex_sparse:0.1,int8_sparse:0.1")
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
