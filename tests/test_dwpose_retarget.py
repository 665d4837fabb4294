"""SteadyDancer pose alignment and negative poses.

``_official_align`` is a literal transcription of the steps of the official ``align_img`` (cv2 rotation
matrices about each parent, offsets from the original pose) used as an independent reference when every
point is present.
"""
import random

import cv2
import numpy as np
import pytest

from steadydancer_turbo import dwpose as D

REF_W, REF_H = 576, 1024
VID_W, VID_H = 832, 480


def _body(scale=1.0, arm=1.0, leg=1.0, cx=0.5, cy=0.3, aspect=1.0):
    """A standing figure in metric units (units of image height), returned normalized for aspect W/H."""
    s = scale
    pts = {1: (0, 0), 0: (0, -0.08 * s), 14: (-0.02 * s, -0.10 * s), 15: (0.02 * s, -0.10 * s),
           16: (-0.045 * s, -0.09 * s), 17: (0.045 * s, -0.09 * s),
           2: (-0.09 * s, 0.0), 5: (0.09 * s, 0.0),
           3: (-0.11 * s, 0.12 * s * arm), 4: (-0.12 * s, 0.23 * s * arm),
           6: (0.115 * s, 0.12 * s * arm), 7: (0.125 * s, 0.23 * s * arm),
           8: (-0.05 * s, 0.30 * s), 11: (0.05 * s, 0.30 * s),
           9: (-0.055 * s, 0.47 * s * leg), 10: (-0.06 * s, 0.63 * s * leg),
           12: (0.055 * s, 0.47 * s * leg), 13: (0.06 * s, 0.63 * s * leg)}
    body = np.zeros((18, 3))
    for i, (x, y) in pts.items():
        body[i] = ((cx * aspect + x) / aspect, cy + y, 0.9)
    rng = np.random.default_rng(int(scale * 1000 + arm * 100))
    lh = np.column_stack([body[7, 0] + rng.normal(0, 0.01, 21), body[7, 1] + 0.03 + rng.normal(0, 0.01, 21),
                          np.full(21, 0.8)])
    rh = np.column_stack([body[4, 0] + rng.normal(0, 0.01, 21), body[4, 1] + 0.03 + rng.normal(0, 0.01, 21),
                          np.full(21, 0.8)])
    face = np.column_stack([body[0, 0] + rng.normal(0, 0.01, 68), body[0, 1] + rng.normal(0, 0.01, 68),
                            np.full(68, 0.7)])
    return D.Person(body, lh, rh, face)


def _moved(p, t, aspect):
    """Frame t of the driving video: arms swing, whole body drifts (all in metric units)."""
    q = p.copy()
    ang = 0.3 * np.sin(t)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    for parent, kids in ((2, [3, 4]), (5, [6, 7])):
        for k in kids:
            v = (q.body[k, :2] - q.body[parent, :2]) * [aspect, 1]
            q.body[k, :2] = q.body[parent, :2] + (rot @ v) / [aspect, 1]
    for part in q.parts().values():
        part[:, 0] += 0.01 * t / aspect
        part[:, 1] += 0.005 * t
    return q


def _metric(xy, aspect):
    return xy * [aspect, 1]


def _official_align(body, hands, s):
    """The official align_img sequence on metric coordinates (body [18,2], hands [2,21,2] = [left, right])."""
    body, hands = body.copy(), hands.copy()
    o = body.copy()
    oh = hands.copy()

    def scale_about(c, pts, k):
        m = cv2.getRotationMatrix2D((float(c[0]), float(c[1])), 0, float(k))
        return pts @ m[:, :2].T + m[:, 2]

    body[[0]] = scale_about(body[1], body[[0]], s["neck"])
    body[[14, 16]] = scale_about(body[0], o[[14, 16]] - o[[0]] + body[[0]], s["face_left"])
    body[[15, 17]] = scale_about(body[0], o[[15, 17]] - o[[0]] + body[[0]], s["face_right"])
    body[[2, 5]] = scale_about(body[1], body[[2, 5]], s["shoulder"])
    body[[3]] = scale_about(body[2], o[[3]] - o[[2]] + body[[2]], s["arm_upper"])
    body[[4]] = scale_about(body[3], o[[4]] - o[[3]] + body[[3]], s["arm_lower"])
    hands[1] = scale_about(body[4], oh[1] - o[[4]] + body[[4]], s["hand"])
    body[[6]] = scale_about(body[5], o[[6]] - o[[5]] + body[[5]], s["arm_upper"])
    body[[7]] = scale_about(body[6], o[[7]] - o[[6]] + body[[6]], s["arm_lower"])
    hands[0] = scale_about(body[7], oh[0] - o[[7]] + body[[7]], s["hand"])
    body[[8, 11]] = scale_about(body[1], body[[8, 11]], s["body_len"])
    body[[9]] = scale_about(body[8], o[[9]] - o[[8]] + body[[8]], s["leg_upper"])
    body[[10]] = scale_about(body[9], o[[10]] - o[[9]] + body[[9]], s["leg_lower"])
    body[[12]] = scale_about(body[11], o[[12]] - o[[11]] + body[[11]], s["leg_upper"])
    body[[13]] = scale_about(body[12], o[[13]] - o[[12]] + body[[12]], s["leg_lower"])
    return body, hands


def _scene(n=6):
    ra, va = REF_W / REF_H, VID_W / VID_H
    ref = D.FramePose(REF_W, REF_H, [_body(scale=1.3, arm=0.8, leg=1.15, cx=0.5, cy=0.25, aspect=ra)])
    base = _body(scale=0.9, arm=1.1, leg=0.9, cx=0.4, cy=0.3, aspect=va)
    drv = [D.FramePose(VID_W, VID_H, [_moved(base, t, va)]) for t in range(n)]
    return ref, drv, ra, va


def _len(person, a, b, aspect):
    return float(np.linalg.norm(_metric(person.body[a, :2] - person.body[b, :2], aspect)))


def test_alignment_matches_official_steps_and_reference_lengths():
    ref, drv, ra, va = _scene()
    al = D.compute_alignment(ref, drv)
    r0, d0 = ref.people[0], drv[0].people[0]
    # ratios by hand from the reference and the first driving frame
    L = lambda p, a, b, asp: _len(p, a, b, asp)  # noqa: E731
    assert al.scales["neck"] == pytest.approx(L(r0, 0, 1, ra) / L(d0, 0, 1, va))
    assert al.scales["shoulder"] == pytest.approx(L(r0, 2, 5, ra) / L(d0, 2, 5, va))
    up = (L(r0, 2, 3, ra) / L(d0, 2, 3, va) + L(r0, 5, 6, ra) / L(d0, 5, 6, va)) / 2
    low = (L(r0, 3, 4, ra) / L(d0, 3, 4, va) + L(r0, 6, 7, ra) / L(d0, 6, 7, va)) / 2
    assert al.scales["arm_upper"] == pytest.approx(up) and al.scales["arm_lower"] == pytest.approx(low)
    assert al.scales["hand"] == pytest.approx((up + low) / 2)
    fl = (L(r0, 16, 14, ra) + L(r0, 14, 0, ra)) / (L(d0, 16, 14, va) + L(d0, 14, 0, va))
    assert al.scales["face_left"] == pytest.approx(fl)
    mid = lambda p, asp: _metric((p.body[8, :2] + p.body[11, :2]) / 2 - p.body[1, :2], asp)  # noqa: E731
    assert al.scales["body_len"] == pytest.approx(np.linalg.norm(mid(r0, ra)) / np.linalg.norm(mid(d0, va)))

    out = D.align_poses(ref, drv)
    assert len(out) == len(drv) and all((f.width, f.height) == (REF_W, REF_H) for f in out)
    # neck of frame 0 sits on the reference neck; later necks follow the driving trajectory
    np.testing.assert_allclose(out[0].people[0].body[1, :2], r0.body[1, :2], atol=1e-12)
    for t, f in enumerate(out):
        p, q = f.people[0], drv[t].people[0]
        # against the official sequence (metric coordinates), then offset and back to reference-normalized x
        ob, oh = _official_align(_metric(q.body[:, :2], va),
                                 np.stack([_metric(q.left_hand[:, :2], va), _metric(q.right_hand[:, :2], va)]),
                                 al.scales)
        off = _metric(r0.body[1, :2], ra) - _metric(d0.body[1, :2], va)
        # (cv2.getRotationMatrix2D takes its centre as float32: agreement to ~1e-7 of the image height)
        np.testing.assert_allclose(p.body[:, :2], (ob + off) / [ra, 1], atol=1e-6)
        np.testing.assert_allclose(p.left_hand[:, :2], (oh[0] + off) / [ra, 1], atol=1e-6)
        np.testing.assert_allclose(p.right_hand[:, :2], (oh[1] + off) / [ra, 1], atol=1e-6)
        # every retargeted bone has the reference's length ratio
        for (a, b), k in [((0, 1), "neck"), ((2, 3), "arm_upper"), ((6, 7), "arm_lower"), ((11, 12), "leg_upper"),
                          ((9, 10), "leg_lower"), ((2, 5), "shoulder")]:
            assert _len(p, a, b, ra) == pytest.approx(al.scales[k] * _len(q, a, b, va), rel=1e-9)
        np.testing.assert_allclose(p.body[:, 2], q.body[:, 2])  # confidences kept
        assert np.isfinite(p.body).all() and np.isfinite(p.face).all()
    # frame 0: bones whose two sides share one ratio land exactly on the reference lengths
    p0 = out[0].people[0]
    for a, b in [(0, 1), (2, 5), (14, 0), (16, 14)]:
        assert _len(p0, a, b, ra) == pytest.approx(_len(r0, a, b, ra), rel=1e-9)


def test_bone_missing_in_frame0_uses_first_visible_frame():
    ref, drv, ra, va = _scene()
    drv[0].people[0].body[6, 2] = 0.05  # left elbow missing in frame 0
    drv[1].people[0].body[6, 2] = 0.0  # and frame 1
    drv[0].people[0].body[[16, 17], 2] = 0.0  # ears missing in frame 0 only
    al = D.compute_alignment(ref, drv)
    r0 = ref.people[0]
    right = _len(r0, 2, 3, ra) / _len(drv[0].people[0], 2, 3, va)
    left = _len(r0, 5, 6, ra) / _len(drv[2].people[0], 5, 6, va)  # first frame showing the left upper arm
    assert al.scales["arm_upper"] == pytest.approx((right + left) / 2)
    assert al.source_frames["arm_upper"] == [0, 2]
    fl = (_len(r0, 16, 14, ra) + _len(r0, 14, 0, ra)) / (_len(drv[1].people[0], 16, 14, va)
                                                        + _len(drv[1].people[0], 14, 0, va))
    assert al.scales["face_left"] == pytest.approx(fl)
    out = D.align_poses(ref, drv)
    p0 = out[0].people[0]
    assert tuple(p0.body[6]) == (0.0, 0.0, 0.0)  # missing stays missing
    assert D.present(p0.body[[5, 7]]).all()  # wrist present although its parent elbow is not
    # the wrist moved with the left shoulder (nearest present ancestor), not through the missing elbow
    q = drv[0].people[0]
    shoulder_shift = _metric(p0.body[5, :2], ra) - _metric(q.body[5, :2], va)
    np.testing.assert_allclose(_metric(p0.body[7, :2], ra) - _metric(q.body[7, :2], va), shoulder_shift, atol=1e-12)
    for f in out:
        for part in f.people[0].parts().values():
            assert np.isfinite(part).all()


def test_nan_and_inf_ratios_as_official():
    ref, drv, ra, va = _scene(3)
    for f in drv:
        f.people[0].body[[16, 17], 2] = 0.0  # ears never visible -> NaN -> 1
    drv[0].people[0].body[5, :2] = drv[0].people[0].body[2, :2]  # zero shoulder width in frame 0 -> inf
    al = D.compute_alignment(ref, drv)
    assert al.scales["face_left"] == 1.0 and al.scales["face_right"] == 1.0
    others = [v for k, v in al.scales.items() if k != "shoulder"]
    assert np.isinf(al.raw_scales["shoulder"])
    assert al.scales["shoulder"] == pytest.approx(np.mean(others))
    out = D.align_poses(ref, drv)
    assert all(np.isfinite(part).all() for f in out for part in f.people[0].parts().values())


def test_garbage_never_yields_nan_and_empty_frames_stay_empty():
    ref, drv, ra, va = _scene(4)
    drv[1].people[0].body[3, :2] = np.nan  # non-finite point with a high confidence: treated as missing
    drv[2] = D.FramePose(VID_W, VID_H, [])
    drv[3].people[0].body[:, 2] = 0.0  # nobody visible, hands remain
    out = D.align_poses(ref, drv)
    assert out[2].people == []
    for f in (out[0], out[1], out[3]):
        for part in f.people[0].parts().values():
            assert np.isfinite(part).all()
    assert tuple(out[1].people[0].body[3]) == (0.0, 0.0, 0.0)
    img = D.render_poses(out, 288, 512, supersample=2)
    assert img.shape == (4, 512, 288, 3) and img[2].max() == 0
    with pytest.raises(ValueError, match="reference"):
        D.compute_alignment(D.FramePose(REF_W, REF_H, []), drv)


def test_negative_poses_reproducible_and_anchored_at_neck():
    ref, drv, ra, va = _scene(5)
    aligned = D.align_poses(ref, drv)
    a = D.negative_poses(aligned, seed=1234)
    b = D.negative_poses(aligned, seed=1234)
    c = D.negative_poses(aligned, seed=99)
    rng = random.Random(1234)  # the official draws: offset_x, offset_y, scale, aspect per frame
    for t, (fa, fb, fc, src) in enumerate(zip(a, b, c, aligned)):
        rng.uniform(-0.2, 0.2)
        rng.uniform(-0.2, 0.2)
        s, asp = rng.uniform(0.7, 1.3), rng.uniform(0.6, 1.4)
        assert 0.7 <= s <= 1.3 and 0.6 <= asp <= 1.4
        pa, pb, p = fa.people[0], fb.people[0], src.people[0]
        np.testing.assert_array_equal(pa.body, pb.body)
        assert not np.allclose(pa.body, fc.people[0].body)
        np.testing.assert_allclose(pa.body[1, :2], p.body[1, :2], atol=1e-12)  # neck fixed
        d_new = pa.body[:, :2] - pa.body[1, :2]
        d_old = p.body[:, :2] - p.body[1, :2]
        np.testing.assert_allclose(d_new, d_old * [asp * s, s], atol=1e-12)
        np.testing.assert_allclose(pa.right_hand[:, :2] - pa.body[1, :2],
                                   (p.right_hand[:, :2] - p.body[1, :2]) * [asp * s, s], atol=1e-12)
    # independent per frame
    assert len({round(x[0], 9) for x in D.negative_factors(5, 1234)}) == 5


def test_steadydancer_pose_frames_bundle():
    ref, drv, ra, va = _scene(4)
    pos, neg, aligned, negative = D.steadydancer_pose_frames(ref, drv, 288, 512, seed=7)
    assert pos.shape == neg.shape == (4, 512, 288, 3) and pos.dtype == np.uint8
    assert pos.max() > 0 and not np.array_equal(pos, neg)
    pos2, neg2, _, _ = D.steadydancer_pose_frames(ref, drv, 288, 512, seed=7)
    np.testing.assert_array_equal(neg, neg2)
    # no face drawn: the face landmarks are present but no white pixel appears
    assert D.present(aligned[0].people[0].face, 0.35).any()
    assert not ((D.render_poses(aligned, 288, 512, face=False) == 255).all(-1)).any()


def test_missing_neck_is_logged_on_every_run(caplog):
    # a Python warning is printed once per code location, so a second clip without a neck in the same ComfyUI
    # session said nothing; the note must reach the log every time, once (not also as a RuntimeWarning)
    ref, drv, _, _ = _scene(2)
    ref.people[0].body[[1, 2, 5], 2] = 0.0  # no shoulders, so no neck
    import warnings
    for _ in range(2):
        caplog.clear()
        with caplog.at_level("WARNING", logger="steadydancer_turbo.dwpose"), warnings.catch_warnings():
            warnings.simplefilter("error")  # a RuntimeWarning would fail here
            D.compute_alignment(ref, drv)
        assert [r.getMessage() for r in caplog.records if "no neck" in r.getMessage()]


def test_negative_pose_shifts_the_face_with_the_neck_without_scaling_it():
    """Official pose_aug_diff: body and hands x *= aspect, *= scale, then + (neck - scaled neck); faces only get
    that offset. Hand numbers: neck (0.5, 0.4), scale 1.2, aspect 0.8 -> factor (0.96, 1.2), offset
    (0.5 * 0.04, 0.4 * -0.2) = (0.02, -0.08)."""
    body = np.zeros((18, 3))
    body[1], body[2] = (0.5, 0.4, 0.9), (0.4, 0.45, 0.9)
    rh = np.zeros((21, 3))
    rh[0] = (0.3, 0.6, 0.9)
    face = np.zeros((68, 3))
    face[0], face[30] = (0.52, 0.2, 0.9), (0.45, 0.25, 0.8)
    p = D.Person(body, np.zeros((21, 3)), rh, face)
    from steadydancer_turbo.dwpose.retarget import negative_person
    n = negative_person(p, scale=1.2, aspect=0.8)
    np.testing.assert_allclose(n.body[1, :2], (0.5, 0.4), atol=1e-12)
    np.testing.assert_allclose(n.body[2, :2], (0.5 + 0.96 * -0.1, 0.4 + 1.2 * 0.05), atol=1e-12)
    np.testing.assert_allclose(n.right_hand[0, :2], (0.5 + 0.96 * -0.2, 0.4 + 1.2 * 0.2), atol=1e-12)
    np.testing.assert_allclose(n.face[0, :2], (0.54, 0.12), atol=1e-12)
    np.testing.assert_allclose(n.face[30, :2], (0.47, 0.17), atol=1e-12)
    # the face keeps its size: distances between landmarks unchanged; confidences kept; missing stays missing
    assert np.isclose(np.linalg.norm(n.face[0, :2] - n.face[30, :2]), np.linalg.norm(face[0, :2] - face[30, :2]))
    assert n.face[30, 2] == 0.8 and not n.face[1].any()
