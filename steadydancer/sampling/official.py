"""The official SteadyDancer sampler: flow-matching UniPC (or Euler) with text CFG and pose guidance.

Reproduces ``WanI2VDancer.generate`` (wan/image2video_dancer.py) + ``FlowUniPCMultistepScheduler``
(wan/utils/fm_solvers_unipc.py):

* Schedule (``official_schedule``): ``sigma_max = float32(1 - 1/1000) = 0.9990000128746``,
  ``linspace(sigma_max, 0, n+1)[:-1]`` in float64, shifted ``s*sigma/(1+(s-1)*sigma)`` in float64; the
  solver uses those sigmas cast to float32 with a final 0; the model gets ``int64(1000*sigma)`` (truncated,
  from the float64 sigma), e.g. 10 steps shift 5 -> 999, 978, 952, 920, 882, 833, 768, 681, 555, 356.
* UniPC: diffusers' ``UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
  solver_order=2, predict_x0=True, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero")``
  with the sigmas above passed explicitly. diffusers >= 0.37 builds a different default flow schedule
  (``linspace(1, 1/1000)``), so the sigmas are always passed (``flow_shift=1`` makes diffusers' own shift an
  exact identity). A fresh scheduler is made per call: nothing survives a call, finished or interrupted.
* Guidance per step ``idx`` of ``n`` (order as official): ``e_c`` = (prompt, pose), ``e_ut`` = (negative
  prompt, pose), and only while ``pose_start < idx/n < pose_end`` (strict) ``e_up`` = (prompt, negative pose);
  ``e = e_ut + g_txt*(e_c - e_ut) + g_pose*(e_c - e_up)``. A pass whose coefficient is zero is skipped
  (``g_txt == 1`` drops ``e_ut``, ``g_pose == 0`` drops ``e_up``), so defaults + 40 steps = 91 passes,
  ``g_pose = 0`` -> 80, ``g_txt = 1, g_pose = 0`` -> 40.
* Noise: float32 ``randn`` from a CPU ``torch.Generator`` seeded with ``seed`` (same video on any device;
  the official script draws on CUDA, so its exact noise is not reproduced). Latents stay float32 and are
  passed to the model as float32 (the DiT runs its own compute dtype, as the official autocast run does);
  its output is used as float32.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from . import context_windows as cw
from .conditioning import KWARG_ORDER, SteadyDancerConditioning, concat_kwargs

NUM_TRAIN_TIMESTEPS = 1000
PASS_C = ("pos", "pos")  # prompt, positive pose
PASS_UT = ("neg", "pos")  # negative prompt, positive pose
PASS_UP = ("pos", "neg")  # prompt, negative pose

Callback = Callable[[int, int, torch.Tensor], None]


# ----------------------------------------------------------------------------------------------------------
# schedule
# ----------------------------------------------------------------------------------------------------------
def shift_sigmas(sigmas, shift: float):
    """Flow-matching timestep shift ``s*sigma/(1+(s-1)*sigma)`` (elementwise, float64 numpy)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def official_sigmas_f64(steps: int, shift: float = 5.0,
                        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The ``steps`` shifted sigmas (no final 0) in float64, exactly as ``FlowUniPCMultistepScheduler``."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))  # the training table's first sigma, f32
    base = np.linspace(sigma_max, 0.0, steps + 1)[:-1].copy()
    return shift_sigmas(base, shift)


def official_schedule(steps: int = 40, shift: float = 5.0, sigmas: Optional[Sequence[float]] = None,
                      num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """(sigmas float32 tensor [n+1] ending in 0, timesteps int64 tensor [n], sigmas float64 numpy [n]).

    ``sigmas`` overrides the schedule (n descending values in (0, 1], optionally followed by the final 0,
    e.g. a ComfyUI SIGMAS); they are then used as given (no shift).
    """
    if sigmas is None:
        s64 = official_sigmas_f64(steps, shift, num_train_timesteps)
    else:
        s64 = np.asarray([float(s) for s in sigmas], dtype=np.float64)
        if len(s64) >= 2 and s64[-1] == 0.0:
            s64 = s64[:-1]
        if len(s64) < 1 or np.any(np.diff(s64) >= 0) or s64[-1] <= 0 or s64[0] > 1:
            raise ValueError("custom sigmas must be strictly decreasing in (0, 1] (a final 0 is optional)")
    timesteps = torch.from_numpy(s64 * num_train_timesteps).to(torch.int64)  # truncation, as official
    sig32 = torch.from_numpy(np.concatenate([s64, [0.0]]).astype(np.float32))
    return sig32, timesteps, s64


def make_unipc_scheduler(sigmas_f64: np.ndarray, device=None):
    """diffusers' UniPC configured as the official ``FlowUniPCMultistepScheduler`` with our sigmas."""
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        solver_order=2,
        prediction_type="flow_prediction",
        predict_x0=True,
        solver_type="bh2",
        lower_order_final=True,
        use_flow_sigmas=True,
        flow_shift=1.0,  # sigmas arrive already shifted; 1*s/(1+0*s) == s exactly
        final_sigmas_type="zero",
        timestep_spacing="linspace",
    )
    if "sigmas" not in inspect.signature(sched.set_timesteps).parameters:
        import diffusers
        raise ImportError(f"the official sampler needs diffusers >= 0.37 (UniPCMultistepScheduler.set_timesteps("
                          f"sigmas=...)); this environment has diffusers {diffusers.__version__}: "
                          "pip install -U 'diffusers>=0.37'")
    sched.set_timesteps(sigmas=np.asarray(sigmas_f64, dtype=np.float64).copy(), device=device)
    sched.set_begin_index(0)  # we step strictly in order; avoids timestep lookups
    return sched


# ----------------------------------------------------------------------------------------------------------
# guidance
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Guidance:
    """Text CFG + SteadyDancer pose guidance. Defaults: paper / README (text 5.0, pose 1.0, window
    (0.1, 0.4)); the official argparse default pose scale is 1.5 and ``generate()``'s is 2.0."""

    text_scale: float = 5.0
    pose_scale: float = 1.0
    pose_start: float = 0.1
    pose_end: float = 0.4

    def pose_active(self, idx: int, steps: int) -> bool:
        """Pose guidance at step ``idx`` of ``steps``: ``pose_start < idx/steps < pose_end`` (strict)."""
        frac = idx / steps
        return self.pose_scale != 0 and self.pose_start < frac < self.pose_end

    def passes(self, idx: int, steps: int) -> tuple[tuple[str, str], ...]:
        """The (text, pose) passes of step ``idx`` in the official order."""
        out = [PASS_C]
        if self.text_scale != 1:
            out.append(PASS_UT)
        if self.pose_active(idx, steps):
            out.append(PASS_UP)
        return tuple(out)

    def combine(self, outputs: dict) -> torch.Tensor:
        """``e_ut + g_txt*(e_c - e_ut) + g_pose*(e_c - e_up)`` with the official operation order."""
        e_c = outputs[PASS_C]
        if PASS_UT in outputs:
            e_ut = outputs[PASS_UT]
            e = e_ut + self.text_scale * (e_c - e_ut)
        else:  # text_scale == 1: e_ut + 1*(e_c - e_ut) == e_c
            e = e_c
        if PASS_UP in outputs:
            e = e + self.pose_scale * (e_c - outputs[PASS_UP])
        return e


def count_passes(steps: int, guidance: Guidance = Guidance()) -> int:
    """DiT passes (batch entries per sample) for a run: 91 for the defaults at 40 steps."""
    return sum(len(guidance.passes(i, steps)) for i in range(steps))


# ----------------------------------------------------------------------------------------------------------
# batching decision
# ----------------------------------------------------------------------------------------------------------
def _estimate_pass_bytes(model, cond: SteadyDancerConditioning, itemsize: int) -> int:
    cfg = getattr(model, "config", None)
    dim = int(getattr(cfg, "dim", 5120))
    ffn = int(getattr(cfg, "ffn_dim", 13824))
    _, T, h, w = cond.latent_shape
    T = min(T, int(getattr(model, "frames_per_call", T)))  # a context-window wrapper runs W frames per forward
    tokens = (T + 2) * (h // 2) * (w // 2) * cond.batch_size
    # peak activations of one block: FFN hidden + q/k/v/o + residual stream, with some slack
    return int(tokens * (ffn + 6 * dim) * itemsize * 1.5)


def should_batch(batch_passes: Union[bool, str], model, cond: SteadyDancerConditioning, device,
                 extra_passes: int, itemsize: int = 2) -> bool:
    """``True``/``False`` as given; ``"auto"``: batch only on CUDA when the extra passes' activations fit
    in the free memory (``torch.cuda.mem_get_info``) with a 2 GiB margin."""
    if isinstance(batch_passes, bool):
        return batch_passes
    if batch_passes != "auto":
        raise ValueError("batch_passes must be True, False or 'auto'")
    device = torch.device(device)
    if extra_passes <= 0 or device.type != "cuda" or not torch.cuda.is_available():
        return False
    free, _ = torch.cuda.mem_get_info(device)
    need = extra_passes * _estimate_pass_bytes(model, cond, itemsize)
    return free > need + (2 << 30)


# ----------------------------------------------------------------------------------------------------------
# sampler
# ----------------------------------------------------------------------------------------------------------
def initial_noise(shape, seed: int, device=None) -> torch.Tensor:
    """float32 standard normal noise drawn on the CPU from ``seed`` (device independent), moved to device."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32, device="cpu").to(device)


def _call_model(model, x, timestep, kwargs, model_dtype):
    if model_dtype is not None:
        x = x.to(model_dtype)
    args = [kwargs[k] for k in KWARG_ORDER]
    out = model(x, timestep, *args)
    return out.float()


def sample_official(
    model,
    cond: SteadyDancerConditioning,
    seed: int = 0,
    steps: int = 40,
    shift: float = 5.0,
    guidance: Guidance = Guidance(),
    solver: str = "unipc",
    sigmas: Optional[Sequence[float]] = None,
    noise: Optional[torch.Tensor] = None,
    callback: Optional[Callback] = None,
    batch_passes: Union[bool, str] = "auto",
    model_dtype: Optional[torch.dtype] = None,
    device=None,
    context: Optional[cw.ContextOptions] = None,
    window_callback: Optional[Callable[[int], None]] = None,
) -> torch.Tensor:
    """Run the official SteadyDancer sampler and return the final (normalized) latent, float32
    [B, 16, T, h, w] on ``device``.

    ``model``: callable ``model(x, timestep, context, clip_fea, clip_fea_c, y, cond, ref_x, ref_c)`` returning
    the velocity [B,16,T,h,w]. ``solver``: ``"unipc"`` (official) or ``"euler"``. ``noise``: optional
    initial noise (else drawn from ``seed`` on the CPU). ``callback(step, total, x0)`` after every step
    (``step`` 0-based, ``x0`` = current clean-latent estimate ``x - sigma*v``, float32); an exception
    raised in it propagates after the current step and nothing is kept. ``batch_passes``: run a step's
    passes as one batched forward (True/False/"auto"). ``model_dtype``: if given, cast x and the floating
    conditioning to it before each call. Default None: pass float32 latents and conditioning, as the official
    pipeline feeds fp32 VAE latents into its autocast-bf16 DiT; ``SteadyDancerDiT`` casts per op to its own
    ``compute_dtype`` (pre-casting would round e.g. the pose latent before its fp32 ``cond + temporal +
    spatial`` sum, unlike the official).

    ``context``: context windows for long videos (steadydancer/sampling/context_windows.py); a length that fits one
    window takes the plain path unchanged. With several windows every pass runs on every window (DiT passes
    per step = windows x passes), the initial noise is ``cw.initial_window_noise`` and
    ``window_callback(passes)`` runs after each window forward.
    """
    if solver not in ("unipc", "euler"):
        raise ValueError("solver must be 'unipc' or 'euler'")
    device = torch.device(device) if device is not None else cond.device
    sig32, timesteps, s64 = official_schedule(steps, shift, sigmas)
    n = len(timesteps)
    if any(PASS_UP in guidance.passes(i, n) for i in range(n)) and not cond.has_negative_pose:
        raise ValueError("pose guidance is active in this schedule but cond.cond_neg is missing; "
                         "pass negative pose latents or set pose_scale=0")

    B = cond.batch_size
    shape = (B, *cond.latent_shape)
    windowed = cw.plan(context, shape[2]) is not None
    if windowed:
        model = cw.ContextWindowModel(model, context, shape[2], B, window_callback)
    if noise is None:
        latent = (cw.initial_window_noise(shape, seed, context, device) if windowed
                  else initial_noise(shape, seed, device))
    else:
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != {shape}")
        latent = noise.to(device=device, dtype=torch.float32)

    mcond = cond.to(device=device, dtype=model_dtype)
    max_passes = max(len(guidance.passes(i, n)) for i in range(n))
    act_dtype = model_dtype or getattr(model, "compute_dtype", None) or torch.bfloat16
    batch = should_batch(batch_passes, model, cond, device, max_passes - 1, torch.finfo(act_dtype).bits // 8)
    kw_cache = {}

    def velocity(idx, latent):
        """The guided velocity of step ``idx`` (the official passes, batched or one by one)."""
        passes = guidance.passes(idx, n)
        if batch and len(passes) > 1:
            if passes not in kw_cache:
                kw_cache[passes] = concat_kwargs([mcond.model_kwargs(*p) for p in passes])
            k = len(passes)
            t = timesteps[idx].repeat(B * k).to(device)
            out = _call_model(model, latent.repeat(k, 1, 1, 1, 1), t, kw_cache[passes], model_dtype)
            outputs = dict(zip(passes, out.chunk(k, 0)))
        else:
            t = timesteps[idx].repeat(B).to(device)
            outputs = {p: _call_model(model, latent, t, mcond.model_kwargs(*p), model_dtype) for p in passes}
        return guidance.combine(outputs)

    try:
        return flow_solver_loop(velocity, latent, sig32, solver, callback)
    finally:
        del kw_cache, mcond


def flow_solver_loop(velocity: Callable[[int, torch.Tensor], torch.Tensor], latent: torch.Tensor,
                     sigmas: torch.Tensor, solver: str = "unipc", callback: Optional[Callback] = None,
                     on_step: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None) -> torch.Tensor:
    """The official solver loop, for any velocity source: ``velocity(idx, latent) -> v`` (float32, guided).

    ``sigmas``: float32 [n+1] ending in 0 (``official_schedule(...)[0]`` or any ComfyUI SIGMAS in (0, 1]);
    ``latent``: the float32 start (raw noise for a full denoise, as official). UniPC = diffusers' scheduler as
    ``make_unipc_scheduler`` (it computes in the float32 sigmas, so float32 input loses nothing), Euler =
    ``x + (sigma' - sigma) v``. ``callback(step, total, x0)`` / ``on_step(step, x0, latent)`` after each step
    (x0 = ``latent - sigma v`` before the step). Used by ``sample_official`` and by the ComfyUI SAMPLER node
    (nodes/native_sampling.py), so both run this one loop.
    """
    if solver not in ("unipc", "euler"):
        raise ValueError("solver must be 'unipc' or 'euler'")
    sig32 = sigmas.detach().to("cpu", torch.float32)
    n = len(sig32) - 1
    scheduler = make_unipc_scheduler(sig32[:-1].double().numpy(), latent.device) if solver == "unipc" else None
    timesteps = scheduler.timesteps if scheduler is not None else None
    try:
        with torch.no_grad():
            for idx in range(n):
                v = velocity(idx, latent)
                sigma = sig32[idx].item()
                x0 = latent - sigma * v  # same as the scheduler's flow->x0 conversion
                if scheduler is not None:
                    latent = scheduler.step(v, timesteps[idx], latent, return_dict=False)[0]
                else:
                    latent = latent + (sig32[idx + 1] - sig32[idx]).item() * v
                if on_step is not None:
                    on_step(idx, x0, latent)
                if callback is not None:
                    callback(idx, n, x0)
    finally:
        del scheduler
    return latent
