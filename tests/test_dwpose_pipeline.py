"""End-to-end extraction with tiny ONNX models that have the real models' I/O names, shapes and dtypes.

Planted detector boxes and SimCC peaks are written by hand (tests/dwpose_onnx_models.py) and the expected
frame coordinates are computed here with the published top-down geometry (box * 1.25, aspect 0.75,
p = u / (288, 384) * scale + centre - scale / 2), independent of the code under test.
"""
import logging
import warnings

import numpy as np
import onnxruntime as ort
import pytest

import dwpose_onnx_models as M
from steadydancer_turbo import dwpose as D
from steadydancer_turbo.dwpose import runtime

COCO_OF_OPENPOSE = [0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]


def _expected_image_points(box, u, wh=(288, 384)):
    x1, y1, x2, y2 = box
    c = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    sw, sh = (x2 - x1) * 1.25, (y2 - y1) * 1.25
    if sw > sh * wh[0] / wh[1]:
        sh = sw * wh[1] / wh[0]
    else:
        sw = sh * wh[0] / wh[1]
    s = np.array([sw, sh])
    return u / np.array(wh) * s + c - s / 2


def _frame_with_gate(h, w):
    f = np.zeros((h, w, 3), np.uint8)
    f[0:6, 0:6] = 255  # makes the gated detector fire; far from every person box below
    return f


def _planted_scene(h, w):
    """Boxes (frame px) chosen relative to the frame so both orientations work."""
    A = np.array([0.20 * w, 0.15 * h, 0.45 * w, 0.80 * h])
    B = np.array([0.60 * w + 0.3, 0.30 * h + 0.7, 0.85 * w, 0.95 * h])
    dup = A + [3, 2, 3, 1]  # IoU with A > 0.45 and lower score -> suppressed
    low = np.array([0.50 * w, 0.05 * h, 0.60 * w, 0.25 * h])  # score 0.25 -> not a person
    cat = np.array([0.05 * w, 0.50 * h, 0.15 * w, 0.70 * h])  # class 3 -> ignored
    r = min(640 / h, 640 / w)
    boxes = [A, B, dup, low, cat]
    obj = [0.9, 0.8, 0.8, 0.5, 0.95]
    cls = [np.eye(80)[0] * p for p in (0.9, 0.7, 0.6, 0.5)] + [np.eye(80)[3] * 0.9]
    raw = M.yolox_raw([b * r for b in boxes], obj, cls)
    return raw, [(A, 0.81), (B, 0.56)]


def _planted_simcc(rng, k=133):
    ix = rng.integers(0, 576, k)
    iy = rng.integers(0, 768, k)
    conf = rng.uniform(0.35, 0.95, k)
    conf[[3, 40, 100]] = 0.1  # below the 0.3 threshold
    sx = np.full((k, 576), -0.5, np.float32)
    sy = np.full((k, 768), -0.5, np.float32)
    sx[np.arange(k), ix] = 1.0
    sy[np.arange(k), iy] = conf
    return sx, sy, np.stack([ix, iy], 1) / 2.0, conf


@pytest.mark.parametrize("h,w", [(481, 833), (833, 481), (367, 367)])
@pytest.mark.parametrize("det_batch,pose_batch", [(1, None), (None, 5)])
def test_planted_boxes_and_keypoints_recovered(h, w, det_batch, pose_batch):
    rng = np.random.default_rng(h * 7 + w)
    raw, people = _planted_scene(h, w)
    sx, sy, u, conf = _planted_simcc(rng)
    det = M.gated_detector(raw, batch=det_batch)
    pose = M.planted_pose(sx, sy, batch=pose_batch)
    dw = D.DWPose(det, pose, providers="cpu")
    assert dw.estimator.input_wh == (288, 384)
    frames = np.stack([_frame_with_gate(h, w)] * 3)
    out = dw(frames, all_people=True)
    assert len(out) == 3
    for fp in out:
        assert (fp.width, fp.height) == (w, h)
        assert len(fp.people) == 2
        for person, (box, score) in zip(fp.people, people):
            np.testing.assert_allclose(person.bbox, box, atol=0.5)
            assert person.score == pytest.approx(score, abs=1e-5)
            exp = _expected_image_points(box, u)
            for i, c in enumerate(COCO_OF_OPENPOSE):
                if c is None:
                    continue
                got = person.body[i, :2] * [w, h]
                assert np.abs(got - exp[c]).max() <= 0.5
                assert person.body[i, 2] == pytest.approx(min(1.0, conf[c]), abs=1e-6)
            np.testing.assert_allclose(person.left_hand[:, :2] * [w, h], exp[91:112], atol=0.5)
            np.testing.assert_allclose(person.right_hand[:, :2] * [w, h], exp[112:133], atol=0.5)
            np.testing.assert_allclose(person.face[:, :2] * [w, h], exp[23:91], atol=0.5)
            assert not D.present(person.body)[[OP for OP, c in enumerate(COCO_OF_OPENPOSE) if c == 3]].any()
    # default: only the most significant (highest-score) person
    single = dw(frames[:1])
    assert len(single[0].people) == 1 and single[0].people[0].score == pytest.approx(0.81, abs=1e-5)


@pytest.mark.parametrize("h,w", [(481, 833), (833, 481)])
def test_reading_pose_model_finds_the_spot(h, w):
    """The pose model reads the crop: a bright pixel decodes back to its frame position within 0.5 px."""
    A = np.array([0.3 * w, 0.3 * h, 0.3 * w + 150, 0.3 * h + 250])  # crop scale k > 1
    r = min(640 / h, 640 / w)
    raw = M.yolox_raw([A * r], [0.9], [np.eye(80)[0] * 0.9])
    dw = D.DWPose(M.gated_detector(raw), M.reading_pose(), providers="cpu")
    rng = np.random.default_rng(3)
    frames, spots = [], []
    for _ in range(4):
        f = _frame_with_gate(h, w)
        px, py = int(rng.uniform(A[0] + 5, A[2] - 5)), int(rng.uniform(A[1] + 5, A[3] - 5))
        f[py, px] = 255
        frames.append(f)
        spots.append((px, py))
    for fp, (px, py) in zip(dw(np.stack(frames)), spots):
        nose = fp.people[0].body[0]
        assert abs(nose[0] * w - px) <= 0.5 and abs(nose[1] * h - py) <= 0.5
        assert nose[2] > 4 - 103.53 / 57.375  # real confidence: above the black level of the model's maps


def test_81_frame_clip_reuses_sessions_and_reports_missing_frames(caplog):
    h, w = 480, 832
    A = np.array([300.0, 100.0, 450.0, 350.0])
    r = min(640 / h, 640 / w)
    raw = M.yolox_raw([A * r], [0.9], [np.eye(80)[0] * 0.9])
    det, pose = M.gated_detector(raw), M.reading_pose()
    dw = D.DWPose(det, pose, providers="cpu")
    created = D.session_creations()
    assert dw.providers == {"detector": "CPUExecutionProvider", "pose": "CPUExecutionProvider"}
    frames = np.zeros((81, h, w, 3), np.uint8)
    spots = {}
    for t in range(81):
        if t in (10, 40, 41):
            continue  # no person: black frame
        frames[t, 0:6, 0:6] = 255
        px, py = 310 + t, 120 + 2 * t
        frames[t, py, px] = 255
        spots[t] = (px, py)
    with warnings.catch_warnings(record=True) as rec, caplog.at_level(logging.INFO, "steadydancer_turbo.dwpose"):
        warnings.simplefilter("always")
        out = dw(frames)
    assert D.session_creations() == created  # nothing re-created per frame
    msgs = [m for m in _warnings_shown(rec, caplog) if "no person" in m]
    assert len(msgs) == 1 and "3 of 81" in msgs[0] and "10, 40, 41" in msgs[0]
    assert dw.last_missing == [10, 40, 41]
    for t, fp in enumerate(out):
        if t in spots:
            nose = fp.people[0].body[0]
            assert abs(nose[0] * w - spots[t][0]) <= 0.5 and abs(nose[1] * h - spots[t][1]) <= 0.5
        else:
            assert fp.people == []
    # a second DWPose on the same files reuses the cached sessions
    D.DWPose(det, pose, providers="cpu")
    assert D.session_creations() == created
    rendered = D.render_poses(out, w, h)
    assert rendered.shape == (81, h, w, 3) and rendered[10].max() == 0 and rendered[11].max() > 0
    # float input (ComfyUI IMAGE as NumPy) gives the same result
    out_f = dw(frames[:12].astype(np.float32) / 255.0, warn_missing=False)
    np.testing.assert_allclose(out_f[11].people[0].body, out[11].people[0].body)


def _warnings_shown(rec, caplog):
    """Every warning a user sees: Python warnings plus WARNING log records (ComfyUI prints both)."""
    return ([str(x.message) for x in rec if issubclass(x.category, RuntimeWarning)]
            + [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING])


def test_gpu_fallback_is_loud_and_explained_once(caplog):
    model = M.reading_pose(k=3)
    runtime.clear_session_cache()
    with warnings.catch_warnings(record=True) as rec, caplog.at_level(logging.INFO, "steadydancer_turbo.dwpose"):
        warnings.simplefilter("always")
        info = runtime.get_session(model, "auto")
    shown = _warnings_shown(rec, caplog)
    requested = runtime.default_providers()
    if requested[0] == "CUDAExecutionProvider" and info.provider != "CUDAExecutionProvider":
        assert len(shown) == 1, shown             # once: not a RuntimeWarning and a log line with the same text
        assert "requested CUDAExecutionProvider" in shown[0] and "CPUExecutionProvider" in shown[0]
        assert "Why:" in shown[0] and len(shown[0].split("Why:")[1].strip()) > 20
    else:  # CPU-only build, or a working GPU: nothing to warn about
        assert info.provider == requested[0]
        assert not shown
    assert info.provider in ort.get_available_providers()


def test_fallback_reason_for_cpu_only_package(monkeypatch):
    monkeypatch.setattr(runtime, "available_providers", lambda: ["CPUExecutionProvider"])
    why = runtime.explain_gpu_fallback(["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"])
    assert "does not include CUDAExecutionProvider" in why and "onnxruntime-gpu" in why
    assert runtime.default_providers() == ["CPUExecutionProvider"]


def test_no_person_anywhere_never_crashes(caplog):
    raw = M.yolox_raw([np.array([10.0, 10.0, 100.0, 200.0])], [0.9], [np.eye(80)[0] * 0.9])
    dw = D.DWPose(M.gated_detector(raw), M.reading_pose(), providers="cpu")
    with warnings.catch_warnings(record=True) as rec, caplog.at_level(logging.INFO, "steadydancer_turbo.dwpose"):
        warnings.simplefilter("always")
        out = dw(np.zeros((2, 99, 101, 3), np.uint8))
    shown = _warnings_shown(rec, caplog)
    assert len(shown) == 1 and "no person detected in 2 of 2" in shown[0], shown
    assert [len(f.people) for f in out] == [0, 0]
    assert D.to_pose_keypoint(out[0]) == {"people": [], "canvas_height": 99, "canvas_width": 101}
    assert D.render_poses(out, 101, 99).max() == 0


def test_session_that_throws_on_gpu_retries_on_cpu(monkeypatch, caplog):
    real = ort.InferenceSession
    calls = []

    def fake(model, sess_options=None, providers=None):
        calls.append([p[0] if isinstance(p, tuple) else p for p in providers])
        if "CUDAExecutionProvider" in calls[-1]:
            raise RuntimeError("CUDA failure 999: unknown error")
        return real(model, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", fake)
    runtime.clear_session_cache()
    with warnings.catch_warnings(record=True) as rec, caplog.at_level(logging.INFO, "steadydancer_turbo.dwpose"):
        warnings.simplefilter("always")
        info = runtime.get_session(M.reading_pose(k=2), "cuda")
    shown = _warnings_shown(rec, caplog)
    assert len(shown) == 1 and "CUDA failure 999" in shown[0] and "retrying with CPUExecutionProvider" in shown[0]
    assert info.provider == "CPUExecutionProvider" and calls[-1] == ["CPUExecutionProvider"]
    runtime.clear_session_cache()
