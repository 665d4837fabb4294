"""Pose nodes on tiny ONNX models with the real DWPose I/O layout (builders shared with the DWPose tests).

Expected keypoints are computed here from the planted SimCC peaks with the published top-down geometry
(box * 1.25, aspect 288:384), and the fitted-canvas positions with hand arithmetic.
"""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("steadydancer_turbo.dwpose.pipeline")
M = pytest.importorskip("dwpose_onnx_models")

pack = importlib.import_module("steadydancer_turbo")
SRC_W, SRC_H = 48, 64
BOX = np.array([6.0, 4.0, 42.0, 62.0])
NECK_UV = {}  # filled by the fixture: expected neck pixel in the source frame


def _crop_to_image(u):
    """Crop-input point (x in 0..288, y in 0..384) -> frame pixels, top-down geometry by hand."""
    x1, y1, x2, y2 = BOX
    c = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    sw, sh = (x2 - x1) * 1.25, (y2 - y1) * 1.25
    if sw > sh * 288 / 384:
        sh = sw * 384 / 288
    else:
        sw = sh * 288 / 384
    s = np.array([sw, sh])
    return np.asarray(u, float) / np.array([288, 384]) * s + c - s / 2


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dwpose")
    r = min(640 / SRC_H, 640 / SRC_W)
    raw = M.yolox_raw([BOX * r], [0.9], [np.eye(80)[0] * 0.9])
    (d / "det.onnx").write_bytes(M.gated_detector(raw))
    # COCO body in crop coordinates: shoulders 5 (176,100) and 6 (112,100) -> OpenPose neck = their midpoint
    pts = {0: (144, 60), 5: (176, 100), 6: (112, 100), 7: (196, 150), 8: (92, 150), 9: (204, 200), 10: (84, 200),
           11: (164, 200), 12: (124, 200), 13: (166, 270), 14: (122, 270), 15: (168, 340), 16: (120, 340),
           1: (152, 52), 2: (136, 52), 3: (160, 56), 4: (128, 56)}
    sx = np.full((133, 576), -1.0, np.float32)
    sy = np.full((133, 768), -1.0, np.float32)
    for k in range(133):
        x, y = pts.get(k, (144, 200))
        conf = 0.9 if k in pts else 0.1  # only the body is present
        sx[k, 2 * x] = 1.0
        sy[k, 2 * y] = conf
    (d / "pose.onnx").write_bytes(M.planted_pose(sx, sy))
    NECK_UV["neck"] = _crop_to_image((144, 100))
    NECK_UV["nose"] = _crop_to_image((144, 60))
    return d


def _frames(n, black=()):
    f = torch.zeros(n, SRC_H, SRC_W, 3)
    f[:, 0:4, 0:4] = 1.0  # opens the gated detector
    for i in black:
        f[i] = 0.0
    return f


def test_extract_gives_controlnet_aux_style_keypoints_and_images(onnx_files, monkeypatch):
    msgs = []
    monkeypatch.setattr(pack.nodes.comfy_bridge, "node_message", lambda nid, t: msgs.append(t))
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerPoseExtract"]()
    poses, img = node.extract(_frames(3, black=(1,)), str(onnx_files / "det.onnx"), str(onnx_files / "pose.onnx"),
                              True, True, False, 0, 0, "cpu", unique_id="5")
    assert len(poses) == 3 and img.shape == (3, SRC_H, SRC_W, 3)
    assert poses[1]["people"] == [] and img[1].max() == 0 and any("1 of 3" in m for m in msgs)
    p = poses[0]
    assert (p["canvas_width"], p["canvas_height"]) == (SRC_W, SRC_H)
    body = np.array(p["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
    assert set(body[:, 2]) <= {0.0, 1.0}  # comfyui_controlnet_aux writes confidence 1.0 for present points
    np.testing.assert_allclose(body[1, :2], NECK_UV["neck"], atol=0.3)  # pixel coordinates of the source frame
    np.testing.assert_allclose(body[0, :2], NECK_UV["nose"], atol=0.3)
    assert p["people"][0]["face_keypoints_2d"] is None
    assert img[0].max() > 0
    big = node.extract(_frames(1), str(onnx_files / "det.onnx"), str(onnx_files / "pose.onnx"),
                       True, False, False, 96, 128, "cpu")[1]
    assert big.shape == (1, 128, 96, 3)


@pytest.mark.parametrize("fit,expect", [
    # 48x64 reference -> 32x48 canvas. crop: s = max(32/48, 48/64) = 0.75 -> 36x48, x offset -(36-32)//2 = -2
    ("crop", lambda x, y: (x * 36 / 48 - 2, y * 48 / 64)),
    # pad: s = min(32/48, 48/64) = 2/3 -> 32x43 (round 42.67), y offset (48-43)//2 = 2
    ("pad", lambda x, y: (x * 32 / 48, y * 43 / 64 + 2)),
    ("stretch", lambda x, y: (x * 32 / 48, y * 48 / 64)),
])
def test_retarget_fits_image_and_poses_alike(onnx_files, fit, expect):
    ext = pack.NODE_CLASS_MAPPINGS["SteadyDancerPoseExtract"]()
    poses, _ = ext.extract(_frames(5), str(onnx_files / "det.onnx"), str(onnx_files / "pose.onnx"),
                           True, True, False, 0, 0, "cpu")
    ref_img = torch.rand(1, SRC_H, SRC_W, 3, generator=torch.Generator().manual_seed(0))
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerPoseRetarget"]()
    ref, pos, neg, aligned = node.retarget(poses, poses[:1], ref_img, 32, 48, fit, True, True, False,
                                           "steadydancer", 3)
    assert ref.shape == (1, 48, 32, 3) and pos.shape == (5, 48, 32, 3) and neg.shape == pos.shape
    torch.testing.assert_close(ref, pack.nodes.common.resize_images(ref_img, 32, 48, fit))
    # the same person drives itself: retargeting is the identity, then the canvas fit moves every point
    nx, ny = NECK_UV["neck"]
    for f in aligned:
        assert (f["canvas_width"], f["canvas_height"]) == (32, 48)
        body = np.array(f["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
        np.testing.assert_allclose(body[1, :2], expect(nx, ny), atol=0.05)
    assert pos.max() > 0 and not torch.equal(pos, neg)
    # same seed -> same negatives; another seed -> different ones
    again = node.retarget(poses, poses[:1], ref_img, 32, 48, fit, True, True, False, "steadydancer", 3)
    assert torch.equal(again[2], neg)
    other = node.retarget(poses, poses[:1], ref_img, 32, 48, fit, True, True, False, "steadydancer", 4)
    assert not torch.equal(other[2], neg)


def test_retarget_colors_are_red_blue_swapped_for_steadydancer(onnx_files):
    ext = pack.NODE_CLASS_MAPPINGS["SteadyDancerPoseExtract"]()
    poses, _ = ext.extract(_frames(1), str(onnx_files / "det.onnx"), str(onnx_files / "pose.onnx"),
                           True, True, False, 0, 0, "cpu")
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerPoseRetarget"]()
    ref_img = torch.zeros(1, SRC_H, SRC_W, 3)
    sd = node.retarget(poses, poses, ref_img, 48, 64, "crop", True, True, False, "steadydancer", 0)[1]
    op = node.retarget(poses, poses, ref_img, 48, 64, "crop", True, True, False, "openpose", 0)[1]
    torch.testing.assert_close(sd, op[..., [2, 1, 0]])
    assert not torch.equal(sd, op)


def test_retarget_refuses_a_reference_without_person(onnx_files):
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerPoseRetarget"]()
    empty = [{"people": [], "canvas_width": SRC_W, "canvas_height": SRC_H}]
    with pytest.raises(ValueError, match="no person"):
        node.retarget(empty * 3, empty, torch.zeros(1, SRC_H, SRC_W, 3), 32, 48, "crop", True, True, False,
                      "steadydancer", 0)
