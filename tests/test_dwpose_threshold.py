"""The keypoint threshold and presence rule, against the reference rules written out by hand.

comfyui_controlnet_aux (``Wholebody.format_result``): a body / hand / face keypoint is kept when
``score >= 0.3``; the inserted neck gets the flag ``shoulder5 > 0.3 and shoulder6 > 0.3``.
Official SteadyDancer preprocessing (preprocess/pose/script/dwpose.py, threshold 0.35): hands / face are
invisible when ``score < 0.35`` (so exactly 0.35 is visible), body joints are kept when ``score > 0.35``.
Model scores are float32, which can never equal the float64 thresholds 0.3 / 0.35 exactly, so the two reference
rules only differ on hand-made ties; at a tie this pack follows controlnet_aux (``>=``) for every part.
"""
import numpy as np
import pytest

from steadydancer_turbo import dwpose as D


def _controlnet_aux_keeps(score):
    return score >= 0.3


CONFS = [0.0, 0.1, 0.29, 0.2999999, 0.3, 0.3000001, 0.31, 0.35, 0.39, 0.3999, 0.4, 0.5, 0.9, 1.0]


def test_default_threshold_is_controlnet_aux_0_3():
    assert D.KEYPOINT_THRESHOLD == 0.3


@pytest.mark.parametrize("part,n", [("body", 18), ("hand", 21), ("face", 68)])
def test_presence_matches_controlnet_aux_rule_at_and_around_the_threshold(part, n):
    rng = np.random.default_rng(n)
    pts = np.column_stack([rng.uniform(0.05, 0.95, (n, 2)), rng.choice(CONFS, n)])
    pts[: len(CONFS), 2] = CONFS[:n]                        # every value at least once (the face gets all)
    want = np.array([_controlnet_aux_keeps(c) for c in pts[:, 2]])
    np.testing.assert_array_equal(D.present(pts), want)    # default threshold
    np.testing.assert_array_equal(D.present(pts, 0.3), want)


def test_exactly_at_the_threshold_is_present_for_any_threshold():
    for thr in (0.3, 0.35, 0.5):
        pts = np.array([[0.5, 0.5, thr], [0.5, 0.5, np.nextafter(thr, 0)], [0.5, 0.5, np.nextafter(thr, 1)]])
        assert D.present(pts, thr).tolist() == [True, False, True]


def test_non_finite_points_are_never_present():
    pts = np.array([[np.nan, 0.5, 0.9], [0.5, np.inf, 0.9], [0.5, 0.5, np.nan], [0.5, 0.5, 0.9]])
    assert D.present(pts).tolist() == [False, False, False, True]


def test_pose_keypoint_json_keeps_points_at_0_3_and_drops_below():
    """POSE_KEYPOINT (controlnet_aux layout): a point below 0.3 is written 0, 0, 0; at 0.3 it is kept."""
    body = np.zeros((18, 3))
    body[:6] = [[0.1, 0.2, 0.3], [0.2, 0.2, 0.2999], [0.3, 0.2, 0.35], [0.4, 0.2, 0.39], [0.5, 0.2, 0.41],
                [0.6, 0.2, 0.05]]
    hand = np.zeros((21, 3))
    hand[0], hand[1] = (0.7, 0.7, 0.3), (0.8, 0.8, 0.2999)
    frame = D.FramePose(100, 50, [D.Person(body=body, left_hand=hand)])
    d = D.to_pose_keypoint(frame, normalized=False)
    p = d["people"][0]
    triples = np.asarray(p["pose_keypoints_2d"]).reshape(18, 3)[:6]
    want = [[10, 10, 0.3], [0, 0, 0], [30, 10, 0.35], [40, 10, 0.39], [50, 10, 0.41], [0, 0, 0]]
    np.testing.assert_allclose(triples, want, atol=1e-9)
    lh = np.asarray(p["hand_left_keypoints_2d"]).reshape(21, 3)
    np.testing.assert_allclose(lh[:2], [[70, 35, 0.3], [0, 0, 0]], atol=1e-9)
    assert p["hand_right_keypoints_2d"] is None            # no point present -> None, as controlnet_aux


def test_drawing_follows_the_threshold():
    """A limb is drawn when both ends pass; a hand point when it passes (controlnet_aux draws what it kept)."""
    W = H = 200

    def canvas(c_shoulder, c_hand):
        body = np.zeros((18, 3))
        body[1] = (0.5, 0.3, 0.9)                           # neck
        body[2] = (0.2, 0.3, c_shoulder)                    # right shoulder: limb (1, 2) is red 153, 0, 0
        hand = np.zeros((21, 3))
        hand[0] = (0.8, 0.8, c_hand)
        return D.draw_pose(D.Person(body=body, right_hand=hand), W, H, body=True, hands=True)

    limb_px, hand_px = (60, int(0.35 * W)), (int(0.8 * H), int(0.8 * W))
    for c in (0.3, 0.35, 0.39):
        img = canvas(c, c)
        assert tuple(img[limb_px]) == (153, 0, 0), c
        assert tuple(img[hand_px]) == (0, 0, 255), c
    img = canvas(0.2999, 0.2999)
    assert tuple(img[limb_px]) == (0, 0, 0) and tuple(img[hand_px]) == (0, 0, 0)


def test_neck_is_present_when_both_shoulders_pass_as_controlnet_aux():
    """controlnet_aux / SteadyDancer wholebody.py: neck flag = shoulder5 > 0.3 and shoulder6 > 0.3."""
    kp = np.random.default_rng(0).uniform(10, 90, (133, 2))
    for s5, s6 in [(0.31, 0.9), (0.9, 0.35), (0.29, 0.9), (0.9, 0.1), (0.5, 0.5)]:
        scores = np.full(133, 0.9)
        scores[5], scores[6] = s5, s6
        full = D.wholebody_to_openpose(kp, scores)
        assert bool(D.present(full[1:2])[0]) == (s5 > 0.3 and s6 > 0.3), (s5, s6)
        np.testing.assert_allclose(full[1, :2], kp[[5, 6]].mean(0))


def test_neck_at_the_steadydancer_threshold_follows_the_official_flag():
    """Official preprocess/pose/script: wholebody.py sets the neck score to the flag (s5 > 0.3 and s6 > 0.3), then
    dwpose.py keeps body joints with score > 0.35: a flag of 1 passes, so the neck is drawn when both shoulders
    are in (0.3, 0.35], although the shoulders themselves are not."""
    kp = np.random.default_rng(1).uniform(10, 90, (133, 2))
    scores = np.full(133, 0.9)
    scores[5] = scores[6] = 0.32
    full = D.wholebody_to_openpose(kp, scores)
    assert bool(D.present(full[1:2], D.STEADYDANCER_THRESHOLD)[0])
