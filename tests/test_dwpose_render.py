"""Pose video rendering (``render_poses``): the fast path (colours swapped while drawing, only the figure's region
resized, frames on several threads, float32 written directly) against the plain per-frame recipe it replaces,
bit for bit: draw the whole canvas, swap red/blue by reversing the array, resize the whole canvas with PIL
bicubic (cv2 for the other methods), ``astype(float32) / 255``.
"""
import cv2
import numpy as np
import pytest
from PIL import Image

from steadydancer_turbo import dwpose as D
from steadydancer_turbo.dwpose import draw as DR

from _pose_fixtures import dancer as _dancer

THR = 0.35  # SteadyDancer's threshold


def _video(W, H, n=6):
    """Frames covering the cases: a moving figure, no frame / no person / nothing present, a figure partly off
    the canvas on each side, one touching the corner, a tiny one, a huge one, two people, a hand on the edge."""
    asp = W / H
    f = [D.FramePose(W, H, [_dancer(i / 7, asp)]) for i in range(n)]
    f += [None, D.FramePose(W, H, []), D.FramePose(W, H, [_dancer(0.1, asp, conf=0.2)])]
    f += [D.FramePose(W, H, [_dancer(0.3, asp, cx=x, cy=y)]) for x, y in ((-0.02, 0.4), (1.0, 0.5), (0.5, 0.02),
                                                                           (0.4, 0.9), (0.98, 0.97))]
    f += [D.FramePose(W, H, [_dancer(0.2, asp, s=0.05)]), D.FramePose(W, H, [_dancer(0.6, asp, s=2.5)]),
          D.FramePose(W, H, [_dancer(0.4, asp, cx=0.3), _dancer(0.9, asp, cx=0.7, s=0.7)])]
    edge = _dancer(0.5, asp)
    edge.right_hand[:, 0] = np.linspace(0.0, 1.0, 21)  # along the whole width, first point at x = 0
    edge.right_hand[:, 1] = 1.0 - 0.5 / H
    f.append(D.FramePose(W, H, [edge]))
    return f


def _reference(poses, W, H, supersample, swap_rb, as_float, resize="bicubic", hands=True, face=False):
    """The per-frame recipe: whole canvas, array swap, whole-frame resize, astype(float32) / 255."""
    dw, dh = int(round(W * supersample)), int(round(H * supersample))
    out = np.zeros((len(poses), H, W, 3), np.uint8)
    for i, p in enumerate(poses):
        if p is None or not p.people:
            continue
        img = D.draw_pose(p, dw, dh, body=True, hands=hands, face=face, threshold=THR)
        if swap_rb:
            img = np.ascontiguousarray(img[..., ::-1])
        if (dw, dh) != (W, H):
            if resize == "bicubic":
                img = np.asarray(Image.fromarray(img).resize((W, H), Image.Resampling.BICUBIC))
            else:
                img = cv2.resize(img, (W, H), interpolation={"area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC}[resize])
        out[i] = img
    return out.astype(np.float32) / 255.0 if as_float else out


def _same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    if a.dtype == np.float32:
        a, b = a.view(np.uint32), b.view(np.uint32)  # -0.0 vs 0.0 would count
    bad = np.argwhere(a != b)
    assert bad.size == 0, f"{len(bad)} values differ, first at {bad[:3].tolist()}"


@pytest.mark.parametrize("W,H", [(832, 480), (208, 304), (101, 57), (48, 64), (16, 512)])
def test_steadydancer_videos_are_bit_identical_to_whole_frame_resizing(W, H):
    """2x supersampling + PIL bicubic (the node's path), positives and the seeded negatives (the official random
    rescaling, which throws parts of the figure off the canvas), swapped colours, uint8 and float32."""
    pos = _video(W, H)
    neg = D.negative_poses(pos, seed=1234, threshold=THR)
    for poses in (pos, neg):
        want = _reference(poses, W, H, 2, True, True)
        assert want.max() > 0.5 and (want[6] == 0).all() and (want[8] == 0).all()
        got = D.render_poses(poses, W, H, supersample=2, swap_rb=True, as_float=True, threshold=THR, threads=3)
        _same_bits(got, want)
    _same_bits(D.render_poses(pos, W, H, supersample=2, threshold=THR, threads=2),
               _reference(pos, W, H, 2, False, False))


def test_other_sizes_resizes_and_switches_match_the_per_frame_recipe():
    W, H = 160, 96
    pos = _video(W, H, n=3)
    cases = [dict(supersample=1), dict(supersample=3), dict(supersample=1.5), dict(supersample=0.5),
             dict(supersample=2, resize="area"), dict(supersample=2, resize="cubic"),
             dict(supersample=2, hands=False, face=True)]
    for kw in cases:
        ss, resize = kw["supersample"], kw.get("resize", "bicubic")
        hands, face = kw.get("hands", True), kw.get("face", False)
        want = _reference(pos, W, H, ss, True, False, resize=resize, hands=hands, face=face)
        got = D.render_poses(pos, W, H, supersample=ss, resize=resize, hands=hands, face=face, swap_rb=True,
                             threshold=THR, threads=2)
        _same_bits(got, want)


def test_thread_count_changes_nothing():
    W, H = 208, 120
    poses = D.negative_poses(_video(W, H, n=10), seed=5, threshold=THR)
    one = D.render_poses(poses, W, H, supersample=2, swap_rb=True, as_float=True, threshold=THR, threads=1)
    for t in (2, 5, None):
        _same_bits(D.render_poses(poses, W, H, supersample=2, swap_rb=True, as_float=True, threshold=THR, threads=t),
                   one)


def test_swap_rb_draws_the_reversed_canvas():
    """Drawing with red and blue exchanged gives the array-reversed canvas, hands' float colours and face included."""
    for p in _video(200, 300, n=2)[:2] + _video(200, 300)[-1:]:
        plain = D.draw_pose(p, 200, 300, face=True, threshold=THR)
        assert plain.any()
        np.testing.assert_array_equal(D.draw_pose(p, 200, 300, face=True, threshold=THR, swap_rb=True),
                                      plain[..., ::-1])


def test_downscale_stays_within_its_patches_and_skips_black_canvases():
    assert DR._downscale_content(np.zeros((40, 60, 3), np.uint8), 30, 20, 2) == []
    img = np.zeros((400, 600, 3), np.uint8)
    img[201, 333] = (0, 0, 9)  # one dark pixel: its bicubic footprint must lie inside the patches
    img[20, 590] = (7, 0, 0)  # and one near the top right corner
    full = np.asarray(Image.fromarray(img).resize((300, 200), Image.Resampling.BICUBIC))
    for band in (8, 32, 1000):
        got = np.zeros_like(full)
        area = 0
        for x0, y0, patch in DR._downscale_content(img, 300, 200, 2, band=band):
            assert not got[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]].any()  # patches do not overlap
            got[y0:y0 + patch.shape[0], x0:x0 + patch.shape[1]] = patch
            area += patch.shape[0] * patch.shape[1]
        np.testing.assert_array_equal(got, full)
        assert full.any() and area < 300 * 200 / 2  # only around the two pixels, not the frame


def test_progress_in_frame_order_and_an_interrupt_stops_the_drawing(monkeypatch):
    W, H = 64, 48
    poses = [D.FramePose(W, H, [_dancer(i / 40, W / H)]) for i in range(40)]
    seen = []
    D.render_poses(poses, W, H, supersample=2, threads=3, progress=seen.append, chunk=8)
    assert seen == [8, 16, 24, 32, 40]
    seen.clear()
    D.render_poses(poses[:13], W, H, threads=1, progress=seen.append, chunk=5)
    assert seen == [5, 10, 13]

    drawn = []
    real = DR.draw_pose
    monkeypatch.setattr(DR, "draw_pose", lambda *a, **k: drawn.append(1) or real(*a, **k))

    class Interrupted(Exception):
        pass

    def stop(done):
        if done >= 8:
            raise Interrupted

    for threads in (1, 2):
        drawn.clear()
        with pytest.raises(Interrupted):
            D.render_poses(poses, W, H, supersample=2, threads=threads, progress=stop, chunk=4)
        assert 8 <= len(drawn) < 40, threads  # the frames queued behind the interrupt were never drawn


def test_default_threads_follow_the_cpus_and_the_frame_count(monkeypatch):
    monkeypatch.setattr(DR.os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    assert DR.default_threads() == 2 and DR.default_threads(1) == 1 and DR.default_threads(0) == 1
    monkeypatch.setattr(DR.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert DR.default_threads() == DR.MAX_THREADS == 4 and DR.default_threads(3) == 3
