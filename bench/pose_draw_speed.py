"""SteadyDancer Retarget Poses node speed on the CPU (issue 15): the drawing path before and after, in one run.

The node (``nodes/pose_nodes.SteadyDancerPoseRetarget.retarget``) is called on 81 POSE_KEYPOINT frames of a dancing
whole-body figure (body swinging its arms and swaying, two 21-point hands, a face; as tall as the frame, like the
figure ``bench/_e2e_files.person_frame`` draws for the end-to-end bench) and a larger reference pose, at each size:

- ``old``: the node with its drawing replaced by the code it had before issue 15: each frame drawn on a black
  canvas of twice the size, red/blue swapped by copying the reversed array, the whole canvas resized with PIL
  bicubic, one frame after the other, then the uint8 video converted to float32 in torch;
- ``new 1 thread``: today's node with the drawing pool limited to one thread (the single-thread gain: colours
  swapped while drawing, only the region around the figure resized, float32 written per patch);
- ``new``: today's node as it runs (``dwpose.draw.default_threads()`` threads);
- ``new N threads`` (with ``--threads N,M,...``): today's node with the drawing pool at N threads (how the drawing
  scales with threads on the machine at hand).

Each row: median of ``--reps`` node calls (after one warm-up call) in ms, per frame (the node draws 2 x 81 frames:
the pose video and the negative pose video), the drawing alone, and whether the outputs are bit-identical to
``old`` (all four outputs). Runs on the CPU only; no model files.

Usage:  python bench/pose_draw_speed.py                      # 832x480 and 1280x720, 81 frames
        python bench/pose_draw_speed.py --frames 9 --reps 1  # seconds-long smoke test
        python bench/pose_draw_speed.py --sizes 832x480 --threads 1,2,4,8,16   # thread sweep
"""
from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402

C.import_pack()
import torch  # noqa: E402

from steadydancer_turbo.dwpose import draw, keypoints  # noqa: E402
from steadydancer_turbo.nodes import pose_nodes  # noqa: E402


def _fixtures():
    """tests/_pose_fixtures.py: the dancing figure the rendering tests use."""
    import importlib.util
    path = pathlib.Path(__file__).resolve().parents[1] / "tests" / "_pose_fixtures.py"
    spec = importlib.util.spec_from_file_location("sd_pose_fixtures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


dancer = _fixtures().dancer


def inputs(W: int, H: int, n: int):
    drv = [keypoints.to_pose_keypoint(keypoints.FramePose(W, H, [dancer(i / 24, W / H)]), True, True, True)
           for i in range(n)]
    ref = keypoints.to_pose_keypoint(keypoints.FramePose(W, H, [dancer(0.0, W / H, s=0.9, cy=0.5)]), True, True, True)
    img = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(0))
    return drv, [ref], img


def old_draw_pose_videos(aligned, negative, W, H, hands, face, swap_rb, threshold):
    """The drawing as the node did it before issue 15 (one frame after the other, whole canvases)."""
    from PIL import Image

    def render(poses):
        out = np.zeros((len(poses), H, W, 3), dtype=np.uint8)
        for i, pose in enumerate(poses):
            if pose is None or not pose.people:
                continue
            img = draw.draw_pose(pose, 2 * W, 2 * H, True, hands, face, threshold)
            if swap_rb:
                img = np.ascontiguousarray(img[..., ::-1])
            out[i] = np.asarray(Image.fromarray(img).resize((W, H), Image.Resampling.BICUBIC))
        return torch.from_numpy(out).to(torch.float32).div_(255.0)

    return render(aligned), render(negative)


def run(path: str, W: int, H: int, n: int, reps: int):
    drv, ref, img = inputs(W, H, n)
    node = pose_nodes.SteadyDancerPoseRetarget()
    real_videos, real_threads = pose_nodes.draw_pose_videos, draw.default_threads
    drawing = []

    def timed(fn):
        def wrapped(*a, **k):
            t = time.perf_counter()
            r = fn(*a, **k)
            drawing.append(time.perf_counter() - t)
            return r
        return wrapped

    pose_nodes.draw_pose_videos = timed(old_draw_pose_videos if path == "old" else real_videos)
    forced = 1 if path == "new 1 thread" else int(path.split()[1]) if path.endswith(" threads") else None
    if forced is not None:
        draw.default_threads = lambda n_frames=None: forced
    try:
        out = node.retarget(drv, ref, img, W, H, "crop", True, True, False, "steadydancer", 0)  # warm-up
        totals = []
        drawing.clear()
        for _ in range(reps):
            t = time.perf_counter()
            out = node.retarget(drv, ref, img, W, H, "crop", True, True, False, "steadydancer", 0)
            totals.append(time.perf_counter() - t)
    finally:
        pose_nodes.draw_pose_videos, draw.default_threads = real_videos, real_threads
    threads = draw.default_threads(n) if path == "new" else 1 if path == "old" else forced
    return statistics.median(totals), statistics.median(drawing), threads, out


def same(a, b) -> bool:
    return (all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a[:3], b[:3]))
            and a[3] == b[3])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="832x480,1280x720", help="width x height list")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", default="", help="also rows with the drawing pool at each of these thread counts")
    args = ap.parse_args()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import cv2
    import PIL
    print(f"# {platform.processor() or platform.machine()}, {cpus} CPUs usable (os.cpu_count() {os.cpu_count()}), "
          f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"numpy {np.__version__}, opencv {cv2.__version__}, pillow {PIL.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# Retarget Poses node, {args.frames} frames, pose + negative pose video ({2 * args.frames} frames drawn), "
          f"median of {args.reps}")
    print("| size | path | threads | node ms | ms / drawn frame | drawing ms | speed-up | identical to old |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        W, H = (int(v) for v in size.lower().split("x"))
        base = None
        sweep = [f"new {t} threads" for t in args.threads.split(",") if t.strip()]
        for path in ["old", "new 1 thread", "new"] + sweep:
            total, drawing, threads, out = run(path, W, H, args.frames, args.reps)
            if base is None:
                base, ref_out = total, out
            ok = "yes" if same(out, ref_out) else "**NO**"
            print(f"| {W}x{H} | {path} | {threads} | {total * 1e3:.0f} | {drawing * 1e3 / (2 * args.frames):.2f} | "
                  f"{drawing * 1e3:.0f} | {base / total:.1f}x | {ok} |", flush=True)


if __name__ == "__main__":
    main()
