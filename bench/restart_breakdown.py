"""Where the first turbo step after a ComfyUI restart goes (issue 15): the Model Loader's path in a plain process.

The first queue after a restart spends ~8.4 s loading files and ~8.3 s on its first sampler step instead of ~1.4 s
(run 20). This script times the DiT's share of that, phase by phase, in one fresh process, the way the Model
Loader node and ComfyUI do it:

- ``load``: ``load_steadydancer(path, device=cpu, fp8_matmul=True, compute_device=cuda)`` (the node's call: the
  file copied from its memory map into host RAM), then the speed options as ``apply_speed_options`` sets them
  (top-k 0.10 ``flex_sparse``, every block ``torch.compile``'d with ``fullgraph=False``);
- ``to_gpu``: ``module.to("cuda")`` from that pageable host copy (what ComfyUI's ModelPatcher does on the first
  sampler step);
- ``forward 1`` / ``2`` / ``3``: 480p forwards at batch 1 (832x480x81 + the two reference frames). The first one
  compiles, or, with the compile cache of an earlier process in ``--cache``, loads the compiled kernels; torch's
  own compile-time breakdown (``torch._dynamo.utils.compile_times``) and cache counters are printed after it;
- floors on the same machine: the file read into host RAM with ``readinto`` (1 and 8 threads) and a host-to-GPU
  copy from pinned memory, scaled to the model's bytes.

Run it twice with the same ``--cache``: the first process fills the cache (a cold start), the second is the
restart. Random weights in the real file: ``bench/comfy_e2e.py --make-files``' fp8-scaled DiT.

Usage:  python bench/restart_breakdown.py --file MODELS/diffusion_models/<fp8 file> --cache DIR --label cold
        python bench/restart_breakdown.py --file ... --cache DIR --label restart
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.import_pack()
import torch  # noqa: E402


def timed(fn):
    C.sync()
    t = time.perf_counter()
    out = fn()
    C.sync()
    return time.perf_counter() - t, out


def read_floor(path: str, threads: int, limit: int) -> float:
    """GB/s reading the first ``limit`` bytes of ``path`` into one fresh host buffer with ``threads`` readers."""
    size = min(os.path.getsize(path), limit)
    buf = torch.empty(size, dtype=torch.uint8)
    mv = memoryview(buf.numpy())
    step = -(-size // threads)

    def part(i):
        with open(path, "rb", buffering=0) as f:
            a, b = i * step, min(size, (i + 1) * step)
            f.seek(a)
            while a < b:
                n = f.readinto(mv[a:min(b, a + (64 << 20))])
                if not n:
                    break
                a += n

    t = time.perf_counter()
    ts = [threading.Thread(target=part, args=(i,)) for i in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    return size / 1e9 / (time.perf_counter() - t)


def pinned_h2d(nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    s, _ = timed(lambda: dst.copy_(src, non_blocking=True))
    return nbytes / 1e9 / s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--file", required=True, help="fp8-scaled SteadyDancer DiT .safetensors (full size)")
    ap.add_argument("--cache", required=True, help="torch.compile cache folder, unless TORCHINDUCTOR_CACHE_DIR is set "
                    "(then that one, as in ComfyUI)")
    ap.add_argument("--label", default="run")
    ap.add_argument("--topk", type=float, default=0.1)
    ap.add_argument("--floors", action="store_true", help="also the read and pinned-copy floors")
    ap.add_argument("--tiny", action="store_true", help="smoke test: a tiny-config file, tiny inputs, any device")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    from steadydancer_turbo.steadydancer.weights import loader, speed_options as accel
    from _dit import ours_inputs

    cache = accel.use_compile_cache(args.cache)["inductor"]  # a TORCHINDUCTOR_CACHE_DIR the caller set wins
    C.DEV = args.device
    if args.tiny:
        C.use_tiny_sizes()
    torch.empty(1, device=C.DEV)  # the CUDA context, which ComfyUI makes at start-up
    card = torch.cuda.get_device_name() if C.DEV == "cuda" else C.DEV
    row = dict(label=args.label, card=card, torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
               cache=cache, cache_files_before=sum(len(f) for _, _, f in os.walk(cache)))

    t = time.perf_counter()
    module = loader.load_steadydancer(args.file, device="cpu", offload_device="cpu", fp8_matmul=True,
                                      attention="sdpa", compute_device=C.DEV)
    accel.use_attention(module, accel.sparse(args.topk))
    accel.compile_blocks(module, fullgraph=False)
    row["load_s"] = time.perf_counter() - t
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    nbytes += sum(b.numel() * b.element_size() for b in module.buffers())
    row["model_gb"] = nbytes / 1e9

    row["to_gpu_s"], _ = timed(lambda: module.to(C.DEV))
    g = torch.Generator(device=C.DEV).manual_seed(11)
    inp = ours_inputs("480p", g)
    inp["timestep"] = torch.tensor([900.0], device=C.DEV)
    from torch._dynamo.utils import counters, compile_times
    counters.clear()
    with torch.no_grad():
        for i in (1, 2, 3):
            row[f"forward{i}_s"], _ = timed(lambda: module(**inp))
            if i == 1:
                times = compile_times(repr="str", aggregate=True)
                row["counters"] = {k: dict(v) for k, v in counters.items() if k in ("inductor", "aot_autograd")}
    row["peak_vram_gib"] = torch.cuda.max_memory_allocated() / 2**30 if C.DEV == "cuda" else 0.0
    if args.floors and C.DEV == "cuda":
        row["read_1thread_gbs"] = read_floor(args.file, 1, 8 << 30)
        row["read_8threads_gbs"] = read_floor(args.file, 8, 8 << 30)
        row["pinned_h2d_gbs"] = pinned_h2d(2 << 30)
        row["floor_read_s"] = row["model_gb"] / max(row["read_1thread_gbs"], row["read_8threads_gbs"])
        row["floor_h2d_s"] = row["model_gb"] / row["pinned_h2d_gbs"]
    print(times)
    print("| label | load s | to GPU s | forward 1 s | forward 2 s | forward 3 s | model GB | peak VRAM GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.label} | {row['load_s']:.2f} | {row['to_gpu_s']:.2f} | {row['forward1_s']:.2f} | "
          f"{row['forward2_s']:.2f} | {row['forward3_s']:.2f} | {row['model_gb']:.2f} | {row['peak_vram_gib']:.1f} |")
    print("RESULT " + json.dumps(row))


if __name__ == "__main__":
    main()
