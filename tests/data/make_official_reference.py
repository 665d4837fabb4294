"""Write the official-parity reference numbers under tests/data/ (run once, by hand, outside CI).

    python tests/data/make_official_reference.py /path/to/MCG-NJU/SteadyDancer

Runs the official SteadyDancer code (wan/modules/model_dancer.py, small_archs.py, mobilenetv2_dcd.py,
wan/utils/fm_solvers_unipc.py of the given checkout; loaded by tests/_official_ref.py, which swaps the CUDA-only
flash-attn for SDPA and keeps the fp32 run in fp32) on CPU in float32 with fixed seeds, and stores only
numbers: the tiny models' weights, the inputs and the official outputs. Our code is not run here, except the
sampler test doubles (tests/_samplers_fakes.py: the deterministic stand-in DiT and its conditioning bundle),
which drive the official scheduler. The official code is never copied into this repository.

Files written:
- tests/data/official_dit_tiny.safetensors: a tiny official WanModel (dim 64, 2 blocks, CLIP width 16; the
  pose modules at their real 14B sizes) and, for several input seeds and shapes, the full forward output plus
  what the official forward handed to its submodules (captured with hooks): the temporal and spatial pose
  module outputs, the alignment unit's output, the 68-channel input of patch_embedding_fuse (channel order),
  the token sequence entering block 0 (reference-frame token order) and block 0's q before/after rope_apply
  with the grid it was given (RoPE positions of the two reference frames). One sample is also run with bf16
  weights under the emulated CUDA bf16 autocast of the official pipeline (bf16 matmuls, convolutions and
  attention computed exactly and rounded once, so the numbers do not depend on the CPU's bf16 kernels). Standalone parts with their own
  weights: DYModule (spatial), the temporal Sequential, PoseRefNetNoBNV3 (alignment at width 32 / 4 heads,
  batch 1 as the official code assumes) and LayerNorm2D at two widths.
- tests/data/official_unipc.safetensors: the official FlowUniPCMultistepScheduler's timesteps, sigmas and
  per-step latents in the official generate() loop (text + pose guidance) around the test double, with the
  conditioning bundle and initial noise it ran on (stored: CPU randn differs slightly between instruction sets).
Metadata in each file: the official commit, torch/diffusers versions, configs and the sample list.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
TESTS = HERE.parent
sys.path.insert(0, str(TESTS))
import conftest  # noqa: E402,F401  (registers this checkout as ``steadydancer_turbo``)
from _official_ref import (  # noqa: E402
    AutocastConvEntry,
    CudaAutocastBF16,
    ExactLowPrecisionMatmuls,
    load_official_modules,
    load_official_scheduler,
    official_model,
    randomize_official,
)

from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig  # noqa: E402

DIT_FILE = HERE / "official_dit_tiny.safetensors"
UNIPC_FILE = HERE / "official_unipc.safetensors"

# the tiny DiT: real structure; pose modules (in_dim_c 16, align 128 wide / 8 heads) at the real sizes
CFG = dict(dim=64, ffn_dim=96, num_layers=2, num_heads=2, text_dim=32, text_len=24, freq_dim=32, clip_dim=16)
WEIGHT_SEED = 12
# full forward samples: name -> (F, H, W, t, text tokens, input seed)
FORWARD = {
    "f3h4w6": (3, 4, 6, 999, 9, 1),
    "f1h2w2": (1, 2, 2, 0, 5, 2),
    "f5h6w4": (5, 6, 4, 437, 24, 3),
    "f2h4w8": (2, 4, 8, 621, 13, 4),
    "batch0": (3, 4, 4, 900, 4, 50),       # batch0 + batch1: same shape, for the batched-forward test
    "batch1": (3, 4, 4, 250, 17, 51),
}
BF16 = {"bf16_f3h4w6": (3, 4, 6, 731, 9, 77)}
# standalone parts: name -> input shape, per part; each part has its own weights (seeds below)
SPATIAL = {"n4h6w4": (4, 16, 6, 4), "n2h3w5": (2, 16, 3, 5), "n1h8w8": (1, 16, 8, 8)}
TEMPORAL = {"t5h6w4": (1, 16, 5, 6, 4), "t1h3w3": (1, 16, 1, 3, 3), "t9h4w2": (1, 16, 9, 4, 2)}
ALIGN = {"t5h3w4": (5, 3, 4), "t1h2w2": (1, 2, 2), "t7h4w6": (7, 4, 6), "t3h6w2": (3, 6, 2)}
ALIGN_SIZE = dict(hidden_dim=32, num_heads=4)   # the model's own alignment unit has the real 128 / 8
LN2D = {"c128": (2, 128, 3, 4), "c16": (2, 16, 3, 3)}
PART_SEEDS = dict(spatial=101, temporal=102, align=103, ln2d=104)
# sampler: name -> (steps, shift, text scale, pose scale, noise seed)
COND_FIELDS = ("context", "context_null", "clip_fea", "clip_fea_c", "y", "cond_pos", "cond_neg", "ref_x", "ref_c")
UNIPC = {"s10_shift5": (10, 5.0, 5.0, 1.0, 11), "s40_shift5": (40, 5.0, 5.0, 1.0, 11),
         "s20_shift3": (20, 3.0, 4.0, 1.5, 11)}


def official_commit(checkout) -> str:
    try:
        return subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:  # an exported tree without .git: say so (pass --commit)
        return "unknown"


def forward_inputs(f, h, w, n_txt, seed, cfg):
    """Inputs in the official layouts: y = cat(mask4, image latent16), ref_x = cat(Zr, ones4, Zr),
    ref_c = cat(Zp0, zeros4, Zp0)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    zp = r(16, 1, h, w)
    zr = r(16, 1, h, w)
    mask = (r(4, f, h, w) > 0).float()
    return dict(x=r(16, f, h, w), y=torch.cat([mask, r(16, f, h, w)]), cond=1.5 * r(16, f, h, w) + 0.2,
                ref_x=torch.cat([zr, torch.ones(4, 1, h, w), zr]),
                ref_c=torch.cat([zp, torch.zeros(4, 1, h, w), zp]),
                ctx=r(n_txt, cfg.text_dim), clip=r(1, 257, cfg.clip_dim), clip_c=r(1, 257, cfg.clip_dim))


def official_forward(md, off, s, t, capture=True):
    """Official forward of one sample; returns (output, captured intermediates)."""
    cap, hooks = {}, []

    def out_hook(name):
        def h(mod, args, out):
            cap.setdefault(name, out.detach().clone())
        return h

    def in_hook(name):
        def h(mod, args):
            cap.setdefault(name, args[0].detach().clone())
        return h

    rope_orig = md.rope_apply

    def rope_spy(x, grid_sizes, freqs):
        out = rope_orig(x, grid_sizes, freqs)
        if "rope_q_in" not in cap:           # the first call: block 0's q
            cap["rope_q_in"], cap["rope_q_out"] = x.detach().clone(), out.detach().clone()
            cap["rope_grid"] = grid_sizes.detach().clone()
        return out

    if capture:
        hooks = [off.condition_embedding_temporal.register_forward_hook(out_hook("temporal")),
                 off.condition_embedding_spatial.register_forward_hook(out_hook("spatial")),
                 off.condition_embedding_align.register_forward_hook(out_hook("aligned")),
                 off.patch_embedding_fuse.register_forward_pre_hook(in_hook("fuse_in")),
                 off.blocks[0].register_forward_pre_hook(in_hook("block0_in"))]
        md.rope_apply = rope_spy
    try:
        with torch.no_grad():
            out = off([s["x"]], t=torch.tensor([t]), context=[s["ctx"]], seq_len=12345, condition=s["cond"],
                      ref_x=s["ref_x"], ref_c=s["ref_c"], clip_fea_x=s["clip"], clip_fea_c=s["clip_c"], y=[s["y"]])
    finally:
        md.rope_apply = rope_orig
        for hk in hooks:
            hk.remove()
    return out[0], cap


def _args(sample):
    f, h, w, _, n_txt, seed = sample
    return f, h, w, n_txt, seed


def _randn(shape, seed, scale=1.0, shift=0.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale + shift


def make_dit(mods, commit):
    md, sa, dcd = mods.model_dancer, mods.small_archs, mods.mobilenetv2_dcd
    cfg = SteadyDancerConfig(**CFG)
    torch.manual_seed(WEIGHT_SEED)
    off = randomize_official(official_model(md, cfg), WEIGHT_SEED)
    t = {f"weights.{k}": v.detach().clone().contiguous() for k, v in off.state_dict().items()}
    samples = {}
    for name, (f, h, w, ts, n_txt, seed) in FORWARD.items():
        s = forward_inputs(f, h, w, n_txt, seed, cfg)
        out, cap = official_forward(md, off, s, ts)
        # the spatial module sees the frames of the pose latent: store [1, 16, F, H, W] like the others
        cap["spatial"] = cap["spatial"].view(1, f, 16, h, w).transpose(1, 2)
        for k, v in {**s, **cap, "out": out}.items():
            t[f"fwd.{name}.{k}"] = v.contiguous()
        samples[name] = dict(F=f, H=h, W=w, t=ts, text_tokens=n_txt, seed=seed)
    # sample batch0 with batch1's reference frames (ref_x, ref_c): how the video output depends on them
    s = dict(forward_inputs(*_args(FORWARD["batch0"]), cfg))
    other = forward_inputs(*_args(FORWARD["batch1"]), cfg)
    s.update(ref_x=other["ref_x"], ref_c=other["ref_c"])
    t["fwd.mix_refs.out"], _ = official_forward(md, off, s, FORWARD["batch0"][3], capture=False)
    samples["mix_refs"] = dict(note="inputs of batch0 with ref_x and ref_c of batch1")
    for name, (f, h, w, ts, n_txt, seed) in BF16.items():
        s = forward_inputs(f, h, w, n_txt, seed, cfg)
        off16 = official_model(md, cfg).to(torch.bfloat16)
        off16.load_state_dict(off.state_dict())
        s16 = dict(s, ctx=s["ctx"].bfloat16(), clip=s["clip"].half(), clip_c=s["clip_c"].half())
        with ExactLowPrecisionMatmuls(), AutocastConvEntry(), CudaAutocastBF16():
            out16, _ = official_forward(md, off16, s16, ts, capture=False)
        out32, _ = official_forward(md, off, s, ts, capture=False)
        for k, v in {**s, "out_bf16_autocast": out16, "out_fp32": out32}.items():
            t[f"fwd.{name}.{k}"] = v.contiguous()
        samples[name] = dict(F=f, H=h, W=w, t=ts, text_tokens=n_txt, seed=seed,
                             note="official bf16 weights under emulated CUDA autocast(bf16); bf16 text, fp16 CLIP; "
                                  "bf16 matmuls/convs/attention exact then rounded (ExactLowPrecisionMatmuls)")

    # standalone parts, their own weights (the temporal Sequential is built as WanModel.__init__ builds it)
    torch.manual_seed(PART_SEEDS["spatial"])
    sp = randomize_official(dcd.DYModule(16, 16), PART_SEEDS["spatial"]).eval()
    torch.manual_seed(PART_SEEDS["temporal"])
    temporal = torch.nn.Sequential(*[m for _ in range(3) for m in (sa.FactorConv3d(16, 16, (3, 3, 3), 1),
                                                                    torch.nn.SiLU())])
    randomize_official(temporal, PART_SEEDS["temporal"]).eval()
    torch.manual_seed(PART_SEEDS["align"])
    al = randomize_official(sa.PoseRefNetNoBNV3(in_channels_x=16, in_channels_c=16, **ALIGN_SIZE),
                            PART_SEEDS["align"]).eval()
    for pname, mod in (("spatial", sp), ("temporal", temporal), ("align", al)):
        for k, v in mod.state_dict().items():
            t[f"parts.{pname}.weights.{k}"] = v.detach().clone().contiguous()
    with torch.no_grad():
        for i, (name, shape) in enumerate(SPATIAL.items()):
            x = _randn(shape, 200 + i, 1.5, 0.3)
            t[f"parts.spatial.{name}.x"], t[f"parts.spatial.{name}.out"] = x, sp(x.clone())
        for i, (name, shape) in enumerate(TEMPORAL.items()):
            x = _randn(shape, 300 + i, 1.5, 0.3)
            t[f"parts.temporal.{name}.x"], t[f"parts.temporal.{name}.out"] = x, temporal(x)
        for i, (name, (tt, h, w)) in enumerate(ALIGN.items()):
            pose, ref = _randn((1, 16, tt, h, w), 400 + i, 1.5, 0.2), _randn((1, 16, tt, h, w), 450 + i)
            t[f"parts.align.{name}.pose"], t[f"parts.align.{name}.ref"] = pose, ref
            t[f"parts.align.{name}.out"] = al(pose, ref)
        for i, (name, shape) in enumerate(LN2D.items()):
            ln = sa.LayerNorm2D(shape[1])
            ln.weight.copy_(_randn(ln.weight.shape, 500 + i, 0.5, 1.0))
            ln.bias.copy_(_randn(ln.bias.shape, 550 + i, 0.5))
            x = _randn(shape, 600 + i, 3.0, 2.0)
            t[f"parts.ln2d.{name}.weight"], t[f"parts.ln2d.{name}.bias"] = ln.weight.detach().clone(), \
                ln.bias.detach().clone()
            t[f"parts.ln2d.{name}.x"], t[f"parts.ln2d.{name}.out"] = x, ln(x)
    parts = dict(spatial=SPATIAL, temporal=TEMPORAL, align=ALIGN, align_size=ALIGN_SIZE, ln2d=LN2D, seeds=PART_SEEDS)
    meta = _meta(commit, config=json.dumps(CFG), weight_seed=str(WEIGHT_SEED), forward=json.dumps(samples),
                 parts=json.dumps(parts))
    return t, meta


def make_unipc(checkout, commit):
    from _samplers_fakes import make_cond, official_loop

    from steadydancer_turbo.steadydancer.sampling.official import initial_noise  # seeded CPU randn (test checks it)

    Official = load_official_scheduler(checkout)
    t, runs = {}, {}
    # the stand-in DiT only reduces text / CLIP to sums and means: small widths keep the stored bundle tiny
    cond = make_cond(text_dim=16, clip_dim=16, clip_tokens=5)
    for f in COND_FIELDS:
        t[f"cond.{f}"] = getattr(cond, f).contiguous()
    for name, (steps, shift, g_txt, g_pose, seed) in UNIPC.items():
        noise = initial_noise((1, *cond.latent_shape), seed=seed)
        sched = Official(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
        sched.set_timesteps(steps, device="cpu", shift=shift)
        latents = official_loop(sched, sched.timesteps, cond, noise, g_txt, g_pose)
        t[f"{name}.timesteps"] = sched.timesteps.clone().to(torch.int64)
        t[f"{name}.sigmas"] = sched.sigmas.clone().float()
        t[f"{name}.noise"] = noise
        t[f"{name}.latents"] = torch.stack([x[0] for x in latents])
        runs[name] = dict(steps=steps, shift=shift, text_scale=g_txt, pose_scale=g_pose, noise_seed=seed,
                          pose_window=[0.1, 0.4])
    meta = _meta(commit, runs=json.dumps(runs), model="tests/_samplers_fakes.FakeDiT on the stored cond.* bundle "
                 "(make_cond(text_dim=16, clip_dim=16, clip_tokens=5))",
                 loop="official generate(): e_c, e_ut every step; e_up when 0.1 < idx/steps < 0.4; "
                      "noise_pred = e_ut + g_txt (e_c - e_ut) [+ g_pose (e_c - e_up)]; scheduler.step")
    return t, meta


def _meta(commit, **kw):
    import diffusers

    return dict(official_repo="https://github.com/MCG-NJU/SteadyDancer", official_commit=commit,
                generator="tests/data/make_official_reference.py", torch=torch.__version__,
                diffusers=diffusers.__version__, dtype="float32 (CPU)", **kw)


def main(argv=None):
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("official", help="path of a MCG-NJU/SteadyDancer checkout (repository root)")
    ap.add_argument("--commit", help="official commit hash (default: git rev-parse HEAD in the checkout)")
    a = ap.parse_args(argv)
    commit = a.commit or official_commit(a.official)
    torch.set_num_threads(1)
    mods = load_official_modules(a.official)
    t, meta = make_dit(mods, commit)
    save_file({k: v.contiguous() for k, v in t.items()}, str(DIT_FILE), metadata=meta)
    t, meta = make_unipc(a.official, commit)
    save_file(t, str(UNIPC_FILE), metadata=meta)
    for f in (DIT_FILE, UNIPC_FILE):
        print(f"wrote {f} ({f.stat().st_size / 1e6:.2f} MB), official commit {commit}")


if __name__ == "__main__":
    main()
