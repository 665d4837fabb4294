"""Unit tests for the DWPose pre/post-processing, against hand-computed numbers and OpenCV geometry."""
import math
import os

import cv2
import numpy as np
import pytest

from steadydancer_turbo import dwpose as D


# ---------------------------------------------------------------- letterbox
@pytest.mark.parametrize("h,w,nh,nw", [(481, 833, 369, 640), (833, 481, 640, 369), (97, 1001, 62, 640)])
def test_letterbox_top_left_on_114(h, w, nh, nw):
    # nh/nw by hand: r = 640 / max side, sizes truncated (481 * 640/833 = 369.56 -> 369; 97*640/1001 = 62.02)
    frame = np.empty((h, w, 3), np.uint8)
    frame[:] = (10, 200, 30)
    canvas, r = D.letterbox(frame)
    assert canvas.shape == (640, 640, 3) and canvas.dtype == np.uint8
    assert r == pytest.approx(640 / max(h, w))
    assert (canvas[:nh, :nw] == (10, 200, 30)).all()
    assert (canvas[nh:, :] == 114).all() and (canvas[:, nw:] == 114).all()


# ---------------------------------------------------------------- NMS
def test_nms_plus_one_areas_and_order():
    boxes = np.array([[0, 0, 9, 9], [1, 1, 10, 10], [20, 20, 29, 29], [5, 0, 14, 9]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.75])
    # IoU(A,B) = 81 / (100+100-81) = 0.68 > 0.45 -> B dropped; IoU(A,D) = 50/150 = 0.33 -> kept
    assert D.nms(boxes, scores, 0.45) == [0, 3, 2]
    # at a threshold below 1/3 D goes too
    assert D.nms(boxes, scores, 0.3) == [0, 2]


# ---------------------------------------------------------------- YOLOX grid decode
def test_decode_people_grid_strides_and_thresholds():
    pred = np.zeros((8400, 85), np.float32)
    # stride 8, cell (gx=3, gy=2): index 2*80+3 = 163; centre (3.5*8, 2.25*8) = (28, 18); w = h = 4*8 = 32
    pred[163, :4] = [0.5, 0.25, math.log(4), math.log(4)]
    pred[163, 4], pred[163, 5] = 0.9, 0.8  # score 0.72
    # stride 16, cell (gx=10, gy=5): index 6400 + 5*40 + 10 = 6610; centre (168, 88); w = 2*16, h = 8*16
    pred[6610, :4] = [0.5, 0.5, math.log(2), math.log(8)]
    pred[6610, 4], pred[6610, 5] = 0.7, 0.7  # score 0.49
    # stride 32, cell (gx=19, gy=19): index 6400+1600+19*20+19 = 8399; score 0.25 -> candidate but not a person
    pred[8399, :4] = [0.5, 0.5, 0.0, 0.0]
    pred[8399, 4], pred[8399, 5] = 0.5, 0.5
    # a confident non-person (class 3) is ignored
    pred[100, :4] = [0.5, 0.5, 1.0, 1.0]
    pred[100, 4], pred[100, 8] = 0.99, 0.99
    r = 0.5
    boxes, scores = D.decode_people(pred, r)
    np.testing.assert_allclose(boxes, np.array([[12, 2, 44, 34], [152, 24, 184, 152]]) / r, atol=1e-4)
    np.testing.assert_allclose(scores, [0.72, 0.49], atol=1e-6)


# ---------------------------------------------------------------- affine crop
def _three_point_matrix(center, scale, wh):
    """The reference construction: centre -> crop centre, centre + (0, -sw/2) -> (w/2, h/2 - w/2), 3rd point
    by a 90 degree turn; solved with cv2.getAffineTransform in float64 terms."""
    w, h = wh
    c = np.asarray(center, float)
    a, b = c, c + [0, -scale[0] * 0.5]
    d = b - a
    src = np.array([a, b, b + [-d[1], d[0]]], np.float32)
    da, db = np.array([w / 2, h / 2]), np.array([w / 2, h / 2 - w / 2])
    dd = db - da
    dst = np.array([da, db, db + [-dd[1], dd[0]]], np.float32)
    return cv2.getAffineTransform(src, dst)


def test_fix_aspect_hand_numbers():
    np.testing.assert_allclose(D.fix_aspect([100, 300], 0.75), [225, 300])
    np.testing.assert_allclose(D.fix_aspect([400, 300], 0.75), [400, 400 / 0.75])


@pytest.mark.parametrize("box", [(13.0, 27.0, 211.0, 400.0), (300.5, 10.25, 700.0, 190.0), (0, 0, 832, 480)])
def test_crop_matrix_matches_reference_and_round_trips(box):
    wh = (288, 384)
    c, s = D.bbox_center_scale(box)
    np.testing.assert_allclose(c, [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    np.testing.assert_allclose(s, [(box[2] - box[0]) * 1.25, (box[3] - box[1]) * 1.25])
    s = D.fix_aspect(s, wh[0] / wh[1])
    m = D.crop_matrix(c, s, wh)
    np.testing.assert_allclose(m, _three_point_matrix(c, s, wh), rtol=1e-4, atol=1e-3)
    rng = np.random.default_rng(0)
    pts = rng.uniform([box[0], box[1]], [box[2], box[3]], size=(50, 2))
    crop_pts = pts @ m[:, :2].T + m[:, 2]
    back = D.input_to_image(crop_pts, c, s, wh)
    assert np.abs(back - pts).max() < 1e-9


@pytest.mark.parametrize("h,w", [(481, 833), (833, 481)])
def test_warped_crop_peak_maps_back_within_half_pixel(h, w):
    wh = (288, 384)
    rng = np.random.default_rng(1)
    for _ in range(5):
        x0, y0 = rng.uniform(20, w - 200), rng.uniform(20, h - 300)
        box = (x0, y0, x0 + 150, y0 + 250)  # crop scale k = 384 / 312.5 > 1
        px, py = int(rng.uniform(box[0] + 5, box[2] - 5)), int(rng.uniform(box[1] + 5, box[3] - 5))
        frame = np.zeros((h, w, 3), np.uint8)
        frame[py, px] = 255
        crop, c, s = D.crop_person(frame, box, wh)
        assert crop.shape == (3, 384, 288) and crop.dtype == np.float32
        # black normalizes to -mean/std per channel (ImageNet RGB statistics)
        np.testing.assert_allclose(crop[:, 0, 0], -np.array([123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375],
                                   rtol=1e-5)
        v, u = np.unravel_index(crop[0].argmax(), crop[0].shape)
        back = D.input_to_image([u, v], c, s, wh)
        assert abs(back[0] - px) <= 0.5 and abs(back[1] - py) <= 0.5


# ---------------------------------------------------------------- SimCC
def test_simcc_decode_argmax_min_and_split_ratio():
    sx = np.full((2, 3, 576), -1.0, np.float32)
    sy = np.full((2, 3, 768), -1.0, np.float32)
    sx[0, 0, 101], sy[0, 0, 57] = 0.9, 0.4  # (50.5, 28.5), score min = 0.4
    sx[0, 1, 0], sy[0, 1, 767] = 0.2, 0.8  # (0, 383.5), 0.2
    sx[1, 2, 575], sy[1, 2, 1] = 0.7, 0.7  # (287.5, 0.5), 0.7
    # [0,2], [1,0], [1,1]: all maxima -1 -> score -1 and location -1 / 2
    locs, vals = D.simcc_decode(sx, sy)
    np.testing.assert_allclose(locs[0, 0], [50.5, 28.5])
    np.testing.assert_allclose(locs[0, 1], [0.0, 383.5])
    np.testing.assert_allclose(locs[1, 2], [287.5, 0.5])
    np.testing.assert_allclose(vals[0, :2], [0.4, 0.2], rtol=1e-6)
    np.testing.assert_allclose(locs[0, 2], [-0.5, -0.5])
    assert vals[1, 0] == pytest.approx(-1.0)


# ---------------------------------------------------------------- 133 -> OpenPose
def test_wholebody_to_openpose_index_table_and_neck():
    idx = np.arange(133, dtype=float)
    kp = np.stack([idx, 1000 + idx], 1)
    sc = 0.5 + idx / 1000.0
    sc[5], sc[6] = 0.9, 0.6
    p = D.person_from_wholebody(kp, sc, width=2, height=4)
    # OpenPose order from the spec table: Nose, Neck, RSho(6), RElb(8), RWri(10), LSho(5), LElb(7), LWri(9),
    # RHip(12), RKnee(14), RAnk(16), LHip(11), LKnee(13), LAnk(15), REye(2), LEye(1), REar(4), LEar(3)
    coco = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
    for i, c in enumerate(coco):
        if c is None:
            continue
        np.testing.assert_allclose(p.body[i], [c / 2, (1000 + c) / 4, sc[c]])
    # mean of the shoulders; the score is DWPose's flag (both shoulders > 0.3), not a confidence
    np.testing.assert_allclose(p.body[1], [5.5 / 2, 1005.5 / 4, 1.0])
    sc[6] = 0.3
    assert D.person_from_wholebody(kp, sc, width=2, height=4).body[1, 2] == 0.0  # 0.3 is not > 0.3
    np.testing.assert_allclose(p.face[:, 0] * 2, np.arange(23, 91))
    np.testing.assert_allclose(p.left_hand[:, 0] * 2, np.arange(91, 112))
    np.testing.assert_allclose(p.right_hand[:, 0] * 2, np.arange(112, 133))
    np.testing.assert_allclose(p.right_hand[:, 2], sc[112:133])


def test_pose_keypoint_layout_and_round_trip():
    rng = np.random.default_rng(2)
    person = D.Person(*(np.column_stack([rng.uniform(0.05, 0.95, (n, 2)), rng.uniform(0.31, 0.99, n)])
                        for n in (18, 21, 21, 68)))
    person.body[3, 2] = 0.1  # missing
    person.left_hand[:, 2] = 0.0  # whole hand missing -> None
    d = D.to_pose_keypoint(D.FramePose(640, 480, [person]))
    assert set(d) == {"people", "canvas_width", "canvas_height"} and d["canvas_width"] == 640
    e = d["people"][0]
    assert set(e) == {"pose_keypoints_2d", "face_keypoints_2d", "hand_left_keypoints_2d", "hand_right_keypoints_2d"}
    assert len(e["pose_keypoints_2d"]) == 54 and len(e["face_keypoints_2d"]) == 70 * 3
    assert e["hand_left_keypoints_2d"] is None and len(e["hand_right_keypoints_2d"]) == 63
    assert e["pose_keypoints_2d"][9:12] == [0.0, 0.0, 0.0]
    assert e["pose_keypoints_2d"][0:3] == pytest.approx(list(person.body[0]))  # real confidence
    assert e["face_keypoints_2d"][-6:] == pytest.approx(list(person.body[14]) + list(person.body[15]))
    px = D.to_pose_keypoint(D.FramePose(640, 480, [person]), normalized=False, binary_confidence=True)
    assert px["people"][0]["pose_keypoints_2d"][0:3] == pytest.approx(
        [person.body[0, 0] * 640, person.body[0, 1] * 480, 1.0])
    for dd in (d, px):
        back = D.from_pose_keypoint(dd).people[0]
        ok = D.present(person.body)
        np.testing.assert_allclose(back.body[ok, :2], person.body[ok, :2], atol=1e-9)
    off = D.to_pose_keypoint(D.FramePose(640, 480, [person]), include_body=False, include_face=False)
    assert off["people"][0]["pose_keypoints_2d"] == [0.0] * 54 and off["people"][0]["face_keypoints_2d"] is None
    import json
    json.dumps(d)


# ---------------------------------------------------------------- model lookup
def test_find_model_file(tmp_path):
    a, b = tmp_path / "comfy_dwpose", tmp_path / "aux_ckpts"
    (b / "yzd-v" / "DWPose").mkdir(parents=True)
    a.mkdir()
    target = b / "yzd-v" / "DWPose" / "yolox_l.onnx"
    target.write_bytes(b"x")
    assert D.find_model_file("yolox_l.onnx", [str(a), str(b)]) == str(target)
    with pytest.raises(D.ModelNotFoundError) as ei:
        D.find_model_file("dw-ll_ucoco_384.onnx", [str(a), str(b)])
    msg = str(ei.value)
    assert "dw-ll_ucoco_384.onnx" in msg and str(a) in msg
    assert "https://huggingface.co/yzd-v/DWPose/resolve/main/dw-ll_ucoco_384.onnx" in msg
    assert isinstance(ei.value, FileNotFoundError)
    assert os.path.isabs(D.find_model_file(str(target), []))
