"""SteadyDancer-14B loader benchmark: load time, peak host RAM, peak VRAM and DiT seconds per forward,
per checkpoint format and block-swap setting, with random weights of the real shapes.

For each format a full-size checkpoint (16.4 B parameters; ``--layers`` fewer blocks to save time/disk) is
written to a temp folder one tensor at a time (nothing model-sized is held in RAM while writing):

- ``bf16``: safetensors, every tensor bf16 (32.8 GB at 40 layers);
- ``fp8``: safetensors in Kijai's scaled layout: block Linear weights float8_e4m3fn + per-tensor
  ``scale_weight``, everything else bf16 (16.4 GB);
- ``q8_0`` / ``q4_k``: GGUF like city96's converter (block Linear weights quantized; 1-D tensors and
  modulation F32, other 2-D F16, the 5-D patch embeddings F32 with 5 dims as fix_5d_tensors writes them).
  The packed blocks are random bytes with valid fp16 scales (dequantization cost does not depend on the
  values; gguf-py cannot quantize K-quants anyway).

Each (format, block_swap) measurement runs in a fresh subprocess so peak RSS (VmHWM) and peak VRAM belong
to that load alone: ``load_steadydancer(path, block_swap=N)`` then one warm-up and ``--forwards`` timed
forwards at 832x480x81 (latent 21x60x104 + 2 reference frames = 35,880 tokens, 512 text tokens, 257 CLIP
tokens). Files are read right after being written, so loads come from the page cache (a cold disk read
adds file size / disk bandwidth). With ``--layers L < 40`` the table also shows time, bytes and VRAM
scaled by 40/L for the block-dominated part - an estimate, marked as such.

Usage (GPU box):   python bench/loader_formats.py                      # all formats, defaults below
                   python bench/loader_formats.py --formats fp8 --swaps 0,40 --layers 20
                   python bench/loader_formats.py --tiny               # CPU smoke test, seconds
Needs torch (+ safetensors optional); GGUF rows need ``gguf`` and ``diffusers`` (dequantizers) and are
skipped with a note when they are missing.
Targets (issue 3): block swap 40 on fp8 at 480p peaks under 10 GiB VRAM at <= 1.5x the all-in-VRAM forward
time; GGUF dequantization adds <= 25 % to a forward (Q4_K / Q8_0 vs bf16).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import torch

DEFAULT_PLAN = "bf16:0,40;fp8:0,20,40;q8_0:0;q4_k:0"


def _import_pack():
    from _common import import_pack  # bench/ is this script's folder, first on sys.path
    import_pack()


def missing_modules(fmt):
    need = ["gguf", "diffusers"] if fmt.startswith("q") else []
    return [m for m in need if importlib.util.find_spec(m) is None]


def config(args):
    _import_pack()
    from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
    if args.tiny:
        return SteadyDancerConfig.tiny(dim=256, num_heads=2, ffn_dim=512, num_layers=args.layers or 4, text_dim=64,
                                       freq_dim=32, clip_dim=64, align_hidden=32)
    return SteadyDancerConfig.full_14b().replace(num_layers=args.layers or 40)


def shapes(cfg):
    from steadydancer_turbo.steadydancer.model.dit import build_meta
    return {k: tuple(v.shape) for k, v in build_meta(cfg).state_dict().items()}


def is_block_linear(k, shape):
    return k.startswith("blocks.") and k.endswith(".weight") and len(shape) == 2


# ------------------------------------------------------------------------------------------ writers
def _rand(shape, gen_device, dtype=torch.bfloat16):
    return (torch.randn(shape, device=gen_device) * 0.02).to(dtype)


def write_safetensors_stream(path, shp, gen_device, fp8=False):
    """Own streaming safetensors writer: header from the shapes, then each tensor's bytes as generated."""
    plan, off = [], 0
    header = {}
    for k, s in shp.items():
        n = 1
        for d in s:
            n *= d
        if fp8 and is_block_linear(k, s):
            items = [(k, s, "F8_E4M3", n), (k[: -len(".weight")] + ".scale_weight", (1,), "F32", 4)]
        else:
            items = [(k, s, "BF16", 2 * n)]
        for name, shape, dt, nbytes in items:
            header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + nbytes]}
            plan.append((name, shape, dt))
            off += nbytes
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for name, shape, dt in plan:
            if dt == "F8_E4M3":
                w = _rand(shape, gen_device, torch.float32)
                scale = w.abs().amax() / 448.0
                t = (w / scale).to(torch.float8_e4m3fn)
                scales = scale.reshape(1).float()
            elif dt == "F32":
                t = scales
            else:
                t = _rand(shape, gen_device)
            f.write(memoryview(t.contiguous().cpu().view(torch.uint8).numpy()))
    return off


def write_gguf_stream(path, shp, gen_device, qname):
    import gguf
    import numpy as np
    Q = gguf.GGMLQuantizationType
    qtype = {"q8_0": Q.Q8_0, "q4_k": Q.Q4_K}[qname]
    scale_off = {Q.Q8_0: (0,), Q.Q4_K: (0, 2)}[qtype]
    block, tsize = gguf.GGML_QUANT_SIZES[qtype]
    w = gguf.GGUFWriter(str(path), arch="wan")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    plan = []
    for k, s in shp.items():
        n = 1
        for d in s:
            n *= d
        if is_block_linear(k, s) and s[-1] % block == 0:
            bshape = (s[0], s[1] // block * tsize)
            w.add_tensor_info(k, bshape, np.dtype(np.uint8), s[0] * s[1] // block * tsize, raw_dtype=qtype)
            plan.append((k, s, "q"))
        elif len(s) == 1 or len(s) == 5 or k.endswith("modulation") or n <= 1024:
            w.add_tensor_info(k, s, np.dtype(np.float32), 4 * n)
            plan.append((k, s, "f32"))
        else:
            w.add_tensor_info(k, s, np.dtype(np.float16), 2 * n)
            plan.append((k, s, "f16"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for k, s, kind in plan:
        if kind == "q":
            nb = s[0] * s[1] // block
            raw = torch.randint(0, 256, (nb, tsize), dtype=torch.uint8, device=gen_device)
            for o in scale_off:
                d = (torch.rand(nb, device=gen_device) * 2e-3 + 1e-4).half().view(torch.uint8).reshape(nb, 2)
                raw[:, o:o + 2] = d
            arr = raw.reshape(s[0], -1).cpu().numpy()
        elif kind == "f32":
            arr = _rand(s, gen_device, torch.float32).cpu().numpy()
        else:
            arr = _rand(s, gen_device, torch.float16).cpu().numpy()
        w.write_tensor_data(arr)
    w.close()
    return os.path.getsize(path)


def write_file(fmt, folder, cfg, gen_device):
    shp = shapes(cfg)
    t = time.perf_counter()
    if fmt in ("bf16", "fp8"):
        path = folder / f"steadydancer_{fmt}.safetensors"
        write_safetensors_stream(path, shp, gen_device, fp8=(fmt == "fp8"))
    else:
        path = folder / f"steadydancer_{fmt}.gguf"
        write_gguf_stream(path, shp, gen_device, fmt)
    return path, os.path.getsize(path), time.perf_counter() - t


# ------------------------------------------------------------------------------------------ child
def _status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


def child(spec):
    _import_pack()
    from steadydancer_turbo.steadydancer.weights.loader import load_steadydancer
    dev = torch.device(spec["device"])
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res = {"rss_before": _status()["VmRSS"]}
    t = time.perf_counter()
    m = load_steadydancer(spec["path"], device=dev, block_swap=spec["swap"], fp8_matmul=spec.get("fp8mm", False))
    if spec.get("turbo_topk"):  # the Model Loader node's turbo settings: top-k sparse self-attention + compile
        from steadydancer_turbo.steadydancer.weights import speed_options as accel
        accel.use_attention(m, accel.sparse(float(spec["turbo_topk"])))
        if cuda:
            accel.compile_blocks(m, fullgraph=False)  # as nodes/model_nodes.apply_speed_options does
    sync()
    res["load_s"] = time.perf_counter() - t
    st = _status()
    res.update(peak_rss_load=st["VmHWM"], rss_after_load=st["VmRSS"], rss_anon=st.get("RssAnon"),
               vram_after_load=torch.cuda.memory_allocated(dev) if cuda else 0,
               info={k: str(v) for k, v in m.load_info.items()})
    cfg = m.config
    f, h, w = spec["latent"]
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
    inp = dict(x=r(1, 16, f, h, w), timestep=torch.tensor([999], device=dev), context=r(1, cfg.text_len, cfg.text_dim),
               clip_fea=r(1, 257, cfg.clip_dim), clip_fea_c=r(1, 257, cfg.clip_dim), y=r(1, 20, f, h, w),
               cond=r(1, 16, f, h, w), ref_x=r(1, 36, 1, h, w), ref_c=r(1, 36, 1, h, w))
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    with torch.no_grad():
        for i in range(1 + spec["forwards"]):
            sync()
            t = time.perf_counter()
            out = m(**inp)
            sync()
            if i:
                times.append(time.perf_counter() - t)
            del out
    if spec.get("turbo_topk"):  # whole 4-step rCM sampling, DiT only (as bench/dit_forward.py's turbo rows)
        from steadydancer_turbo.steadydancer.sampling.conditioning import SteadyDancerConditioning
        from steadydancer_turbo.turbo.rcm import sample_rcm
        c = SteadyDancerConditioning(context=inp["context"], context_null=inp["context"], clip_fea=inp["clip_fea"],
                                     clip_fea_c=inp["clip_fea_c"], y=inp["y"], cond_pos=inp["cond"],
                                     ref_x=inp["ref_x"], ref_c=inp["ref_c"])
        res["turbo4_s"] = []
        with torch.no_grad():
            for _ in range(2):
                sync()
                t = time.perf_counter()
                xo = sample_rcm(m, c, seed=0, steps=4)
                sync()
                res["turbo4_s"].append(time.perf_counter() - t)
        res["turbo4_finite"] = bool(torch.isfinite(xo).all())
    res["forward_s"] = sorted(times)[len(times) // 2]
    res["forward_all_s"] = times
    res["peak_vram"] = torch.cuda.max_memory_allocated(dev) if cuda else 0
    res["peak_vram_reserved"] = torch.cuda.max_memory_reserved(dev) if cuda else 0
    res["peak_rss"] = _status()["VmHWM"]
    res["swap_stats"] = dict(m.block_swap.stats)
    print("RESULT " + json.dumps(res), flush=True)


# ------------------------------------------------------------------------------------------ parent
def parse_plan(s):
    plan = []
    for part in s.split(";"):
        fmt, _, swaps = part.partition(":")
        plan.append((fmt.strip(), [int(x) for x in swaps.split(",")] if swaps else [0]))
    return plan


def gib(x):
    return x / 2 ** 30


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default=DEFAULT_PLAN, help="format:swaps;... formats bf16, fp8, fp8mm (fp8 file, "
                    f"torch._scaled_mm), fp8turbo (fp8mm + --turbo-topk + compile + turbo timing), q8_0, q4_k (default {DEFAULT_PLAN!r})")
    ap.add_argument("--turbo-topk", type=float, default=0.1, help="fp8turbo rows: the loader's fp8 matmul + top-k "
                    "sparse self-attention + compiled blocks, then whole 4-step turbo sampling")
    ap.add_argument("--formats", help="shortcut: these formats with --swaps")
    ap.add_argument("--swaps", default="0", help="with --formats: block-swap settings")
    ap.add_argument("--layers", type=int, default=None, help="transformer blocks (default 40; tiny: 4)")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--forwards", type=int, default=1, help="timed forwards after one warm-up (median)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tmp", default=None, help="folder for the generated checkpoints (default: a temp dir)")
    ap.add_argument("--time-budget", type=float, default=480.0, help="skip remaining rows after this many seconds")
    ap.add_argument("--child-timeout", type=float, default=400.0)
    ap.add_argument("--tiny", action="store_true", help="tiny model on small frames (CPU smoke test)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child))

    t0 = time.perf_counter()
    if args.tiny:
        args.frames, args.width, args.height = 5, 64, 64
    plan = [(f, [int(x) for x in args.swaps.split(",")]) for f in args.formats.split(",")] if args.formats \
        else parse_plan(args.plan)
    cfg = config(args)
    L = cfg.num_layers
    latent = ((args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    gen_device = args.device if args.device.startswith("cuda") else "cpu"
    folder = pathlib.Path(args.tmp or tempfile.mkdtemp(prefix="sd_loader_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    dev_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    print(f"# SteadyDancer loader bench on {dev_name}, torch {torch.__version__}; model dim {cfg.dim}, {L} blocks; "
          f"video {args.width}x{args.height}x{args.frames} (latent {latent}); files in {folder}", flush=True)
    rows, notes = [], []
    files = {}
    try:
        for fmt, swaps in plan:
            base = "fp8" if fmt in ("fp8mm", "fp8turbo") else fmt
            miss = missing_modules(base)
            if miss:
                notes.append(f"{fmt}: skipped, missing Python packages {miss}")
                continue
            if time.perf_counter() - t0 > args.time_budget:
                notes.append(f"{fmt}: skipped, time budget of {args.time_budget:.0f} s used up")
                continue
            for old in [k for k in files if k != base]:  # one file on disk at a time
                files.pop(old)[0].unlink(missing_ok=True)
            if base not in files:
                path, size, wt = write_file(base, folder, cfg, gen_device)
                files[base] = (path, size)
                print(f"wrote {path.name}: {gib(size):.2f} GiB in {wt:.1f} s", flush=True)
            path, size = files[base]
            for swap in swaps:
                if swap > L:
                    notes.append(f"{fmt} swap {swap}: more than the {L} blocks, skipped")
                    continue
                if time.perf_counter() - t0 > args.time_budget:
                    notes.append(f"{fmt} swap {swap}: skipped, time budget used up")
                    continue
                spec = dict(path=str(path), swap=swap, device=args.device, latent=latent, forwards=args.forwards,
                            fp8mm=fmt in ("fp8mm", "fp8turbo"),
                            turbo_topk=args.turbo_topk if fmt == "fp8turbo" else None)
                cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", json.dumps(spec)]
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
                except subprocess.TimeoutExpired:
                    notes.append(f"{fmt} swap {swap}: timed out after {args.child_timeout:.0f} s")
                    continue
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if p.returncode or not line:
                    notes.append(f"{fmt} swap {swap}: failed (rc {p.returncode}): {p.stderr.strip()[-600:]}")
                    continue
                r = json.loads(line[-1][len("RESULT "):])
                r.update(fmt=fmt, swap=swap, file=size)
                rows.append(r)
                print(f"{fmt:6s} swap {swap:2d}: load {r['load_s']:.1f} s, forward {r['forward_s']:.2f} s, "
                      f"peak VRAM {gib(r['peak_vram']):.2f} GiB, peak RSS {gib(r['peak_rss']):.2f} GiB"
                      + (f", turbo 4 steps {r['turbo4_s']} s (finite {r['turbo4_finite']})" if "turbo4_s" in r else ""),
                      flush=True)
    finally:
        for path, _ in files.values():
            path.unlink(missing_ok=True)
        if args.tmp is None:
            shutil.rmtree(folder, ignore_errors=True)

    # table
    print()
    scale = 40 / L
    hdr = ("| format | swap | file GiB | load s | host RSS peak during load GiB (x file) | host RSS peak incl. forward GiB "
           "| VRAM after load GiB | peak VRAM GiB | s / forward | vs bf16 swap 0 |")
    if L != 40:
        hdr += " est. 40 blocks: s / fwd, peak VRAM GiB |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    bf0 = next((r["forward_s"] for r in rows if r["fmt"] == "bf16" and r["swap"] == 0), None)
    for r in rows:
        rel = f"{r['forward_s'] / bf0:.2f}x" if bf0 else "-"
        line = (f"| {r['fmt']} | {r['swap']} | {gib(r['file']):.2f} | {r['load_s']:.1f} | "
                f"{gib(r['peak_rss_load']):.2f} ({r['peak_rss_load'] / r['file']:.2f}) | {gib(r['peak_rss']):.2f} | "
                f"{gib(r['vram_after_load']):.2f} | {gib(r['peak_vram']):.2f} | {r['forward_s']:.3f} | {rel} |")
        if L != 40:
            line += f" ~{r['forward_s'] * scale:.2f}, ~{gib(r['peak_vram']) * scale:.1f} |"
        print(line)
    print("- host RSS includes the process baseline (Python, torch, CUDA context: ~0.3 GiB on CPU, more with "
          "CUDA); peak during load is VmHWM right after load_steadydancer returns")
    for r in rows:
        if "turbo4_s" in r:
            print(f"- {r['fmt']} swap {r['swap']}: whole 4-step turbo sampling (DiT only, top-k {args.turbo_topk}, "
                  f"compiled) {', '.join(f'{x:.3f}' for x in r['turbo4_s'])} s, finite output: {r['turbo4_finite']}")
    for n in notes:
        print("- " + n)
    if L != 40:
        print(f"- est. columns scale the measured value by 40/{L}: an upper-bound-ish estimate (the non-block part "
              "does not grow with blocks; with block swap the resident part does not either)")
    print(f"- total bench time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
