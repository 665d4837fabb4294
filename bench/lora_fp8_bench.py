"""fp8 layers with a ComfyUI LoRA patch: today's per-call merge against the low-rank side terms (issue 15).

One ``QuantLinear`` per Wan2.1-14B Linear shape (random e4m3 weights with a per-tensor scale, a random rank-64
LoRA with alpha 64 at strength 1, the lightx2v step-distill LoRA's rank), at the token counts one 480p 81-frame
SteadyDancer forward feeds it (35,880 video tokens incl. the two reference frames; 512 text and 257 CLIP tokens for
the cross-attention k/v). Paths, each timed with CUDA events (median of ``--reps`` after warm-ups):

- ``bf16 merged``: the LoRA merged once into a bf16 weight, plain bf16 matmul (what a bf16 model with the LoRA
  merged in place runs; the accuracy reference of the float path);
- ``fp8 per-call merge``: what ComfyUI's patch did to an fp8-matmul layer before: ``weight_patch_fn`` =
  dequantize to fp32 + ``comfy.lora.calculate_weight`` (LoRA tensors cast from host RAM, full up @ down in fp32),
  cast to bf16, bf16 matmul, every call;
- ``fp8 + side terms``: the fp8 matmul kept, the LoRA added as ``(x @ down.T) @ up.T`` (``set_lowrank_terms``);
- ``fp8, no LoRA``: the fp8 matmul alone, for scale.

Errors: relative L2 against the float32 product of the same operands with the LoRA merged in float32. The
``per forward`` rows sum one DiT block's Linear layers (self-attn q/k/v/o and cross-attn q/o at the video tokens,
cross-attn k/v at the text tokens, k_img/v_img at the CLIP tokens, FFN up/down) times 40 blocks.

With ``--comfyui PATH`` (a ComfyUI checkout importable by this Python) the merge and the adapter are ComfyUI's own
(``comfy.lora.calculate_weight``, ``comfy.weight_adapter.lora.LoRAAdapter``, converted by the node layer's
``lora_side_terms``); without it a stand-in with ComfyUI 0.33's formula (``W += strength * alpha / rank * up @
down``) is used, and the table says so.

    python bench/lora_fp8_bench.py [--comfyui /path/to/ComfyUI] [--tokens 35880] [--reps 10] [--compile]
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from _common import import_pack

ROOT = pathlib.Path(__file__).resolve().parents[1]
D, FFN, RANK, ALPHA, LAYERS = 5120, 13824, 64, 64.0, 40


def comfy_pieces(path, cpu=False):
    """(LoRAAdapter class, merge(patches, key, weight_fp32), source label)."""
    if path:
        sys.path.insert(0, str(pathlib.Path(path).resolve()))
        if cpu:
            import comfy.cli_args
            comfy.cli_args.args.cpu = True
        import comfy.lora
        from comfy.weight_adapter.lora import LoRAAdapter
        return (LoRAAdapter, lambda p, key, w: comfy.lora.calculate_weight(p, w, key, intermediate_dtype=torch.float32),
                "ComfyUI's calculate_weight")

    class LoRAAdapter:
        def __init__(self, loaded_keys, weights):
            self.loaded_keys, self.weights = loaded_keys, weights

    def merge(patches, key, w):  # comfy/weight_adapter/lora.py LoRAAdapter.calculate_weight, plain LoRA
        for strength, v, _, _, _ in patches:
            up, down, alpha = v.weights[:3]
            up = up.to(w.device, torch.float32)
            down = down.to(w.device, torch.float32)
            w += (strength * alpha / down.shape[0]) * torch.mm(up.flatten(1), down.flatten(1)).reshape(w.shape)
        return w

    return LoRAAdapter, merge, "stand-in with ComfyUI 0.33's formula"


def timed(fn, reps, warm=2):
    for _ in range(warm):
        fn()
    ts = []
    if not torch.cuda.is_available():  # --tiny smoke run on the CPU: wall clock
        import time
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(1000 * (time.perf_counter() - t0))
        return statistics.median(ts)
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench_shape(in_f, out_f, tokens, args, lora_cls, merge):
    from steadydancer_turbo.nodes import native_model as nm
    from steadydancer_turbo.steadydancer.kernels.fp8_linear import quantize_per_tensor
    from steadydancer_turbo.steadydancer.weights.quant import QuantLinear, dequantize_fp8
    dev, bf = torch.device("cuda" if not args.tiny else "cpu"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(in_f * 7 + out_f)
    w = torch.randn(out_f, in_f, device=dev, generator=g) * in_f ** -0.5
    q, s = quantize_per_tensor(w, torch.float8_e4m3fn)
    bias = torch.randn(out_f, device=dev, generator=g) * 0.02
    up = (torch.randn(out_f, RANK, device=dev, generator=g) * 0.02).to(bf).cpu()     # LoRA tensors in host RAM,
    down = (torch.randn(RANK, in_f, device=dev, generator=g) * in_f ** -0.5).to(bf).cpu()  # as ComfyUI keeps them
    patches = [(1.0, lora_cls(set(), (up, down, ALPHA, None, None, None)), 1.0, None, None)]
    x = torch.randn(tokens, in_f, device=dev, generator=g).to(bf)

    def layer(fp8mm):
        lin = QuantLinear(in_f, out_f, True, "fp8", torch.float8_e4m3fn, bf, device=dev)
        lin.weight, lin.weight_scale = q, s.reshape(1)
        lin.bias = nn.Parameter(bias.to(bf), requires_grad=False)
        lin.fp8_matmul = fp8mm
        return lin

    w32 = dequantize_fp8(q, s, torch.float32)
    merged32 = w32 + (ALPHA / RANK) * (up.to(dev, torch.float32) @ down.to(dev, torch.float32))
    ref = F.linear(x.float(), merged32, bias)
    rows = []
    merged_bf = merged32.to(bf)
    paths = {"bf16 merged": lambda: F.linear(x, merged_bf, bias.to(bf))}
    today = layer(True)
    today.weight_patch_fn = lambda wt: merge(patches, "k", wt)   # no low-rank form: the fp8 matmul is off
    assert not today.fp8_matmul_active(x)
    paths["fp8 per-call merge"] = lambda: today(x)
    new = layer(True)
    new.weight_patch_fn = today.weight_patch_fn
    new.set_lowrank_terms(nm.lora_side_terms(patches, new.weight_shape, lora_cls))
    assert new.fp8_matmul_active(x)
    paths["fp8 + side terms"] = lambda: new(x)
    plain = layer(True)
    paths["fp8, no LoRA"] = lambda: plain(x)
    for name, fn in paths.items():
        if args.compile and name != "bf16 merged":
            fn = torch.compile(fn)
        with torch.no_grad():
            ms = timed(fn, args.reps)
            err = rel(fn(), ref) if name != "fp8, no LoRA" else float("nan")
        rows.append(dict(shape=f"{in_f}->{out_f}", tokens=tokens, path=name, ms=ms, err=err))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfyui", default=None, help="ComfyUI checkout: use its LoRAAdapter and calculate_weight")
    ap.add_argument("--tokens", type=int, default=35880, help="video tokens per forward (480p 81 frames + 2 refs)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="torch.compile each path's call")
    ap.add_argument("--tiny", action="store_true", help="smoke run of the script on the CPU (small shapes; the fp8 "
                    "device probe forced on, torch._scaled_mm on the CPU); its times mean nothing")
    args = ap.parse_args()
    import_pack()  # no node-layer __init__
    from steadydancer_turbo.steadydancer.kernels import fp8_linear as f8
    global D, FFN, RANK, ALPHA
    if args.tiny:
        D, FFN, RANK, ALPHA, args.tokens = 256, 512, 8, 8.0, 300
        f8.fp8_matmul_supported = lambda device=None: True
        torch.cuda.is_available = lambda: False
    elif not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (or --tiny for a CPU smoke run)")
    elif not f8.fp8_matmul_supported("cuda"):
        sys.exit(f"{torch.cuda.get_device_name()} has no fp8 tensor cores (needs compute capability 8.9+)")
    lora_cls, merge, source = comfy_pieces(args.comfyui, cpu=args.tiny)
    print(f"# {'CPU smoke run' if args.tiny else torch.cuda.get_device_name()}, torch {torch.__version__}, LoRA rank {RANK} alpha {ALPHA:g}, "
          f"merge: {source}, compile: {args.compile}")
    t = args.tokens
    # (in, out, tokens, layers per block)
    shapes = [(D, D, t, 6), (D, D, 512, 2), (D, D, 257, 2), (D, FFN, t, 1), (FFN, D, t, 1)]
    rows, per_fwd = [], {}
    for in_f, out_f, tokens, n in shapes:
        r = bench_shape(in_f, out_f, tokens, args, lora_cls, merge)
        rows += r
        for row in r:
            per_fwd[row["path"]] = per_fwd.get(row["path"], 0.0) + row["ms"] * n * LAYERS
        torch.cuda.empty_cache()
    print(f"{'layer':>12} {'tokens':>7} {'path':<20} {'ms':>9} {'rel err vs fp32 merged':>23}")
    for r in rows:
        print(f"{r['shape']:>12} {r['tokens']:>7} {r['path']:<20} {r['ms']:9.3f} {r['err']:23.2e}")
    print(f"\nper DiT forward, the Linear layers of {LAYERS} blocks (per block: self-attn q/k/v/o + cross-attn q/o at "
          "the video tokens, cross-attn k/v at the text tokens, k_img/v_img at the CLIP tokens, FFN up/down):")
    for p, ms in per_fwd.items():
        print(f"  {p:<20} {ms / 1000:7.3f} s")


if __name__ == "__main__":
    main()
