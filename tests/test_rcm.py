"""TurboDiffusion rCM sampler: schedules against TurboDiffusion's published numbers, the sampling loop
against a literal re-statement of TurboDiffusion's loop, passes, determinism, interruption."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _samplers_fakes import FakeDiT, make_cond
from steadydancer_turbo.turbo.rcm import (
    model_timesteps,
    rcm_sigmas,
    sample_rcm,
    trigflow_times,
)

# Published numbers: produced by executing TurboDiffusion's own statements
# (turbodiffusion/inference/wan2.2_i2v_infer.py: mid_t = [1.5, 1.4, 1.0][:n-1];
#  t = tensor([atan(sigma_max), *mid_t, 0], float64); t = sin(t)/(cos(t)+sin(t))), 9 decimals;
# the 5-decimal values agree with TurboDiffusion's README-derived table in spec-turbo.md §1.
FIRST = {80: 0.987654321, 200: 0.995024876, 1600: 0.999375390}
TAIL = [0.933781061, 0.852895395, 0.608979049]
# timesteps the net sees: (t.float() * ones(float64) * 1000).to(bfloat16)
T_FIRST = {80: 988.0, 200: 996.0, 1600: 1000.0}
T_TAIL = [932.0, 852.0, 608.0]


@pytest.mark.parametrize("sigma_max", [80, 200, 1600])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_published_sigma_lists(sigma_max, steps):
    want = [FIRST[sigma_max], *TAIL[: steps - 1], 0.0]
    got = rcm_sigmas(steps, sigma_max)
    assert got.dtype == torch.float64 and len(got) == steps + 1
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-9, rtol=0)  # in fact to 9 decimals
    assert model_timesteps(got).tolist() == [T_FIRST[sigma_max], *T_TAIL[: steps - 1]]


def test_spec_table_values():
    # spec-turbo.md §1 table (5 decimals)
    np.testing.assert_allclose(rcm_sigmas(4, 80).numpy(), [0.98765, 0.93378, 0.85290, 0.60898, 0], atol=1e-5)
    np.testing.assert_allclose(rcm_sigmas(4, 200).numpy(), [0.99502, 0.93378, 0.85290, 0.60898, 0], atol=1e-5)


def test_default_is_i2v_sigma_max_200():
    np.testing.assert_allclose(rcm_sigmas().numpy(), [FIRST[200], *TAIL, 0.0], atol=1e-9)


@pytest.mark.parametrize("sigma_max", [80, 200, 1600])
@pytest.mark.parametrize("steps", [5, 6, 7, 8])
def test_extended_schedules_monotonic(sigma_max, steps):
    s = rcm_sigmas(steps, sigma_max).numpy()
    assert len(s) == steps + 1 and s[-1] == 0.0 and s[0] == pytest.approx(FIRST[sigma_max], abs=1e-9)
    assert np.all(np.diff(s) < 0)
    assert np.all(s[:-1] < 1)


def test_extension_reduces_to_published_and_nests():
    four = rcm_sigmas(4, 200).numpy()
    eight = rcm_sigmas(8, 200).numpy()
    np.testing.assert_array_equal(eight[::2], four)  # 8 steps = 4-step points + midpoints (TrigFlow time)
    t8 = trigflow_times(8, 200)
    assert t8[1] == pytest.approx((math.atan(200) + 1.5) / 2) and t8[7] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        trigflow_times(4, 200, mid_t=[1.5, 1.6, 1.0])  # non-monotonic anchors


def test_shift_schedule_lightx2v():
    s = rcm_sigmas(4, schedule="shift", shift=5.0).numpy()
    np.testing.assert_allclose(s, [1.0, 0.9375, 5 / 6, 0.625, 0.0], atol=1e-12)
    # sigma = s t / (1 + (s-1) t) for t = 1 - i/n, checked at 8 steps against float64 by hand
    s8 = rcm_sigmas(8, schedule="shift", shift=5.0).numpy()
    t = 1 - np.arange(9) / 8
    np.testing.assert_allclose(s8[:-1], (5 * t / (1 + 4 * t))[:-1], atol=1e-12)


# --------------------------------------------------------------------------------------- sampling loop
def _turbo_loop(cond, seed, steps, sigma_max, ode, model, t_steps=None):
    """TurboDiffusion's loop (wan2.2_i2v_infer.py) restated, with a CPU generator and our model signature.
    ``t_steps`` replaces TurboDiffusion's rCM sigma list (e.g. the LightX2V shift list checked above); the net
    then sees float32 ``1000 sigma`` (LightX2V) instead of TurboDiffusion's bf16-rounded value."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    shape = (1, *cond.latent_shape)
    init_noise = torch.randn(*shape, dtype=torch.float32, generator=gen)
    custom = t_steps is not None
    if not custom:
        mid_t = [1.5, 1.4, 1.0][: steps - 1]
        t_steps = torch.tensor([math.atan(sigma_max), *mid_t, 0], dtype=torch.float64)
        t_steps = torch.sin(t_steps) / (torch.cos(t_steps) + torch.sin(t_steps))
    x = init_noise.to(torch.float64) * t_steps[0]
    ones = torch.ones(x.size(0), 1, dtype=x.dtype)
    kw = cond.model_kwargs()
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        ts = (t_cur.float() * ones * 1000)
        ts = (ts if custom else ts.to(torch.bfloat16)).float().view(-1)
        v_pred = model(x.float(), ts, kw["context"], kw["clip_fea"], kw["clip_fea_c"], kw["y"], kw["cond"],
                       kw["ref_x"], kw["ref_c"]).to(torch.float64)
        if ode:
            x = x - (t_cur - t_next) * v_pred
        else:
            x = (1 - t_next) * (x - t_cur * v_pred) + t_next * torch.randn(
                *x.shape, dtype=torch.float32, generator=gen)
    return x.float()


@pytest.mark.parametrize("mode", ["sde", "ode"])
@pytest.mark.parametrize("steps,sigma_max", [(4, 200), (2, 80), (3, 1600)])
def test_loop_matches_turbodiffusion(mode, steps, sigma_max):
    cond = make_cond()
    ref = _turbo_loop(cond, 17, steps, sigma_max, mode == "ode", FakeDiT())
    model = FakeDiT()
    got = sample_rcm(model, cond, seed=17, steps=steps, sigma_max=sigma_max, mode=mode)
    assert torch.equal(got, ref)
    assert model.passes == steps and len(model.calls) == steps  # one pass per step, no CFG
    assert all(model.kind(r, cond) == ("pos", "pos") for r in model.rows)


def test_x0_callback_and_sde_renoise_math():
    """Hand check of one SDE step: x1 = (1 - s1) * (x0 - s0 v) + s1 * noise_2nd_draw."""
    cond = make_cond()
    model = FakeDiT()
    x0s = []
    sample_rcm(model, cond, seed=3, steps=2, callback=lambda i, n, x0: x0s.append((i, n, x0)))
    s = rcm_sigmas(2, 200)
    gen = torch.Generator().manual_seed(3)
    shape = (1, *cond.latent_shape)
    n0 = torch.randn(shape, generator=gen)
    n1 = torch.randn(shape, generator=gen)
    x = n0.double() * s[0]
    v = model.rows[0]["out"].double()
    assert model.rows[0]["t"] == 996.0
    torch.testing.assert_close(x0s[0][2][0], (x - s[0] * v).float()[0], rtol=0, atol=1e-6)
    x1 = (1 - s[1]) * (x - s[0] * v) + s[1] * n1
    torch.testing.assert_close(model.rows[1]["x"], x1.float()[0], rtol=0, atol=1e-6)
    assert [(i, n) for i, n, _ in x0s] == [(0, 2), (1, 2)]


def test_turbo_pass_count_and_shift_schedule_timesteps():
    cond = make_cond()
    model = FakeDiT()
    sample_rcm(model, cond, steps=4, schedule="shift")
    assert model.passes == 4
    assert [r["t"] for r in model.rows] == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)
    model8 = FakeDiT()
    out = sample_rcm(model8, cond, steps=8, mode="ode")
    assert model8.passes == 8 and torch.isfinite(out).all()
    with pytest.raises(ValueError):
        sample_rcm(FakeDiT(), cond, steps=9)


def test_custom_sigmas_and_int_timesteps():
    cond = make_cond()
    model = FakeDiT()
    sample_rcm(model, cond, sigmas=[0.99, 0.6, 0.0], timestep_rounding="int")
    assert [r["t"] for r in model.rows] == [990, 600]


def test_determinism_and_callback_stop():
    cond = make_cond()
    a = sample_rcm(FakeDiT(), cond, seed=4)
    b = sample_rcm(FakeDiT(), cond, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, sample_rcm(FakeDiT(), cond, seed=5))

    class Stop(Exception):
        pass

    def cb(i, n, x0):
        if i == 1:
            raise Stop

    model = FakeDiT()
    with pytest.raises(Stop):
        sample_rcm(model, cond, seed=4, callback=cb)
    assert model.passes == 2
    assert torch.equal(sample_rcm(FakeDiT(), cond, seed=4), a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cpu_vs_gpu_same_result():
    cond = make_cond()
    a = sample_rcm(FakeDiT(), cond, seed=9)
    b = sample_rcm(FakeDiT(), cond.to("cuda"), seed=9, device="cuda")
    torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-4)
