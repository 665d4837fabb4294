"""The two DiTs the benchmarks time, their random inputs, and the steps every model section shares:
diffusers' WanTransformer3DModel (the ``diffusers`` section: the ratio baseline), the ``flextune`` section (the
fastest flex options for top-k attention, kept for the later sections), our SteadyDancerDiT's inputs,
attention switching, one timed variant row, and whole 4-step turbo sampling.
"""

from __future__ import annotations

import time

import torch

import _common as C
from _common import (cuda_time, dit_flops, free_cuda, have_time, latent_hw, log, median, mem_alloc,  # noqa: F401
                     ours_model, random_model, record, rel_l2, section_env, sync, tokens)


# ----------------------------------------------------------------------------------------------------- flex tuning
def section_flextune():
    """Pick the fastest flex kernel options for top-k self-attention at the 480p shape (checked against the
    default configuration's output); later sections use the winner."""
    from steadydancer_turbo.steadydancer.kernels import sparse_attention as spa

    g = torch.Generator(device=C.DEV).manual_seed(5)
    L = tokens("480p", 2)
    q, k, v = (torch.randn(1, L, C.HEADS, C.HD, device=C.DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
    cfg = spa.SparseAttentionConfig(topk=C.ARGS.topk)
    idx = spa.select_kv_blocks(q, k, cfg)
    cands = [None, {"USE_TMA": True}, {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2}]
    best, best_ms, ref = None, float("inf"), None
    for opts in cands:
        if not have_time(25):
            break
        try:
            spa.set_flex_kernel_options(opts)
            spa._compiled_flex = None  # fresh compile with these options
            t, _, o = cuda_time(lambda: spa.sparse_attention(q, k, v, cfg, kv_indices=idx), 5)
            ref = o if ref is None else ref
            err = rel_l2(o, ref)
            record(section="micro", what="flex_tune", options=str(opts), ms=median(t) * 1e3, rel_l2_vs_default=err)
            if err < 1e-2 and median(t) * 1e3 < best_ms:
                best, best_ms = opts, median(t) * 1e3
        except Exception as e:
            record(section="micro", what="flex_tune", options=str(opts), error=repr(e)[:300])
    spa.set_flex_kernel_options(best)
    spa._compiled_flex = None
    record(section="micro", what="flex_tune_choice", options=str(best), ms=best_ms)
    del q, k, v, ref
    free_cuda()


# ----------------------------------------------------------------------------------------------------- diffusers
def diffusers_inputs(res, g):
    lh, lw = latent_hw(res)
    bf = dict(device=C.DEV, dtype=torch.bfloat16, generator=g)
    return dict(hidden_states=torch.randn(1, 36, 21, lh, lw, **bf),
                timestep=torch.tensor([999], device=C.DEV, dtype=torch.long),
                encoder_hidden_states=torch.randn(1, C.L_TEXT, C.TEXT_DIM, **bf),
                encoder_hidden_states_image=torch.randn(1, C.L_IMG, 1280, **bf), return_dict=False)


def section_diffusers():
    from diffusers import WanTransformer3DModel

    t0 = time.time()
    model = random_model(lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=C.HEADS, attention_head_dim=C.HD, in_channels=36, out_channels=16,
        text_dim=C.TEXT_DIM, freq_dim=C.FREQ_DIM, ffn_dim=C.FFN, num_layers=C.LAYERS, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=C.D, rope_max_seq_len=1024))
    sync()
    nparams = sum(p.numel() for p in model.parameters())
    log(f"diffusers model built in {time.time() - t0:.1f}s, {nparams / 1e9:.3f} B params, "
        f"{mem_alloc() / 2**30:.1f} GiB")
    g = torch.Generator(device=C.DEV).manual_seed(123)
    for res in C.ARGS.res:
        L = tokens(res)
        est = {"480p": 3.5, "720p": 13.0}[res] * (C.ARGS.reps + 1) + 5
        if not have_time(est):
            continue
        inp = diffusers_inputs(res, g)
        with torch.no_grad():
            t, peak, out = cuda_time(lambda: model(**inp)[0], C.ARGS.reps)
        fl = dit_flops(L)
        record(section="model", model="diffusers", variant="dense_sdpa_default", res=res, tokens=L,
               s=median(t), times=t, tflops=fl["total"] / median(t) / 1e12, pflop=fl["total"] / 1e15,
               peak_gib=peak / 2**30, finite=bool(torch.isfinite(out).all()))
        C.BASE[res] = median(t)
        del out
        del inp
        free_cuda()
    res = "480p"
    if res in C.ARGS.res and "diffusers_cudnn" in C.ARGS.variants and have_time(15):
        L, fl = tokens(res), dit_flops(tokens(res))
        inp = diffusers_inputs(res, g)
        try:
            model.set_attention_backend("_native_cudnn")
            with torch.no_grad():
                t, peak, out = cuda_time(lambda: model(**inp)[0], C.ARGS.reps)
            record(section="model", model="diffusers", variant="dense_cudnn", res=res, tokens=L, s=median(t),
                   times=t, tflops=fl["total"] / median(t) / 1e12, peak_gib=peak / 2**30,
                   ratio_vs_diffusers=median(t) / C.BASE[res])
            del out
        except Exception as e:
            record(section="model", model="diffusers", variant="dense_cudnn", res=res, error=repr(e)[:300])
        finally:
            if hasattr(model, "reset_attention_backend"):
                model.reset_attention_backend()
            else:
                model.set_attention_backend("native")
        del inp
    del model
    free_cuda()





def ours_inputs(res, g):
    lh, lw = latent_hw(res)
    f32 = dict(device=C.DEV, dtype=torch.float32, generator=g)
    bf = dict(device=C.DEV, dtype=torch.bfloat16, generator=g)
    zr = torch.randn(1, 16, 1, lh, lw, **f32)
    return dict(x=torch.randn(1, 16, 21, lh, lw, **f32),
                timestep=torch.tensor([999], device=C.DEV, dtype=torch.long),
                context=torch.randn(1, C.L_TEXT, C.TEXT_DIM, **bf),
                clip_fea=torch.randn(1, C.L_IMG, 1280, **bf), clip_fea_c=torch.randn(1, C.L_IMG, 1280, **bf),
                y=torch.randn(1, 20, 21, lh, lw, **f32), cond=torch.randn(1, 16, 21, lh, lw, **f32),
                ref_x=torch.cat([zr, torch.ones(1, 4, 1, lh, lw, device=C.DEV), zr], 1),
                ref_c=torch.randn(1, 16, 1, lh, lw, **f32))


def set_backend(model, backend: str):
    """Switch the attention backend of our model (registry names, see steadydancer/kernels/attention.py and
    backends.py); "flex_sparse:<topk>" / "int8_sparse:<topk>" register that top-k setting on first use."""
    from steadydancer_turbo.steadydancer.kernels.backends import SPARSE_FAMILIES
    from steadydancer_turbo.steadydancer.weights import speed_options as accel

    family, _, topk = backend.partition(":")
    if family in SPARSE_FAMILIES and topk:
        backend = accel.sparse(float(topk.split(":")[0]), kernel=SPARSE_FAMILIES[family])
    accel.use_attention(model, backend)


def run_ours_variant(model, variant, res, inp, dense_out, reps, keep_frac=1.0, warmup=1):
    L = tokens(res, 2)
    with torch.no_grad():
        t, peak, out = cuda_time(lambda: model(**inp), reps, warmup=warmup)
    fl = dit_flops(L, attn_keep=keep_frac)
    fl_dense = dit_flops(L)
    row = dict(section="model", model="ours", variant=variant, res=res, tokens=L, s=median(t), times=t,
               tflops=fl["total"] / median(t) / 1e12, pflop=fl["total"] / 1e15,
               dense_equiv_tflops=fl_dense["total"] / median(t) / 1e12, peak_gib=peak / 2**30,
               finite=bool(torch.isfinite(out).all()))
    if res in C.BASE:
        row["ratio_vs_diffusers"] = median(t) / C.BASE[res]
    if dense_out is not None:
        row["rel_l2_vs_dense_bf16"] = rel_l2(out, dense_out)
    record(**row)
    return out


def turbo_sample(model, inp, steps=4, seed=0):
    """Whole rCM turbo sampling, DiT only: turbo/rcm.py's ``sample_rcm`` when it is importable, otherwise the
    same loop (spec-turbo.md section 1: one forward per step, x0 = x - s v, SDE re-noising) written out here."""
    try:
        from steadydancer_turbo.steadydancer.sampling.conditioning import SteadyDancerConditioning
        from steadydancer_turbo.turbo.rcm import sample_rcm
    except Exception:
        sample_rcm = None
    if sample_rcm is not None:
        cond = SteadyDancerConditioning(context=inp["context"], context_null=inp["context"],
                                        clip_fea=inp["clip_fea"], clip_fea_c=inp["clip_fea_c"], y=inp["y"],
                                        cond_pos=inp["cond"], ref_x=inp["ref_x"], ref_c=inp["ref_c"])
        return sample_rcm(model, cond, seed=seed, steps=steps), "turbo.rcm.sample_rcm"
    sig = [0.99502, 0.93378, 0.85290, 0.60898, 0.0]  # rCM, sigma_max=200 (I2V), spec-turbo.md
    g = torch.Generator(device=C.DEV).manual_seed(seed)
    x = torch.randn(inp["x"].shape, device=C.DEV, generator=g) * sig[0]
    kw = {k: v for k, v in inp.items() if k not in ("x", "timestep")}
    for s, s_next in zip(sig[:-1], sig[1:]):
        ts = torch.full((1,), 1000 * s, device=C.DEV)
        v = model(x=x, timestep=ts, **kw)
        x0 = x - s * v
        x = (1 - s_next) * x0 + s_next * torch.randn(x.shape, device=C.DEV, generator=g) if s_next > 0 else x0
    return x, "bench loop"


