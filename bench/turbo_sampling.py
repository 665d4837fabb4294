"""How fast is whole 4-step turbo (rCM) sampling with the compiled fp8 + top-k sparse DiT, and which option
buys what? (issue 7's target: 4 steps at 480p under 5 s.) The compiled model only; eager numbers come from
bench/dit_forward.py.

    PYTHONPATH=<dir holding steadydancer_turbo> python bench/turbo_sampling.py --out OUTDIR
    python bench/turbo_sampling.py --device cpu --tiny --out /tmp/x     # smoke test of the script itself

Sections (``--sections``, in order; default env,diffusers,compiled):
  env        as in dit_forward.py
  flextune   as in dit_forward.py: the fastest flex kernel options for top-k attention, used by later sections
  diffusers  diffusers' forward at each ``--res``, the ratio baseline of the table (as in dit_forward.py)
  compiled   compiled blocks only: fp8+sparse at 720p/480p (top-k 0.15 and 0.10), turbo, bf16 sparse 720p, and a
             noise floor (output change for a one-bf16-rounding input perturbation)
  tuned      flex options / block-selection cost / fused q/k/v micro checks, then the compiled fp8 + top-k model
             (base = flex USE_TMA only vs the tuned options), a profile of one forward, whole turbo sampling.
             ``--optins base,amax2,ropetab,both,base2`` times the fp8 two-stage amax and the (cos, sin)-table RoPE
             one by one (``lib``/``lib2``/``libtuned`` = the library's defaults, flex "auto" or tuned tiles;
             ``--turbo-reps N``): kernel micro checks of both (GELU + quantize at the FFN2 input; RMSNorm + RoPE
             of q), then the compiled model once per listed config, each with forward time, error vs dense bf16
             and whole turbo sampling; profile of the last. ``--fixed-flex``: no micro checks, tuned + per-token
             FFN2 scaling, then base.

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
from _dit import (ours_inputs, run_ours_variant, section_diffusers, section_flextune, set_backend,  # noqa: F401
                  turbo_sample)


def section_compiled():
    """Compiled blocks only: fp8 + top-k sparse at 720p and 480p (incl. whole 4-step turbo sampling), bf16
    sparse at 720p, against eager dense references of this run, plus a bf16 noise floor (same model, input
    perturbed by one bf16 rounding) to read the random-weight errors against."""
    from steadydancer_turbo.steadydancer.weights import speed_options as accel
    from steadydancer_turbo.steadydancer.kernels.fp8_linear import FP8Linear

    model = ours_model()
    g = torch.Generator(device=C.DEV).manual_seed(7)
    inputs = {res: ours_inputs(res, g) for res in C.ARGS.res}
    twins = {}
    for name, mod in model.blocks.named_modules():
        if type(mod) is nn.Linear:
            twins[name] = (mod, FP8Linear.from_linear(mod, act_scaling=C.ARGS.fp8_scaling,
                                                      fast_accum=C.ARGS.fp8_fast_accum))
    record(section="fp8", what="mode", act_scaling=C.ARGS.fp8_scaling, fast_accum=C.ARGS.fp8_fast_accum)

    def use_fp8(on):
        for name, (lin, f8) in twins.items():
            parent_name, _, attr = name.rpartition(".")
            setattr(model.blocks.get_submodule(parent_name) if parent_name else model.blocks, attr, f8 if on else lin)

    best = C.ARGS.dense_backend
    dense = {}
    with torch.no_grad():
        for res in C.ARGS.res:
            if have_time({"480p": 5, "720p": 17}[res]):
                set_backend(model, best)
                _, _, dense[res] = cuda_time(lambda: model(**inputs[res]), 1, warmup=0)
        if "480p" in dense:
            inp = dict(inputs["480p"])
            inp["x"] = inp["x"].to(torch.bfloat16).float() + inp["x"] * 2 ** -9 * torch.randn(
                inp["x"].shape, device=C.DEV, generator=g)
            _, _, o = cuda_time(lambda: model(**inp), 1, warmup=0)
            xr = rel_l2(inp["x"], inputs["480p"]["x"])
            record(section="noise_floor", res="480p", input_rel_l2=xr, output_rel_l2=rel_l2(o, dense["480p"]))
            del o, inp
    free_cuda()

    def run(variant, res, topk, fp8, turbo):
        if res not in inputs:
            return
        L = tokens(res, 2)
        nk = math.ceil(L / 128)
        kf = max(1, int(topk * nk)) / nk
        if not have_time({"480p": 35, "720p": 50}[res] + (6 if turbo else 0)):
            return
        try:
            use_fp8(fp8)
            set_backend(model, f"flex_sparse:{topk}")
            t0c = time.time()
            with torch.no_grad():
                model(**inputs[res])
            sync()
            record(section="compile", what=f"first_forward_{res}_{variant}", s=time.time() - t0c)
            run_ours_variant(model, variant, res, inputs[res], dense.get(res), C.ARGS.reps, kf, warmup=0)
            if turbo:
                with torch.no_grad():
                    t, peak, (x, how) = cuda_time(lambda: turbo_sample(model, inputs["480p"]), 1, warmup=0)
                record(section="turbo", model="ours", variant=f"turbo4_{variant}", res=res, s=t[0],
                       peak_gib=peak / 2**30, sampler=how, finite=bool(torch.isfinite(x).all()))
        except Exception as e:
            record(section="model", model="ours", variant=variant, res=res, error=repr(e)[:500],
                   tb=traceback.format_exc()[-2000:])
            log(traceback.format_exc())

    accel.compile_blocks(model)
    run(f"fp8_sparse{C.ARGS.topk}_compiled", "720p", C.ARGS.topk, True, False)
    run("fp8_sparse0.1_compiled", "480p", 0.1, True, True)
    run(f"fp8_sparse{C.ARGS.topk}_compiled", "480p", C.ARGS.topk, True, True)
    run(f"sparse{C.ARGS.topk}_compiled", "720p", C.ARGS.topk, False, False)
    del model, inputs, dense, twins
    free_cuda()


def section_tuned():
    """Turbo target (issue 7: 4 rCM steps at 480p < 5 s with fp8 + sparse): kernel-level checks first (flex
    kernel options at ``--topk``, the in-graph cost of block selection + BlockMask, one fused q/k/v fp8 GEMM vs
    three), then the compiled fp8 + top-k model in up to three configurations on one card, each with its error
    vs this run's dense bf16 eager output, one forward under the profiler, and whole turbo sampling:
      base       = the previous best (flex USE_TMA only)
      tuned+qkv  = + the fastest flex options of the micro check, + fused q/k/v (steadydancer/model/fused_qkv.py)
                   where the micro check found the fused GEMM faster (each part's share: the micro numbers)."""
    from steadydancer_turbo.steadydancer.weights import speed_options as accel
    from steadydancer_turbo.steadydancer.kernels import sparse_attention as spa
    from steadydancer_turbo.steadydancer.kernels.fp8_linear import (FP8Linear, convert_linears_to_fp8, quantize_tensorwise,
                                                          set_tensorwise_amax)
    from steadydancer_turbo.steadydancer.model.fused_qkv import fuse_qkv, unfuse_qkv

    topk = C.ARGS.topk
    g = torch.Generator(device=C.DEV).manual_seed(5)
    L = tokens("480p", 2)
    cfg_sp = spa.SparseAttentionConfig(topk=topk)
    base_opts = {"USE_TMA": True}
    best_opts, best_ms = base_opts, float("inf")
    qkv_wins = False
    HOPPER_TUNED = {"USE_TMA": True, "ROWS_GUARANTEED_SAFE": True, "BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4,
                    "num_stages": 3}  # fastest of run 4's flex micro check (6.47 vs 7.38 ms at top-k 0.10)
    if C.ARGS.optins:
        optin_micro(L, g)
    if C.DEV == "cuda" and not C.ARGS.fixed_flex and not C.ARGS.optins:
        q, k, v = (torch.randn(1, L, C.HEADS, C.HD, device=C.DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
        idx = spa.select_kv_blocks(q, k, cfg_sp)
        ref = None
        cands = [base_opts,
                 {"USE_TMA": True, "PRESCALE_QK": True, "ROWS_GUARANTEED_SAFE": True},
                 {"USE_TMA": True, "ROWS_GUARANTEED_SAFE": True, "num_stages": 4},
                 {"USE_TMA": True, "ROWS_GUARANTEED_SAFE": True, "BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8,
                  "num_stages": 2},
                 {"USE_TMA": True, "ROWS_GUARANTEED_SAFE": True, "BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4,
                  "num_stages": 3}]
        for opts in cands:
            if not have_time(165):
                break
            try:
                spa.set_flex_kernel_options(opts)
                spa._compiled_flex = None
                t, _, o = cuda_time(lambda: spa.sparse_attention(q, k, v, cfg_sp, kv_indices=idx), 7)
                ref = o if ref is None else ref
                err = rel_l2(o, ref)
                ms = median(t) * 1e3
                kf = idx.shape[-1] / math.ceil(L / 128)
                record(section="micro", what=f"flex_opts_topk{topk}", options=str(opts), ms=ms,
                       tflops=4 * L * L * C.HD * C.HEADS * kf / median(t) / 1e12, rel_l2_vs_first=err)
                if err < 5e-3 and ms < best_ms * 0.99:
                    best_opts, best_ms = opts, ms
            except Exception as e:
                record(section="micro", what=f"flex_opts_topk{topk}", options=str(opts), error=repr(e)[:300])
        record(section="micro", what="flex_opts_choice", options=str(best_opts), ms=best_ms)
        # selection + block mask: eager and compiled (the compiled number is what a compiled block pays)
        sel = lambda: spa.build_block_mask(spa.select_kv_blocks(q, k, cfg_sp), L, L, 128, 128)  # noqa: E731
        t, _, _ = cuda_time(sel, 10)
        csel = torch.compile(lambda q, k: spa.build_block_mask(spa.select_kv_blocks(q, k, cfg_sp), L, L, 128, 128),
                             dynamic=False)
        tc, _, _ = cuda_time(lambda: csel(q, k), 10, warmup=2)
        record(section="micro", what=f"select_blockmask_topk{topk}", ms_eager=median(t) * 1e3,
               ms_compiled=median(tc) * 1e3, per_forward_ms_compiled=40 * median(tc) * 1e3)
        del q, k, v, idx, ref
        free_cuda()
        # q/k/v: three fp8 products (input quantized once, as in a compiled block) vs one fused product
        x = torch.randn(L, C.D, device=C.DEV, dtype=torch.bfloat16, generator=g)
        lins = [FP8Linear.from_linear(nn.Linear(C.D, C.D, device=C.DEV, dtype=torch.bfloat16), act_scaling="tensor",
                                      fast_accum=True) for _ in range(3)]
        xq, xs = quantize_tensorwise(x)
        three = lambda: [torch._scaled_mm(xq, m.weight.t(), scale_a=xs, scale_b=m.scale_weight, bias=m.bias,  # noqa
                                          out_dtype=torch.bfloat16, use_fast_accum=True) for m in lins]
        wcat = torch.cat([m.weight for m in lins], 0)
        bcat = torch.cat([m.bias for m in lins], 0)
        scat = torch.cat([m.scale_weight.reshape(1).expand(C.D) for m in lins]).reshape(1, -1).contiguous()
        sa = xs.reshape(1, 1).expand(L, 1).contiguous()
        fused_row = lambda: torch._scaled_mm(xq, wcat.t(), scale_a=sa, scale_b=scat, bias=bcat,  # noqa: E731
                                             out_dtype=torch.bfloat16, use_fast_accum=True)
        one = torch.ones((), device=C.DEV)
        fused_tensor = lambda: torch._scaled_mm(xq, wcat.t(), scale_a=xs, scale_b=one, bias=bcat,  # noqa: E731
                                                out_dtype=torch.bfloat16, use_fast_accum=True)
        t3, _, o3 = cuda_time(three, 10)
        tr, _, orow = cuda_time(fused_row, 10)
        tt, _, _ = cuda_time(fused_tensor, 10)
        err = rel_l2(orow, torch.cat(o3, -1))
        fl = 2 * L * C.D * 3 * C.D
        record(section="micro", what="qkv_fp8_gemm", ms_three=median(t3) * 1e3, ms_fused_rowwise=median(tr) * 1e3,
               ms_fused_tensorwise_timing_only=median(tt) * 1e3, tflops_three=fl / median(t3) / 1e12,
               tflops_fused_rowwise=fl / median(tr) / 1e12, rel_l2_fused_vs_three=err)
        qkv_wins = median(tr) < 0.98 * median(t3) and err < 1e-2
        del x, lins, xq, wcat, bcat, scat, sa, o3, orow
        free_cuda()

    # ------------------------------------------------------------------ the model
    t0 = time.time()
    model = ours_model()
    gi = torch.Generator(device=C.DEV).manual_seed(7)
    inp = ours_inputs("480p", gi)
    with torch.no_grad():
        set_backend(model, C.ARGS.dense_backend)
        _, _, dense = cuda_time(lambda: model(**inp), 1, warmup=0)
    log(f"model + dense reference in {time.time() - t0:.1f}s")
    convert_linears_to_fp8(model, act_scaling="tensor", fast_accum=True)  # bf16 block weights freed
    free_cuda()
    if C.DEV == "cuda":  # (CPU smoke test: eager; inductor's CPU flex has no block-sparse lowering)
        accel.compile_blocks(model)
    set_backend(model, f"flex_sparse:{topk}")
    nk = math.ceil(L / 128)
    kf = max(1, int(topk * nk)) / nk

    def config(label, opts, qkv, ffn2_rowwise=False, need_s=45, amax2=False, ropetab=False):
        """amax2 / ropetab: True / False force the opt-in forms on / off (runs 4-6 used off = the old base);
        None leaves the library's defaults (two-stage amax and RoPE tables since run 6)."""
        if not have_time(need_s):
            return
        try:
            spa.set_flex_kernel_options(opts)
            set_tensorwise_amax() if amax2 is None else set_tensorwise_amax("two_stage" if amax2 else "flat")
            model.rope_real_tables = True if ropetab is None else ropetab
            (fuse_qkv if qkv else unfuse_qkv)(model)
            for blk in model.blocks:  # per-token scale for the GELU output: one fused pass instead of two
                blk.ffn[2].act_scaling = "rowwise" if ffn2_rowwise else "tensor"
            torch._dynamo.reset()  # the kernel options are read at trace time: make sure they are re-read
            t0c = time.time()
            with torch.no_grad():
                model(**inp)
            sync()
            record(section="compile", what=f"first_forward_480p_{label}", s=time.time() - t0c)
            variant = f"fp8_sparse{topk}_compiled_{label}"
            run_ours_variant(model, variant, "480p", inp, dense, C.ARGS.reps, kf, warmup=0)
            with torch.no_grad():
                t, peak, (xo, how) = cuda_time(lambda: turbo_sample(model, inp), C.ARGS.turbo_reps, warmup=0)
            record(section="turbo", model="ours", variant=f"turbo4_{variant}", res="480p", s=median(t), times=t,
                   peak_gib=peak / 2**30, sampler=how, finite=bool(torch.isfinite(xo).all()))
        except Exception as e:
            record(section="model", model="ours", variant=label, res="480p", error=repr(e)[:500],
                   tb=traceback.format_exc()[-2000:])
            log(traceback.format_exc())

    def profile(label):
        if C.DEV != "cuda" or not have_time(12):
            return
        from torch.profiler import ProfilerActivity, profile as prof

        with torch.no_grad(), prof(activities=[ProfilerActivity.CUDA]) as p:
            model(**inp)
            sync()
        rows = sorted(p.key_averages(), key=lambda e: -e.device_time_total)[:18]
        total = sum(e.device_time_total for e in p.key_averages())
        for e in rows:
            record(section="profile", what=label, kernel=e.key[:90], ms=e.device_time_total / 1e3, calls=e.count,
                   share=e.device_time_total / max(total, 1))

    if C.ARGS.optins:  # fp8-amax / RoPE-table opt-ins, each against the same model and inputs (base first and, if listed, last)
        tuned = HOPPER_TUNED if C.DEV == "cuda" else base_opts
        # base/amax2/ropetab/both: run 6's comparison (run 4's tuned flex tiles); lib/lib2: the library's own
        # defaults (flex "auto" = USE_TMA on Hopper, two-stage amax, RoPE tables); libtuned: those + tuned tiles
        optins = {"base": {}, "base2": {}, "amax2": {"amax2": True}, "ropetab": {"ropetab": True},
              "both": {"amax2": True, "ropetab": True}, "lib": {"opts": "auto", "amax2": None, "ropetab": None},
              "lib2": {"opts": "auto", "amax2": None, "ropetab": None}, "libtuned": {"amax2": None, "ropetab": None}}
        names = [n for n in C.ARGS.optins.split(",") if n]
        for i, name in enumerate(names):
            kw = dict(optins[name])
            config(f"optin_{name}", kw.pop("opts", tuned), False, need_s=45 if i == 0 else 35, **kw)
        profile("optin_" + names[-1])
        set_tensorwise_amax()
        spa.set_flex_kernel_options("auto")
        del model, inp, dense
        free_cuda()
        return
    if C.ARGS.fixed_flex:  # second run: flex options fixed (no micro), FFN2 input scaled per token
        config("tuned+ffn2row", HOPPER_TUNED, False, True)
        config("base", base_opts, False, need_s=18)  # recompile with warm caches: ~8 s (run 4)
        return
    config("base", base_opts, False)
    tuned = best_opts != base_opts
    qkv = qkv_wins or C.ARGS.tiny
    if tuned or qkv:
        config("+".join(["tuned"] * tuned + ["qkv"] * qkv), best_opts, qkv)
    profile("best")
    del model, inp, dense
    free_cuda()


def optin_micro(L, g):
    """Kernel-level checks of the fp8-amax / RoPE-table opt-ins at the 480p shapes, each compiled alone (dynamic=False):
    GELU(tanh) + per-tensor fp8 quantization of the FFN2 input [L, 13824] with the flat vs the two-stage amax
    (outputs must be bit-identical), and RMSNorm + RoPE of q [1, L, 40, 128] with the complex-freqs real path vs
    the (cos, sin) tables (rel. L2 between them: 0 up to FMA contraction). ms = median of 10, after 2 warm-ups."""
    from steadydancer_turbo.steadydancer.kernels import fp8_linear as F8
    from steadydancer_turbo.steadydancer.model.dit import rope_apply, rope_freqs, rope_tables
    from steadydancer_turbo.steadydancer.model.layers import RMSNorm

    if not have_time(60):
        return
    try:
        h = torch.randn(L, C.FFN, device=C.DEV, dtype=torch.bfloat16, generator=g) * 3
        outs = {}
        for how, fn in (("flat", F8.quantize_per_tensor), ("two_stage", F8.quantize_tensorwise_two_stage)):
            cq = torch.compile(lambda t, fn=fn: fn(F.gelu(t, approximate="tanh")), dynamic=False)
            t, _, outs[how] = cuda_time(lambda: cq(h), 10, warmup=2)
            gb = (h.numel() * 2 + h.numel()) / 1e9  # read bf16 once + write fp8 once (the floor)
            record(section="micro", what=f"optin_gelu_quant_ffn2_{how}", ms=median(t) * 1e3,
                   floor_gb=gb, tb_s_vs_floor=gb / median(t) / 1e3)
        (a8, as_), (b8, bs) = outs["flat"], outs["two_stage"]
        record(section="micro", what="optin_gelu_quant_bit_identical",
               equal=bool(torch.equal(a8.view(torch.uint8), b8.view(torch.uint8)) and torch.equal(as_, bs)))
        del h, outs, a8, b8
        free_cuda()
        lh, lw = latent_hw("480p")
        freqs = rope_freqs((C.FRAMES // 4 + 1 + 2, lh // 2, lw // 2), C.HD, device=C.DEV)
        assert freqs.shape[0] == L, (freqs.shape, L)
        tabs = rope_tables(freqs)
        norm = RMSNorm(C.D).to(C.DEV, torch.bfloat16)
        x = torch.randn(1, L, C.D, device=C.DEV, dtype=torch.bfloat16, generator=g)
        shape = (1, L, C.HEADS, C.HD)
        ro = {}
        for how, fr in (("complex_real", freqs), ("tables", tabs)):
            cr = torch.compile(lambda t, f: rope_apply(norm(t).view(shape), f, torch.bfloat16, torch.float32,
                                                       real=True), dynamic=False)
            t, _, ro[how] = cuda_time(lambda: cr(x, fr), 10, warmup=2)
            gb = 2 * x.numel() * 2 / 1e9
            record(section="micro", what=f"optin_rmsnorm_rope_q_{how}", ms=median(t) * 1e3, floor_gb=gb,
                   tb_s_vs_floor=gb / median(t) / 1e3)
        record(section="micro", what="optin_rope_tables_vs_real", rel_l2=rel_l2(ro["tables"], ro["complex_real"]),
               equal=bool(torch.equal(ro["tables"], ro["complex_real"])))
        del x, ro, tabs, freqs
    except Exception as e:
        record(section="micro", what="optin_micro", error=repr(e)[:500], tb=traceback.format_exc()[-2000:])
        log(traceback.format_exc())
    free_cuda()




SECTIONS = {"env": section_env, "flextune": section_flextune, "diffusers": section_diffusers, "compiled": section_compiled,
            "tuned": section_tuned}

if __name__ == "__main__":
    C.main(SECTIONS, "env,diffusers,compiled", __doc__)
