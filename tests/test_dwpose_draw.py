"""Rendering: limb / joint / hand colours from the OpenPose tables (spec-dwpose.md §4), switches, safety."""
import numpy as np
import pytest

from steadydancer_turbo import dwpose as D

W, H = 401, 601  # odd canvas


def _person():
    body = np.zeros((18, 3))
    pts = {0: (0.50, 0.10), 1: (0.50, 0.30), 2: (0.25, 0.30), 5: (0.75, 0.30), 3: (0.20, 0.50), 8: (0.40, 0.65),
           11: (0.60, 0.65), 9: (0.40, 0.90)}
    for i, (x, y) in pts.items():
        body[i] = (x, y, 0.9)
    lh = np.zeros((21, 3))
    rh = np.zeros((21, 3))
    # right hand: wrist and thumb chain far from the body, edges 0..3 along a horizontal line
    for k in range(5):
        rh[k] = (0.05 + 0.05 * k, 0.95, 0.8)
    # index finger base 5 and 6..8 (edges 4: 0-5, 5: 5-6, 6: 6-7, 7: 7-8) on a vertical line
    rh[5] = (0.05, 0.80, 0.8)
    rh[6], rh[7], rh[8] = (0.05, 0.72, 0.8), (0.05, 0.64, 0.8), (0.05, 0.56, 0.8)
    face = np.zeros((68, 3))
    face[:10] = np.column_stack([np.linspace(0.85, 0.95, 10), np.full(10, 0.05), np.full(10, 0.9)])
    return D.Person(body, lh, rh, face)


def _mid(p, a, b, canvas=(W, H)):
    return int((p[a, 0] + p[b, 0]) / 2 * canvas[0]), int((p[a, 1] + p[b, 1]) / 2 * canvas[1])


def test_limb_and_joint_colours():
    p = _person()
    img = D.draw_pose(p, W, H, face=False)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8
    # spec table: limb colour x 0.6 floored. (1-2) 255,0,0 -> 153,0,0; (1-5) 255,85,0 -> 153,51,0;
    # (2-3) 255,170,0 -> 153,102,0; (1-8) 0,255,0 -> 0,153,0; (1-11) 0,255,255 -> 0,153,153; (8-9) 0,255,85
    # -> 0,153,51; (1-0) 0,0,255 -> 0,0,153
    for (a, b), rgb in [((1, 2), (153, 0, 0)), ((1, 5), (153, 51, 0)), ((2, 3), (153, 102, 0)),
                        ((1, 8), (0, 153, 0)), ((1, 11), (0, 153, 153)), ((8, 9), (0, 153, 51)),
                        ((1, 0), (0, 0, 153))]:
        x, y = _mid(p.body, a, b)
        assert tuple(img[y, x]) == rgb, (a, b)
    # joints: full colour of their index (0 nose 255,0,0; 1 neck 255,85,0; 9 RKnee 0,255,170)
    for j, rgb in [(0, (255, 0, 0)), (1, (255, 85, 0)), (9, (0, 255, 255))]:
        assert tuple(img[int(p.body[j, 1] * H), int(p.body[j, 0] * W)]) == rgb
    # limb half-width 4: 3 px off the axis still coloured, 7 px off is black
    x, y = _mid(p.body, 1, 8)
    assert tuple(img[y, x + 3]) == (0, 153, 0) and tuple(img[y, x + 7]) == (0, 0, 0)


def test_hand_edge_and_point_colours():
    p = _person()
    img = D.draw_pose(p, W, H, body=False, hands=True)
    # The reference passes matplotlib's float64 hsv_to_rgb([e/20, 1, 1]) * 255 to cv2.line, which rounds
    # half-to-even. Recomputed here with matplotlib's formula (vectorized numpy). Exact halves agree with
    # spec-dwpose.md's table (e0 255,0,0; e5 128,255,0; e6 51,255,0); where float64 lands just off a half the
    # reference gives e1 255,77,0 and e7 0,255,25 (the spec table's 76 / 26 assume exact halves).
    h = np.arange(20) / 20.0
    i = (h * 6.0).astype(int)
    f = h * 6.0 - i
    q, t = 1 - f, 1 - (1 - f)
    one, zero = np.ones(20), np.zeros(20)
    rgb = np.select([i[:, None] == k for k in range(6)],
                    [np.stack(c, 1) for c in ((one, t, zero), (q, one, zero), (zero, one, t), (zero, q, one),
                                              (t, zero, one), (one, zero, q))]) * 255
    table = np.rint(rgb).astype(int)
    assert tuple(table[0]) == (255, 0, 0) and tuple(table[5]) == (128, 255, 0) and tuple(table[6]) == (51, 255, 0)
    assert tuple(table[1]) == (255, 77, 0) and tuple(table[7]) == (0, 255, 25)
    for e, (a, b) in enumerate([(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8)]):
        x, y = _mid(p.right_hand, a, b)
        assert tuple(img[y, x]) == tuple(table[e]), (a, b)
    x, y = int(p.right_hand[2, 0] * W), int(p.right_hand[2, 1] * H)
    assert tuple(img[y, x]) == (0, 0, 255)  # hand points blue
    # body off: no body colours anywhere (nose joint pixel black)
    assert tuple(img[int(p.body[0, 1] * H), int(p.body[0, 0] * W)]) == (0, 0, 0)
    assert D.draw_pose(p, W, H, body=False, hands=False).max() == 0


def test_face_switch():
    p = _person()
    white = lambda im: int(((im == 255).all(-1)).sum())  # noqa: E731
    off = D.draw_pose(p, W, H, face=False)
    on = D.draw_pose(p, W, H, face=True)
    assert white(off) == 0
    assert white(on) > 10 * 20  # ten radius-3 dots
    x, y = int(p.face[4, 0] * W), int(p.face[4, 1] * H)
    assert tuple(on[y, x]) == (255, 255, 255) and tuple(off[y, x]) == (0, 0, 0)


def test_swap_rb_and_missing_and_nan_points():
    p = _person()
    x, y = _mid(p.body, 1, 0)
    assert tuple(D.draw_pose(p, W, H, swap_rb=True)[y, x]) == (153, 0, 0)
    q = p.copy()
    q.body[0, 2] = 0.2  # below threshold: nose and its limb vanish
    img = D.draw_pose(q, W, H)
    assert tuple(img[y, x]) == (0, 0, 0)
    r = p.copy()
    r.body[0, :2] = np.nan
    r.body[2, :2] = (1e12, -1e12)
    r.right_hand[3, :2] = np.inf
    img = D.draw_pose(r, W, H, face=True)  # no exception, nothing drawn for the bad points
    assert tuple(img[y, x]) == (0, 0, 0)


def test_render_supersample_and_float():
    p = _person()
    frames = [D.FramePose(W, H, [p]), D.FramePose(W, H, []), None]
    out = D.render_poses(frames, 208, 304, supersample=2, as_float=True)
    assert out.shape == (3, 304, 208, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0 and out[0].max() > 0.5
    assert out[1].max() == 0 and out[2].max() == 0
    u8 = D.render_poses(frames[:1], 208, 304, supersample=2)
    np.testing.assert_allclose(u8[0] / 255.0, out[0], atol=1e-6)
    # drawn at 2x then resized: the neck-nose limb keeps its (0,0,153) hue at the middle
    x, y = int(0.5 * 208), int(0.2 * 304)
    px = u8[0, y, x].astype(int)
    assert px[2] > 100 and px[0] < 30 and px[1] < 30


@pytest.mark.parametrize("method", ["bicubic", "area", "linear"])
def test_resize_frame_methods(method):
    """bicubic = PIL's (SteadyDancer's generate_dancer.py resizes its pose frames with PIL BICUBIC); the others
    are OpenCV's interpolations."""
    import cv2
    from PIL import Image

    img = D.draw_pose(_person(), 400, 600)
    got = D.resize_frame(img, 200, 300, method)
    if method == "bicubic":
        want = np.asarray(Image.fromarray(img).resize((200, 300), Image.Resampling.BICUBIC))
    else:
        want = cv2.resize(img, (200, 300), interpolation={"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}[method])
    assert got.shape == (300, 200, 3) and got.any()
    np.testing.assert_array_equal(got, want)
    assert D.resize_frame(img, 400, 600, method) is img      # same size: untouched


def test_face_draws_the_70_openpose_points_with_the_two_eyes():
    """comfyui_controlnet_aux's face: the 68 landmarks plus body points 14 and 15 (the eyes), each a white filled
    circle of radius 3 at (int(x*W), int(y*H)); no landmark present -> nothing drawn, eyes included."""
    import cv2
    body = np.zeros((18, 3))
    body[14], body[15] = (0.30, 0.04, 0.9), (0.70, 0.04, 0.9)
    face = np.zeros((68, 3))
    # 68 landmarks on a 17 x 4 grid, 20 px apart on a 401 x 601 canvas: every circle a separate blob
    grid = [(0.1 + 0.05 * (k % 17), 0.2 + 0.04 * (k // 17)) for k in range(68)]
    face[:, :2], face[:, 2] = grid, 0.9
    p = D.Person(body, np.zeros((21, 3)), np.zeros((21, 3)), face)
    img = D.draw_pose(p, W, H, body=False, hands=False, face=True)
    want = np.zeros((H, W, 3), np.uint8)
    for x, y in grid + [(0.30, 0.04), (0.70, 0.04)]:
        cv2.circle(want, (int(x * W), int(y * H)), 3, (255, 255, 255), thickness=-1)
    assert np.array_equal(img, want)
    n, _ = cv2.connectedComponents((img[..., 0] > 0).astype(np.uint8))
    assert n - 1 == 70
    # the eyes alone are no face
    no_face = D.Person(body, np.zeros((21, 3)), np.zeros((21, 3)), np.zeros((68, 3)))
    assert D.draw_pose(no_face, W, H, body=False, hands=False, face=True).max() == 0
