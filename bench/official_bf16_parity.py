"""bf16 parity of our SteadyDancer DiT with the official implementation, on a CUDA GPU.

The CPU test suite proves float32 parity (tests/test_dit_official_parity.py). This script checks the bf16 path
the way the official pipeline runs it: official WanModel with bf16 weights under CUDA autocast(bf16), fp32
latents in; ours with bf16 weights and no autocast. Both are compared with a float64 run of our model (same
weights), so the numbers say whether our explicit casts reproduce the official mixed precision.

    python bench/official_bf16_parity.py --official /path/to/MCG-NJU/SteadyDancer [--dim 1536 --layers 4]

Random weights (no checkpoint needed). If flash_attn is not installed, the official ``flash_attention`` is
replaced by SDPA with the same casts (q, k, v -> bf16); ours then uses "sdpa" too, so both sides run the same
kernel; with flash_attn installed, ours uses the "flash_attn" backend.
Expected: rel(ours_bf16, official_bf16) well below rel(official_bf16, fp64) (ideally ~1e-3 or less vs ~1e-2).
"""
from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import types

import torch
import torch.nn.functional as F



def _import_pack():
    from _common import import_pack

    import_pack(run_init=True)


def _load_official(path: str, patch_bf16_line: bool):
    root = pathlib.Path(path) / "wan" / "modules"
    pkg = types.ModuleType("_sd_official")
    pkg.__path__ = []
    sys.modules["_sd_official"] = pkg
    have_flash = importlib.util.find_spec("flash_attn") is not None or \
        importlib.util.find_spec("flash_attn_interface") is not None

    def load(name, patch=None):
        p = root / f"{name}.py"
        src = p.read_text()
        if patch:
            assert src.count(patch[0]) == 1
            src = src.replace(*patch)
        mod = types.ModuleType(f"_sd_official.{name}")
        mod.__file__, mod.__package__ = str(p), "_sd_official"
        sys.modules[mod.__name__] = mod
        exec(compile(src, str(p), "exec"), mod.__dict__)
        return mod

    if have_flash:
        load("attention")
    else:
        att = types.ModuleType("_sd_official.attention")

        def flash_attention(q, k, v, q_lens=None, k_lens=None, dtype=torch.bfloat16, **_):
            half = (torch.float16, torch.bfloat16)
            out_dtype = q.dtype
            q, k, v = (t if t.dtype in half else t.to(dtype) for t in (q, k, v))
            q, k = q.to(v.dtype), k.to(v.dtype)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return o.transpose(1, 2).type(out_dtype)

        def flash_attention_fp32(q, k, v, **_):     # CPU dry run: keep the input precision
            out_dtype = q.dtype
            q, k = q.to(v.dtype), k.to(v.dtype)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return o.transpose(1, 2).type(out_dtype)

        att.flash_attention = flash_attention_fp32 if patch_bf16_line else flash_attention
        sys.modules["_sd_official.attention"] = att
    load("small_archs")
    load("mobilenetv2_dcd")
    patch = ("x = x.to(torch.bfloat16)", "x = x.type_as(v)") if patch_bf16_line else None
    return load("model_dancer", patch), have_flash


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--official", required=True)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=8960)
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--lat-h", type=int, default=16)
    ap.add_argument("--lat-w", type=int, default=24)
    ap.add_argument("--t", type=int, default=750)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-dry-run", action="store_true", help="fp32 on CPU, to check the script itself")
    a = ap.parse_args()
    _import_pack()
    from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
    from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT

    dev = torch.device("cpu" if a.cpu_dry_run else "cuda")
    md, have_flash = _load_official(a.official, patch_bf16_line=a.cpu_dry_run)
    cfg = SteadyDancerConfig(dim=a.dim, ffn_dim=a.ffn, num_layers=a.layers, num_heads=a.dim // 128)
    torch.manual_seed(a.seed)
    off = md.WanModel(model_type="i2v", in_dim=36, dim=cfg.dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads,
                      num_layers=cfg.num_layers, text_dim=4096, freq_dim=256, out_dim=16).eval()
    with torch.no_grad():   # the official init zeroes the head; give it real values
        off.head.head.weight.normal_(0, cfg.dim ** -0.5)
        for p in off.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.05)
    sd = off.state_dict()

    ref = SteadyDancerDiT(cfg).to(torch.float64)
    ref.load_state_dict(sd)
    ref.to(dev)
    ours = SteadyDancerDiT(cfg, attention="flash_attn" if have_flash and not a.cpu_dry_run else "sdpa")
    ours.load_state_dict(sd)
    wdt = torch.float32 if a.cpu_dry_run else torch.bfloat16
    ours.to(dev, wdt)
    off.to(dev, wdt)

    f, h, w = a.frames, a.lat_h, a.lat_w
    g = torch.Generator().manual_seed(a.seed + 1)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    zr, zp = r(16, 1, h, w), r(16, 1, h, w)
    x, cond = r(16, f, h, w), r(16, f, h, w)
    mask = torch.zeros(4, f, h, w)
    mask[:, 0] = 1
    y = torch.cat([mask, r(16, f, h, w)])
    ref_x = torch.cat([zr, torch.ones(4, 1, h, w), zr])
    ref_c = torch.cat([zp, torch.zeros(4, 1, h, w), zp])
    ctx = r(120, 4096) * 0.1
    clip_x, clip_c = r(1, 257, 1280), r(1, 257, 1280)
    t = torch.tensor([a.t], dtype=torch.long)
    to = lambda z, dt=torch.float32: z.to(dev, dt)  # noqa: E731

    with torch.no_grad():
        want = ref(to(x[None], torch.float64), to(t), [to(ctx, torch.float64)], to(clip_x, torch.float64),
                   to(clip_c, torch.float64), to(y[None], torch.float64), to(cond[None], torch.float64),
                   to(ref_x[None], torch.float64), to(ref_c[None], torch.float64))[0]
        ctx_in = to(ctx, torch.float32 if a.cpu_dry_run else torch.bfloat16)        # T5 output is bf16
        clip_dt = torch.float32 if a.cpu_dry_run else torch.float16                  # CLIP runs in fp16
        with torch.autocast(dev.type, dtype=wdt, enabled=not a.cpu_dry_run):
            o = off([to(x)], t=to(t), context=[ctx_in], seq_len=0, condition=to(cond), ref_x=to(ref_x),
                    ref_c=to(ref_c), clip_fea_x=to(clip_x, clip_dt), clip_fea_c=to(clip_c, clip_dt), y=[to(y)])[0]
        u = ours(to(x[None]), to(t), [ctx_in], to(clip_x, clip_dt), to(clip_c, clip_dt), to(y[None]),
                 to(cond[None]), to(ref_x[None]), to(ref_c[None]))[0]

    rel = lambda p, q: ((p.double() - q.double()).norm() / q.double().norm()).item()  # noqa: E731
    print(f"device={dev} weights={wdt} dim={cfg.dim} layers={cfg.num_layers} grid=({f},{h},{w}) "
          f"flash_attn={have_flash} official_out_dtype={o.dtype}")
    print(f"rel(ours, official)      = {rel(u, o):.3e}")
    print(f"rel(official, fp64 ours) = {rel(o, want):.3e}")
    print(f"rel(ours, fp64 ours)     = {rel(u, want):.3e}")


if __name__ == "__main__":
    main()
