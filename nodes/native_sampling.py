"""SteadyDancer's samplers as native ComfyUI pieces for ``SamplerCustomAdvanced`` (bridge-side; imports ``comfy``
lazily through ``native()``). No sampling math here: the loops are the core's ``flow_solver_loop`` (official
UniPC / Euler, steadydancer/sampling/official.py) and ``rcm_loop`` (turbo/rcm.py), the guidance combination is the core
``Guidance`` (steadydancer/sampling/official.py); these classes only adapt ComfyUI's calling conventions:

- GUIDER ``SteadyDancerGuider(CFGGuider)``: three cond sets (``positive``, ``negative``, ``negative_pose`` =
  prompt + negative poses); per step the core ``Guidance.passes`` picks the passes (text CFG, pose CFG inside its
  window), ``comfy.samplers.calc_cond_batch`` runs them (batched into one forward when ComfyUI's memory check
  allows; context windows, EasyCache and patches hook in there), ``Guidance.combine`` mixes the x0 predictions
  (the official v-space formula is linear, so this equals it up to rounding). The ``negative_pose`` set exists
  for a run only when its sigmas have a pose-guidance step (``pose_conds_for_run``): the negative pose latents,
  which the Conditioning node defers, are VAE-encoded then, before the DiT is loaded, and never otherwise.
- SAMPLERs (``comfy.samplers.Sampler``): they get the guider's x0 and turn it into the velocity the core loops
  take (``v = (x - x0) / sigma``); the official sampler starts from the raw noise (as official; ComfyUI's
  KSAMPLER would scale it by sigma_0 = 0.999), rCM from ``sigma_0 * noise`` with its SDE noise continuing the
  generator that ``RandomNoise`` seeded (bit-identical noise to ``sample_rcm``).
- Context windows (long videos): the options ride in ``transformer_options`` (``native_model.with_context``) and
  the DiT call windows itself; the rCM SAMPLER's SDE draws then follow the core's ``WindowNoise`` and the
  one-node samplers start from its FreeNoise draw (``WindowedNoise``), exactly as ``sample_rcm`` /
  ``sample_official`` with ``context=``. Core ``RandomNoise`` (KSampler, SamplerCustomAdvanced) gives plain
  i.i.d. start noise over all frames instead. With windows our SAMPLERs' progress bar counts window passes
  (``WindowProgress``: windows x guidance passes per step, with a preview of the last step's x0) and Cancel is
  checked after every window pass (also under KSampler, whose bar counts steps).
- The timestep rounding each sampler needs (official int64 truncation, TurboDiffusion bf16) goes to the DiT
  through ``transformer_options["steadydancer_timestep"]``.
"""
from __future__ import annotations

import functools
import types

import torch

from .native_model import KEY_POSE_NEG, NEGATIVE_POSE, PROGRESS_KEY, TIMESTEP_KEY, context_of


def pose_conds_for_run(conds: dict, guidance, steps: int) -> dict:
    """The guider's cond sets for one run of ``steps`` steps: without ``negative_pose`` when no step of this
    schedule runs pose guidance (scale 0, empty window); else with its deferred negative pose latents encoded
    (conditioning_nodes.DeferredLatent, once per Conditioning output). ``conds`` itself is left unchanged."""
    from .conditioning_nodes import resolve_latent
    if not any(guidance.pose_active(i, steps) for i in range(max(0, steps))):
        return {k: v for k, v in conds.items() if k != NEGATIVE_POSE}
    out = dict(conds)
    if NEGATIVE_POSE in out:
        out[NEGATIVE_POSE] = [{**c, KEY_POSE_NEG: resolve_latent(c[KEY_POSE_NEG])} if KEY_POSE_NEG in c else c
                              for c in out[NEGATIVE_POSE]]
    return out


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


class WindowProgress:
    """Per-window-pass progress for a windowed run: the DiT reports every window forward (``window_done(passes)``,
    nodes/native_model.py), the SAMPLER every finished step (``step_done``); both drive ComfyUI's step callback
    with ``total`` = windows x guidance passes of the whole run. ``batch``: latent rows per guidance pass."""

    def __init__(self, callback, total: int, batch: int, x):
        self.callback, self.total, self.batch = callback, max(1, int(total)), int(batch)
        self.done, self.x0, self.x = 0, x, x

    def _report(self, value):
        if self.callback is not None:
            self.callback(min(max(value, 1), self.total) - 1, self.x0, self.x, self.total)

    def window_done(self, passes: int):
        self.done += int(passes)
        self._report(self.done)

    def step_done(self, x0, x, last: bool):
        self.x0, self.x = x0, x
        self._report(self.total if last else self.done)


def _passes_per_run(guider, steps: int) -> int:
    """Guidance passes of a run with ``guider``: ours by its Guidance, core CFG guiders 2 per step (1 at cfg 1)."""
    guidance = getattr(guider, "guidance", None)
    if guidance is not None:
        from ..steadydancer.sampling import official as sds
        return sds.count_passes(steps, guidance)
    conds = getattr(guider, "conds", {}) or {}
    two = "negative" in conds and float(getattr(guider, "cfg", 1.0)) != 1.0
    return steps * (2 if two else 1)


def _window_progress(model_wrap, extra: dict, callback, x, steps: int):
    """(extra_args with a WindowProgress in transformer_options, the progress) when the MODEL runs context windows;
    else (extra, None)."""
    from ..steadydancer.sampling import context_windows as cw
    windows = context_of(extra.get("model_options"))
    wins = cw.plan(windows, x.shape[2])
    if wins is None:
        return extra, None
    prog = WindowProgress(callback, len(wins) * _passes_per_run(model_wrap, steps), x.shape[0], x)
    extra["model_options"]["transformer_options"][PROGRESS_KEY] = prog
    return extra, prog


@functools.lru_cache(maxsize=None)
def native():
    import comfy.samplers

    from ..steadydancer.sampling import context_windows as cw
    from ..steadydancer.sampling import official as sds
    from ..turbo import rcm

    class SteadyDancerGuider(comfy.samplers.CFGGuider):
        guidance = sds.Guidance()

        def set_guidance(self, guidance):
            self.guidance = guidance

        def set_conds(self, positive, negative):
            self.inner_set_conds({"positive": positive, "negative": negative, NEGATIVE_POSE: positive})

        def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
            kept = self.original_conds
            self.original_conds = pose_conds_for_run(kept, self.guidance, int(sigmas.shape[-1]) - 1)
            try:
                return super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)
            finally:
                self.original_conds = kept

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            idx, n = step_index(timestep, model_options)
            passes = self.guidance.passes(idx, n)
            names = {sds.PASS_C: "positive", sds.PASS_UT: "negative", sds.PASS_UP: NEGATIVE_POSE}
            conds = [self.conds.get(names[p]) for p in passes]
            out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
            return self.guidance.combine(dict(zip(passes, out)))

    class FlowSampler(comfy.samplers.Sampler):
        """The official flow UniPC (or Euler) loop of steadydancer/sampling/official.py."""

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
            extra, prog = _window_progress(model_wrap, extra, callback, x, n)

            def velocity(idx, latent):
                s = sig[idx].to(latent.device)
                x0 = model_wrap(latent, s * latent.new_ones(B), **extra)
                return (latent - x0.float()) / s

            def on_step(idx, x0, latent):
                if prog is not None:
                    prog.step_done(x0, latent, idx == n - 1)
                elif callback is not None:
                    callback(idx, x0, latent, n)

            return sds.flow_solver_loop(velocity, x, sig, self.solver, on_step=on_step)

    class RCMSampler(comfy.samplers.Sampler):
        """TurboDiffusion's rCM loop (turbo/rcm.py): SDE (re-noise) or ODE (Euler), one pass per step."""

        def __init__(self, mode="sde", timestep="bfloat16"):
            self.mode, self.timestep = mode, timestep

        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            extra = _with_timestep_mode(extra_args, self.timestep)
            seed = int(extra_args.get("seed", 0) or 0)
            gen = torch.Generator(device="cpu")
            gen.manual_seed(seed)
            windows = context_of(extra_args.get("model_options"))
            if cw.plan(windows, noise.shape[2]) is not None:
                draw = cw.WindowNoise(tuple(noise.shape), gen, windows, seed)
                draw()  # = the one-node sampler's start noise (WindowedNoise): continue after it, as sample_rcm
            else:
                draw = gen
                torch.randn(tuple(noise.shape), generator=gen, dtype=torch.float32)  # = RandomNoise's draw
            sig = sigmas.detach().to(torch.float64)
            B, n = noise.shape[0], len(sig) - 1
            extra, prog = _window_progress(model_wrap, extra, callback, noise.float(), n)

            def velocity(i, xin):
                s = sig[i].float().to(xin.device)
                x0 = model_wrap(xin, s * xin.new_ones(B), **extra)
                return (xin - x0.float()) / s

            def on_step(i, x0, x):
                if prog is not None:
                    prog.step_done(x0.float(), x.float(), i == n - 1)
                elif callback is not None:
                    callback(i, x0.float(), x.float(), n)

            return rcm.rcm_loop(velocity, noise.float(), sig, draw, self.mode, on_step=on_step)

    return types.SimpleNamespace(SteadyDancerGuider=SteadyDancerGuider, FlowSampler=FlowSampler,
                                 RCMSampler=RCMSampler)


def make_guider(model, positive, negative, guidance):
    g = native().SteadyDancerGuider(model)
    g.set_conds(positive, negative)
    g.set_guidance(guidance)
    return g


class WindowedNoise:
    """A NOISE for SamplerCustomAdvanced (the one-node samplers, the Context Noise node): the core's context-window
    start noise (``cw.initial_window_noise``: the first window's frames = RandomNoise's draw for that shape, later
    frames FreeNoise / independent); core RandomNoise's own draw when ``context`` makes one window."""

    def __init__(self, seed, context):
        self.seed, self.context = int(seed), context

    def generate_noise(self, input_latent):
        from ..steadydancer.sampling import context_windows as cw
        x = input_latent["samples"]
        if cw.plan(self.context, int(x.shape[2])) is None:   # one window: exactly core RandomNoise
            from comfy_extras.nodes_custom_sampler import Noise_RandomNoise
            return Noise_RandomNoise(self.seed).generate_noise(input_latent)
        return cw.initial_window_noise(tuple(x.shape), self.seed, self.context)


def sample_custom_advanced(guider, sampler, sigmas, latent, seed, context=None):
    """Core ``SamplerCustomAdvanced`` itself (RandomNoise from ``seed``, or ``WindowedNoise`` when ``context``
    makes several windows; progress + previews, guider.sample), for the one-node samplers. Returns the LATENT."""
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced

    from ..steadydancer.sampling import context_windows as cw
    windowed = cw.plan(context, int(latent["samples"].shape[2])) is not None
    noise = WindowedNoise(seed, context) if windowed else Noise_RandomNoise(int(seed))
    out = SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent)
    return out.result[0]


def basic_guider(model, positive):
    """Core BasicGuider (one pass per step, no CFG): what the rCM sampler needs."""
    from comfy_extras.nodes_custom_sampler import Guider_Basic

    g = Guider_Basic(model)
    g.set_conds(positive)
    return g
