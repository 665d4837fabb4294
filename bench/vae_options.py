#!/usr/bin/env python3
"""What ComfyUI's own Wan VAE options cost on a SteadyDancer video: core VAEDecode against core VAEDecodeTiled at
a few tile settings (time, peak VRAM, difference to the untiled decode), and the untiled encode the Conditioning
node runs, at 832x480x81 (and 1280x720x81).

It loads the VAE with ComfyUI's own loader (``comfy.sd.VAE``, as VAELoader does) and calls the core node classes
(``nodes.VAEDecode`` / ``nodes.VAEDecodeTiled``), so the numbers are the nodes' own:

    python bench/vae_options.py --comfyui /path/to/ComfyUI --vae models/vae/wan_2.1_vae.safetensors
    python bench/vae_options.py --comfyui /path/to/ComfyUI --make-vae /tmp/wan_vae.safetensors   # random weights

Random weights give real time and memory; the tiled-vs-untiled difference is only a rough size of the tile-border
blending on them (real weights decode smooth images), not a quality figure. ``--tiny``: a CPU smoke test.
"""
import argparse
import json
import pathlib
import sys
import time

BENCH = pathlib.Path(__file__).resolve().parent
SIZES = {"480p": (832, 480), "720p": (1280, 720)}
# (tile_size, overlap, temporal_size, temporal_overlap) as the VAEDecodeTiled widgets take them
SETTINGS = [(512, 64, 64, 8), (512, 64, 84, 8), (256, 32, 64, 8), (256, 32, 84, 8), (768, 64, 84, 8)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--vae", help="a Wan 2.1 VAE file")
    ap.add_argument("--make-vae", metavar="FILE", help="write a random-weight Wan 2.1 VAE there first and use it")
    ap.add_argument("--res", default="480p,720p")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: 64x64, 9 frames, 1 rep")
    ap.add_argument("--out", help="write results.jsonl there")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(BENCH))
    import _e2e_files as F

    if args.make_vae:
        import torch
        F.write_plain(pathlib.Path(args.make_vae), F.vae_shapes(args.comfyui), torch.bfloat16, 14)
        args.vae = args.make_vae
    if not args.vae:
        raise SystemExit("give --vae FILE or --make-vae FILE")
    F._comfy(args.comfyui)
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    import nodes
    import torch

    cuda = torch.cuda.is_available() and not args.tiny
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(args.vae))
    sizes = {"tiny": (64, 64)} if args.tiny else {r: SIZES[r] for r in args.res.split(",")}
    frames = 9 if args.tiny else args.frames
    reps = 1 if args.tiny else args.reps
    rows = []

    def timed(fn):
        best, peak, out = None, 0, None
        for _ in range(reps + (0 if args.tiny else 1)):      # one warm-up on the GPU
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            with torch.inference_mode():  # as ComfyUI runs its nodes
                out = fn()
            if cuda:
                torch.cuda.synchronize()
                peak = max(peak, torch.cuda.max_memory_allocated())
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        return best, peak, out

    def emit(**row):
        row.update(card=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                   vae_dtype=str(vae.vae_dtype), date=time.strftime("%Y-%m-%d"))
        rows.append(row)
        print("RESULT " + json.dumps(row), flush=True)

    for res, (w, h) in sizes.items():
        g = torch.Generator().manual_seed(3)
        video = torch.rand(frames, h, w, 3, generator=g)
        t, peak, lat = timed(lambda: vae.encode(video))
        emit(res=res, what="encode", frames=frames, s=t, peak_gib=peak / 2**30)
        samples = {"samples": torch.randn(lat.shape, generator=g)}
        t, peak, (ref,) = timed(lambda: nodes.VAEDecode().decode(vae, samples))
        ref = ref.float()
        emit(res=res, what="VAEDecode", frames=int(ref.shape[0]), s=t, peak_gib=peak / 2**30)
        for ts, ov, tt, to in ([(32, 8, 8, 4)] if args.tiny else SETTINGS):
            t, peak, (img,) = timed(lambda: nodes.VAEDecodeTiled().decode(vae, samples, ts, ov, tt, to))
            img = img.float()
            same = tuple(img.shape) == tuple(ref.shape)
            d = (img - ref) if same else None
            emit(res=res, what="VAEDecodeTiled", tile_size=ts, overlap=ov, temporal_size=tt, temporal_overlap=to,
                 frames=int(img.shape[0]), s=t, peak_gib=peak / 2**30, same_shape=same,
                 max_abs_vs_untiled=float(d.abs().max()) if same else None,
                 rel_l2_vs_untiled=float(d.norm() / ref.norm().clamp_min(1e-12)) if same else None)
        mm.soft_empty_cache()
    print("\nres    what              tile/ovl  time/ovl  frames      s  peak GiB  max|d|  rel L2")
    for r in rows:
        tile = f"{r.get('tile_size', '')}/{r.get('overlap', '')}" if "tile_size" in r else ""
        tim = f"{r.get('temporal_size', '')}/{r.get('temporal_overlap', '')}" if "tile_size" in r else ""
        md, rl = r.get("max_abs_vs_untiled"), r.get("rel_l2_vs_untiled")
        print(f"{r['res']:6} {r['what']:16} {tile:>9} {tim:>9} {r['frames']:6} {r['s']:6.2f} {r['peak_gib']:9.2f} "
              f"{'' if md is None else f'{md:.3f}':>7} {'' if rl is None else f'{rl:.4f}':>7}")
    if args.out:
        pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(args.out) / "vae_options.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
