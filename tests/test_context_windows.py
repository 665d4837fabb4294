"""Context windows for long videos (steadydancer/sampling/context_windows.py) in both samplers.

References: hand / float64 arithmetic for schedules and weights, the plain (no-window) sampler path for
bit-identity, the full-length conditioning tensors for every window's slices, and an independent windowed
turbo loop (ODE) written out here from the documented rules."""
from __future__ import annotations

import math

import pytest
import torch

from _samplers_fakes import FakeDiT, make_cond
from steadydancer_turbo.steadydancer.sampling import context_windows as cw
from steadydancer_turbo.steadydancer.sampling.conditioning import KWARG_ORDER, latent_frames
from steadydancer_turbo.steadydancer.sampling.official import Guidance, count_passes, initial_noise, sample_official
from steadydancer_turbo.turbo.rcm import rcm_sigmas, model_timesteps, sample_rcm

LENGTHS = (81, 85, 161, 241, 321, 481)
ODD = [(2, 1), (3, 1), (5, 2), (7, 3), (9, 4), (13, 6), (21, 1), (21, 10), (21, 15), (21, 20), (17, 5), (33, 8)]


def _small_cond(frames, **kw):
    return make_cond(frames=frames, lat_h=2, lat_w=2, text_dim=8, clip_dim=4, clip_tokens=3, text_len=(3, 2), **kw)


class Recorder(FakeDiT):
    """FakeDiT that also keeps every call's inputs."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def __call__(self, x, timestep, *args):
        out = super().__call__(x, timestep, *args)
        self.inputs.append(dict(x=x.clone(), t=timestep.clone(), out=out.clone(),
                                **{k: (None if a is None else a.clone()) for k, a in zip(KWARG_ORDER, args)}))
        return out


# ------------------------------------------------------------------------------------------------ schedule
@pytest.mark.parametrize("frames", LENGTHS)
@pytest.mark.parametrize("window,overlap", [(21, 4)] + ODD)
def test_schedule_covers_every_frame_exactly_once_in_order(frames, window, overlap):
    T = latent_frames(frames)
    wins = cw.window_schedule(T, window, overlap)
    if T <= window:
        assert wins == [(0, T)]
        return
    assert wins[0][0] == 0 and wins[-1][1] == T                      # placement ends exactly on the last frame
    assert all(e - s == window for s, e in wins)                       # every window is a full window
    assert len(wins) == math.ceil((T - overlap) / (window - overlap))  # the fewest windows
    gaps = [b[0] - a[0] for a, b in zip(wins, wins[1:])]
    assert all(1 <= g <= window - overlap for g in gaps) and max(gaps) - min(gaps) <= 1
    assert set().union(*(range(s, e) for s, e in wins)) == set(range(T))
    px = cw.pixel_ranges(wins)                                         # and in pixel frames: 4(T-1)+1 exactly
    assert px[0][0] == 0 and px[-1][1] == frames == 4 * (T - 1) + 1
    assert set().union(*(range(s, e) for s, e in px)) == set(range(frames))


def test_schedule_by_hand():
    assert cw.window_schedule(41) == [(0, 21), (10, 31), (20, 41)]       # 161 frames
    assert cw.window_schedule(22) == [(0, 21), (1, 22)]
    assert cw.window_schedule(21) == [(0, 21)] and cw.window_schedule(5) == [(0, 5)]
    assert cw.window_schedule(11, 5, 2) == [(0, 5), (3, 8), (6, 11)]


@pytest.mark.parametrize("frames", LENGTHS)
@pytest.mark.parametrize("window,overlap", [(21, 4)] + ODD)
@pytest.mark.parametrize("fusion", cw.FUSIONS)
def test_fusion_weights_sum_to_one_on_every_frame(frames, window, overlap, fusion):
    T = latent_frames(frames)
    wins = cw.window_schedule(T, window, overlap)
    ws = cw.fusion_weights(wins, T, fusion)
    total = torch.zeros(T, dtype=torch.float64)
    for (s, e), w in zip(wins, ws):
        assert w.shape == (e - s,) and bool((w > 0).all())
        total[s:e] += w
    assert torch.allclose(total, torch.ones(T, dtype=torch.float64), rtol=0, atol=1e-12)
    # frames seen by one window only get weight exactly 1 (fusion exact there)
    cover = torch.zeros(T)
    for s, e in wins:
        cover[s:e] += 1
    for (s, e), w in zip(wins, ws):
        assert bool((w[cover[s:e] == 1] == 1).all())
    # pixel-frame weights (colour guard) also sum to 1 on every output frame
    ptot = torch.zeros(frames, dtype=torch.float64)
    for (ps, pe), (s, _), w in zip(cw.pixel_ranges(wins), wins, ws):
        pw = cw.pixel_weights(w, s)
        assert len(pw) == pe - ps
        ptot[ps:pe] += pw
    assert torch.allclose(ptot, torch.ones(frames, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("fusion", cw.FUSIONS)
def test_two_window_ramps_by_hand(fusion):
    # T=9, window 6, overlap 3 -> (0,6), (3,9): frames 3,4,5 shared; right window ramps up by (j+1)/4
    wins = cw.window_schedule(9, 6, 3)
    assert wins == [(0, 6), (3, 9)]
    a, b = cw.fusion_weights(wins, 9, fusion)
    r = [(j + 1) / 4 for j in range(3)]
    if fusion == "cosine":
        r = [math.sin(math.pi / 2 * v) ** 2 for v in r]
    assert a.tolist()[:3] == [1, 1, 1] and b.tolist()[3:] == [1, 1, 1]
    for j in range(3):
        assert b[j].item() == pytest.approx(r[j], abs=1e-15)
        assert a[3 + j].item() == pytest.approx(1 - r[j], abs=1e-15)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("kw,match", [
    (dict(window=21, overlap=21), "smaller than the window"),
    (dict(window=21, overlap=0), "at least 1 latent"),
    (dict(window=1, overlap=1), "at least 2 latent"),
    (dict(window=21, overlap=4, anchor=5), "anchor"),
    (dict(fusion="pyramid"), "fusion"),
    (dict(noise="zeros"), "noise"),
    (dict(anchor=1, batch_windows=True), "one after another"),
])
def test_impossible_options_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        cw.ContextOptions(**kw)


def test_pixel_frame_options_adjust_with_a_note_or_refuse():
    opt, notes = cw.ContextOptions.from_pixel_frames(81, 16)
    assert (opt.window, opt.overlap, opt.anchor, notes) == (21, 4, 0, [])
    opt, notes = cw.ContextOptions.from_pixel_frames(83, 18, 5)
    assert (opt.window, opt.overlap, opt.anchor) == (21, 4, 1)
    assert len(notes) == 3 and "83" in notes[0] and "81" in notes[0] and "18" in notes[1]
    with pytest.raises(ValueError, match="at least 4"):
        cw.ContextOptions.from_pixel_frames(81, 2)
    with pytest.raises(ValueError, match="smaller than the window"):
        cw.ContextOptions.from_pixel_frames(17, 20)
    with pytest.raises(ValueError, match="at least 5"):
        cw.ContextOptions.from_pixel_frames(1, 4)


# ------------------------------------------------------------------------------------------------ one window = today
def _tiny_dit():
    from test_sampling_e2e import _tiny_dit as make
    return make()


@pytest.mark.parametrize("frames,opt", [(81, cw.ContextOptions()), (17, cw.ContextOptions(window=5, overlap=2)),
                                        (9, cw.ContextOptions(window=5, overlap=1, anchor=1))])
def test_one_window_is_bit_identical_for_both_samplers(frames, opt):
    model, cfg = _tiny_dit()
    cond = make_cond(frames=frames, lat_h=2, lat_w=2, text_dim=cfg.text_dim, clip_dim=cfg.clip_dim,
                     clip_tokens=cfg.clip_tokens, text_len=(4, 3))
    a = sample_official(model, cond, seed=3, steps=4, context=opt)
    b = sample_official(model, cond, seed=3, steps=4)
    assert torch.equal(a, b)
    a = sample_rcm(model, cond, seed=3, steps=2, context=opt)
    b = sample_rcm(model, cond, seed=3, steps=2)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ slicing
@pytest.mark.parametrize("batch", [False, True])
def test_every_window_gets_its_own_pose_slice_and_the_same_references(batch):
    frames, opt = 41, cw.ContextOptions(window=4, overlap=2)       # T=11 -> 4 windows
    cond = _small_cond(frames)
    T = cond.latent_shape[1]
    wins = opt.windows(T)
    rec = Recorder()
    steps, g = 10, Guidance(pose_scale=1.0)
    sample_official(rec, cond, seed=0, steps=steps, guidance=g, context=opt, batch_passes=batch)
    per_step = [len(g.passes(i, steps)) for i in range(steps)]
    calls_per_step = [1 if batch else k for k in per_step]
    assert len(rec.inputs) == sum(calls_per_step) * len(wins)
    i = 0
    for step in range(steps):
        passes = g.passes(step, steps)
        groups = [passes] if batch else [(p,) for p in passes]
        for group in groups:
            for k, (s, e) in enumerate(wins):
                call = rec.inputs[i]
                i += 1
                assert call["x"].shape[2] == e - s
                for r, (text, pose) in enumerate(group):
                    full = cond.cond_pos if pose == "pos" else cond.cond_neg
                    assert torch.equal(call["cond"][r:r + 1], full[:, :, s:e])       # positive and negative
                    assert torch.equal(call["y"][r:r + 1], cond.y[:, :, s:e])
                    assert torch.equal(call["ref_x"][r:r + 1], cond.ref_x)
                    assert torch.equal(call["ref_c"][r:r + 1], cond.ref_c)
                    assert torch.equal(call["clip_fea"][r:r + 1], cond.clip_fea)
                    assert torch.equal(call["clip_fea_c"][r:r + 1], cond.clip_fea_c)
                    ctx = cond.context if text == "pos" else cond.context_null
                    assert torch.equal(call["context"][r:r + 1, :ctx.shape[1]], ctx)
                if k == 0:
                    assert bool((call["y"][:, :4, 0] == 1).all())      # first window: the image condition
                else:
                    assert bool((call["y"][:, :4] == 0).all())         # later windows: no first-frame snap-back
    assert i == len(rec.inputs)


def test_pose_guidance_window_runs_in_every_window_and_pass_count():
    opt = cw.ContextOptions(window=4, overlap=1)
    cond = _small_cond(41)
    nwin = len(opt.windows(cond.latent_shape[1]))
    g = Guidance()
    for steps in (10, 40):
        rec = Recorder()
        units = []
        sample_official(rec, cond, steps=steps, guidance=g, context=opt, batch_passes=False,
                        window_callback=units.append)
        assert rec.passes == sum(units) == count_passes(steps, g) * nwin   # 91 x windows at 40 steps
        neg_calls = [c for c in rec.inputs if any(torch.equal(c["cond"], cond.cond_neg[:, :, s:e])
                                                  for s, e in opt.windows(cond.latent_shape[1]))]
        active = sum(g.pose_active(i, steps) for i in range(steps))
        assert len(neg_calls) == active * nwin


def test_fusion_of_a_framewise_model_equals_the_full_length_call():
    """A model whose output at a frame depends on that frame only: fused windows == one full-length call."""
    cond = _small_cond(61)
    T = cond.latent_shape[1]

    def framewise(x, t, context, clip_fea, clip_fea_c, y, c, ref_x, ref_c):
        return torch.tanh(x * 0.7 + c * 0.2 + y[:, 4:] * 0.1) * (1 + t.view(-1, 1, 1, 1, 1) / 1000) + ref_x[:, :16]

    args = [cond.model_kwargs("pos", "pos")[k] for k in KWARG_ORDER]
    x = torch.randn(1, 16, T, 2, 2, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0])
    full = framewise(x, t, *args)
    for fusion in cw.FUSIONS:
        for opt in (cw.ContextOptions(window=5, overlap=2, fusion=fusion),
                    cw.ContextOptions(window=6, overlap=5, fusion=fusion, batch_windows=True)):
            out = cw.ContextWindowModel(framewise, opt, T)(x, t, *args)
            torch.testing.assert_close(out, full, rtol=3e-7, atol=3e-7)  # float32 rounding of w*v sums


def test_fusion_by_hand_with_a_window_mean_model():
    """Each window returns its own mean of x: the fused frame value is sum_k w_k(f) * mean_k (float64 by hand)."""
    T, opt = 10, cw.ContextOptions(window=4, overlap=2)
    wins = opt.windows(T)
    x = torch.arange(T, dtype=torch.float32).view(1, 1, T, 1, 1).expand(1, 16, T, 2, 2).contiguous()
    model = lambda x, t, *a: x.mean(dim=2, keepdim=True).expand_as(x).clone()  # noqa: E731
    args = [torch.zeros(1, 2, 3)] * 3 + [torch.zeros(1, 20, T, 2, 2), torch.zeros(1, 16, T, 2, 2)] + \
        [torch.zeros(1, 36, 1, 2, 2), torch.zeros(1, 16, 1, 2, 2)]
    out = cw.ContextWindowModel(model, opt, T)(x, torch.tensor([1.0]), *args)
    # hand: linear ramps over each overlap (o frames: (j+1)/(o+1) up, complement down)
    expect = []
    for f in range(T):
        num = den = 0.0
        for k, (s, e) in enumerate(wins):
            if not s <= f < e:
                continue
            w = 1.0
            if k > 0 and f < wins[k - 1][1]:
                o = wins[k - 1][1] - s
                w = min(w, (f - s + 1) / (o + 1))
            if k + 1 < len(wins) and f >= wins[k + 1][0]:
                o = e - wins[k + 1][0]
                w = min(w, (e - f) / (o + 1))
            num += w * (s + e - 1) / 2
            den += w
        expect.append(num / den)
    torch.testing.assert_close(out[0, 0, :, 0, 0].double(), torch.tensor(expect, dtype=torch.float64),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("frames", LENGTHS)
def test_exact_frame_counts_through_both_samplers(frames):
    cond = _small_cond(frames, with_neg=True)
    opt = cw.ContextOptions()
    T = latent_frames(frames)
    nwin = len(opt.windows(T)) if T > 21 else 1
    rec = Recorder()
    out = sample_rcm(rec, cond, seed=0, steps=1, context=opt)
    assert out.shape[2] == T and 4 * (out.shape[2] - 1) + 1 == frames
    assert len(rec.inputs) == nwin and all(c["x"].shape[2] == min(21, T) for c in rec.inputs)
    rec = Recorder()
    out = sample_official(rec, cond, seed=0, steps=1, context=opt, guidance=Guidance(text_scale=1, pose_scale=0))
    assert out.shape[2] == T and len(rec.inputs) == nwin


# ------------------------------------------------------------------------------------------------ anchoring
def test_anchor_takes_the_previous_windows_current_estimate():
    opt = cw.ContextOptions(window=5, overlap=3, anchor=2)
    cond = _small_cond(45)                                   # T=12
    T = cond.latent_shape[1]
    wins = opt.windows(T)
    rec = Recorder()
    sample_rcm(rec, cond, seed=0, steps=2, context=opt)
    for step in range(2):
        calls = rec.inputs[step * len(wins):(step + 1) * len(wins)]
        for k in range(1, len(wins)):
            (ps, _), (s, _) = wins[k - 1], wins[k]
            prev, cur = calls[k - 1], calls[k]
            sigma = prev["t"].double() / 1000
            est = prev["x"].double()[:, :, s - ps:s - ps + 2] - sigma * prev["out"].double()[:, :, s - ps:s - ps + 2]
            assert bool((cur["y"][:, :4, :2] == 1).all())
            torch.testing.assert_close(cur["y"][:, 4:, :2].double(), est, rtol=0, atol=1e-6)
            assert torch.equal(cur["y"][:, :, 2:], cond.y[:, :, s + 2:s + 5])    # the rest: the global slice
        assert torch.equal(calls[0]["y"], cond.y[:, :, :5])


# ------------------------------------------------------------------------------------------------ noise
def test_freenoise_first_window_is_the_plain_draw_and_later_frames_are_shuffled_copies():
    shape, seed = (1, 16, 30, 2, 3), 11
    opt = cw.ContextOptions(window=8, overlap=3)
    n = cw.initial_window_noise(shape, seed, opt)
    assert torch.equal(n[:, :, :8], initial_noise((1, 16, 8, 2, 3), seed))
    # kijai / core rule: frames start+W .. start+W+d-1 are a permutation of frames start .. start+d-1, d = W - o
    d = 8 - 3
    for start in range(0, 30 - 8, d):
        dst = n[:, :, start + 8:min(start + 8 + d, 30)]
        src = n[:, :, start:start + dst.shape[2]]
        key = lambda t: sorted(t[0, :, i].sum().item() for i in range(t.shape[2]))  # noqa: E731
        assert key(dst) == key(src)
        for i in range(dst.shape[2]):
            assert any(torch.equal(dst[:, :, i], src[:, :, j]) for j in range(src.shape[2]))
    assert torch.equal(n, cw.initial_window_noise(shape, seed, opt))                     # deterministic
    ind = cw.initial_window_noise(shape, seed, cw.ContextOptions(window=8, overlap=3, noise="independent"))
    assert torch.equal(ind[:, :, :8], n[:, :, :8])
    assert not any(torch.equal(ind[:, :, i], ind[:, :, j]) for i in range(30) for j in range(i))


def test_long_turbo_run_starts_from_the_one_window_runs_noise():
    opt = cw.ContextOptions(window=5, overlap=2)
    rec_long, rec_short = Recorder(), Recorder()
    sample_rcm(rec_long, _small_cond(45), seed=9, steps=3, context=opt)
    sample_rcm(rec_short, _small_cond(17), seed=9, steps=3, context=opt)
    assert torch.equal(rec_long.inputs[0]["x"], rec_short.inputs[0]["x"])


def test_windowed_turbo_ode_matches_an_independent_loop():
    """sample_rcm(context=...) against the rules written out here: FreeNoise noise, every window through the
    tiny DiT with its slices, linear-ramp fusion (hand weights), Euler step on the full latent."""
    model, cfg = _tiny_dit()
    frames, W, o = 53, 6, 2                                              # T=14 -> (0,6) (4,10) (8,14)
    cond = make_cond(frames=frames, lat_h=2, lat_w=2, text_dim=cfg.text_dim, clip_dim=cfg.clip_dim,
                     clip_tokens=cfg.clip_tokens, text_len=(4, 3), with_neg=False)
    opt = cw.ContextOptions(window=W, overlap=o)
    ours = sample_rcm(model, cond, seed=5, steps=3, mode="ode", schedule="shift", context=opt)

    T = 14
    wins = [(0, 6), (4, 10), (8, 14)]
    assert opt.windows(T) == wins
    w = torch.ones(3, T, dtype=torch.float64)      # hand weights: overlaps {4,5} and {8,9}, ramps 1/3, 2/3
    w[1, 4], w[1, 5], w[0, 4], w[0, 5] = 1 / 3, 2 / 3, 2 / 3, 1 / 3
    w[2, 8], w[2, 9], w[1, 8], w[1, 9] = 1 / 3, 2 / 3, 2 / 3, 1 / 3
    g = torch.Generator().manual_seed(5)
    first = torch.randn((1, 16, W, 2, 2), generator=g)
    pg = torch.Generator().manual_seed((5 ^ 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
    noise = torch.empty(1, 16, T, 2, 2)
    noise[:, :, :W] = first
    for start in range(0, T - W, W - o):
        n = min(start + W + (W - o), T) - (start + W)
        noise[:, :, start + W:start + W + n] = noise[:, :, start:start + n][:, :, torch.randperm(n, generator=pg)]
    s = rcm_sigmas(3, schedule="shift")
    ts = model_timesteps(s, "float32")
    kw = cond.model_kwargs()
    x = noise.double() * s[0]
    with torch.no_grad():
        for i in range(3):
            v = torch.zeros(1, 16, T, 2, 2)
            for k, (a, b) in enumerate(wins):
                vk = model(x.float()[:, :, a:b], ts[i].repeat(1), kw["context"], kw["clip_fea"], kw["clip_fea_c"],
                           kw["y"][:, :, a:b], kw["cond"][:, :, a:b], kw["ref_x"],
                           kw["ref_c"])
                v[:, :, a:b] += w[k, a:b].float().view(1, 1, -1, 1, 1) * vk
            x = x - (s[i] - s[i + 1]) * v.double()
    torch.testing.assert_close(ours, x.float(), rtol=0, atol=1e-6)


def test_wrapper_on_a_one_window_length_is_the_plain_call():
    """Code that wraps the model without asking ``plan`` first (e.g. a guider) still gets the plain call."""
    model, cfg = _tiny_dit()
    cond = make_cond(frames=17, lat_h=2, lat_w=2, text_dim=cfg.text_dim, clip_dim=cfg.clip_dim,
                     clip_tokens=cfg.clip_tokens, text_len=(4, 3))
    args = [cond.model_kwargs()[k] for k in KWARG_ORDER]
    x = torch.randn(1, 16, 5, 2, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700])
    with torch.no_grad():
        assert torch.equal(cw.ContextWindowModel(model, cw.ContextOptions(), 5)(x, t, *args), model(x, t, *args))
