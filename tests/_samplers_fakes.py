"""Test doubles for the sampler tests: a small deterministic stand-in for the DiT forward and a tiny
conditioning bundle. The stand-in is a fixed nonlinear function of *all* DiT inputs, applied row by row
(so batching passes cannot change results), and it records what it was called with."""
from __future__ import annotations

import torch

from steadydancer_turbo.steadydancer.sampling.conditioning import (
    SteadyDancerConditioning,
    build_i2v_mask,
    build_ref_c,
    build_ref_x,
    build_y,
)


def init_tiny_weights(model, seed=0):
    """Deterministic small random weights for a tiny DiT (norm scales near 1), fp32 compute."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.compute_dtype = torch.float32
    return model.eval()


def make_cond(frames=9, lat_h=4, lat_w=6, seed=123, batch=1, with_neg=True, text_len=(7, 5),
              text_dim=4096, clip_tokens=257, clip_dim=1280):
    g = torch.Generator().manual_seed(seed)
    T = (frames - 1) // 4 + 1

    def r(*shape):
        return torch.randn(*shape, generator=g)

    img = torch.cat([r(batch, 16, 1, lat_h, lat_w), torch.zeros(batch, 16, T - 1, lat_h, lat_w)], 2)
    y = build_y(build_i2v_mask(frames, lat_h, lat_w), img)
    return SteadyDancerConditioning(
        context=r(batch, text_len[0], text_dim),
        context_null=r(batch, text_len[1], text_dim),
        clip_fea=r(batch, clip_tokens, clip_dim),
        clip_fea_c=r(batch, clip_tokens, clip_dim),
        y=y,
        cond_pos=r(batch, 16, T, lat_h, lat_w),
        cond_neg=r(batch, 16, T, lat_h, lat_w) if with_neg else None,
        ref_x=build_ref_x(r(batch, 16, 1, lat_h, lat_w)),
        ref_c=build_ref_c(r(batch, 16, 1, lat_h, lat_w)),
    )


class FakeDiT:
    """v = f(x, t, context, clip, y, cond, ref) row-wise; records calls and per-row outputs."""

    def __init__(self):
        self.calls = []  # (batch rows, timestep list)
        self.rows = []  # per row: dict(x, t, ctx_sum, cond_sum, out)

    def __call__(self, x, timestep, context, clip_fea, clip_fea_c, y, cond, ref_x, ref_c):
        B = x.shape[0]
        assert timestep.shape == (B,)
        for t in (context, clip_fea, clip_fea_c, y, cond, ref_x, ref_c):
            assert t.shape[0] == B
        xf = x.float()
        tt = (timestep.double() / 1000).float().view(B, 1, 1, 1, 1)
        ctx = (context.double().sum(dim=(1, 2)) / 1000).float().view(B, 1, 1, 1, 1)
        clip = (clip_fea.float().mean(dim=(1, 2)) + 0.5 * clip_fea_c.float().mean(dim=(1, 2))).view(B, 1, 1, 1, 1)
        refs = (0.1 * ref_x[:, :16].float() + 0.05 * ref_c[:, :16].float())  # [B,16,1,h,w] broadcast over T
        out = torch.tanh(0.8 * xf + 0.4 * cond.float() + 0.3 * y[:, 4:].float() + 0.2 * y[:, :4].float().mean(1, keepdim=True) + refs)
        out = out * (0.5 + tt) + ctx + clip - 0.3 * xf
        self.calls.append((B, timestep.tolist()))
        for b in range(B):
            self.rows.append(dict(x=x[b].clone(), t=timestep[b].item(),
                                  ctx_sum=context[b].double().sum().item(),
                                  cond_sum=cond[b].double().sum().item(), out=out[b].clone()))
        return out

    @property
    def passes(self):
        return sum(b for b, _ in self.calls)

    def kind(self, row, cond):
        """(text, pose) of a recorded row, identified by its context / pose latent."""
        text = "pos" if abs(row["ctx_sum"] - cond.context.double().sum().item()) < 1e-6 else "neg"
        assert text == "pos" or abs(row["ctx_sum"] - cond.context_null.double().sum().item()) < 1e-6
        pose = "pos" if abs(row["cond_sum"] - cond.cond_pos.double().sum().item()) < 1e-6 else "neg"
        return text, pose


def official_loop(scheduler, timesteps, cond, noise, g_txt, g_pose, start=0.1, end=0.4):
    """The official generate() loop around FakeDiT, one pass per forward, stepping ``scheduler`` (a diffusers-
    style scheduler: the official FlowUniPCMultistepScheduler or diffusers' UniPC); returns per-step latents.
    Written from the official generate_dancer / image2video_dancer loop, independent of our sampler."""
    model = FakeDiT()
    kw = {
        "c": (cond.context, cond.cond_pos),
        "ut": (cond.context_null, cond.cond_pos),
        "up": (cond.context, cond.cond_neg),
    }

    def run(name, latent, t):
        ctx, pose = kw[name]
        return model(latent, t.view(1), ctx, cond.clip_fea, cond.clip_fea_c, cond.y, pose, cond.ref_x, cond.ref_c)

    latent = noise.clone()
    out = []
    for idx, t in enumerate(timesteps):
        e_c = run("c", latent, t)
        e_ut = run("ut", latent, t)
        if idx / len(timesteps) > start and idx / len(timesteps) < end:
            e_up = run("up", latent, t)
            noise_pred = e_ut + g_txt * (e_c - e_ut) + g_pose * (e_c - e_up)
        else:
            noise_pred = e_ut + g_txt * (e_c - e_ut)
        latent = scheduler.step(noise_pred, t, latent, return_dict=False)[0]
        out.append(latent)
    return out
