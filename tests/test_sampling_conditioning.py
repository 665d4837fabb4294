"""Latent normalization, SteadyDancer conditioning builders, size rule and pass kwargs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _samplers_fakes import make_cond
from steadydancer_turbo.steadydancer.sampling import latents
from steadydancer_turbo.steadydancer.sampling.conditioning import (
    KWARG_ORDER,
    SteadyDancerConditioning,
    build_i2v_mask,
    build_ref_c,
    build_ref_x,
    build_y,
    check_frame_count,
    official_latent_size,
    official_pixel_size,
    pad_context,
)


# -------------------------------------------------------------------------------------------------- latents
def test_latent_constants_match_official_vae():
    # wan/modules/vae.py (WanVAE.__init__), spot values
    assert len(latents.WAN21_LATENT_MEAN) == len(latents.WAN21_LATENT_STD) == 16
    assert latents.WAN21_LATENT_MEAN[0] == -0.7571 and latents.WAN21_LATENT_MEAN[7] == 1.5508
    assert latents.WAN21_LATENT_MEAN[15] == -0.2921
    assert latents.WAN21_LATENT_STD[0] == 2.8184 and latents.WAN21_LATENT_STD[8] == 3.2687
    assert latents.WAN21_LATENT_STD[15] == 1.9160


def test_normalize_is_official_formula_and_roundtrips():
    mu = torch.randn(2, 16, 3, 4, 5, dtype=torch.float64)
    mean = np.array(latents.WAN21_LATENT_MEAN, dtype=np.float32).astype(np.float64).reshape(1, 16, 1, 1, 1)
    inv = (1.0 / np.array(latents.WAN21_LATENT_STD, dtype=np.float32)).astype(np.float64).reshape(1, 16, 1, 1, 1)
    z = latents.normalize(mu)
    np.testing.assert_allclose(z.numpy(), (mu.numpy() - mean) * inv, rtol=1e-12)
    torch.testing.assert_close(latents.denormalize(z), mu, rtol=1e-12, atol=1e-12)
    # unbatched [16,T,H,W] with channel_dim=0, float32, bf16 input promoted to float32
    u = torch.randn(16, 2, 3, 3)
    torch.testing.assert_close(latents.normalize(u, channel_dim=0), latents.normalize(u[None])[0])
    assert latents.normalize(u.bfloat16(), channel_dim=0).dtype == torch.float32
    with pytest.raises(ValueError):
        latents.normalize(torch.zeros(1, 4, 2, 2, 2))


# ----------------------------------------------------------------------------------------------- frames
def test_frame_counts():
    assert check_frame_count(81) == 21 and check_frame_count(1) == 1 and check_frame_count(5) == 2
    for bad in (0, 2, 80, 82):
        with pytest.raises(ValueError):
            check_frame_count(bad)


def test_i2v_mask_official_81():
    m = build_i2v_mask(81, 6, 4)
    assert m.shape == (4, 21, 6, 4)
    assert torch.all(m[:, 0] == 1) and torch.all(m[:, 1:] == 0)


@pytest.mark.parametrize("frames", [1, 5, 33, 121])
def test_i2v_mask_any_4n_plus_1(frames):
    T = (frames - 1) // 4 + 1
    m = build_i2v_mask(frames, 2, 2)
    assert m.shape == (4, T, 2, 2)
    assert m[:, 0].eq(1).all() and m[:, 1:].eq(0).all()


def test_i2v_mask_known_frames():
    # pixel frames 0..5 known: latent 0 <- frame 0 (x4), latent 1 <- frames 1..4, latent 2 <- frames 5..8
    m = build_i2v_mask(13, 2, 2, known_frames=6)[:, :, 0, 0]
    assert m.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]


# --------------------------------------------------------------------------------------------- builders
def test_build_y_ref_x_ref_c():
    img = torch.randn(16, 3, 4, 6)
    mask = build_i2v_mask(9, 4, 6)
    y = build_y(mask, img)
    assert y.shape == (20, 3, 4, 6) and torch.equal(y[:4], mask) and torch.equal(y[4:], img)
    yb = build_y(mask, img[None].repeat(2, 1, 1, 1, 1))
    assert yb.shape == (2, 20, 3, 4, 6) and torch.equal(yb[1], y)
    with pytest.raises(ValueError):
        build_y(build_i2v_mask(5, 4, 6), img)

    zr = torch.randn(1, 16, 1, 4, 6)
    rx = build_ref_x(zr)
    assert rx.shape == (1, 36, 1, 4, 6)
    assert torch.equal(rx[:, :16], zr) and rx[:, 16:20].eq(1).all() and torch.equal(rx[:, 20:], zr)
    rc = build_ref_c(zr)
    assert rc.shape == (1, 36, 1, 4, 6)
    assert torch.equal(rc[:, :16], zr) and rc[:, 16:20].eq(0).all() and torch.equal(rc[:, 20:], zr)
    assert torch.equal(build_ref_c(zr, channels=16), zr)
    assert build_ref_x(torch.randn(16, 4, 6)).shape == (36, 1, 4, 6)
    with pytest.raises(ValueError):
        build_ref_x(torch.randn(1, 16, 2, 4, 6))


# ------------------------------------------------------------------------------------------------- sizes
def test_official_size_rule():
    # 1024*576 area (589,824 px): portrait 576x1024 reference -> 128 x 72 latents (1024 x 576 px)
    assert official_latent_size(1024, 576) == (128, 72)
    assert official_pixel_size(1024, 576) == (1024, 576)
    assert official_latent_size(576, 1024) == (72, 128)
    # official float quirk, reproduced: 399360 * (480/832) = 230399.99999999997 -> sqrt 479.999.. -> 59 -> 58
    assert official_latent_size(480, 832, 832 * 480) == (58, 104)
    assert official_latent_size(832, 480, 832 * 480) == (104, 60)
    # floor, not round: sqrt(589824*900/800)/8 = 101.8 -> 101 -> even 100 (rounding would give 102)
    assert math.sqrt(589824 * 900 / 800) / 8 > 101.5
    assert official_latent_size(900, 800) == (100, 90)
    h, w = official_latent_size(1000, 700)
    assert h % 2 == 0 and w % 2 == 0 and h * w * 64 <= 589824


# ------------------------------------------------------------------------------------------ conditioning
def test_model_kwargs_selects_text_and_pose():
    c = make_cond()
    kw = c.model_kwargs()
    assert tuple(kw) == KWARG_ORDER
    assert kw["context"] is c.context and kw["cond"] is c.cond_pos
    assert c.model_kwargs("neg", "pos")["context"] is c.context_null
    assert c.model_kwargs("pos", "neg")["cond"] is c.cond_neg
    for k in ("clip_fea", "clip_fea_c", "y", "ref_x", "ref_c"):
        assert c.model_kwargs("neg", "neg")[k] is getattr(c, k)
    with pytest.raises(ValueError):
        make_cond(with_neg=False).model_kwargs("pos", "neg")


def test_batched_kwargs_concat_and_pad():
    c = make_cond(batch=2, text_len=(7, 5))
    passes = [("pos", "pos"), ("neg", "pos"), ("pos", "neg")]
    kw = c.batched_kwargs(passes)
    assert kw["context"].shape == (6, 7, 4096)
    torch.testing.assert_close(kw["context"][2:4, :5], c.context_null)
    assert kw["context"][2:4, 5:].eq(0).all()
    assert torch.equal(kw["cond"][4:6], c.cond_neg) and torch.equal(kw["cond"][0:2], c.cond_pos)
    assert kw["y"].shape[0] == 6 and torch.equal(kw["y"][2:4], c.y)
    assert pad_context([torch.ones(1, 2, 3), torch.ones(1, 4, 3)]).shape == (2, 4, 3)


def test_unbatched_inputs_get_batch_dim_and_validation():
    c = make_cond()
    u = SteadyDancerConditioning(context=c.context[0], context_null=c.context_null[0], clip_fea=c.clip_fea[0],
                                 clip_fea_c=c.clip_fea_c[0], y=c.y[0], cond_pos=c.cond_pos[0],
                                 ref_x=c.ref_x[0], ref_c=c.ref_c[0, :16])
    assert u.batch_size == 1 and u.latent_shape == (16, 3, 4, 6) and not u.has_negative_pose
    with pytest.raises(ValueError):
        SteadyDancerConditioning(context=c.context, context_null=c.context_null, clip_fea=c.clip_fea,
                                 clip_fea_c=c.clip_fea_c, y=c.y, cond_pos=c.cond_pos[:, :, :2],
                                 ref_x=c.ref_x, ref_c=c.ref_c)


def test_to_dtype():
    c = make_cond().to(dtype=torch.bfloat16)
    assert c.y.dtype == c.context.dtype == c.cond_neg.dtype == torch.bfloat16


def test_size_rule_equals_official_numpy_statement_on_many_sizes():
    # the official statement (image2video_dancer.py), evaluated with numpy as there
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(64, 2049, size=2))
        area = int(rng.choice([832 * 480, 1024 * 576, 1280 * 720]))
        ar = h / w
        want = (round(np.sqrt(area * ar) // 8 // 2 * 2), round(np.sqrt(area / ar) // 8 // 2 * 2))
        assert official_latent_size(h, w, area) == want, (h, w, area)
