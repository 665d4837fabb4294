"""SteadyDancer's samplers as native ComfyUI pieces for ``SamplerCustomAdvanced`` (bridge-side; imports ``comfy``
lazily through ``native()``). No sampling math here: the loops are the core's ``flow_solver_loop`` (official
UniPC / Euler, steadydancer/sampling.py) and ``rcm_loop`` (turbo/rcm.py), the guidance combination is the core
``Guidance`` (steadydancer/sampling.py); these classes only adapt ComfyUI's calling conventions:

- GUIDER ``SteadyDancerGuider(CFGGuider)``: three cond sets (``positive``, ``negative``, ``negative_pose`` =
  prompt + negative poses); per step the core ``Guidance.passes`` picks the passes (text CFG, pose CFG inside its
  window), ``comfy.samplers.calc_cond_batch`` runs them (batched into one forward when ComfyUI's memory check
  allows; context windows, EasyCache and patches hook in there), ``Guidance.combine`` mixes the x0 predictions
  (the official v-space formula is linear, so this equals it up to rounding).
- SAMPLERs (``comfy.samplers.Sampler``): they get the guider's x0 and turn it into the velocity the core loops
  take (``v = (x - x0) / sigma``); the official sampler starts from the raw noise (as official; ComfyUI's
  KSAMPLER would scale it by sigma_0 = 0.999), rCM from ``sigma_0 * noise`` with its SDE noise continuing the
  generator that ``RandomNoise`` seeded (bit-identical noise to ``sample_rcm``).
- The timestep rounding each sampler needs (official int64 truncation, TurboDiffusion bf16) goes to the DiT
  through ``transformer_options["steadydancer_timestep"]``.
"""
from __future__ import annotations

import functools
import types

import torch

from .native_model import NEGATIVE_POSE, TIMESTEP_KEY


def step_index(timestep: torch.Tensor, model_options: dict) -> tuple[int, int]:
    """(index, steps) of the current step, found in the sampler's ``sample_sigmas`` (as core context windows do)."""
    sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
    if sigmas is None:
        raise RuntimeError("SteadyDancer guider: the sampler gave no sample_sigmas")
    s = float(timestep.reshape(-1)[0])
    hits = (sigmas.float() == s).nonzero().reshape(-1)
    if len(hits) == 0:
        hits = (sigmas.float() - s).abs().argmin().reshape(1)
    return int(hits[0]), len(sigmas) - 1


def _with_timestep_mode(extra_args: dict, mode: str) -> dict:
    extra = dict(extra_args)
    mo = dict(extra.get("model_options", {}))
    to = dict(mo.get("transformer_options", {}))
    to[TIMESTEP_KEY] = mode
    mo["transformer_options"] = to
    extra["model_options"] = mo
    return extra


@functools.lru_cache(maxsize=None)
def native():
    import comfy.samplers

    from ..steadydancer import sampling as sds
    from ..turbo import rcm

    class SteadyDancerGuider(comfy.samplers.CFGGuider):
        guidance = sds.Guidance()

        def set_guidance(self, guidance):
            self.guidance = guidance

        def set_conds(self, positive, negative):
            self.inner_set_conds({"positive": positive, "negative": negative, NEGATIVE_POSE: positive})

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            idx, n = step_index(timestep, model_options)
            passes = self.guidance.passes(idx, n)
            names = {sds.PASS_C: "positive", sds.PASS_UT: "negative", sds.PASS_UP: NEGATIVE_POSE}
            conds = [self.conds.get(names[p]) for p in passes]
            out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
            return self.guidance.combine(dict(zip(passes, out)))

    class FlowSampler(comfy.samplers.Sampler):
        """The official flow UniPC (or Euler) loop of steadydancer/sampling.py."""

        def __init__(self, solver="unipc"):
            self.solver = solver

        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            extra = _with_timestep_mode(extra_args, "int")
            sig = sigmas.detach().float()
            if latent_image is not None and bool(latent_image.any()):
                x = model_wrap.inner_model.model_sampling.noise_scaling(sig[0], noise, latent_image)
            else:
                x = noise.float()  # the official start: raw noise, not sigma_0 * noise
            B, n = x.shape[0], len(sig) - 1

            def velocity(idx, latent):
                s = sig[idx].to(latent.device)
                x0 = model_wrap(latent, s * latent.new_ones(B), **extra)
                return (latent - x0.float()) / s

            def on_step(idx, x0, latent):
                if callback is not None:
                    callback(idx, x0, latent, n)

            return sds.flow_solver_loop(velocity, x, sig, self.solver, on_step=on_step)

    class RCMSampler(comfy.samplers.Sampler):
        """TurboDiffusion's rCM loop (turbo/rcm.py): SDE (re-noise) or ODE (Euler), one pass per step."""

        def __init__(self, mode="sde", timestep="bfloat16"):
            self.mode, self.timestep = mode, timestep

        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            extra = _with_timestep_mode(extra_args, self.timestep)
            gen = torch.Generator(device="cpu")
            gen.manual_seed(int(extra_args.get("seed", 0) or 0))
            torch.randn(tuple(noise.shape), generator=gen, dtype=torch.float32)  # = RandomNoise's draw: continue after it
            sig = sigmas.detach().to(torch.float64)
            B, n = noise.shape[0], len(sig) - 1

            def velocity(i, xin):
                s = sig[i].float().to(xin.device)
                x0 = model_wrap(xin, s * xin.new_ones(B), **extra)
                return (xin - x0.float()) / s

            def on_step(i, x0, x):
                if callback is not None:
                    callback(i, x0.float(), x.float(), n)

            return rcm.rcm_loop(velocity, noise.float(), sig, gen, self.mode, on_step=on_step)

    return types.SimpleNamespace(SteadyDancerGuider=SteadyDancerGuider, FlowSampler=FlowSampler,
                                 RCMSampler=RCMSampler)


def make_guider(model, positive, negative, guidance):
    g = native().SteadyDancerGuider(model)
    g.set_conds(positive, negative)
    g.set_guidance(guidance)
    return g


def sample_custom_advanced(guider, sampler, sigmas, latent, seed):
    """Core ``SamplerCustomAdvanced`` itself (RandomNoise from ``seed``, progress + previews, guider.sample), for
    the one-node samplers. Returns the LATENT dict."""
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    out = SamplerCustomAdvanced.execute(Noise_RandomNoise(int(seed)), guider, sampler, sigmas, latent)
    return out.result[0]


def basic_guider(model, positive):
    """Core BasicGuider (one pass per step, no CFG): what the rCM sampler needs."""
    from comfy_extras.nodes_custom_sampler import Guider_Basic

    g = Guider_Basic(model)
    g.set_conds(positive)
    return g
