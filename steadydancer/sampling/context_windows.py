"""Context windows for long videos: every denoising step runs the DiT on overlapping windows of latent frames
and fuses the overlaps, so a video of any 4n+1 length is made by a model trained on 81 frames (21 latents).

Plain PyTorch; the samplers use it as a wrapper around the model callable (``ContextWindowModel`` has the
DiT's call signature ``model(x, timestep, *[kwargs[k] for k in KWARG_ORDER])``), so guidance, schedules and
other wrappers (multi-GPU, ...) compose with it unchanged.

Schedule (``window_schedule``): windows of exactly ``window`` latent frames (default 21 = 81 px), the fewest
that keep consecutive overlaps >= ``overlap`` (default 4 = 16 px), placed evenly from frame 0 to the last
frame (the first starts at 0, the last ends on T-1; start gaps differ by at most one frame). The output has
exactly the input's frames: nothing is padded, nothing dropped. ``T <= window`` is one window, and then the
samplers skip all of this: bit-identical to the no-window path.

Per window (``ContextWindowModel.__call__``):

- ``x``, the pose latent ``cond`` and ``y`` are sliced along frames with the same indices. ``cond`` is the
  positive *or* negative pose (or both, stacked along batch in batched guidance passes): every batch row is
  sliced alike. The pose comes from one VAE encode of the whole pose video (so a later window's frame 0 is a
  4-pixel-frame causal latent, as in kijai's wrapper).
- ``y`` (mask + image latent): the first window gets the global frames 0..W-1 (mask 1 + reference latent on
  frame 0, as the official 81-frame run). Later windows get their own slice of the global ``y``: mask 0 and the
  latents of the gray frames, i.e. **no** first-frame constraint, so they do not snap back to the reference
  image. Identity still reaches every window through the reference tokens ``ref_x`` / ``ref_c`` (appended
  after each window's frames at window-local RoPE t = W, W+1) and both CLIP features, which are passed
  unchanged to every window (``ref_c`` is the global first pose, the official semantics).
- Optional anchoring (``anchor`` latent frames, off by default): window k>0 takes its first ``anchor`` frames
  as known frames (mask 1) whose image latent is window k-1's clean estimate ``x - sigma*v`` of the same step
  and pass (``sigma = timestep/1000``; the official sampler's timesteps are truncated, an error < 1e-3 in
  sigma). Windows then run one after another.
- Fusion: ``v = sum_k w_k * v_k`` per frame with weights that sum to 1 on every frame (``fusion_weights``):
  1 inside a window, a ``linear`` ((j+1)/(o+1)) or ``cosine`` (sin^2) ramp across each overlap of o frames,
  normalised per frame (exact where only one window covers a frame). Each guidance pass is fused on its own and
  the guidance combination then runs on the fused full latent (linear, so equal to guiding per window then
  fusing, not bitwise). The sampler makes one solver step per denoising step on the full latent.
- DiT passes per denoising step: (windows) x (guidance passes of that step): turbo 1 x windows; official 2 or
  3 (pose guidance window 0.1-0.4) x windows. ``window_callback(units)`` runs after every window forward with
  the number of guidance passes it did (progress bars, interrupt).

Noise (``WindowNoise``): ``"freenoise"`` (default) draws the first window's noise exactly as the one-window
path does (same generator, same shape: a long video starts from the 81-frame run's noise, also every SDE
draw of the turbo sampler), and fills each later stride of frames with a random permutation of an earlier
stride (FreeNoise / kijai / ComfyUI core rule, permutations from a second generator seeded from ``seed``), so
every window's noise is a reshuffle of the first window's. Why: overlaps are consistent by construction (all
windows slice one global latent), and FreeNoise gives the later windows the same noise "content" as the
reference-anchored first window, the usual remedy for content drift between windows. ``"independent"``: the
first window as above, the other frames i.i.d. from the second generator.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .conditioning import KWARG_ORDER, MASK_CHANNELS
from .latents import VAE_STRIDE

FUSIONS = ("linear", "cosine")
NOISES = ("freenoise", "independent")
DEFAULT_WINDOW = 21   # latent frames = 81 pixel frames, the training length
DEFAULT_OVERLAP = 4   # latent frames = 16 pixel frames
_PERM_SEED_MIX = 0x9E3779B97F4A7C15  # second generator's seed = seed XOR this (fixed, documented)

Window = Tuple[int, int]  # [start, end) in latent frames


@dataclass(frozen=True)
class ContextOptions:
    """Context-window settings, all in latent frames (1 latent = 4 pixel frames; latent 0 = pixel frame 0)."""

    window: int = DEFAULT_WINDOW
    overlap: int = DEFAULT_OVERLAP
    fusion: str = "linear"
    noise: str = "freenoise"
    anchor: int = 0
    batch_windows: bool = False  # True: all windows in one batched forward (more VRAM; not with anchor)

    def __post_init__(self):
        for name in ("window", "overlap", "anchor"):
            if int(getattr(self, name)) != getattr(self, name):
                raise ValueError(f"context {name} must be a whole number of latent frames")
        if self.window < 2:
            raise ValueError(f"context window must be at least 2 latent frames (5 pixel frames), got {self.window}")
        if not 1 <= self.overlap < self.window:
            raise ValueError(f"context overlap must be at least 1 latent frame (4 pixel frames) and smaller than the "
                             f"window ({self.window} latent = {pixel_frames(self.window)} frames), got {self.overlap}")
        if not 0 <= self.anchor <= self.overlap:
            raise ValueError(f"anchor frames ({self.anchor} latent) must be between 0 and the overlap "
                             f"({self.overlap} latent)")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {self.noise!r}")
        if self.anchor and self.batch_windows:
            raise ValueError("anchoring needs the windows one after another; turn batch_windows off")

    @classmethod
    def from_pixel_frames(cls, window_frames: int = 81, overlap_frames: int = 16, anchor_frames: int = 0,
                          **kw) -> Tuple["ContextOptions", List[str]]:
        """Options from pixel-frame counts (what users know) and the notes about what was adjusted.

        ``window_frames`` must be 4n+1 (rounded down otherwise, with a note); ``overlap_frames`` and
        ``anchor_frames`` multiples of 4 (rounded down, with a note). Impossible combinations raise."""
        notes = []
        wf, of, af = int(window_frames), int(overlap_frames), int(anchor_frames)
        if wf < 5:
            raise ValueError(f"context window must be at least 5 frames, got {wf}")
        good = (wf - 1) // VAE_STRIDE[0] * VAE_STRIDE[0] + 1
        if good != wf:
            notes.append(f"context window {wf} is not 4n+1; using {good} frames.")
        for name, v in (("overlap", of), ("anchor", af)):
            if v % VAE_STRIDE[0]:
                notes.append(f"context {name} {v} is not a multiple of 4; using {v // 4 * 4} frames.")
        if of < VAE_STRIDE[0]:
            raise ValueError(f"context overlap must be at least 4 frames (1 latent frame), got {of}")
        return cls(window=latent_count(good), overlap=of // 4, anchor=af // 4, **kw), notes

    def windows(self, frames: int) -> List[Window]:
        return window_schedule(frames, self.window, self.overlap)

    def active(self, frames: int) -> bool:
        """More than one window for ``frames`` latent frames (else the samplers take the plain path)."""
        return int(frames) > self.window


def pixel_frames(latent: int) -> int:
    return VAE_STRIDE[0] * (int(latent) - 1) + 1


def latent_count(pixel: int) -> int:
    return (int(pixel) - 1) // VAE_STRIDE[0] + 1


# ----------------------------------------------------------------------------------------------------- schedule
def window_schedule(frames: int, window: int = DEFAULT_WINDOW, overlap: int = DEFAULT_OVERLAP) -> List[Window]:
    """[start, end) windows over ``frames`` latent frames (see module doc). Raises on impossible settings."""
    T, W, o = int(frames), int(window), int(overlap)
    if T < 1:
        raise ValueError(f"need at least one latent frame, got {T}")
    if W < 2 or not 1 <= o < W:
        raise ValueError(f"impossible context window/overlap: window {W}, overlap {o} latent frames "
                         "(need window >= 2 and 1 <= overlap < window)")
    if T <= W:
        return [(0, T)]
    n = -(-(T - o) // (W - o))  # fewest windows with every gap <= W - o
    span = T - W
    starts = [(i * span + (n - 1) // 2) // (n - 1) for i in range(n)]  # rounded i*span/(n-1), integers only
    return [(s, s + W) for s in starts]


def _ramp(k: torch.Tensor, m: int, fusion: str) -> torch.Tensor:
    r = k / m
    return r if fusion == "linear" else torch.sin(0.5 * math.pi * r) ** 2


def fusion_weights(windows: Sequence[Window], frames: int, fusion: str = "linear") -> List[torch.Tensor]:
    """Per-window float64 weights [end-start] that sum to 1 on every frame.

    Raw weight of window k at its local frame j: 1, times a ramp r((j+1)/(o_l+1)) over the o_l frames it
    shares with window k-1 and r((L-j)/(o_r+1)) over the o_r frames it shares with window k+1 (the smaller
    of the two where they meet), r = identity (linear) or sin^2(pi/2 .) (cosine); then each frame's weights
    are divided by their sum. Two windows on a frame get r and 1-r (complementary ramps: already sum 1)."""
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    raws = []
    for k, (s, e) in enumerate(windows):
        L = e - s
        j = torch.arange(L, dtype=torch.float64)
        w = torch.ones(L, dtype=torch.float64)
        if k > 0:
            o_l = windows[k - 1][1] - s
            if o_l > 0:
                w = torch.minimum(w, torch.where(j < o_l, _ramp(j + 1, o_l + 1, fusion), w))
        if k + 1 < len(windows):
            o_r = e - windows[k + 1][0]
            if o_r > 0:
                w = torch.minimum(w, torch.where(j >= L - o_r, _ramp(L - j, o_r + 1, fusion), w))
        raws.append(w)
    total = torch.zeros(int(frames), dtype=torch.float64)
    for (s, e), w in zip(windows, raws):
        total[s:e] += w
    if not bool((total > 0).all()):
        raise ValueError("context windows do not cover every frame")
    return [w / total[s:e] for (s, e), w in zip(windows, raws)]


def pixel_ranges(windows: Sequence[Window]) -> List[Tuple[int, int]]:
    """Pixel-frame [start, end) of each latent window (latent 0 = pixel 0, latent j >= 1 = pixels 4j-3..4j)."""
    out = []
    for s, e in windows:
        out.append((0 if s == 0 else VAE_STRIDE[0] * s - 3, VAE_STRIDE[0] * (e - 1) + 1))
    return out


def pixel_weights(latent_weights: torch.Tensor, start: int) -> torch.Tensor:
    """A window's per-latent weights expanded to its pixel frames (each latent's weight on its 1 or 4 frames)."""
    reps = torch.full((len(latent_weights),), VAE_STRIDE[0], dtype=torch.long)
    if start == 0:
        reps[0] = 1
    return torch.repeat_interleave(latent_weights, reps)


# ----------------------------------------------------------------------------------------------------- noise
class WindowNoise:
    """Draws [B, C, T, h, w] float32 noise for a windowed run (see module doc): the first window's frames from
    ``gen`` exactly as ``torch.randn(window shape, generator=gen)``, the rest from a second generator."""

    def __init__(self, shape, gen: torch.Generator, options: ContextOptions, seed: int):
        self.shape = tuple(shape)
        self.gen = gen
        self.options = options
        self.perm_gen = torch.Generator(device="cpu")
        self.perm_gen.manual_seed((int(seed) ^ _PERM_SEED_MIX) & 0xFFFFFFFFFFFFFFFF)

    def __call__(self) -> torch.Tensor:
        B, C, T, h, w = self.shape
        W = min(self.options.window, T)
        first = torch.randn((B, C, W, h, w), generator=self.gen, dtype=torch.float32)
        if T == W:
            return first
        out = torch.empty(self.shape, dtype=torch.float32)
        out[:, :, :W] = first
        if self.options.noise == "independent":
            out[:, :, W:] = torch.randn((B, C, T - W, h, w), generator=self.perm_gen, dtype=torch.float32)
            return out
        d = W - self.options.overlap
        for start in range(0, T - W, d):
            dst0, dst1 = start + W, min(start + W + d, T)
            n = dst1 - dst0
            perm = torch.randperm(n, generator=self.perm_gen)
            out[:, :, dst0:dst1] = out[:, :, start:start + n][:, :, perm]
        return out


def initial_window_noise(shape, seed: int, options: ContextOptions, device=None) -> torch.Tensor:
    """The official sampler's initial noise for a windowed run (first window = ``sampling.initial_noise``)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return WindowNoise(shape, gen, options, seed)().to(device)


# ----------------------------------------------------------------------------------------------------- the wrapper
class ContextWindowModel:
    """A model callable that runs ``model`` on every context window and fuses the outputs (module doc).

    ``frames``: latent frames of the full video (every call must have them); ``batch_size``: samples per pass
    (to count guidance passes in batched calls for ``window_callback``)."""

    def __init__(self, model, options: ContextOptions, frames: int, batch_size: int = 1,
                 window_callback: Optional[Callable[[int], None]] = None):
        self.model = model
        self.options = options
        self.frames = int(frames)
        self.batch_size = int(batch_size)
        self.window_callback = window_callback
        self.windows = options.windows(self.frames)
        self.weights = fusion_weights(self.windows, self.frames, options.fusion)
        self._w_dev = {}

    @property
    def frames_per_call(self) -> int:
        """Latent frames the wrapped model sees per forward (for memory estimates): one window, or all of them
        with ``batch_windows``."""
        n = len(self.windows) if self.options.batch_windows else 1
        return min(self.frames, self.options.window) * n

    def __getattr__(self, name):  # config, compute_dtype, ... of the wrapped model
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def _weight(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """Window k's weights [1,1,L,1,1] rounded once from float64 to the output's dtype, on its device."""
        key = (k, str(like.device), like.dtype)
        if key not in self._w_dev:
            self._w_dev[key] = self.weights[k].to(device=like.device, dtype=like.dtype).view(1, 1, -1, 1, 1)
        return self._w_dev[key]

    def _done(self, rows: int) -> None:
        if self.window_callback is not None:
            self.window_callback(max(1, rows // self.batch_size))

    def __call__(self, x, timestep, *args):
        if len(args) != len(KWARG_ORDER):
            raise TypeError(f"expected {len(KWARG_ORDER)} conditioning arguments {KWARG_ORDER}, got {len(args)}")
        kw = dict(zip(KWARG_ORDER, args))
        T = x.shape[2]
        if T != self.frames:
            raise ValueError(f"context windows were planned for {self.frames} latent frames, got {T}")
        for name in ("y", "cond"):
            if kw[name].shape[2] != T:
                raise ValueError(f"{name} has {kw[name].shape[2]} frames, the latent {T}")
        if len(self.windows) == 1:  # fits one window: the plain call, unchanged
            out = self.model(x, timestep, *args)
            self._done(x.shape[0])
            return out
        if self.options.batch_windows:
            return self._batched(x, timestep, kw)
        out = None
        prev = None  # (start, x slice, v) of the previous window, for anchoring
        a = self.options.anchor
        for k, (s, e) in enumerate(self.windows):
            xk = x[:, :, s:e].contiguous()
            yk = kw["y"][:, :, s:e].contiguous()
            if a and prev is not None:
                ps, px, pv = prev
                sigma = (timestep.to(torch.float64) / 1000).reshape(-1, 1, 1, 1, 1)
                sl = slice(s - ps, s - ps + a)
                est = px[:, :, sl].to(torch.float64) - sigma * pv[:, :, sl].to(torch.float64)
                yk[:, :MASK_CHANNELS, :a] = 1
                yk[:, MASK_CHANNELS:, :a] = est.to(yk.dtype)
            ck = kw["cond"][:, :, s:e].contiguous()
            vk = self.model(xk, timestep, kw["context"], kw["clip_fea"], kw["clip_fea_c"], yk, ck, kw["ref_x"],
                            kw["ref_c"])
            if out is None:
                out = torch.zeros((*vk.shape[:2], T, *vk.shape[3:]), dtype=vk.dtype, device=vk.device)
            out[:, :, s:e] += self._weight(k, vk) * vk
            prev = (s, xk, vk) if a else None
            del vk
            self._done(x.shape[0])
        return out

    def _batched(self, x, timestep, kw):
        n, R = len(self.windows), x.shape[0]
        cat = lambda t: torch.cat([t[:, :, s:e] for s, e in self.windows], 0)  # noqa: E731
        rep = lambda t: None if t is None else t.repeat(n, *([1] * (t.ndim - 1)))  # noqa: E731
        v = self.model(cat(x), rep(timestep.reshape(-1).expand(R) if timestep.numel() == 1 else timestep),
                       rep(kw["context"]), rep(kw["clip_fea"]), rep(kw["clip_fea_c"]), cat(kw["y"]),
                       cat(kw["cond"]), rep(kw["ref_x"]), rep(kw["ref_c"]))
        out = torch.zeros((R, v.shape[1], x.shape[2], *v.shape[3:]), dtype=v.dtype, device=v.device)
        for k, (s, e) in enumerate(self.windows):
            out[:, :, s:e] += self._weight(k, v) * v[k * R:(k + 1) * R]
        self._done(R * n)
        return out


def plan(options: Optional[ContextOptions], frames: int) -> Optional[List[Window]]:
    """The windows for ``frames`` latent frames, or None when the plain (one-window) path applies."""
    if options is None or not options.active(frames):
        return None
    return options.windows(frames)
