"""TurboDiffusion rCM few-step sampler (and the lightx2v shift schedule), for any Wan-compatible velocity model.

As TurboDiffusion runs it (``turbodiffusion/inference/wan2.{1_t2v,2_i2v}_infer.py``):

* TrigFlow times ``[atan(sigma_max), *mid_t[:n-1], 0]`` with ``mid_t = [1.5, 1.4, 1.0]`` (float64), mapped to
  rectified-flow sigmas ``sin t / (cos t + sin t)`` (= sigma_edm/(1+sigma_edm) with sigma_edm = tan t).
  sigma_max 200 (TurboDiffusion's I2V default; 80 for T2V): 0.995025, 0.933781, 0.852895, 0.608979, 0.
* Timestep given to the net: ``1000*float32(sigma)`` (product in float64) cast to the model dtype (bfloat16 in
  TurboDiffusion): 996, 932, 852, 608 for sigma_max 200. ``timestep_rounding`` picks bf16 (default for
  the rCM schedule), float32 or int64-truncated.
* ``x = noise * sigma_0`` kept in float64; per step ``v = net(x)`` (one pass, no CFG), ``x0 = x - sigma*v``;
  SDE (default): ``x = (1 - sigma') * x0 + sigma' * fresh_noise`` (fresh float32 noise every step, also the
  last where sigma' = 0, from the same seeded generator); ODE: ``x = x - (sigma - sigma') * v`` (Euler).

Differences from TurboDiffusion, by design: noise comes from a CPU ``torch.Generator`` (TurboDiffusion
seeds a CUDA one), so the same seed gives the same video on any device.

Schedules for more steps than the anchors (5-8 with the default mid_t): the TrigFlow anchors
``[atan(sigma_max), *mid_t, 0]`` sit at step fractions 0, 1/K, ..., 1 (K = len(mid_t)+1 = 4); an n-step
schedule (n > K) takes the TrigFlow time at fractions i/n by piecewise-linear interpolation between the
anchors. At n = K it is exactly the published schedule; every multiple of K contains all published points
(8 steps = the 4-step points plus midpoints in TrigFlow time); it is strictly decreasing and ends at 0.
For n <= K the published rule (the head of mid_t) is used unchanged.

``schedule="shift"``: the lightx2v / ComfyUI "simple + shift" schedule ``sigma = s*u/(1+(s-1)*u)``,
``u = 1 - i/n`` (shift 5, 4 steps: 1.0, 0.9375, 0.8333, 0.625, 0), for step-distilled LoRAs such as
lightx2v's Wan2.1-I2V distill LoRA; the model then gets ``1000*sigma`` in float32 by default.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from ..steadydancer.sampling import context_windows as cw
from ..steadydancer.sampling.conditioning import KWARG_ORDER, SteadyDancerConditioning
from ..steadydancer.sampling.official import shift_sigmas

RCM_MID_T = (1.5, 1.4, 1.0)
SIGMA_MAX_I2V = 200.0
SIGMA_MAX_T2V = 80.0
LIGHTX2V_SHIFT = 5.0
MAX_STEPS = 8

Callback = Callable[[int, int, torch.Tensor], None]


def trigflow_times(steps: int = 4, sigma_max: float = SIGMA_MAX_I2V,
                   mid_t: Sequence[float] = RCM_MID_T) -> list[float]:
    """TrigFlow times [t_0 = atan(sigma_max), ..., 0] for ``steps`` steps (see module doc)."""
    steps = int(steps)
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if sigma_max <= 0:
        raise ValueError("sigma_max must be > 0")
    mid_t = [float(t) for t in mid_t]
    anchors = [math.atan(sigma_max), *mid_t, 0.0]
    if any(a <= b for a, b in zip(anchors[:-1], anchors[1:])):
        raise ValueError(f"TrigFlow anchors must decrease strictly: {anchors}")
    K = len(anchors) - 1
    if steps <= K:
        return [anchors[0], *mid_t[: steps - 1], 0.0]
    out = []
    for i in range(steps + 1):
        u = i * K / steps  # position in anchor intervals
        j = min(int(u), K - 1)
        if i * K == j * steps:  # exactly on an anchor: no interpolation error
            out.append(anchors[j])
            continue
        f = u - j
        out.append(anchors[j] + (anchors[j + 1] - anchors[j]) * f)
    out[-1] = 0.0
    return out


def trigflow_to_rf(t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow sigma of TrigFlow time t: ``sin t / (cos t + sin t)``."""
    return torch.sin(t) / (torch.cos(t) + torch.sin(t))


def rcm_sigmas(steps: int = 4, sigma_max: float = SIGMA_MAX_I2V, mid_t: Sequence[float] = RCM_MID_T,
               schedule: str = "rcm", shift: float = LIGHTX2V_SHIFT) -> torch.Tensor:
    """Flow sigmas [steps+1] (float64, ending in 0) for the rCM or the shift schedule."""
    if schedule == "rcm":
        t = torch.tensor(trigflow_times(steps, sigma_max, mid_t), dtype=torch.float64)
        return trigflow_to_rf(t)
    if schedule == "shift":
        if steps < 1:
            raise ValueError("steps must be >= 1")
        u = [1.0 - i / steps for i in range(steps + 1)]
        s = torch.from_numpy(shift_sigmas(u, shift))  # the one flow-shift formula (float64)
        s[-1] = 0.0
        return s
    raise ValueError("schedule must be 'rcm' or 'shift'")


def model_timesteps(sigmas: torch.Tensor, rounding: str = "bfloat16") -> torch.Tensor:
    """Timesteps the net sees for each step (``sigmas`` without the final 0): ``1000*sigma``.

    ``"bfloat16"``: TurboDiffusion (``(t.float() * 1000).to(bf16)``), returned as float32 values;
    ``"float32"``: unrounded float32; ``"int"``: int64 truncation (Wan / official SteadyDancer style).
    """
    # TurboDiffusion: t.float() (float32) times a float64 ones-tensor times 1000 -> float64, then cast
    t64 = sigmas[:-1].to(torch.float32).to(torch.float64) * 1000
    if rounding == "bfloat16":
        return t64.to(torch.bfloat16).float()
    if rounding == "float32":
        return t64.float()
    if rounding == "int":
        return (sigmas[:-1] * 1000).to(torch.int64)
    raise ValueError("rounding must be 'bfloat16', 'float32' or 'int'")


def sample_rcm(
    model,
    cond: SteadyDancerConditioning,
    seed: int = 0,
    steps: int = 4,
    sigma_max: float = SIGMA_MAX_I2V,
    mid_t: Sequence[float] = RCM_MID_T,
    mode: str = "sde",
    schedule: str = "rcm",
    shift: float = LIGHTX2V_SHIFT,
    sigmas: Optional[Sequence[float]] = None,
    timestep_rounding: Optional[str] = None,
    callback: Optional[Callback] = None,
    model_dtype: Optional[torch.dtype] = None,
    device=None,
    text: str = "pos",
    pose: str = "pos",
    context: Optional[cw.ContextOptions] = None,
    window_callback: Optional[Callable[[int], None]] = None,
) -> torch.Tensor:
    """Few-step sampling with one DiT pass per step (no CFG). Returns the final latent, float32
    [B, 16, T, h, w] on ``device``.

    ``mode``: ``"sde"`` (re-noise, default) or ``"ode"`` (Euler). ``schedule``: ``"rcm"`` or ``"shift"``;
    ``sigmas`` (descending, ending in 0) overrides both. ``timestep_rounding``: see ``model_timesteps``
    (default: bfloat16 for rcm, float32 otherwise). ``callback(step, total, x0)`` after each step (0-based
    step, float32 x0); an exception in it propagates after that step. ``model_dtype``: if given, x (kept in
    float64) and the conditioning are cast to it for the model, as TurboDiffusion feeds its net bf16 x;
    default None passes float32 (``SteadyDancerDiT`` casts per op to its compute dtype).

    ``context``: context windows for long videos (steadydancer/sampling/context_windows.py); a length that fits one
    window takes the plain path unchanged. With several windows each step runs the DiT once per window, every
    noise draw (initial and SDE) is a ``cw.WindowNoise`` draw (its first window = the plain draw) and
    ``window_callback(1)`` runs after each window forward.
    """
    if mode not in ("sde", "ode"):
        raise ValueError("mode must be 'sde' or 'ode'")
    if sigmas is not None:
        s = torch.tensor([float(v) for v in sigmas], dtype=torch.float64)
        if len(s) < 2 or s[-1] != 0 or torch.any(s[1:] >= s[:-1]):
            raise ValueError("custom sigmas must be strictly decreasing and end with 0")
    else:
        if steps > MAX_STEPS:
            raise ValueError(f"at most {MAX_STEPS} steps")
        s = rcm_sigmas(steps, sigma_max, mid_t, schedule, shift)
    if timestep_rounding is None:
        timestep_rounding = "bfloat16" if (schedule == "rcm" and sigmas is None) else "float32"
    t_model = model_timesteps(s, timestep_rounding)
    n = len(s) - 1

    device = torch.device(device) if device is not None else cond.device
    B = cond.batch_size
    shape = (B, *cond.latent_shape)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    if cw.plan(context, shape[2]) is not None:
        model = cw.ContextWindowModel(model, context, shape[2], B, window_callback)
        draw = cw.WindowNoise(shape, gen, context, seed)
    else:
        draw = lambda: torch.randn(shape, generator=gen, dtype=torch.float32)  # noqa: E731
    noise = draw()
    kwargs = cond.to(device=device, dtype=model_dtype).model_kwargs(text, pose)
    args = [kwargs[k] for k in KWARG_ORDER]

    def velocity(i, xin):
        return model(xin, t_model[i].repeat(B).to(device), *args)

    return rcm_loop(velocity, noise.to(device), s, draw, mode, callback, model_dtype)


def rcm_loop(velocity: Callable[[int, torch.Tensor], torch.Tensor], noise: torch.Tensor, sigmas: torch.Tensor,
             gen: Union[torch.Generator, Callable[[], torch.Tensor]], mode: str = "sde",
             callback: Optional[Callback] = None,
             model_dtype: Optional[torch.dtype] = None,
             on_step: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None) -> torch.Tensor:
    """The rCM step loop for any velocity source ``velocity(i, x_model) -> v`` (x_model: x in ``model_dtype``,
    default float32). ``noise``: the float32 start noise; ``gen``: the CPU generator that drew it (the SDE's
    fresh noise continues from it), or a callable returning the next fresh noise (``cw.WindowNoise`` for
    context windows); ``sigmas``: float64 [n+1] ending in 0. Returns float32. Used by
    ``sample_rcm`` and by the ComfyUI SAMPLER node (nodes/native_sampling.py): one loop for both."""
    if mode not in ("sde", "ode"):
        raise ValueError("mode must be 'sde' or 'ode'")
    device = noise.device
    if isinstance(gen, torch.Generator):
        shape = tuple(noise.shape)
        draw = lambda: torch.randn(shape, generator=gen, dtype=torch.float32)  # noqa: E731
    else:
        draw = gen
    s_dev = sigmas.to(device=device, dtype=torch.float64)
    n = len(s_dev) - 1
    x = noise.to(dtype=torch.float64) * s_dev[0]
    with torch.no_grad():
        for i in range(n):
            t_cur, t_next = s_dev[i], s_dev[i + 1]
            xin = x.to(model_dtype if model_dtype is not None else torch.float32)
            v = velocity(i, xin).to(torch.float64)
            x0 = x - t_cur * v
            if mode == "ode":
                x = x - (t_cur - t_next) * v
            else:
                fresh = draw().to(device)
                x = (1 - t_next) * x0 + t_next * fresh  # t_next*fresh is float32, as TurboDiffusion
            if on_step is not None:
                on_step(i, x0, x)
            if callback is not None:
                callback(i, n, x0.float())
    return x.float()
