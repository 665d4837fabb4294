"""Shared pieces of the DiT benchmarks (bench/dit_forward.py, bench/turbo_sampling.py): options, timing with CUDA
events, result rows (``results.jsonl``, ``bench.log``, ``table.txt`` under ``--out``), random bf16 models built
on the GPU, analytic FLOPs, the env section and the printed table.

State shared by the sections lives here as module globals (``ARGS``, ``DEV``, the model dimensions, ``RESULTS``,
``BASE``); section modules read them as ``C.NAME`` (``import _common as C``), so ``--tiny`` resizes everything.

Weights: random, built directly on the GPU in bf16 (parameters are cast to bf16 as each is registered, so the
fp32 copy of one layer is the most that ever exists). Two 14B models never coexist: build, time, free.

Numbers: median of ``--reps`` timed forwards after one warm-up forward at the same shape (CUDA events).
TFLOP/s is an analytic count (printed) over the time. Peak memory is torch.cuda.max_memory_allocated over the
warm-up + timed forwards (weights included). Relative L2 errors are against the dense bf16 output of the same
model with the same inputs. Random weights make attention nearly uniform, which is the worst case for top-k
sparse attention.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import time
import traceback

import torch
import torch.nn as nn

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
def import_pack(run_init: bool = False):
    """Make ``steadydancer_turbo`` importable from this checkout (run from anywhere, no PYTHONPATH). By default
    without running the pack's ``__init__`` (which imports the ComfyUI node layer and its dependencies);
    ``run_init``: run it too (the node layer, e.g. inside a ComfyUI process)."""
    import importlib.util
    import pathlib
    import sys

    name = "steadydancer_turbo"
    if name not in sys.modules:
        root = pathlib.Path(__file__).resolve().parents[1]
        spec = importlib.util.spec_from_file_location(name, root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        if run_init:
            spec.loader.exec_module(mod)


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


def random_model(make) -> nn.Module:
    """``make()`` built directly on the bench device in bf16, in eval mode, frozen, with the pack's deterministic
    random weights (``steadydancer/model/random_init.py``)."""
    from steadydancer_turbo.steadydancer.model.random_init import randomize_
    with bf16_params_on(DEV):
        model = make()
    model.eval().requires_grad_(False)
    randomize_(model, seed=0)
    return model


def ours_model() -> nn.Module:
    """The SteadyDancer DiT the ours/compiled/tuned sections time: full 14B (or tiny), SDPA, random bf16 weights."""
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




BASE: dict = {}  # diffusers' seconds per forward by resolution (the ratio baseline)


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
    write_table(lines)


def write_table(lines: list[str]):
    """Print the table and keep it as ``table.txt`` under ``--out``."""
    txt = "\n".join(lines)
    print("\n" + txt, flush=True)
    if ARGS.out:
        with open(os.path.join(ARGS.out, "table.txt"), "w") as f:
            f.write(txt + "\n")


def use_tiny_sizes():
    """The model dimensions and resolutions of the tiny config (``--tiny`` smoke tests)."""
    global D, FFN, LAYERS, HEADS, HD, TEXT_DIM, FREQ_DIM
    from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig

    c = SteadyDancerConfig.tiny()
    D, FFN, LAYERS, HEADS, HD, TEXT_DIM, FREQ_DIM = (c.dim, c.ffn_dim, c.num_layers, c.num_heads, c.head_dim,
                                                     c.text_dim, c.freq_dim)
    RES.update({"480p": (128, 96), "720p": (160, 128)})


def main(sections: dict, default_sections: str, description: str):
    """Parse the shared options, run ``--sections`` (names of ``sections``) in order, print the table."""
    global ARGS, LOG
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--res", default="480p,720p")
    ap.add_argument("--sections", default=default_sections, help=f"comma list of: {', '.join(sections)}")
    ap.add_argument("--variants", default="sdpa,sparse,fp8,turbo,compile,diffusers_cudnn")
    ap.add_argument("--micro", default="light", help="light: correctness + fp8 modes; full: + attention kernels")
    ap.add_argument("--fp8-scaling", default="auto", choices=["auto", "rowwise", "tensor"],
                    help="auto: the fastest FFN-shaped fp8 mode of the micro section with error < 5%%")
    ap.add_argument("--fp8-fast-accum", action="store_true")
    ap.add_argument("--dense-backend", default="sdpa_cudnn")
    ap.add_argument("--topk", type=float, default=0.15)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--turbo-reps", type=int, default=1, help="timed whole 4-step turbo runs per config")
    ap.add_argument("--fixed-flex", action="store_true",
                    help="tuned section: skip the micro checks; tuned+ffn2row, then base")
    ap.add_argument("--optins", default="", help="tuned section: comma list of fp8-amax / RoPE-table configs to time "
                    "(base, amax2, ropetab, both, base2, lib, lib2, libtuned), after their kernel micro checks; "
                    "skips the tuned section's flex micro checks")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds; sections that would overrun are skipped")
    ap.add_argument("--device", default="cuda", help="cpu: smoke-test the script itself (use with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and sizes (smoke test)")
    ARGS = ap.parse_args()
    global DEV
    DEV = ARGS.device
    if ARGS.tiny:
        use_tiny_sizes()
    ARGS.res = [r for r in ARGS.res.split(",") if r]
    ARGS.variants = set(ARGS.variants.split(","))
    if ARGS.out:
        os.makedirs(ARGS.out, exist_ok=True)
        LOG = open(os.path.join(ARGS.out, "bench.log"), "a")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    for name in ARGS.sections.split(","):
        if name not in sections:
            ap.error(f"unknown section {name!r}; this script has: {', '.join(sections)}")
        fn = sections[name]
        try:
            fn()
        except Exception as e:
            record(section=name, error=repr(e)[:500], tb=traceback.format_exc()[-3000:])
            log(traceback.format_exc())
        free_cuda()
    print_table()


