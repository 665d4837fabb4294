"""How fast is one full-size 14B DiT forward? SteadyDancer DiT (ours) against diffusers' WanTransformer3DModel,
and which kernels (attention backends, fp8 matmul modes, flex options) make the difference.

One command, one GPU (H100 80 GB / H200), inside 10 minutes (``--budget`` seconds; sections that would overrun
are skipped and say so):

    PYTHONPATH=<dir holding steadydancer_turbo> python bench/dit_forward.py --out OUTDIR
    python bench/dit_forward.py --device cpu --tiny --out /tmp/x        # smoke test of the script itself

Sections (``--sections``, in order; default env,micro,diffusers,ours):
  env        card, torch, CUDA, cuDNN, Triton, diffusers, date (every result row repeats card/torch/date)
  micro      flex top-k vs a masked dense reference on the GPU; our registry's attention backends; FFN-shaped
             bf16 vs fp8 matmul in four fp8 modes (``--micro full``: also flash/cuDNN/efficient/flex kernels at
             480p and 720p token counts)
  flextune   picks the fastest flex kernel options for top-k attention (used by the later sections)
  diffusers  WanTransformer3DModel, Wan2.1-I2V-14B config, random bf16 weights built on the GPU: one forward at
             832x480x81 and 1280x720x81 (default attention; cuDNN backend at 480p) -> the ratio baseline
  ours       SteadyDancerDiT.full_14b() (+2 reference frames): dense bf16 (sdpa / sdpa_cudnn), fp8 linears,
             top-k sparse, fp8+sparse, 4-step turbo sampling, then torch.compile'd blocks (dense, fp8,
             fp8+sparse, turbo); fp8 "twins" of every block Linear sit next to the bf16 ones so any order works

Weights, timing and error conventions: bench/_common.py. Run history and analysis: bench/RESULTS.md,
bench/perf_notes.md; raw logs: bench/logs/ (index in bench/logs/README.md).
"""

from __future__ import annotations

import math
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

import _common as C
from _common import (cuda_time, dit_flops, free_cuda, have_time, latent_hw, log, median, mem_alloc,  # noqa: F401
                     ours_model, random_model, record, rel_l2, section_env, sync, tokens)
from _dit import (diffusers_inputs, ours_inputs, run_ours_variant, section_diffusers, section_flextune,  # noqa: F401
                  set_backend, turbo_sample)


# ----------------------------------------------------------------------------------------------------- micro
def section_micro():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from steadydancer_turbo.steadydancer.kernels.sparse_attention import (SparseAttentionConfig, build_block_mask,
                                                                  select_kv_blocks, sparse_attention,
                                                                  sparse_attention_reference)

    # correctness of the GPU flex path (full blocks, non-divisible length) against a masked reference
    g = torch.Generator(device=C.DEV).manual_seed(1)
    L = 9000 if C.DEV == "cuda" else 700
    q, k, v = (torch.randn(1, L, 4, C.HD, device=C.DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
    cfg = SparseAttentionConfig(topk=0.15)
    idx = select_kv_blocks(q, k, cfg)
    out = sparse_attention(q, k, v, cfg, kv_indices=idx)
    ref = sparse_attention_reference(q.float(), k.float(), v.float(), idx, cfg.block_q, cfg.block_k)
    record(section="micro", what="flex_topk_vs_masked_reference", L=L, rel_l2=rel_l2(out, ref),
           finite=bool(torch.isfinite(out).all()))
    del q, k, v, out, ref

    # our registry's backends on the 480p self-attention shape (sdpa = PyTorch's pick, sdpa_cudnn = direct)
    try:
        from steadydancer_turbo.steadydancer.kernels.attention import get_backend
        import steadydancer_turbo.steadydancer.kernels.backends  # noqa: F401

        L = tokens("480p", 2)
        q, k, v = (torch.randn(1, L, C.HEADS, C.HD, device=C.DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
        ref = None
        for name in ("sdpa", "sdpa_cudnn", "auto"):
            fn = get_backend(name)
            t, _, o = cuda_time(lambda: fn(q, k, v), 5)
            ref = o if ref is None else ref
            record(section="micro", what=f"registry_{name}", L=L, ms=median(t) * 1e3,
                   tflops=4 * L * L * C.HD * C.HEADS / median(t) / 1e12, rel_l2_vs_sdpa=rel_l2(o, ref))
        del q, k, v, ref, o
    except Exception as e:
        record(section="micro", what="registry_backends", error=repr(e)[:300])
    free_cuda()

    if C.ARGS.micro == "full":
        for res, L in (("480p", tokens("480p", 2)), ("720p", tokens("720p", 2))):
            q, k, v = (torch.randn(1, L, C.HEADS, C.HD, device=C.DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            flops = 4 * L * L * C.HD * C.HEADS
            reps = 5 if res == "480p" else 3
            base = None
            for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                                  ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
                try:
                    with sdpa_kernel([backend]):
                        t, _, o = cuda_time(lambda: F.scaled_dot_product_attention(qt, kt, vt), reps)
                    if base is None:
                        base = o
                    record(section="micro", what=f"self_attn_{name}", res=res, L=L, ms=median(t) * 1e3,
                           tflops=flops / median(t) / 1e12, rel_l2_vs_flash=rel_l2(o, base))
                except Exception as e:
                    record(section="micro", what=f"self_attn_{name}", res=res, L=L, error=repr(e)[:300])
            for topk in (1.0, 0.15, 0.10):
                try:
                    cfg = SparseAttentionConfig(topk=topk)
                    t_sel, _, idx = cuda_time(lambda: select_kv_blocks(q, k, cfg), reps)
                    t_bm, _, bm = cuda_time(lambda: build_block_mask(idx, L, L, 128, 128), reps)
                    t, _, o = cuda_time(lambda: sparse_attention(q, k, v, cfg, kv_indices=idx), reps)
                    t_all, _, _ = cuda_time(lambda: sparse_attention(q, k, v, cfg), reps)
                    kept = idx.shape[-1] / math.ceil(L / 128)
                    record(section="micro", what=f"self_attn_flex_topk{topk}", res=res, L=L, kept_frac=kept,
                           ms_kernel=median(t) * 1e3, ms_select=median(t_sel) * 1e3, ms_blockmask=median(t_bm) * 1e3,
                           ms_total=median(t_all) * 1e3, tflops_dense_equiv=flops / median(t_all) / 1e12,
                           rel_l2_vs_flash=rel_l2(o.transpose(1, 2), base))
                except Exception as e:
                    record(section="micro", what=f"self_attn_flex_topk{topk}", res=res, L=L,
                           error=repr(e)[:500], tb=traceback.format_exc()[-1500:])
            del q, k, v, qt, kt, vt, base
            free_cuda()

    # C.FFN-shaped matmul: bf16 nn.Linear vs FP8Linear (quantization included)
    from steadydancer_turbo.steadydancer.kernels.fp8_linear import FP8Linear, quantize_rowwise

    M = tokens("480p", 2)
    x = torch.randn(M, C.D, device=C.DEV, dtype=torch.bfloat16, generator=g)
    lin = nn.Linear(C.D, C.FFN, device=C.DEV, dtype=torch.bfloat16)
    flops = 2 * M * C.D * C.FFN
    with torch.no_grad():
        t, _, ref = cuda_time(lambda: lin(x), 10)
        record(section="micro", what="ffn1_bf16_linear", M=M, ms=median(t) * 1e3, tflops=flops / median(t) / 1e12)
        for scaling in ("rowwise", "tensor"):
            for fast in (False, True):
                try:
                    f8 = FP8Linear.from_linear(lin, act_scaling=scaling, fast_accum=fast)
                    t, _, o = cuda_time(lambda: f8(x), 10)
                    tq, _, _ = cuda_time(lambda: quantize_rowwise(x), 10)
                    record(section="micro", what=f"ffn1_fp8_{scaling}{'_fastacc' if fast else ''}", M=M,
                           ms=median(t) * 1e3, ms_quant_rowwise=median(tq) * 1e3,
                           tflops=flops / median(t) / 1e12, rel_l2_vs_bf16=rel_l2(o, ref))
                    del f8
                except Exception as e:
                    record(section="micro", what=f"ffn1_fp8_{scaling}{'_fastacc' if fast else ''}",
                           error=repr(e)[:500], tb=traceback.format_exc()[-1500:])
    del x, lin
    free_cuda()





# ----------------------------------------------------------------------------------------------------- ours
def section_ours():
    from steadydancer_turbo.steadydancer.weights import speed_options as accel

    t0 = time.time()
    model = ours_model()
    sync()
    nparams = sum(p.numel() for p in model.parameters())
    log(f"ours built in {time.time() - t0:.1f}s, {nparams / 1e9:.3f} B params, "
        f"{mem_alloc() / 2**30:.1f} GiB")
    g = torch.Generator(device=C.DEV).manual_seed(7)
    inputs = {res: ours_inputs(res, g) for res in C.ARGS.res}
    dense = {}
    V = C.ARGS.variants
    est = {"480p": 3.3, "720p": 11.0}
    best = C.ARGS.dense_backend
    sp = f"flex_sparse:{C.ARGS.topk}"
    keep = {}
    for res in C.ARGS.res:
        nk = math.ceil(tokens(res, 2) / 128)
        keep[res] = max(1, int(C.ARGS.topk * nk)) / nk

    def go(variant, res, backend, kf=1.0, reps=None, ref=True, extra_s=0.0, warmup=1):
        reps = reps or C.ARGS.reps
        if res not in inputs or not have_time(est[res] * (reps + warmup) * max(kf, 0.45) + extra_s):
            return None
        try:
            set_backend(model, backend)
            return run_ours_variant(model, variant, res, inputs[res], dense.get(res) if ref else None, reps, kf,
                                    warmup)
        except Exception as e:
            record(section="model", model="ours", variant=variant, res=res, error=repr(e)[:500],
                   tb=traceback.format_exc()[-2000:])
            log(traceback.format_exc())
            return None

    def turbo(variant, backend, per_fwd):
        if "turbo" not in V or "480p" not in inputs or not have_time(4 * per_fwd + 5):
            return
        try:
            set_backend(model, backend)
            with torch.no_grad():
                t, peak, (x, how) = cuda_time(lambda: turbo_sample(model, inputs["480p"]), 1, warmup=0)
            record(section="turbo", model="ours", variant=variant, res="480p", s=t[0], peak_gib=peak / 2**30,
                   sampler=how, finite=bool(torch.isfinite(x).all()))
        except Exception as e:
            record(section="turbo", model="ours", variant=variant, error=repr(e)[:500],
                   tb=traceback.format_exc()[-2000:])

    # fp8 twins of every block Linear, kept next to the bf16 ones (~16 GB more) so the run can switch between
    # bf16 and fp8 in any order instead of converting destructively.
    twins = {}

    def use_fp8(on: bool):
        from steadydancer_turbo.steadydancer.kernels.fp8_linear import FP8Linear

        if on and not twins:
            if C.ARGS.fp8_scaling == "auto":
                cands = [r for r in C.RESULTS if str(r.get("what", "")).startswith("ffn1_fp8_") and "ms" in r
                         and r.get("rel_l2_vs_bf16", 1) < 0.05]
                pick = min(cands, key=lambda r: r["ms"])["what"][len("ffn1_fp8_"):] if cands else "rowwise"
                C.ARGS.fp8_scaling = pick.split("_")[0]
                C.ARGS.fp8_fast_accum = pick.endswith("_fastacc")
            for name, mod in model.blocks.named_modules():
                if type(mod) is nn.Linear:
                    twins[name] = (mod, FP8Linear.from_linear(mod, act_scaling=C.ARGS.fp8_scaling,
                                                              fast_accum=C.ARGS.fp8_fast_accum))
            log(f"fp8 twins: {len(twins)} linears ({C.ARGS.fp8_scaling}, fast_accum={C.ARGS.fp8_fast_accum}), "
                f"{mem_alloc() / 2**30:.1f} GiB allocated")
            record(section="fp8", what="mode", act_scaling=C.ARGS.fp8_scaling, fast_accum=C.ARGS.fp8_fast_accum,
                   linears=len(twins))
        for name, (lin, f8) in twins.items():
            parent_name, _, attr = name.rpartition(".")
            parent = model.blocks.get_submodule(parent_name) if parent_name else model.blocks
            setattr(parent, attr, f8 if on else lin)

    def guarded(label, fn):
        try:
            fn()
            return True
        except Exception as e:
            record(section="model", model="ours", variant=label, error=repr(e)[:500], tb=traceback.format_exc()[-2000:])
            log(traceback.format_exc())
            return False

    # 1. dense bf16, eager: cuDNN attention (reference outputs for every error below) and the official-equivalent
    #    path (sdpa picks flash; float64 RoPE) at 480p
    for res in C.ARGS.res:
        out = go(f"dense_{best}", res, best, ref=False)
        if out is not None:
            dense[res] = out
    if "sdpa" in V and best != "sdpa":
        go("dense_sdpa", "480p", "sdpa")
    # 2. fp8 linears, eager
    if "fp8" in V and have_time(20) and guarded("fp8_setup", lambda: use_fp8(True)):
        go("fp8", "480p", best)
        use_fp8(False)
    # 3. top-k sparse self-attention (eager blocks; the flex kernel itself is compiled, ~20 s per shape), bf16 and
    #    fp8
    if "sparse" in V:
        for res in reversed(C.ARGS.res):
            go(f"sparse{C.ARGS.topk}", res, sp, kf=keep[res], extra_s=30)
        if twins:
            use_fp8(True)
            for res in reversed(C.ARGS.res):
                go(f"fp8_sparse{C.ARGS.topk}", res, sp, kf=keep[res] * 0.8)
            use_fp8(False)
    # 4. whole turbo sampling, eager
    turbo(f"turbo4_dense_{best}", best, est["480p"])
    if twins and "sparse" in V:
        use_fp8(True)
        turbo(f"turbo4_fp8_sparse{C.ARGS.topk}", sp, est["480p"] * 0.55)
        use_fp8(False)
    # 5. torch.compile per block (fp32 real RoPE, all elementwise work fused); fp8 recompiles once for its modules
    if "compile" in V and "480p" in inputs and have_time(150):
        def first(label):
            t0c = time.time()
            with torch.no_grad():
                model(**inputs["480p"])
            sync()
            record(section="compile", what=f"first_forward_480p_{label}", s=time.time() - t0c)

        set_backend(model, best)
        accel.compile_blocks(model)
        if guarded("dense_compiled", lambda: first("dense")):
            go(f"dense_{best}_compiled", "480p", best, warmup=0)
            turbo(f"turbo4_dense_{best}_compiled", best, est["480p"] * 0.9)
            if twins and have_time(120):
                use_fp8(True)
                if guarded("fp8_compiled", lambda: first("fp8")):
                    go(f"fp8_{best}_compiled", "480p", best, warmup=0)
                    if "sparse" in V and have_time(100):
                        set_backend(model, sp)
                        if guarded("fp8_sparse_compiled", lambda: first("fp8_sparse")):
                            go(f"fp8_sparse{C.ARGS.topk}_compiled", "480p", sp, kf=keep["480p"], warmup=0)
                            turbo(f"turbo4_fp8_sparse{C.ARGS.topk}_compiled", sp, est["480p"] * 0.45)
                use_fp8(False)
        accel.uncompile_blocks(model)
    # 6. leftovers if time allows: fp8 at 720p (eager)
    if twins and "720p" in inputs:
        use_fp8(True)
        go("fp8", "720p", best)
        use_fp8(False)
    del model, inputs, dense, twins
    free_cuda()




SECTIONS = {"env": section_env, "micro": section_micro, "flextune": section_flextune, "diffusers": section_diffusers,
            "ours": section_ours}

if __name__ == "__main__":
    C.main(SECTIONS, "env,micro,diffusers,ours", __doc__)
