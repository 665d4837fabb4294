"""Official SteadyDancer sampler: schedule, UniPC vs diffusers / the official scheduler, guidance, passes,
determinism, interruption."""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
import torch
from safetensors import safe_open

from _samplers_fakes import FakeDiT, make_cond
from _samplers_fakes import official_loop as _reference_loop
from steadydancer_turbo.steadydancer.sampling.conditioning import SteadyDancerConditioning
from steadydancer_turbo.steadydancer.sampling.official import (
    Guidance,
    count_passes,
    initial_noise,
    official_schedule,
    sample_official,
)


# ---------------------------------------------------------------------------------------------- schedule
def test_schedule_matches_official_values():
    # values from running the official FlowUniPCMultistepScheduler (spec appendix), 10 steps shift 5
    sig, ts, _ = official_schedule(10, 5.0)
    assert ts.dtype == torch.int64
    assert ts.tolist() == [999, 978, 952, 920, 882, 833, 768, 681, 555, 356]
    assert sig.dtype == torch.float32 and len(sig) == 11 and sig[-1].item() == 0.0
    np.testing.assert_allclose(sig[:4].numpy(), [0.9998, 0.978048, 0.952154, 0.920810], atol=2e-6)
    np.testing.assert_allclose(sig[9].item(), 0.356888, atol=2e-6)
    # first sigma: shift of float32(0.999) computed in float64
    s0 = np.float64(np.float32(0.999))
    assert sig[0].item() == np.float32(5 * s0 / (1 + 4 * s0))


def test_schedule_40_steps_shift_3_and_truncation():
    sig, ts, s64 = official_schedule(40, 3.0)
    assert len(ts) == 40 and len(sig) == 41
    assert np.all(np.diff(sig.numpy()) < 0)
    # timesteps are truncated (not rounded) float64 sigma * 1000
    np.testing.assert_array_equal(ts.numpy(), np.floor(s64 * 1000).astype(np.int64))
    assert any((s64 * 1000) % 1 > 0.5)  # some would round differently


def test_custom_sigmas():
    sig, ts, _ = official_schedule(sigmas=[0.9, 0.5, 0.2, 0.0])
    assert ts.tolist() == [900, 500, 200]
    np.testing.assert_allclose(sig.numpy(), [0.9, 0.5, 0.2, 0.0], atol=1e-7)
    with pytest.raises(ValueError):
        official_schedule(sigmas=[0.5, 0.9])


# ---------------------------------------------------------------------------- reference loops (independent)
def _our_latents(cond, noise, steps, shift, guidance, solver="unipc", batch=False):
    model = FakeDiT()
    latents = sample_official(model, cond, steps=steps, shift=shift, guidance=guidance, solver=solver,
                              noise=noise, batch_passes=batch)
    # inputs of the c-pass at each step = the latent after the previous step
    seen = [r["x"] for r in model.rows if r["ctx_sum"] == model.rows[0]["ctx_sum"]
            and r["cond_sum"] == model.rows[0]["cond_sum"]]
    return seen[1:] + [latents[0]], model


@pytest.mark.parametrize("steps,shift", [(10, 5.0), (12, 3.0)])
def test_unipc_matches_diffusers_configured_as_official(steps, shift):
    from diffusers import UniPCMultistepScheduler

    cond = make_cond()
    noise = initial_noise((1, *cond.latent_shape), seed=7)
    # configured independently of our code: diffusers applies flow_shift to the *unshifted* official linspace
    sched = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift,
                                    solver_order=2, predict_x0=True, solver_type="bh2",
                                    lower_order_final=True, final_sigmas_type="zero")
    base = np.linspace(float(np.float32(0.999)), 0.0, steps + 1)[:-1].copy()
    sched.set_timesteps(sigmas=base)
    ref = _reference_loop(sched, sched.timesteps, cond, noise, 5.0, 1.0)
    ours, _ = _our_latents(cond, noise, steps, shift, Guidance())
    assert len(ours) == len(ref) == steps
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b[0], rtol=0, atol=1e-6, msg=f"step {i}")


OFFICIAL = os.environ.get("STEADYDANCER_OFFICIAL_PATH")
UNIPC_DATA = pathlib.Path(__file__).parent / "data" / "official_unipc.safetensors"


def _unipc_reference():
    """Stored official runs (tests/data/make_official_reference.py): name -> (params, tensors), and the
    conditioning bundle they ran on."""
    with safe_open(str(UNIPC_DATA), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        runs = json.loads(f.metadata()["runs"])
    cond = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("cond.")}
    return {n: (p, {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(n + ".")}) for n, p in runs.items()}, \
        cond


UNIPC_RUNS, UNIPC_COND = _unipc_reference()


def _stored_cond():
    return SteadyDancerConditioning(**{k: v.clone() for k, v in UNIPC_COND.items()})


@pytest.mark.parametrize("name", list(UNIPC_RUNS))
def test_unipc_matches_official_scheduler_stored_run(name):
    """Our sampler vs the official FlowUniPCMultistepScheduler in the official generate() loop (text + pose
    guidance), on the same deterministic stand-in DiT: timesteps, sigmas and every step's latent."""
    p, ref = UNIPC_RUNS[name]
    sig, ts, _ = official_schedule(p["steps"], p["shift"])
    assert ref["timesteps"].tolist() == ts.tolist()
    torch.testing.assert_close(sig, ref["sigmas"], rtol=0, atol=0)
    cond = _stored_cond()
    ours, _ = _our_latents(cond, ref["noise"], p["steps"], p["shift"], Guidance(p["text_scale"], p["pose_scale"]))
    assert len(ours) == len(ref["latents"]) == p["steps"]
    for i, (a, b) in enumerate(zip(ours, ref["latents"])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"step {i}")


@pytest.mark.skipif(not OFFICIAL, reason="live official run: set STEADYDANCER_OFFICIAL_PATH to a checkout")
@pytest.mark.parametrize("name", list(UNIPC_RUNS))
def test_stored_unipc_runs_equal_a_fresh_official_run(name):
    from _official_ref import load_official_scheduler

    p, ref = UNIPC_RUNS[name]
    sched = load_official_scheduler(OFFICIAL)(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)
    sched.set_timesteps(p["steps"], device="cpu", shift=p["shift"])
    assert sched.timesteps.tolist() == ref["timesteps"].tolist()
    torch.testing.assert_close(sched.sigmas.float(), ref["sigmas"], rtol=0, atol=0)
    got = _reference_loop(sched, sched.timesteps, _stored_cond(), ref["noise"], p["text_scale"], p["pose_scale"])
    torch.testing.assert_close(torch.stack([x[0] for x in got]), ref["latents"], rtol=0, atol=1e-6)


def test_euler_matches_float64_reference():
    cond = make_cond()
    noise = initial_noise((1, *cond.latent_shape), seed=3)
    g = Guidance(text_scale=3.0, pose_scale=0.5)
    ours, model = _our_latents(cond, noise, 8, 5.0, g, solver="euler")
    sig, ts, _ = official_schedule(8, 5.0)
    # recompute each Euler step in float64 from the recorded model outputs
    x = noise.double()
    rows = iter(model.rows)
    for i in range(8):
        outs = {}
        for _ in g.passes(i, 8):
            r = next(rows)
            outs[model.kind(r, cond)] = r["out"].double()
        e = outs[("neg", "pos")] + 3.0 * (outs[("pos", "pos")] - outs[("neg", "pos")])
        if ("pos", "neg") in outs:
            e = e + 0.5 * (outs[("pos", "pos")] - outs[("pos", "neg")])
        x = x + (sig[i + 1].double() - sig[i].double()) * e
        torch.testing.assert_close(ours[i].double(), x[0], rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------------- guidance / passes
@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("g,expected", [(Guidance(), 91), (Guidance(pose_scale=0.0), 80),
                                        (Guidance(text_scale=1.0, pose_scale=0.0), 40),
                                        (Guidance(text_scale=1.0, pose_scale=1.0), 51)])
def test_pass_accounting_40_steps(batch, g, expected):
    cond = make_cond(frames=5, lat_h=2, lat_w=2, text_len=(3, 2))
    model = FakeDiT()
    sample_official(model, cond, seed=0, steps=40, guidance=g, batch_passes=batch, solver="euler")
    assert model.passes == expected == count_passes(40, g)
    assert len(model.calls) == (40 if batch else expected)


def test_pass_window_and_order_10_steps():
    cond = make_cond()
    model = FakeDiT()
    sample_official(model, cond, steps=10, batch_passes=False)
    kinds = [model.kind(r, cond) for r in model.rows]
    assert len(kinds) == 22  # 3 passes at steps 2 and 3 only (0.1 < idx/10 < 0.4, strict)
    ts = [r["t"] for r in model.rows]
    per_step = {}
    for t, k in zip(ts, kinds):
        per_step.setdefault(t, []).append(k)
    steps = list(per_step.values())
    for i, ks in enumerate(steps):
        want = [("pos", "pos"), ("neg", "pos")] + ([("pos", "neg")] if i in (2, 3) else [])
        assert ks == want, (i, ks)
    # batched: same row order inside one forward
    model_b = FakeDiT()
    sample_official(model_b, cond, steps=10, batch_passes=True)
    assert [model_b.kind(r, cond) for r in model_b.rows] == kinds


def test_guidance_combination_equals_official_formula():
    """x0 handed to the callback = x - sigma * (e_ut + g_txt(e_c - e_ut) + g_pose(e_c - e_up)) on the
    recorded model outputs."""
    cond = make_cond()
    model = FakeDiT()
    got = []
    g = Guidance(text_scale=4.5, pose_scale=1.7, pose_start=0.05, pose_end=0.55)
    sample_official(model, cond, steps=10, guidance=g, batch_passes=False,
                    callback=lambda i, n, x0: got.append(x0.clone()))
    sig, _, _ = official_schedule(10, 5.0)
    rows = iter(model.rows)
    n_up = 0
    for i in range(10):
        rs = [next(rows) for _ in g.passes(i, 10)]
        outs = {model.kind(r, cond): r["out"] for r in rs}
        e_c, e_ut = outs[("pos", "pos")], outs[("neg", "pos")]
        if 0.05 < i / 10 < 0.55:
            n_up += 1
            e = e_ut + 4.5 * (e_c - e_ut) + 1.7 * (e_c - outs[("pos", "neg")])
        else:
            assert ("pos", "neg") not in outs
            e = e_ut + 4.5 * (e_c - e_ut)
        torch.testing.assert_close(got[i][0], rs[0]["x"] - sig[i] * e, rtol=0, atol=0)
    assert n_up == 5  # steps 1..5


def test_batched_equals_unbatched():
    cond = make_cond(batch=2)
    a = sample_official(FakeDiT(), cond, seed=5, steps=10, batch_passes=False)
    b = sample_official(FakeDiT(), cond, seed=5, steps=10, batch_passes=True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert a.shape == (2, *cond.latent_shape)


def test_pose_guidance_needs_negative_pose():
    cond = make_cond(with_neg=False)
    with pytest.raises(ValueError, match="cond_neg"):
        sample_official(FakeDiT(), cond, steps=10)
    out = sample_official(FakeDiT(), cond, steps=10, guidance=Guidance(pose_scale=0.0))
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------- determinism / noise
def test_noise_is_cpu_generator_float32():
    n = initial_noise((1, 16, 2, 4, 4), seed=42)
    ref = torch.randn((1, 16, 2, 4, 4), generator=torch.Generator("cpu").manual_seed(42), dtype=torch.float32)
    assert n.dtype == torch.float32 and torch.equal(n, ref)


def test_same_seed_same_output():
    cond = make_cond()
    a = sample_official(FakeDiT(), cond, seed=9, steps=6)
    b = sample_official(FakeDiT(), cond, seed=9, steps=6)
    c = sample_official(FakeDiT(), cond, seed=10, steps=6)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cpu_vs_gpu_noise_same_result():
    cond = make_cond()
    a = sample_official(FakeDiT(), cond, seed=9, steps=6)
    b = sample_official(FakeDiT(), cond.to("cuda"), seed=9, steps=6, device="cuda")
    torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-4)


def test_model_dtype_cast():
    seen = []

    class Wrapped(FakeDiT):
        compute_dtype = torch.bfloat16

        def __call__(self, x, t, *args):
            seen.append((x.dtype, args[0].dtype, args[4].dtype))
            return super().__call__(x, t, *args).to(torch.bfloat16)

    # default: float32 in (the DiT casts per op to its compute dtype, like the official autocast run)
    out = sample_official(Wrapped(), make_cond(), steps=4)
    assert set(seen) == {(torch.float32,) * 3}
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    seen.clear()
    out = sample_official(Wrapped(), make_cond(), steps=4, model_dtype=torch.bfloat16)
    assert set(seen) == {(torch.bfloat16,) * 3}
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------- callback
class Stop(Exception):
    pass


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_callback_exception_stops_after_current_step(solver):
    cond = make_cond()
    model = FakeDiT()
    seen = []

    def cb(step, total, x0):
        seen.append((step, total, tuple(x0.shape)))
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        sample_official(model, cond, seed=1, steps=10, solver=solver, callback=cb, batch_passes=False)
    assert [s[0] for s in seen] == [0, 1, 2, 3] and all(s[1] == 10 for s in seen)
    assert model.passes == sum(len(Guidance().passes(i, 10)) for i in range(4))
    # nothing kept: a later run equals a fresh one
    a = sample_official(FakeDiT(), cond, seed=1, steps=10, solver=solver)
    b = sample_official(FakeDiT(), cond, seed=1, steps=10, solver=solver)
    assert torch.equal(a, b)
