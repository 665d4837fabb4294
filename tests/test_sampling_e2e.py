"""Tiny end-to-end runs with the real SteadyDancerDiT (tiny config, random weights) for both samplers, and
the UniPC step-by-step check against diffusers on that tiny DiT."""
from __future__ import annotations

import numpy as np
import pytest
import torch

model_mod = pytest.importorskip("steadydancer_turbo.steadydancer.model.dit")
config_mod = pytest.importorskip("steadydancer_turbo.steadydancer.model.config")

from _samplers_fakes import init_tiny_weights, make_cond  # noqa: E402
from steadydancer_turbo.steadydancer.sampling.official import (  # noqa: E402
    Guidance,
    initial_noise,
    sample_official,
)
from steadydancer_turbo.turbo.rcm import sample_rcm  # noqa: E402


def _tiny_dit(seed=0):
    # small everywhere (also the CLIP width) so the samplers' many forwards stay fast on CPU
    cfg = config_mod.SteadyDancerConfig.tiny(dim=64, ffn_dim=96, num_heads=2, text_dim=32, freq_dim=32,
                                             clip_dim=48)
    return init_tiny_weights(model_mod.SteadyDancerDiT(cfg), seed), cfg


class Counting:
    def __init__(self, model):
        self.model, self.passes, self.forwards, self.inputs = model, 0, 0, []

    def __call__(self, x, t, *args):
        self.passes += x.shape[0]
        self.forwards += 1
        self.inputs.append(x[:1].clone())
        return self.model(x, t, *args)


def _cond(cfg, **kw):
    return make_cond(frames=5, lat_h=4, lat_w=4, text_dim=cfg.text_dim, clip_dim=cfg.clip_dim,
                     clip_tokens=cfg.clip_tokens, text_len=(6, 4), **kw)


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_official_sampler_tiny_dit(solver):
    model, cfg = _tiny_dit()
    cond = _cond(cfg)
    m = Counting(model)
    out = sample_official(m, cond, seed=1, steps=4, solver=solver, batch_passes=False)
    assert out.shape == (1, 16, 2, 4, 4) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert m.passes == 9  # 2 + 3 (idx 1: 0.1 < 0.25 < 0.4) + 2 + 2
    mb = Counting(model)
    outb = sample_official(mb, cond, seed=1, steps=4, solver=solver, batch_passes=True)
    assert mb.forwards == 4 and mb.passes == 9
    torch.testing.assert_close(outb, out, rtol=1e-4, atol=1e-4)


def test_unipc_matches_diffusers_on_tiny_dit():
    from diffusers import UniPCMultistepScheduler

    model, cfg = _tiny_dit(seed=3)
    cond = _cond(cfg)
    steps, shift, g = 6, 5.0, Guidance()
    noise = initial_noise((1, *cond.latent_shape), seed=2)
    m = Counting(model)
    ours = sample_official(m, cond, steps=steps, shift=shift, guidance=g, noise=noise, batch_passes=False)

    sched = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    sched.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0.0, steps + 1)[:-1].copy())
    x = noise.clone()
    kw = {p: [cond.model_kwargs(*p)[k] for k in ("context", "clip_fea", "clip_fea_c", "y", "cond", "ref_x", "ref_c")]
          for p in [("pos", "pos"), ("neg", "pos"), ("pos", "neg")]}
    step_inputs = [m.inputs[i] for i in _first_pass_index(steps, g)]  # x entering each step
    for idx, t in enumerate(sched.timesteps):
        torch.testing.assert_close(step_inputs[idx], x, rtol=0, atol=1e-5, msg=f"step {idx}")
        tt = t.view(1)
        with torch.no_grad():
            e_c = model(x, tt, *kw[("pos", "pos")])
            e_ut = model(x, tt, *kw[("neg", "pos")])
            if 0.1 < idx / steps < 0.4:
                e = e_ut + 5.0 * (e_c - e_ut) + 1.0 * (e_c - model(x, tt, *kw[("pos", "neg")]))
            else:
                e = e_ut + 5.0 * (e_c - e_ut)
        x = sched.step(e, t, x, return_dict=False)[0]
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)


def _first_pass_index(steps, g):
    out, k = [], 0
    for i in range(steps):
        out.append(k)
        k += len(g.passes(i, steps))
    return out


@pytest.mark.parametrize("mode", ["sde", "ode"])
@pytest.mark.parametrize("schedule", ["rcm", "shift"])
def test_rcm_tiny_dit(mode, schedule):
    """The turbo sampler on the real tiny DiT equals TurboDiffusion's loop restated (test_rcm._turbo_loop)."""
    from test_rcm import _turbo_loop

    model, cfg = _tiny_dit()
    cond = _cond(cfg, with_neg=False)
    m = Counting(model)
    out = sample_rcm(m, cond, seed=1, steps=4, mode=mode, schedule=schedule)
    assert out.shape == (1, 16, 2, 4, 4) and out.dtype == torch.float32
    assert m.passes == 4
    # LightX2V shift list sigma = 5t / (1 + 4t), t = 1 - i/4 (test_rcm.test_shift_schedule_lightx2v)
    t_steps = None if schedule == "rcm" else torch.tensor([1.0, 0.9375, 5 / 6, 0.625, 0.0], dtype=torch.float64)
    with torch.no_grad():
        want = _turbo_loop(cond, 1, 4, 200, mode == "ode", model, t_steps)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_bf16_compute_dtype_tiny_dit():
    """bf16 compute (the official autocast casts, checked op by op in test_dit_official_parity.py) through both
    samplers: fp32 results, within bf16 rounding of the fp32-compute run with the same seed, and really bf16."""
    model, cfg = _tiny_dit()
    cond = _cond(cfg)
    ref = {"official": sample_official(model, cond, seed=1, steps=3),
           "rcm": sample_rcm(model, _cond(cfg, with_neg=False), seed=1, steps=2)}
    model.compute_dtype = torch.bfloat16
    got = {"official": sample_official(model, cond, seed=1, steps=3),
           "rcm": sample_rcm(model, _cond(cfg, with_neg=False), seed=1, steps=2)}
    for k in ref:
        assert got[k].dtype == torch.float32
        rel = ((got[k] - ref[k]).norm() / ref[k].norm()).item()
        assert 1e-5 < rel < 2e-2, (k, rel)
