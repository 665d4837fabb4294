"""Pose nodes on tiny ONNX models with the real DWPose I/O layout (builders shared with the DWPose tests).

Expected keypoints are computed here from the planted SimCC peaks with the published top-down geometry
(box * 1.25, aspect 288:384), and the fitted-canvas positions with hand arithmetic.
"""
from __future__ import annotations

import importlib
import sys

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


def test_extract_gives_normalized_keypoints_with_real_confidences_and_images(onnx_files, monkeypatch):
    msgs = []
    monkeypatch.setattr(pack.nodes.comfy_bridge, "node_message", lambda nid, t: msgs.append(t))
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerPoseExtract"]()
    poses, img = node.extract(_frames(3, black=(1,)), str(onnx_files / "det.onnx"), str(onnx_files / "pose.onnx"),
                              True, True, False, 0, 0, "cpu", max_missing_share=0.5, unique_id="5")
    assert len(poses) == 3 and img.shape == (3, SRC_H, SRC_W, 3)
    assert poses[1]["people"] == [] and img[1].max() == 0 and any("1 of 3" in m for m in msgs)
    p = poses[0]
    assert (p["canvas_width"], p["canvas_height"]) == (SRC_W, SRC_H)
    body = np.array(p["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
    # the real confidences (planted SimCC peaks of 0.9; missing points 0), not comfyui_controlnet_aux's 1.0
    present = body[:, 2] > 0
    joints = present & (np.arange(18) != 1)  # the neck (1) carries DWPose's 0/1 flag, not a confidence
    assert joints.sum() >= 3 and np.allclose(body[joints, 2], 0.9, atol=1e-5) and body[1, 2] == 1.0
    # coordinates normalized to the source frame (0.3 px tolerance on each axis)
    px = np.array([SRC_W, SRC_H], dtype=np.float64)
    np.testing.assert_allclose(body[1, :2] * px, NECK_UV["neck"], atol=0.3)
    np.testing.assert_allclose(body[0, :2] * px, NECK_UV["nose"], atol=0.3)
    assert p["people"][0]["face_keypoints_2d"] is None
    assert img[0].max() > 0
    big = node.extract(_frames(1), str(onnx_files / "det.onnx"), str(onnx_files / "pose.onnx"),
                       True, False, False, 96, 128, "cpu")[1]
    assert big.shape == (1, 128, 96, 3)


def test_extract_fails_without_a_person_in_too_many_frames(onnx_files, monkeypatch):
    """No person in any frame always fails; more than max_missing_share (default 25%) of the frames fails too;
    at or below it the run goes on with the frames named on the node."""
    msgs = []
    monkeypatch.setattr(pack.nodes.comfy_bridge, "node_message", lambda nid, t: msgs.append(t))
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerPoseExtract"]()
    args = (str(onnx_files / "det.onnx"), str(onnx_files / "pose.onnx"), True, True, False, 0, 0, "cpu")
    with pytest.raises(ValueError, match="no person in any of the 3 frame"):
        node.extract(_frames(3, black=(0, 1, 2)), *args, max_missing_share=1.0)
    with pytest.raises(ValueError, match=r"1 of 3 frame.*33%.*max_missing_share 25%"):
        node.extract(_frames(3, black=(1,)), *args)                      # 1/3 > 0.25
    poses, _ = node.extract(_frames(4, black=(2,)), *args, unique_id="7")   # 1/4 = 0.25: allowed
    assert [bool(p["people"]) for p in poses] == [True, True, False, True]
    assert any("1 of 4" in m and ": 2 " in m for m in msgs), msgs
    with pytest.raises(ValueError, match="2 of 4"):
        node.extract(_frames(4, black=(0, 3)), *args, max_missing_share=0.49)


def test_gpu_fallback_warning_is_shown_on_the_extract_node(onnx_files, monkeypatch):
    """A requested GPU provider that the session does not get: the runtime's warning goes to the node, every run."""
    from steadydancer_turbo.dwpose import runtime
    msgs = []
    monkeypatch.setattr(pack.nodes.comfy_bridge, "node_message", lambda nid, t: msgs.append((nid, t)))
    real = runtime._ort()

    class FakeSession:
        def __init__(self, model, sess_options=None, providers=None):
            self._s = real.InferenceSession(model, sess_options=sess_options, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return ["CPUExecutionProvider"]          # what ORT reports when it dropped CUDA

        def __getattr__(self, name):
            return getattr(self._s, name)

    class FakeOrt:
        def __getattr__(self, name):
            return getattr(real, name)

        InferenceSession = FakeSession

        @staticmethod
        def get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.setattr(runtime, "_ort", lambda: FakeOrt())
    runtime.clear_session_cache()
    pack.nodes.pose_nodes._PIPELINES.clear()
    try:
        node = pack.NODE_CLASS_MAPPINGS["SteadyDancerPoseExtract"]()
        for run in range(2):
            msgs.clear()
            node.extract(_frames(1), str(onnx_files / "det.onnx"), str(onnx_files / "pose.onnx"), True, True, False,
                         0, 0, "cuda", unique_id="9")
            warn = [t for nid, t in msgs if nid == "9" and "requested CUDAExecutionProvider" in t]
            assert len(warn) == 2, (run, msgs)       # detector and pose model, on the first and the cached run
            assert "CPUExecutionProvider" in warn[0]
    finally:
        runtime.clear_session_cache()
        pack.nodes.pose_nodes._PIPELINES.clear()


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
    torch.testing.assert_close(ref, pack.nodes.frames.resize_images(ref_img, 32, 48, fit))
    # the same person drives itself: retargeting is the identity, then the canvas fit moves every point
    nx, ny = NECK_UV["neck"]
    for f in aligned:
        assert (f["canvas_width"], f["canvas_height"]) == (32, 48)
        body = np.array(f["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
        # normalized to the 32x48 canvas
        np.testing.assert_allclose(body[1, :2] * (32, 48), expect(nx, ny), atol=0.05)
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


def test_extract_rechecks_the_model_files_on_every_run(onnx_files, tmp_path, monkeypatch):
    # the sessions stay cached, but a file deleted since the last run is reported (file, folder, download link)
    # instead of silently running from the cached session
    folder = tmp_path / "dwpose"
    folder.mkdir()
    for src, name in (("det.onnx", "yolox_l.onnx"), ("pose.onnx", "dw-ll_ucoco_384.onnx")):
        (folder / name).write_bytes((onnx_files / src).read_bytes())
    monkeypatch.setattr(pack.nodes.comfy_bridge, "get_folder_paths", lambda kind: [str(folder)])
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerPoseExtract"]()
    args = (True, False, False, 0, 0, "cpu")
    poses, _ = node.extract(_frames(1), "yolox_l.onnx", "dw-ll_ucoco_384.onnx", *args)
    assert poses[0]["people"]
    (folder / "yolox_l.onnx").unlink()
    D = importlib.import_module("steadydancer_turbo.dwpose")
    with pytest.raises(D.ModelNotFoundError) as e:
        node.extract(_frames(1), "yolox_l.onnx", "dw-ll_ucoco_384.onnx", *args)
    msg = str(e.value)
    assert "'yolox_l.onnx' not found" in msg and str(folder) in msg
    assert "https://huggingface.co/yzd-v/DWPose/resolve/main/yolox_l.onnx" in msg


def test_switching_model_files_releases_the_previous_sessions(onnx_files, tmp_path, monkeypatch):
    # the node keeps one pipeline; the ONNX Runtime sessions of the one it replaces must be freed, not kept
    # alive by the runtime's session cache (an ORT session on CUDA holds its own GPU memory arena)
    import gc
    import weakref
    folder = tmp_path / "dwpose"
    folder.mkdir()
    for src, name in (("det.onnx", "yolox_l.onnx"), ("pose.onnx", "dw-ll_ucoco_384.onnx"),
                      ("pose.onnx", "other_pose.onnx")):
        (folder / name).write_bytes((onnx_files / src).read_bytes())
    monkeypatch.setattr(pack.nodes.comfy_bridge, "get_folder_paths", lambda kind: [str(folder)])
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerPoseExtract"]()
    args = (True, False, False, 0, 0, "cpu")
    node.extract(_frames(1), "yolox_l.onnx", "dw-ll_ucoco_384.onnx", *args)
    (first,) = pack.nodes.pose_nodes._PIPELINES.values()
    old_pose = weakref.ref(first.estimator.info.session)
    del first
    poses, _ = node.extract(_frames(1), "yolox_l.onnx", "other_pose.onnx", *args)
    assert poses[0]["people"]
    gc.collect()
    assert old_pose() is None


def _comfy_type_name(cls):
    """How ComfyUI's execution.full_type_name prints an exception class (module + qualname)."""
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def test_pack_exceptions_have_readable_names_when_loaded_like_comfyui(tmp_path, monkeypatch):
    # ComfyUI imports a custom node folder under its path ("/.../custom_nodes/ComfyUI-SteadyDancer-Turbo"), so
    # a class's default __module__ would print that whole path in the error dialog
    import importlib.util
    import pathlib
    root = pathlib.Path(pack.__file__).resolve().parent
    name = f"{tmp_path}/custom_nodes/ComfyUI-SteadyDancer-Turbo.dwpose.models"
    spec = importlib.util.spec_from_file_location(name, root / "dwpose" / "models.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, mod)            # as ComfyUI's load_custom_node does
    spec.loader.exec_module(mod)
    with pytest.raises(mod.ModelNotFoundError) as e:
        mod.find_model_file("yolox_l.onnx", [str(tmp_path)])
    assert _comfy_type_name(type(e.value)) == "steadydancer_turbo.dwpose.ModelNotFoundError"
    # and each such name is where the class really lives in the package
    from steadydancer_turbo.dwpose.models import ModelNotFoundError
    from steadydancer_turbo.steadydancer.checkpoints import CheckpointError
    from steadydancer_turbo.steadydancer.model.config import NotSteadyDancerError
    for cls in (ModelNotFoundError, CheckpointError, NotSteadyDancerError):
        m, _, q = _comfy_type_name(cls).rpartition(".")
        assert m.startswith("steadydancer_turbo.") and getattr(importlib.import_module(m), q) is cls


def test_retarget_applies_steadydancer_keypoint_threshold(onnx_files):
    """The official preprocessing drops keypoints scoring below 0.35 (DWPose's own default is 0.3): a point at
    0.32 reaches the node as a real confidence and is left out of the aligned poses; one at 0.40 is kept."""
    import copy
    ext = pack.NODE_CLASS_MAPPINGS["SteadyDancerPoseExtract"]()
    poses, _ = ext.extract(_frames(2), str(onnx_files / "det.onnx"), str(onnx_files / "pose.onnx"),
                           True, True, False, 0, 0, "cpu")
    body = np.array(poses[1]["people"][0]["pose_keypoints_2d"]).reshape(18, 3)
    j = int(np.flatnonzero((body[:, 2] > 0) & (np.arange(18) != 1))[-1])  # a present joint other than the neck
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerPoseRetarget"]()
    ref_img = torch.zeros(1, SRC_H, SRC_W, 3)
    kept = {}
    for c in (0.32, 0.40):
        drv = copy.deepcopy(poses)
        drv[1]["people"][0]["pose_keypoints_2d"][3 * j + 2] = c
        aligned = node.retarget(drv, poses[:1], ref_img, 48, 64, "stretch", True, True, False, "openpose", 0)[3]
        kept[c] = np.array(aligned[1]["people"][0]["pose_keypoints_2d"]).reshape(18, 3)[j, 2]
    assert kept[0.32] == 0.0
    assert kept[0.40] == pytest.approx(0.40)


def test_drawn_frames_become_images_without_float_temporaries_and_with_the_same_numbers():
    """Pose videos are drawn as uint8 and converted once in torch (nodes/pose_nodes._to_image): bit-identical to
    the former numpy ``astype(float32) / 255.0`` for every byte value; float32 frames are wrapped, not copied."""
    import numpy as np
    from steadydancer_turbo.nodes.pose_nodes import _to_image
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    img = _to_image(u8)
    assert img.dtype == torch.float32 and img.shape == (1, 16, 16, 3) and img.is_contiguous()
    assert np.array_equal(img.numpy().view(np.uint32), (u8.astype(np.float32) / 255.0).view(np.uint32))
    f32 = np.random.default_rng(0).random((2, 4, 5, 3), dtype=np.float32)
    assert np.shares_memory(_to_image(f32).numpy(), f32)


def _node_video_poses(W, H, n):
    """POSE_KEYPOINT frames of a moving whole-body figure (the render tests' dancer) and a larger reference."""
    from _pose_fixtures import dancer
    from steadydancer_turbo.dwpose import keypoints
    drv = [keypoints.to_pose_keypoint(keypoints.FramePose(W, H, [dancer(i / 9, W / H)]), True, True, True)
           for i in range(n)]
    ref = keypoints.to_pose_keypoint(keypoints.FramePose(W, H, [dancer(0.0, W / H, s=1.2, cy=0.5)]), True, True, True)
    return drv, [ref]


@pytest.mark.parametrize("W,H,fit,colors,face", [(208, 128, "crop", "steadydancer", False),
                                                  (96, 160, "pad", "openpose", True)])
def test_retarget_videos_are_bit_identical_to_the_per_frame_recipe(W, H, fit, colors, face):
    """The node's pose and negative pose videos against the plain recipe (whole 2x canvas, array swap, whole-frame
    PIL bicubic, uint8 -> float32 in torch as the node used to convert), fixed negative seed."""
    import test_dwpose_render as R
    from PIL import Image
    from steadydancer_turbo.dwpose import keypoints, retarget
    drv, ref = _node_video_poses(W, H, 7)
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerPoseRetarget"]()
    ref_img = torch.zeros(1, H, W, 3)
    _, pos, neg, _ = node.retarget(drv, ref, ref_img, W, H, fit, True, True, face, colors, 77)

    r = keypoints.from_pose_keypoint(ref[0])
    aligned = retarget.align_poses(r, [keypoints.from_pose_keypoint(d) for d in drv], threshold=R.THR)
    negative = retarget.negative_poses(aligned, seed=77, threshold=R.THR)
    for got, poses in ((pos, aligned), (neg, negative)):
        poses = pack.nodes.pose_nodes.refit_poses(poses, W, H, fit)
        want = np.zeros((len(poses), H, W, 3), np.uint8)
        for i, p in enumerate(poses):
            img = R.D.draw_pose(p, 2 * W, 2 * H, body=True, hands=True, face=face, threshold=R.THR)
            if colors == "steadydancer":
                img = np.ascontiguousarray(img[..., ::-1])
            want[i] = np.asarray(Image.fromarray(img).resize((W, H), Image.Resampling.BICUBIC))
        want = torch.from_numpy(want).to(torch.float32).div_(255.0)
        assert got.dtype == torch.float32 and got.shape == want.shape and want.max() > 0.5
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_retarget_progress_covers_both_videos_and_an_interrupt_stops_it(monkeypatch):
    drv, ref = _node_video_poses(64, 48, 20)
    cbm = pack.nodes.comfy_bridge
    bars = []

    class Bar:
        def __init__(self, total):
            self.total, self.values = total, []
            bars.append(self)

        def update_absolute(self, value, preview=None):
            self.values.append(value)

    monkeypatch.setattr(cbm, "Progress", Bar)
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerPoseRetarget"]()
    args = (drv, ref, torch.zeros(1, 48, 64, 3), 64, 48, "crop", True, True, False, "steadydancer", 0)
    node.retarget(*args)
    (bar,) = bars
    assert bar.total == 40 and bar.values == [8, 16, 20, 28, 36, 40]

    class Interrupted(Exception):
        pass

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) > 3:
            raise Interrupted

    monkeypatch.setattr(cbm, "check_interrupt", interrupt)
    bars.clear()
    with pytest.raises(Interrupted):
        node.retarget(*args)
    assert bars[0].values[-1] < 40  # stopped within the drawing, not after it
