"""Long-video node layer: the colour-drift guard (steadydancer/sampling/colour_guard.py) against float64 statistics computed
by hand (numpy), the Context Windows node, and the length limits of the nodes that set the frame count."""
from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from steadydancer_turbo.steadydancer.sampling import context_windows as cw
from steadydancer_turbo.steadydancer.sampling.colour_guard import colour_guard

pack = importlib.import_module("steadydancer_turbo")


def _video(n, seed=0, drift=0.0):
    g = torch.Generator().manual_seed(seed)
    v = torch.rand(n, 6, 5, 3, generator=g) * 0.5 + 0.2
    ramp = torch.linspace(0, 1, n).view(n, 1, 1, 1)
    return (v + drift * ramp * torch.tensor([0.2, -0.1, 0.05])).clamp(0, 1)


def _affine(x, ref, strength=1.0):
    """Reinhard per-channel transfer of the frames x (numpy float64) onto ref's mean/std."""
    m, s = x.reshape(-1, 3).mean(0), x.reshape(-1, 3).std(0)
    rm, rs = ref.reshape(-1, 3).mean(0), ref.reshape(-1, 3).std(0)
    a = np.clip(rs / s, 0.5, 2.0)
    b = rm - a * m
    return 1 + strength * (a - 1), strength * b


def test_one_window_matches_the_reference_statistics_by_hand():
    frames, ref = _video(9), torch.rand(1, 7, 4, 3, generator=torch.Generator().manual_seed(3)) * 0.4 + 0.3
    out = colour_guard(frames, ref, None, 1.0)
    a, b = _affine(frames.double().numpy(), ref.double().numpy())
    expect = np.clip(frames.double().numpy() * a + b, 0, 1)
    np.testing.assert_allclose(out.numpy(), expect, rtol=0, atol=1e-6)
    half = colour_guard(frames, ref, None, 0.5)
    a, b = _affine(frames.double().numpy(), ref.double().numpy(), 0.5)
    np.testing.assert_allclose(half.numpy(), np.clip(frames.double().numpy() * a + b, 0, 1), rtol=0, atol=1e-6)


def test_windows_get_their_own_correction_blended_with_the_fusion_weights():
    opt = cw.ContextOptions(window=3, overlap=1)            # 25 frames = 7 latent -> (0,3) (2,5) (4,7)
    frames = _video(25, drift=1.0)
    ref = _video(1, seed=5)
    out = colour_guard(frames, ref, opt, 1.0).double().numpy()
    x = frames.double().numpy()
    wins = [(0, 3), (2, 5), (4, 7)]
    assert opt.windows(7) == wins
    px = [(0, 9), (5, 17), (13, 25)]                        # pixel frames of each latent window
    assert cw.pixel_ranges(wins) == px
    A = np.zeros((25, 3))
    B = np.zeros((25, 3))
    # latent overlap frames 2 and 4 are shared by two windows with weight 1/2 each (o = 1: ramp 1/2)
    for k, (ps, pe) in enumerate(px):
        a, b = _affine(x[ps:pe], ref.double().numpy())
        for f in range(ps, pe):
            lat = 0 if f == 0 else (f + 3) // 4
            shared = lat in (2, 4) and (k, lat) in ((0, 2), (1, 2), (1, 4), (2, 4))
            w = 0.5 if shared else 1.0
            A[f] += w * a
            B[f] += w * b
    expect = np.clip(x * A[:, None, None, :] + B[:, None, None, :], 0, 1)
    np.testing.assert_allclose(out, expect, rtol=0, atol=1e-6)
    # the drift is gone: every window's mean colour is close to the reference's
    for ps, pe in px:
        np.testing.assert_allclose(out[ps:pe].reshape(-1, 3).mean(0), ref.double().numpy().reshape(-1, 3).mean(0),
                                   atol=0.03)


def test_strength_zero_and_bad_inputs():
    frames, ref = _video(9), _video(1)
    assert colour_guard(frames, ref, None, 0.0) is frames or torch.equal(colour_guard(frames, ref, None, 0.0), frames)
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerColourGuard"]()
    assert node.apply(frames, ref, 0.0)[0] is frames        # off: the input passes through untouched
    with pytest.raises(ValueError, match="4n\\+1"):
        colour_guard(_video(10), ref, None, 1.0)
    with pytest.raises(ValueError, match="strength"):
        colour_guard(frames, ref, None, 1.5)
    before = frames.clone()
    node.apply(frames, ref, 1.0)
    assert torch.equal(frames, before)                      # the input tensor is never modified


def test_context_node_converts_pixel_frames_and_notes_adjustments(monkeypatch):
    cb = importlib.import_module("steadydancer_turbo.nodes.comfy_bridge")
    notes = []
    monkeypatch.setattr(cb, "node_message", lambda nid, text: notes.append(text))
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerContextOptions"]()
    (opt,) = node.build(81, 16, "cosine", "independent", 4, unique_id="7")
    assert (opt.window, opt.overlap, opt.fusion, opt.noise, opt.anchor) == (21, 4, "cosine", "independent", 1)
    assert notes == []
    (opt,) = node.build(82, 17, "linear", "freenoise", 0, unique_id="7")
    assert (opt.window, opt.overlap) == (21, 4) and len(notes) == 2
    with pytest.raises(ValueError, match="smaller than the window"):
        node.build(17, 20, "linear", "freenoise", 0)
    with pytest.raises(ValueError, match="anchor"):
        node.build(81, 8, "linear", "freenoise", 12)


def test_frame_count_nodes_accept_30_seconds_and_adjust_non_4n_plus_1():
    from steadydancer_turbo.nodes.frames import adjust_length

    resample = pack.NODE_CLASS_MAPPINGS["SteadyDancerResampleFrames"].INPUT_TYPES()["required"]["max_frames"][1]
    length = pack.NODE_CLASS_MAPPINGS["SteadyDancerConditioning"].INPUT_TYPES()["required"]["length"][1]
    assert resample["max"] >= 481 and length["max"] >= 481
    assert adjust_length(481) == (481, None)
    n, note = adjust_length(483)
    assert n == 481 and "483" in note and "481" in note
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerResampleFrames"]()
    images = torch.zeros(500, 2, 2, 3)
    out, fps, count = node.resample(images, 16.0, 16.0, 0, True)
    assert count == 497 and out.shape[0] == 497


class _FakePatcher:
    """What the node uses of a ComfyUI ModelPatcher: clone() with its own model_options (ComfyUI deep-copies them)."""

    def __init__(self, steadydancer=True, options=None):
        self.model = type("M", (), {"is_steadydancer": steadydancer})()
        self.model_options = options or {"transformer_options": {"other": 1}}

    def clone(self):
        import copy
        return _FakePatcher(self.model.is_steadydancer, copy.deepcopy(self.model_options))


def test_context_windows_on_model_node_sets_the_options_on_a_clone():
    """The DiT call reads them from transformer_options (nodes/native_model.py; the windowed run itself is checked
    in real ComfyUI: tests/integration/test_comfyui_native.py); the input MODEL is left as it was."""
    from steadydancer_turbo.nodes import native_model as nm
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerApplyContextWindows"]()
    opts = cw.ContextOptions(window=3, overlap=1)
    base = _FakePatcher()
    (m,) = node.apply(base, opts)
    assert m is not base and nm.context_of(m.model_options) is opts
    assert m.model_options["transformer_options"]["other"] == 1           # other options kept
    assert nm.context_of(base.model_options) is None
    with pytest.raises(ValueError, match="SteadyDancer Model Loader"):
        node.apply(_FakePatcher(steadydancer=False), opts)
