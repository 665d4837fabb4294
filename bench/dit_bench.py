"""Full-size 14B DiT forward benchmark: SteadyDancer DiT (ours) against diffusers' WanTransformer3DModel.

One command, one GPU (H100 80 GB / H200), inside 10 minutes (``--budget`` seconds; sections that would overrun
are skipped and say so):

    PYTHONPATH=<dir holding steadydancer_turbo> python bench/dit_bench.py --out OUTDIR
    python bench/dit_bench.py --device cpu --tiny --out /tmp/x        # smoke test of the script itself

Sections (``--sections``, in order):
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
  perf2      turbo target: flex options / selection cost / fused q/k/v micro checks, then the compiled fp8 +
             top-k model (previous best vs tuned), a profile of one forward, whole turbo sampling
             ``--p3 base,amax2,ropetab,both,base2`` (perf3, run 6; ``lib``/``lib2``/``libtuned`` = the library's
             defaults since run 6, flex "auto" or tuned tiles; ``--turbo-reps N``): kernel micro checks of the
             two-stage fp8 amax (GELU + quantize at the FFN2 input) and of the (cos, sin)-table RoPE (RMSNorm +
             RoPE of q), then the compiled fp8 + top-k model once per listed config (flex options as --p2-fixed's
             "tuned"), each with forward time, error vs dense bf16 and whole turbo sampling; profile of the last
  turboc     compiled blocks only: fp8+sparse at 720p/480p (top-k 0.15 and 0.10), turbo, bf16 sparse 720p, and a
             noise floor (output change for a one-bf16-rounding input perturbation)

Weights: random, built directly on the GPU in bf16 (parameters are cast to bf16 as each is registered, so the
fp32 copy of one layer is the most that ever exists). Two 14B models never coexist: build, time, free.

Numbers: median of ``--reps`` timed forwards after one warm-up forward at the same shape (CUDA events).
TFLOP/s is an analytic count (printed) over the time. Peak memory is torch.cuda.max_memory_allocated over the
warm-up + timed forwards (weights included). Relative L2 errors are against the dense bf16 output of the same
model with the same inputs. Random weights make attention nearly uniform, which is the worst case for top-k
sparse attention. Results and analysis: bench/perf_notes.md; raw logs: bench/logs/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

T0 = time.time()
DEV = "cuda"
RESULTS: list[dict] = []
ARGS = None
LOG = None

RES = {"480p": (832, 480), "720p": (1280, 720)}
FRAMES = 81
D, FFN, LAYERS, HEADS, HD = 5120, 13824, 40, 40, 128
TEXT_DIM, FREQ_DIM = 4096, 256
L_TEXT, L_IMG = 512, 257


# ----------------------------------------------------------------------------------------------------- utilities
def log(*a):
    msg = " ".join(str(x) for x in a)
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)
    if LOG:
        LOG.write(msg + "\n")
        LOG.flush()


def elapsed():
    return time.time() - T0


def have_time(need_s: float) -> bool:
    ok = elapsed() + need_s < ARGS.budget
    if not ok:
        log(f"SKIP (time budget): need ~{need_s:.0f}s, {ARGS.budget - elapsed():.0f}s left")
    return ok


def record(**kw):
    kw.setdefault("card", ENV.get("card"))
    kw.setdefault("torch", ENV.get("torch"))
    kw.setdefault("date", ENV.get("date"))
    RESULTS.append(kw)
    if ARGS.out:
        with open(os.path.join(ARGS.out, "results.jsonl"), "a") as f:
            f.write(json.dumps(kw) + "\n")
    log("RESULT", json.dumps(kw))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def mem_alloc():
    return torch.cuda.memory_allocated() if DEV == "cuda" else 0


def cuda_time(fn, reps: int, warmup: int = 1) -> tuple[list[float], float, object]:
    """Returns (times_s, peak_bytes, last_output). CUDA events on the GPU (host clock for --device cpu)."""
    sync()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = None
    for _ in range(warmup):
        out = fn()
    sync()
    times = []
    for _ in range(reps):
        if DEV == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out = fn()
            e.record()
            sync()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    return times, (torch.cuda.max_memory_allocated() if DEV == "cuda" else 0), out


def median(x):
    x = sorted(x)
    n = len(x)
    return x[n // 2] if n % 2 else 0.5 * (x[n // 2 - 1] + x[n // 2])


def free_cuda():
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def bf16_params_on(device: str, dtype=torch.bfloat16):
    """Build a module directly on ``device``: floating parameters are cast to ``dtype`` the moment they are
    registered (before the module's own init runs on them, on the GPU), buffers keep the dtype the code gives."""
    orig = nn.Module.register_parameter

    def reg(self, name, param):
        if param is not None and param.is_floating_point() and param.dtype != dtype:
            param = nn.Parameter(param.data.to(dtype), requires_grad=param.requires_grad)
        orig(self, name, param)

    nn.Module.register_parameter = reg
    try:
        with torch.device(device):
            yield
    finally:
        nn.Module.register_parameter = orig


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0):
    """Deterministic random weights with sane scales, generated on the GPU: matrices ~ N(0, 1/fan_in),
    1-D weights of norms = 1, biases ~ N(0, 0.02), other 1-D / modulation tables ~ N(0, 1/sqrt(dim))."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        if p.dim() >= 2 and "modulation" not in name and "scale_shift_table" not in name:
            fan_in = p[0].numel()
            p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
        elif name.endswith("bias"):
            p.normal_(0.0, 0.02, generator=g)
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)


def random_model(make) -> nn.Module:
    """``make()`` built directly on the bench device in bf16, in eval mode, frozen, with ``randomize_``'s weights."""
    with bf16_params_on(DEV):
        model = make()
    model.eval().requires_grad_(False)
    randomize_(model, seed=0)
    return model


def ours_model() -> nn.Module:
    """The SteadyDancer DiT the ours/turboc/perf2 sections time: full 14B (or tiny), SDPA, random bf16 weights."""
    from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
    from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT

    cfg = SteadyDancerConfig.tiny() if ARGS.tiny else SteadyDancerConfig.full_14b()
    return random_model(lambda: SteadyDancerDiT(cfg, attention="sdpa"))


# ----------------------------------------------------------------------------------------------------- FLOPs
def dit_flops(l_tokens: int, attn_keep: float = 1.0, in_ch: int = 36) -> dict:
    """Analytic FLOPs of one Wan-14B-I2V-style forward with ``l_tokens`` self-attention tokens
    (2 FLOPs per multiply-add). ``attn_keep`` scales the self-attention score/PV part (sparse)."""
    L = l_tokens
    per_block_lin = 2 * L * D * D * 4                       # self q k v o
    per_block_lin += 2 * L * D * D * 2                      # cross q o
    per_block_lin += 2 * (L_TEXT + L_IMG) * D * D * 2       # cross k v (text) + k_img v_img
    per_block_lin += 2 * L * D * FFN * 2                    # ffn
    self_attn = 4 * L * L * D * attn_keep                   # QK^T + PV over all heads
    cross_attn = 4 * L * (L_TEXT + L_IMG) * D
    embed = 2 * L * in_ch * 4 * D + 2 * L * D * 64          # patch embedding + head (small)
    total = LAYERS * (per_block_lin + self_attn + cross_attn) + embed
    return {"total": total, "linear": LAYERS * per_block_lin, "self_attn": LAYERS * self_attn,
            "cross_attn": LAYERS * cross_attn}


def latent_hw(res):
    w, h = RES[res]
    return h // 8, w // 8


def tokens(res, ref_frames=0):
    lh, lw = latent_hw(res)
    return (21 + ref_frames) * (lh // 2) * (lw // 2)


# ----------------------------------------------------------------------------------------------------- env
ENV: dict = {}


def section_env():
    if DEV != "cuda":
        ENV.update(card="cpu (smoke test)", torch=torch.__version__, date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"))
        return
    p = torch.cuda.get_device_properties(0)
    ENV.update(card=p.name, torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
               mem_gib=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count, python=platform.python_version())
    try:
        import triton
        ENV["triton"] = triton.__version__
    except Exception:
        pass
    try:
        import diffusers
        ENV["diffusers"] = diffusers.__version__
    except Exception as e:
        ENV["diffusers"] = f"missing ({e})"
    log("ENV", json.dumps(ENV))
    record(section="env", **{k: v for k, v in ENV.items() if k not in ("card", "torch", "date")})


# ----------------------------------------------------------------------------------------------------- micro
def section_micro():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from steadydancer_turbo.steadydancer.kernels.sparse_attention import (SparseAttentionConfig, build_block_mask,
                                                                  select_kv_blocks, sparse_attention,
                                                                  sparse_attention_reference)

    # correctness of the GPU flex path (full blocks, non-divisible length) against a masked reference
    g = torch.Generator(device=DEV).manual_seed(1)
    L = 9000 if DEV == "cuda" else 700
    q, k, v = (torch.randn(1, L, 4, HD, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
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
        q, k, v = (torch.randn(1, L, HEADS, HD, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
        ref = None
        for name in ("sdpa", "sdpa_cudnn", "auto"):
            fn = get_backend(name)
            t, _, o = cuda_time(lambda: fn(q, k, v), 5)
            ref = o if ref is None else ref
            record(section="micro", what=f"registry_{name}", L=L, ms=median(t) * 1e3,
                   tflops=4 * L * L * HD * HEADS / median(t) / 1e12, rel_l2_vs_sdpa=rel_l2(o, ref))
        del q, k, v, ref, o
    except Exception as e:
        record(section="micro", what="registry_backends", error=repr(e)[:300])
    free_cuda()

    if ARGS.micro == "full":
        for res, L in (("480p", tokens("480p", 2)), ("720p", tokens("720p", 2))):
            q, k, v = (torch.randn(1, L, HEADS, HD, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            flops = 4 * L * L * HD * HEADS
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

    # FFN-shaped matmul: bf16 nn.Linear vs FP8Linear (quantization included)
    from steadydancer_turbo.steadydancer.kernels.fp8_linear import FP8Linear, quantize_rowwise

    M = tokens("480p", 2)
    x = torch.randn(M, D, device=DEV, dtype=torch.bfloat16, generator=g)
    lin = nn.Linear(D, FFN, device=DEV, dtype=torch.bfloat16)
    flops = 2 * M * D * FFN
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


def section_flextune():
    """Pick the fastest flex kernel options for top-k self-attention at the 480p shape (checked against the
    default configuration's output); later sections use the winner."""
    from steadydancer_turbo.steadydancer.kernels import sparse_attention as spa

    g = torch.Generator(device=DEV).manual_seed(5)
    L = tokens("480p", 2)
    q, k, v = (torch.randn(1, L, HEADS, HD, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
    cfg = spa.SparseAttentionConfig(topk=ARGS.topk)
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
    bf = dict(device=DEV, dtype=torch.bfloat16, generator=g)
    return dict(hidden_states=torch.randn(1, 36, 21, lh, lw, **bf),
                timestep=torch.tensor([999], device=DEV, dtype=torch.long),
                encoder_hidden_states=torch.randn(1, L_TEXT, TEXT_DIM, **bf),
                encoder_hidden_states_image=torch.randn(1, L_IMG, 1280, **bf), return_dict=False)


def section_diffusers():
    from diffusers import WanTransformer3DModel

    t0 = time.time()
    model = random_model(lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HD, in_channels=36, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=FREQ_DIM, ffn_dim=FFN, num_layers=LAYERS, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=D, rope_max_seq_len=1024))
    sync()
    nparams = sum(p.numel() for p in model.parameters())
    log(f"diffusers model built in {time.time() - t0:.1f}s, {nparams / 1e9:.3f} B params, "
        f"{mem_alloc() / 2**30:.1f} GiB")
    g = torch.Generator(device=DEV).manual_seed(123)
    for res in ARGS.res:
        L = tokens(res)
        est = {"480p": 3.5, "720p": 13.0}[res] * (ARGS.reps + 1) + 5
        if not have_time(est):
            continue
        inp = diffusers_inputs(res, g)
        with torch.no_grad():
            t, peak, out = cuda_time(lambda: model(**inp)[0], ARGS.reps)
        fl = dit_flops(L)
        record(section="model", model="diffusers", variant="dense_sdpa_default", res=res, tokens=L,
               s=median(t), times=t, tflops=fl["total"] / median(t) / 1e12, pflop=fl["total"] / 1e15,
               peak_gib=peak / 2**30, finite=bool(torch.isfinite(out).all()))
        BASE[res] = median(t)
        del out
        del inp
        free_cuda()
    res = "480p"
    if res in ARGS.res and "diffusers_cudnn" in ARGS.variants and have_time(15):
        L, fl = tokens(res), dit_flops(tokens(res))
        inp = diffusers_inputs(res, g)
        try:
            model.set_attention_backend("_native_cudnn")
            with torch.no_grad():
                t, peak, out = cuda_time(lambda: model(**inp)[0], ARGS.reps)
            record(section="model", model="diffusers", variant="dense_cudnn", res=res, tokens=L, s=median(t),
                   times=t, tflops=fl["total"] / median(t) / 1e12, peak_gib=peak / 2**30,
                   ratio_vs_diffusers=median(t) / BASE[res])
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


BASE: dict = {}


# ----------------------------------------------------------------------------------------------------- ours
def ours_inputs(res, g):
    lh, lw = latent_hw(res)
    f32 = dict(device=DEV, dtype=torch.float32, generator=g)
    bf = dict(device=DEV, dtype=torch.bfloat16, generator=g)
    zr = torch.randn(1, 16, 1, lh, lw, **f32)
    return dict(x=torch.randn(1, 16, 21, lh, lw, **f32),
                timestep=torch.tensor([999], device=DEV, dtype=torch.long),
                context=torch.randn(1, L_TEXT, TEXT_DIM, **bf),
                clip_fea=torch.randn(1, L_IMG, 1280, **bf), clip_fea_c=torch.randn(1, L_IMG, 1280, **bf),
                y=torch.randn(1, 20, 21, lh, lw, **f32), cond=torch.randn(1, 16, 21, lh, lw, **f32),
                ref_x=torch.cat([zr, torch.ones(1, 4, 1, lh, lw, device=DEV), zr], 1),
                ref_c=torch.randn(1, 16, 1, lh, lw, **f32))


def set_backend(model, backend: str):
    """Switch the attention backend of our model (registry names, see steadydancer/kernels/attention.py and
    fast_attention.py); "flex_sparse:<topk>" registers that top-k setting on first use."""
    from steadydancer_turbo.steadydancer.weights import speed_options as accel

    if backend.startswith("flex_sparse:"):
        backend = accel.sparse(float(backend.split(":")[1]))
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
    if res in BASE:
        row["ratio_vs_diffusers"] = median(t) / BASE[res]
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
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(inp["x"].shape, device=DEV, generator=g) * sig[0]
    kw = {k: v for k, v in inp.items() if k not in ("x", "timestep")}
    for s, s_next in zip(sig[:-1], sig[1:]):
        ts = torch.full((1,), 1000 * s, device=DEV)
        v = model(x=x, timestep=ts, **kw)
        x0 = x - s * v
        x = (1 - s_next) * x0 + s_next * torch.randn(x.shape, device=DEV, generator=g) if s_next > 0 else x0
    return x, "bench loop"


def section_ours():
    from steadydancer_turbo.steadydancer.weights import speed_options as accel

    t0 = time.time()
    model = ours_model()
    sync()
    nparams = sum(p.numel() for p in model.parameters())
    log(f"ours built in {time.time() - t0:.1f}s, {nparams / 1e9:.3f} B params, "
        f"{mem_alloc() / 2**30:.1f} GiB")
    g = torch.Generator(device=DEV).manual_seed(7)
    inputs = {res: ours_inputs(res, g) for res in ARGS.res}
    dense = {}
    V = ARGS.variants
    est = {"480p": 3.3, "720p": 11.0}
    best = ARGS.dense_backend
    sp = f"flex_sparse:{ARGS.topk}"
    keep = {}
    for res in ARGS.res:
        nk = math.ceil(tokens(res, 2) / 128)
        keep[res] = max(1, int(ARGS.topk * nk)) / nk

    def go(variant, res, backend, kf=1.0, reps=None, ref=True, extra_s=0.0, warmup=1):
        reps = reps or ARGS.reps
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
            if ARGS.fp8_scaling == "auto":
                cands = [r for r in RESULTS if str(r.get("what", "")).startswith("ffn1_fp8_") and "ms" in r
                         and r.get("rel_l2_vs_bf16", 1) < 0.05]
                pick = min(cands, key=lambda r: r["ms"])["what"][len("ffn1_fp8_"):] if cands else "rowwise"
                ARGS.fp8_scaling = pick.split("_")[0]
                ARGS.fp8_fast_accum = pick.endswith("_fastacc")
            for name, mod in model.blocks.named_modules():
                if type(mod) is nn.Linear:
                    twins[name] = (mod, FP8Linear.from_linear(mod, act_scaling=ARGS.fp8_scaling,
                                                              fast_accum=ARGS.fp8_fast_accum))
            log(f"fp8 twins: {len(twins)} linears ({ARGS.fp8_scaling}, fast_accum={ARGS.fp8_fast_accum}), "
                f"{mem_alloc() / 2**30:.1f} GiB allocated")
            record(section="fp8", what="mode", act_scaling=ARGS.fp8_scaling, fast_accum=ARGS.fp8_fast_accum,
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
    for res in ARGS.res:
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
        for res in reversed(ARGS.res):
            go(f"sparse{ARGS.topk}", res, sp, kf=keep[res], extra_s=30)
        if twins:
            use_fp8(True)
            for res in reversed(ARGS.res):
                go(f"fp8_sparse{ARGS.topk}", res, sp, kf=keep[res] * 0.8)
            use_fp8(False)
    # 4. whole turbo sampling, eager
    turbo(f"turbo4_dense_{best}", best, est["480p"])
    if twins and "sparse" in V:
        use_fp8(True)
        turbo(f"turbo4_fp8_sparse{ARGS.topk}", sp, est["480p"] * 0.55)
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
                            go(f"fp8_sparse{ARGS.topk}_compiled", "480p", sp, kf=keep["480p"], warmup=0)
                            turbo(f"turbo4_fp8_sparse{ARGS.topk}_compiled", sp, est["480p"] * 0.45)
                use_fp8(False)
        accel.uncompile_blocks(model)
    # 6. leftovers if time allows: fp8 at 720p (eager)
    if twins and "720p" in inputs:
        use_fp8(True)
        go("fp8", "720p", best)
        use_fp8(False)
    del model, inputs, dense, twins
    free_cuda()


def section_turboc():
    """Compiled blocks only: fp8 + top-k sparse at 720p and 480p (incl. whole 4-step turbo sampling), bf16
    sparse at 720p, against eager dense references of this run, plus a bf16 noise floor (same model, input
    perturbed by one bf16 rounding) to read the random-weight errors against."""
    from steadydancer_turbo.steadydancer.weights import speed_options as accel
    from steadydancer_turbo.steadydancer.kernels.fp8_linear import FP8Linear

    model = ours_model()
    g = torch.Generator(device=DEV).manual_seed(7)
    inputs = {res: ours_inputs(res, g) for res in ARGS.res}
    twins = {}
    for name, mod in model.blocks.named_modules():
        if type(mod) is nn.Linear:
            twins[name] = (mod, FP8Linear.from_linear(mod, act_scaling=ARGS.fp8_scaling,
                                                      fast_accum=ARGS.fp8_fast_accum))
    record(section="fp8", what="mode", act_scaling=ARGS.fp8_scaling, fast_accum=ARGS.fp8_fast_accum)

    def use_fp8(on):
        for name, (lin, f8) in twins.items():
            parent_name, _, attr = name.rpartition(".")
            setattr(model.blocks.get_submodule(parent_name) if parent_name else model.blocks, attr, f8 if on else lin)

    best = ARGS.dense_backend
    dense = {}
    with torch.no_grad():
        for res in ARGS.res:
            if have_time({"480p": 5, "720p": 17}[res]):
                set_backend(model, best)
                _, _, dense[res] = cuda_time(lambda: model(**inputs[res]), 1, warmup=0)
        if "480p" in dense:
            inp = dict(inputs["480p"])
            inp["x"] = inp["x"].to(torch.bfloat16).float() + inp["x"] * 2 ** -9 * torch.randn(
                inp["x"].shape, device=DEV, generator=g)
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
            run_ours_variant(model, variant, res, inputs[res], dense.get(res), ARGS.reps, kf, warmup=0)
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
    run(f"fp8_sparse{ARGS.topk}_compiled", "720p", ARGS.topk, True, False)
    run("fp8_sparse0.1_compiled", "480p", 0.1, True, True)
    run(f"fp8_sparse{ARGS.topk}_compiled", "480p", ARGS.topk, True, True)
    run(f"sparse{ARGS.topk}_compiled", "720p", ARGS.topk, False, False)
    del model, inputs, dense, twins
    free_cuda()


def section_perf2():
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

    topk = ARGS.topk
    g = torch.Generator(device=DEV).manual_seed(5)
    L = tokens("480p", 2)
    cfg_sp = spa.SparseAttentionConfig(topk=topk)
    base_opts = {"USE_TMA": True}
    best_opts, best_ms = base_opts, float("inf")
    qkv_wins = False
    HOPPER_TUNED = {"USE_TMA": True, "ROWS_GUARANTEED_SAFE": True, "BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4,
                    "num_stages": 3}  # fastest of run 4's flex micro check (6.47 vs 7.38 ms at top-k 0.10)
    if ARGS.p3:
        perf3_micro(L, g)
    if DEV == "cuda" and not ARGS.p2_fixed and not ARGS.p3:
        q, k, v = (torch.randn(1, L, HEADS, HD, device=DEV, dtype=torch.bfloat16, generator=g) for _ in range(3))
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
                       tflops=4 * L * L * HD * HEADS * kf / median(t) / 1e12, rel_l2_vs_first=err)
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
        x = torch.randn(L, D, device=DEV, dtype=torch.bfloat16, generator=g)
        lins = [FP8Linear.from_linear(nn.Linear(D, D, device=DEV, dtype=torch.bfloat16), act_scaling="tensor",
                                      fast_accum=True) for _ in range(3)]
        xq, xs = quantize_tensorwise(x)
        three = lambda: [torch._scaled_mm(xq, m.weight.t(), scale_a=xs, scale_b=m.scale_weight, bias=m.bias,  # noqa
                                          out_dtype=torch.bfloat16, use_fast_accum=True) for m in lins]
        wcat = torch.cat([m.weight for m in lins], 0)
        bcat = torch.cat([m.bias for m in lins], 0)
        scat = torch.cat([m.scale_weight.reshape(1).expand(D) for m in lins]).reshape(1, -1).contiguous()
        sa = xs.reshape(1, 1).expand(L, 1).contiguous()
        fused_row = lambda: torch._scaled_mm(xq, wcat.t(), scale_a=sa, scale_b=scat, bias=bcat,  # noqa: E731
                                             out_dtype=torch.bfloat16, use_fast_accum=True)
        one = torch.ones((), device=DEV)
        fused_tensor = lambda: torch._scaled_mm(xq, wcat.t(), scale_a=xs, scale_b=one, bias=bcat,  # noqa: E731
                                                out_dtype=torch.bfloat16, use_fast_accum=True)
        t3, _, o3 = cuda_time(three, 10)
        tr, _, orow = cuda_time(fused_row, 10)
        tt, _, _ = cuda_time(fused_tensor, 10)
        err = rel_l2(orow, torch.cat(o3, -1))
        fl = 2 * L * D * 3 * D
        record(section="micro", what="qkv_fp8_gemm", ms_three=median(t3) * 1e3, ms_fused_rowwise=median(tr) * 1e3,
               ms_fused_tensorwise_timing_only=median(tt) * 1e3, tflops_three=fl / median(t3) / 1e12,
               tflops_fused_rowwise=fl / median(tr) / 1e12, rel_l2_fused_vs_three=err)
        qkv_wins = median(tr) < 0.98 * median(t3) and err < 1e-2
        del x, lins, xq, wcat, bcat, scat, sa, o3, orow
        free_cuda()

    # ------------------------------------------------------------------ the model
    t0 = time.time()
    model = ours_model()
    gi = torch.Generator(device=DEV).manual_seed(7)
    inp = ours_inputs("480p", gi)
    with torch.no_grad():
        set_backend(model, ARGS.dense_backend)
        _, _, dense = cuda_time(lambda: model(**inp), 1, warmup=0)
    log(f"model + dense reference in {time.time() - t0:.1f}s")
    convert_linears_to_fp8(model, act_scaling="tensor", fast_accum=True)  # bf16 block weights freed
    free_cuda()
    if DEV == "cuda":  # (CPU smoke test: eager; inductor's CPU flex has no block-sparse lowering)
        accel.compile_blocks(model)
    set_backend(model, f"flex_sparse:{topk}")
    nk = math.ceil(L / 128)
    kf = max(1, int(topk * nk)) / nk

    def config(label, opts, qkv, ffn2_rowwise=False, need_s=45, amax2=False, ropetab=False):
        """amax2 / ropetab: True / False force the perf3 forms on / off (runs 4-6 used off = the old base);
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
            run_ours_variant(model, variant, "480p", inp, dense, ARGS.reps, kf, warmup=0)
            with torch.no_grad():
                t, peak, (xo, how) = cuda_time(lambda: turbo_sample(model, inp), ARGS.turbo_reps, warmup=0)
            record(section="turbo", model="ours", variant=f"turbo4_{variant}", res="480p", s=median(t), times=t,
                   peak_gib=peak / 2**30, sampler=how, finite=bool(torch.isfinite(xo).all()))
        except Exception as e:
            record(section="model", model="ours", variant=label, res="480p", error=repr(e)[:500],
                   tb=traceback.format_exc()[-2000:])
            log(traceback.format_exc())

    def profile(label):
        if DEV != "cuda" or not have_time(12):
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

    if ARGS.p3:  # perf3 opt-ins, each against the same model and inputs (base first and, if listed, last)
        tuned = HOPPER_TUNED if DEV == "cuda" else base_opts
        # base/amax2/ropetab/both: run 6's comparison (run 4's tuned flex tiles); lib/lib2: the library's own
        # defaults (flex "auto" = USE_TMA on Hopper, two-stage amax, RoPE tables); libtuned: those + tuned tiles
        p3 = {"base": {}, "base2": {}, "amax2": {"amax2": True}, "ropetab": {"ropetab": True},
              "both": {"amax2": True, "ropetab": True}, "lib": {"opts": "auto", "amax2": None, "ropetab": None},
              "lib2": {"opts": "auto", "amax2": None, "ropetab": None}, "libtuned": {"amax2": None, "ropetab": None}}
        names = [n for n in ARGS.p3.split(",") if n]
        for i, name in enumerate(names):
            kw = dict(p3[name])
            config(f"p3_{name}", kw.pop("opts", tuned), False, need_s=45 if i == 0 else 35, **kw)
        profile("p3_" + names[-1])
        set_tensorwise_amax()
        spa.set_flex_kernel_options("auto")
        del model, inp, dense
        free_cuda()
        return
    if ARGS.p2_fixed:  # second run: flex options fixed (no micro), FFN2 input scaled per token
        config("tuned+ffn2row", HOPPER_TUNED, False, True)
        config("base", base_opts, False, need_s=18)  # recompile with warm caches: ~8 s (run 4)
        return
    config("base", base_opts, False)
    tuned = best_opts != base_opts
    qkv = qkv_wins or ARGS.tiny
    if tuned or qkv:
        config("+".join(["tuned"] * tuned + ["qkv"] * qkv), best_opts, qkv)
    profile("best")
    del model, inp, dense
    free_cuda()


def perf3_micro(L, g):
    """Kernel-level checks of the perf3 opt-ins at the 480p shapes, each compiled alone (dynamic=False):
    GELU(tanh) + per-tensor fp8 quantization of the FFN2 input [L, 13824] with the flat vs the two-stage amax
    (outputs must be bit-identical), and RMSNorm + RoPE of q [1, L, 40, 128] with the complex-freqs real path vs
    the (cos, sin) tables (rel. L2 between them: 0 up to FMA contraction). ms = median of 10, after 2 warm-ups."""
    from steadydancer_turbo.steadydancer.kernels import fp8_linear as F8
    from steadydancer_turbo.steadydancer.model.dit import rope_apply, rope_freqs, rope_tables
    from steadydancer_turbo.steadydancer.model.layers import RMSNorm

    if not have_time(60):
        return
    try:
        h = torch.randn(L, FFN, device=DEV, dtype=torch.bfloat16, generator=g) * 3
        outs = {}
        for how, fn in (("flat", F8.quantize_per_tensor), ("two_stage", F8.quantize_tensorwise_two_stage)):
            cq = torch.compile(lambda t, fn=fn: fn(F.gelu(t, approximate="tanh")), dynamic=False)
            t, _, outs[how] = cuda_time(lambda: cq(h), 10, warmup=2)
            gb = (h.numel() * 2 + h.numel()) / 1e9  # read bf16 once + write fp8 once (the floor)
            record(section="micro", what=f"p3_gelu_quant_ffn2_{how}", ms=median(t) * 1e3,
                   floor_gb=gb, tb_s_vs_floor=gb / median(t) / 1e3)
        (a8, as_), (b8, bs) = outs["flat"], outs["two_stage"]
        record(section="micro", what="p3_gelu_quant_bit_identical",
               equal=bool(torch.equal(a8.view(torch.uint8), b8.view(torch.uint8)) and torch.equal(as_, bs)))
        del h, outs, a8, b8
        free_cuda()
        lh, lw = latent_hw("480p")
        freqs = rope_freqs((FRAMES // 4 + 1 + 2, lh // 2, lw // 2), HD, device=DEV)
        assert freqs.shape[0] == L, (freqs.shape, L)
        tabs = rope_tables(freqs)
        norm = RMSNorm(D).to(DEV, torch.bfloat16)
        x = torch.randn(1, L, D, device=DEV, dtype=torch.bfloat16, generator=g)
        shape = (1, L, HEADS, HD)
        ro = {}
        for how, fr in (("complex_real", freqs), ("tables", tabs)):
            cr = torch.compile(lambda t, f: rope_apply(norm(t).view(shape), f, torch.bfloat16, torch.float32,
                                                       real=True), dynamic=False)
            t, _, ro[how] = cuda_time(lambda: cr(x, fr), 10, warmup=2)
            gb = 2 * x.numel() * 2 / 1e9
            record(section="micro", what=f"p3_rmsnorm_rope_q_{how}", ms=median(t) * 1e3, floor_gb=gb,
                   tb_s_vs_floor=gb / median(t) / 1e3)
        record(section="micro", what="p3_rope_tables_vs_real", rel_l2=rel_l2(ro["tables"], ro["complex_real"]),
               equal=bool(torch.equal(ro["tables"], ro["complex_real"])))
        del x, ro, tabs, freqs
    except Exception as e:
        record(section="micro", what="p3_micro", error=repr(e)[:500], tb=traceback.format_exc()[-2000:])
        log(traceback.format_exc())
    free_cuda()


# ----------------------------------------------------------------------------------------------------- table
def print_table():
    lines = [f"card={ENV.get('card')} torch={ENV.get('torch')} cuda={ENV.get('cuda')} cudnn={ENV.get('cudnn')} "
             f"date={ENV.get('date')} reps={ARGS.reps}"]
    for res in ARGS.res:
        fl = dit_flops(tokens(res)), dit_flops(tokens(res, 2))
        lines.append(f"FLOPs {res}: diffusers {fl[0]['total'] / 1e15:.3f} PFLOP ({tokens(res)} tok, self-attn "
                     f"{fl[0]['self_attn'] / 1e15:.3f}); ours {fl[1]['total'] / 1e15:.3f} PFLOP ({tokens(res, 2)} tok, "
                     f"self-attn {fl[1]['self_attn'] / 1e15:.3f})")
    lines.append(f"{'model':10s} {'variant':28s} {'res':5s} {'s':>8s} {'x diff':>7s} {'TFLOP/s':>8s} "
                 f"{'peakGiB':>8s} {'relL2':>8s}")
    for r in RESULTS:
        if r.get("section") not in ("model", "turbo") or "error" in r:
            continue
        ratio = r.get("ratio_vs_diffusers", 1.0 if r.get("model") == "diffusers" and "default" in r["variant"]
                      else float("nan"))
        lines.append(f"{r.get('model', ''):10s} {r['variant']:28s} {r['res']:5s} {r['s']:8.3f} {ratio:7.3f} "
                     f"{r.get('tflops', float('nan')):8.1f} {r.get('peak_gib', float('nan')):8.1f} "
                     f"{r.get('rel_l2_vs_dense_bf16', float('nan')):8.4f}")
    for r in RESULTS:
        if r.get("section") in ("micro", "profile", "compile"):
            lines.append("micro " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                                                 for k, v in r.items() if k not in ("card", "torch", "date", "tb")}))
        if "error" in r:
            lines.append(f"ERROR {r.get('model', '')} {r.get('variant', r.get('what'))} {r.get('res', '')}: "
                         f"{r['error'][:300]}")
    txt = "\n".join(lines)
    print("\n" + txt, flush=True)
    if ARGS.out:
        with open(os.path.join(ARGS.out, "table.txt"), "w") as f:
            f.write(txt + "\n")


def main():
    global ARGS, LOG
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--res", default="480p,720p")
    ap.add_argument("--sections", default="env,micro,diffusers,ours")
    ap.add_argument("--variants", default="sdpa,sparse,fp8,turbo,compile,diffusers_cudnn")
    ap.add_argument("--micro", default="light", help="light: correctness + fp8 modes; full: + attention kernels")
    ap.add_argument("--fp8-scaling", default="auto", choices=["auto", "rowwise", "tensor"],
                    help="auto: the fastest FFN-shaped fp8 mode of the micro section with error < 5%%")
    ap.add_argument("--fp8-fast-accum", action="store_true")
    ap.add_argument("--dense-backend", default="sdpa_cudnn")
    ap.add_argument("--topk", type=float, default=0.15)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--turbo-reps", type=int, default=1, help="timed whole 4-step turbo runs per config")
    ap.add_argument("--p2-fixed", action="store_true", help="perf2: skip the micro checks; tuned+ffn2row, then base")
    ap.add_argument("--p3", default="", help="perf2 section, perf3 opt-ins: comma list of configs to time "
                    "(base, amax2, ropetab, both, base2), after their kernel micro checks; skips perf2's micro")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; sections that would overrun are skipped")
    ap.add_argument("--device", default="cuda", help="cpu: smoke-test the script itself (use with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and sizes (smoke test)")
    ARGS = ap.parse_args()
    global DEV, D, FFN, LAYERS, HEADS, HD, TEXT_DIM, FREQ_DIM
    DEV = ARGS.device
    if ARGS.tiny:
        from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig

        c = SteadyDancerConfig.tiny()
        D, FFN, LAYERS, HEADS, HD, TEXT_DIM, FREQ_DIM = (c.dim, c.ffn_dim, c.num_layers, c.num_heads, c.head_dim,
                                                         c.text_dim, c.freq_dim)
        RES.update({"480p": (128, 96), "720p": (160, 128)})
    ARGS.res = [r for r in ARGS.res.split(",") if r]
    ARGS.variants = set(ARGS.variants.split(","))
    if ARGS.out:
        os.makedirs(ARGS.out, exist_ok=True)
        LOG = open(os.path.join(ARGS.out, "bench.log"), "a")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    sections = ARGS.sections.split(",")
    for name in sections:
        fn = globals()[f"section_{name}"]
        try:
            fn()
        except Exception as e:
            record(section=name, error=repr(e)[:500], tb=traceback.format_exc()[-3000:])
            log(traceback.format_exc())
        free_cuda()
    print_table()


if __name__ == "__main__":
    sys.exit(main())
