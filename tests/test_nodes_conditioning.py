"""The conditioning node on ComfyUI-shaped inputs: every DiT tensor checked against an independent recomputation
(official semantics, ComfyUI's Wan21 latent normalization constants)."""
from __future__ import annotations

import importlib

import pytest
import torch

from test_nodes_support import FakeWanVAE, clip_vision_output, comfy_process_in, text_conditioning

pytest.importorskip("steadydancer_turbo.steadydancer.sampling.conditioning")
pack = importlib.import_module("steadydancer_turbo")


class Built:
    """The node's outputs, read back from the native CONDITIONING entries (keys of nodes/native_model.py)."""

    def __init__(self, out):
        from steadydancer_turbo.nodes import native_model as nm
        pos, neg, latent, self.w, self.h, self.length = out
        assert len(pos) == len(neg) == 1
        (self.context, p), (self.context_null, q) = pos[0], neg[0]
        for key in (nm.KEY_Y, nm.KEY_POSE, nm.KEY_REF_X, nm.KEY_REF_C):   # shared by both
            assert p[key] is q[key]
        self.y, self.cond_pos, self.ref_x, self.ref_c = p[nm.KEY_Y], p[nm.KEY_POSE], p[nm.KEY_REF_X], p[nm.KEY_REF_C]
        from steadydancer_turbo.nodes.conditioning_nodes import resolve_latent
        self.cond_neg = resolve_latent(p.get(nm.KEY_POSE_NEG))  # deferred: encoded here, as the guider does
        self.clip_fea = p["clip_vision_output"].penultimate_hidden_states
        self.clip_fea_c = p[nm.KEY_CLIP_POSE].penultimate_hidden_states
        self.latent = latent["samples"]
        self.cond = self  # the old bundle.cond spelling


def _cond_inputs(W=32, H=48, F=9, seed=0, neg=True, n_text=(7, 5)):
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(1, H, W, 3, generator=g)
    poses = torch.rand(F, H, W, 3, generator=g)
    negs = torch.rand(F, H, W, 3, generator=g) if neg else None
    return dict(positive=text_conditioning(n_text[0], 1), negative=text_conditioning(n_text[1], 2), vae=FakeWanVAE(3),
                clip_vision_reference=clip_vision_output(4), clip_vision_pose=clip_vision_output(5),
                reference_image=ref, pose_frames=poses, width=W, height=H, length=F, fit="crop",
                negative_pose_frames=negs)


def test_conditioning_node_builds_official_tensors():
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerConditioning"]()
    inp = _cond_inputs()
    c = bundle = Built(node.build(**inp))
    w, h, n = c.w, c.h, c.length
    vae = FakeWanVAE(3)  # same weights, fresh: expected values computed independently of the node
    ref, poses = inp["reference_image"], inp["pose_frames"]
    T, lh, lw = 3, 6, 4
    assert (w, h, n) == (32, 48, 9)
    # text: the real tokens of the 512-row ComfyUI conditioning, zero rows after them (the DiT's own padding)
    assert c.context.shape == c.context_null.shape == (1, 512, 4096)
    assert torch.equal(c.context[:, :7], inp["positive"][0][0][:, :7]) and c.context[:, 7:].abs().max() == 0
    assert torch.equal(c.context_null[:, :5], inp["negative"][0][0][:, :5]) and c.context_null[:, 5:].abs().max() == 0
    assert torch.equal(c.clip_fea, inp["clip_vision_reference"].penultimate_hidden_states)
    assert torch.equal(c.clip_fea_c, inp["clip_vision_pose"].penultimate_hidden_states)
    # y = cat(mask, latent(ref + gray frames)); mask 1 on latent frame 0 only
    assert c.y.shape == (1, 20, T, lh, lw)
    assert torch.equal(c.y[0, :4, 0], torch.ones(4, lh, lw)) and c.y[0, :4, 1:].abs().max() == 0
    clip = torch.cat([ref, torch.full((8, h, w, 3), 0.5)])
    torch.testing.assert_close(c.y[:, 4:].double(), comfy_process_in(vae.encode(clip)), rtol=1e-5, atol=1e-5)
    zr = comfy_process_in(vae.encode(ref))
    torch.testing.assert_close(c.ref_x.double(), torch.cat([zr, torch.ones(1, 4, 1, lh, lw, dtype=torch.float64), zr], 1),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.ref_c[:, :16].double(), comfy_process_in(vae.encode(poses[:1])), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.cond_pos.double(), comfy_process_in(vae.encode(poses)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c.cond_neg.double(), comfy_process_in(vae.encode(inp["negative_pose_frames"])),
                               rtol=1e-5, atol=1e-5)
    # the empty LATENT to sample into (all zeros: ComfyUI leaves a zero latent unnormalized)
    assert c.latent.shape == (1, 16, T, lh, lw) and c.latent.abs().max() == 0


def test_conditioning_node_adjusts_length_and_size():
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerConditioning"]()
    inp = _cond_inputs(F=11, neg=False)
    inp.update(length=81, width=40, height=50)  # 11 pose frames -> 9; 40x50 -> 48x48 (multiples of 16)
    bundle = Built(node.build(**inp))
    assert (bundle.w, bundle.h, bundle.length) == (48, 48, 9)
    assert bundle.cond.y.shape == (1, 20, 3, 6, 6) and bundle.cond.cond_neg is None


def test_conditioning_length_0_means_all_pose_frames(monkeypatch):
    """length 0 (the default) takes every pose frame Resample Frames made (13 -> 13, not a stale 9 or 81),
    rounded down to 4n+1; an explicit length still wins, capped by the pose frames with a note."""
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerConditioning"]()
    assert node.INPUT_TYPES()["required"]["length"][1]["default"] == 0
    notes = []
    monkeypatch.setattr(pack.nodes.conditioning_nodes.cb, "node_message", lambda nid, text: notes.append(text))
    for frames, length, expect in [(13, 0, 13), (15, 0, 13), (13, 9, 9), (13, 81, 13), (13, 10, 9)]:
        notes.clear()
        inp = _cond_inputs(F=frames, neg=False)
        inp["length"] = length
        bundle = Built(node.build(**inp))
        n = bundle.length
        assert n == expect == bundle.length, (frames, length)
        assert bundle.cond.cond_pos.shape[2] == (expect - 1) // 4 + 1
        assert bool(notes) == ((frames, length) in [(15, 0), (13, 81), (13, 10)]), (frames, length, notes)
    inp = _cond_inputs(F=13)  # negative pose frames: all of both
    inp["negative_pose_frames"] = inp["negative_pose_frames"][:9]
    inp["length"] = 0
    assert node.build(**inp)[5] == 9


def test_conditioning_node_cuts_long_text_to_512_and_rejects_wrong_encoders():
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerConditioning"]()
    inp = _cond_inputs()
    inp["positive"] = text_conditioning(600, 9)
    bundle = Built(node.build(**inp))
    assert bundle.context.shape == (1, 512, 4096)
    assert torch.equal(bundle.context, inp["positive"][0][0][:, :512])
    inp = _cond_inputs()
    inp["positive"] = [[torch.randn(1, 77, 768), {}]]
    with pytest.raises(ValueError, match="umt5"):
        node.build(**inp)
    inp = _cond_inputs()
    inp["clip_vision_pose"] = clip_vision_output(1, dim=1024)
    with pytest.raises(ValueError, match="clip_vision_h"):
        node.build(**inp)


def _guidance(pose, start=0.1, end=0.4, text=5.0):
    from steadydancer_turbo.steadydancer.sampling.official import Guidance
    return Guidance(text, pose, start, end)


def test_negative_poses_are_encoded_only_when_pose_guidance_runs():
    """The Conditioning node defers the negative-pose VAE encode; the guider's per-run cond sets
    (native_sampling.pose_conds_for_run, called by SteadyDancerGuider.sample before the DiT loads) encode them
    once when the schedule has a pose-guidance step, and drop the negative_pose set (no encode) when it has
    none. The encoded latent equals a direct encode of the resized negative frames (the old eager path)."""
    from steadydancer_turbo.nodes import native_model as nm
    from steadydancer_turbo.nodes.conditioning_nodes import DeferredLatent
    from steadydancer_turbo.nodes.native_sampling import pose_conds_for_run

    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerConditioning"]()
    inp = _cond_inputs(W=40, H=48)  # 40 wide: resized to 48 (the deferred frames are the resized ones)
    vae = inp["vae"]
    pos, neg, *_ = node.build(**inp)
    assert len(vae.encode_calls) == 4  # image clip, reference, first pose, pose video: no negative poses
    deferred = pos[0][1][nm.KEY_POSE_NEG]
    assert isinstance(deferred, DeferredLatent) and not deferred.encoded and neg[0][1][nm.KEY_POSE_NEG] is deferred
    assert deferred.shape == tuple(pos[0][1][nm.KEY_POSE].shape)
    def converted(c):  # what CFGGuider.inner_set_conds keeps (comfy.sampler_helpers.convert_cond)
        return [{**e[1], "cross_attn": e[0], "model_conds": {}} for e in c]

    conds = {"positive": converted(pos), "negative": converted(neg), nm.NEGATIVE_POSE: converted(pos)}

    # pose guidance off: scale 0, a window with no step in it (4 steps: 0, .25, .5, .75 vs (0.3, 0.45)), 0 steps
    for g, steps in [(_guidance(0.0), 40), (_guidance(1.0, 0.3, 0.45), 4), (_guidance(1.0, 0.4, 0.1), 40),
                     (_guidance(1.0), 0)]:
        run = pose_conds_for_run(conds, g, steps)
        assert sorted(run) == ["negative", "positive"], (g, steps)
    assert len(vae.encode_calls) == 4 and not deferred.encoded

    # pose guidance on (official defaults, 40 steps): encoded once, into the negative_pose set only
    run = pose_conds_for_run(conds, _guidance(1.0), 40)
    assert len(vae.encode_calls) == 5 and vae.encode_calls[-1] == (9, 48, 48, 3)
    z = run[nm.NEGATIVE_POSE][0][nm.KEY_POSE_NEG]
    from steadydancer_turbo.nodes.frames import resize_images
    want = comfy_process_in(FakeWanVAE(3).encode(resize_images(inp["negative_pose_frames"], 48, 48, "crop")))
    torch.testing.assert_close(z.double(), want, rtol=1e-5, atol=1e-5)
    assert conds[nm.NEGATIVE_POSE][0][nm.KEY_POSE_NEG] is deferred and pos[0][1][nm.KEY_POSE_NEG] is deferred
    run2 = pose_conds_for_run(conds, _guidance(2.0, 0.0, 1.0), 8)  # a second run (other guider): no re-encode
    assert run2[nm.NEGATIVE_POSE][0][nm.KEY_POSE_NEG] is z and len(vae.encode_calls) == 5


def test_turbo_graph_conditioning_never_encodes_negative_poses():
    """The turbo workflow connects no negative_pose_frames: four encodes, no negative-pose key at all."""
    from steadydancer_turbo.nodes import native_model as nm
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerConditioning"]()
    inp = _cond_inputs(neg=False)
    pos, neg, *_ = node.build(**inp)
    assert len(inp["vae"].encode_calls) == 4 and nm.KEY_POSE_NEG not in pos[0][1]
