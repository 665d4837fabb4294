"""SteadyDancer conditioning: the tensors every DiT pass needs, and builders with the official semantics.

All latents here are *normalized* Wan2.1 VAE latents (see ``latents.py``); encoding images/videos is the
VAE's job, this module only arranges already-encoded latents the way ``wan/image2video_dancer.py`` does.

DiT forward (shared interface, ``steadydancer/model/dit.py``)::

    v = model(x, timestep, context, clip_fea, clip_fea_c, y, cond, ref_x, ref_c)

``SteadyDancerConditioning.model_kwargs(text=..., pose=...)`` returns everything after ``timestep`` as a dict
(keys ``context, clip_fea, clip_fea_c, y, cond, ref_x, ref_c``; the sampler passes them positionally in
that order). The official sampler runs up to three passes per step:

============ =========================== ==========================
pass          text                        pose latent (``cond``)
============ =========================== ==========================
``e_c``       prompt (``text="pos"``)      positive (``pose="pos"``)
``e_ut``      negative prompt (``"neg"``)  positive
``e_up``      prompt                       negative (``pose="neg"``)
============ =========================== ==========================

All passes share ``y``, ``ref_x``, ``ref_c`` and both CLIP features.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..model.config import SteadyDancerConfig
from .latents import LATENT_CHANNELS, VAE_STRIDE

KWARG_ORDER = ("context", "clip_fea", "clip_fea_c", "y", "cond", "ref_x", "ref_c")
# the real model's text / CLIP input sizes, read from the one model config
_FULL = SteadyDancerConfig.full_14b()
TEXT_DIM = _FULL.text_dim        # 4096 (umT5-XXL)
TEXT_LEN = _FULL.text_len        # 512
CLIP_TOKENS = _FULL.clip_tokens  # 257 (ViT-H/14 at 224 + class token)
CLIP_DIM = _FULL.clip_dim        # 1280
MASK_CHANNELS = 4


# ----------------------------------------------------------------------------------------------------------
# sizes and frame counts
# ----------------------------------------------------------------------------------------------------------
def check_frame_count(frames: int) -> int:
    """Validate a pixel frame count (Wan VAE needs 4n+1) and return the latent frame count n+1."""
    frames = int(frames)
    if frames < 1 or (frames - 1) % VAE_STRIDE[0] != 0:
        raise ValueError(f"frame count must be 4n+1 (1, 5, ..., 81, ...), got {frames}")
    return (frames - 1) // VAE_STRIDE[0] + 1


def latent_frames(frames: int) -> int:
    """Latent frames for ``frames`` pixel frames (4n+1 -> n+1)."""
    return check_frame_count(frames)


def official_latent_size(height: int, width: int, max_area: int = 1024 * 576,
                         vae_stride: int = VAE_STRIDE[1], patch: int = 2) -> tuple[int, int]:
    """The official size rule (``WanI2VDancer.generate``): latent (lat_h, lat_w) for a reference image of
    ``height`` x ``width`` pixels and a target pixel area ``max_area`` (``--size 1024*576`` -> 589,824).

    Official code: ``lat_h = round(sqrt(max_area * h/w) // 8 // 2 * 2)`` - i.e. the square root is
    *floored* to a multiple of 8 pixels and the latent size floored to an even number (patch 2), same for
    width with ``w/h``. (The spec's "round(...)" describes the outer ``round``, which only turns the
    already-integral float into an int.) The pixel size is ``8 * lat``.

    The float arithmetic is kept as official, quirks included: a 480x832 image with ``max_area=832*480``
    gives 399360*(480/832) = 230399.99999999997, sqrt 479.99999999999994, so lat_h = 58 (464 px), not 60.
    """
    if height <= 0 or width <= 0 or max_area <= 0:
        raise ValueError("height, width and max_area must be positive")
    aspect_ratio = height / width
    lat_h = round(math.sqrt(max_area * aspect_ratio) // vae_stride // patch * patch)
    lat_w = round(math.sqrt(max_area / aspect_ratio) // vae_stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise ValueError(f"max_area {max_area} too small for a {width}x{height} image")
    return int(lat_h), int(lat_w)


def official_pixel_size(height: int, width: int, max_area: int = 1024 * 576) -> tuple[int, int]:
    """(pixel_h, pixel_w) = 8 x ``official_latent_size``."""
    lat_h, lat_w = official_latent_size(height, width, max_area)
    return lat_h * VAE_STRIDE[1], lat_w * VAE_STRIDE[2]


# ----------------------------------------------------------------------------------------------------------
# builders (official semantics)
# ----------------------------------------------------------------------------------------------------------
def build_i2v_mask(frames: int, lat_h: int, lat_w: int, known_frames: int = 1,
                   device=None, dtype=torch.float32) -> torch.Tensor:
    """The Wan I2V mask, shape [4, T, lat_h, lat_w] with T = (frames-1)//4 + 1.

    Official (81 frames only): a per-pixel-frame mask [81] with 1 on frame 0; frame 0 is repeated 4 times
    (the causal VAE's first latent frame encodes pixel frame 0 alone, every later latent frame encodes 4
    pixel frames), giving 84 = 21 x 4 sub-frames, reshaped to [21, 4] and transposed to 4 channels x 21
    latent frames. Result: 1 on all 4 channels of latent frame 0, 0 elsewhere.

    The same construction works for any 4n+1 frame count (4n+1 pixel frames -> 4n+4 = 4(n+1) sub-frames ->
    n+1 latent frames), which is what we do. ``known_frames`` (default 1 = official) marks the first k pixel
    frames as given (as Wan's first/last-frame variants do); for k = 1 + 4m latent frames 0..m are fully 1.
    """
    T = check_frame_count(frames)
    if not 0 <= known_frames <= frames:
        raise ValueError(f"known_frames must be in [0, {frames}], got {known_frames}")
    per_frame = torch.zeros(frames, dtype=dtype, device=device)
    per_frame[:known_frames] = 1
    sub = torch.cat([per_frame[:1].repeat(VAE_STRIDE[0]), per_frame[1:]])  # [4T]
    mask = sub.view(T, VAE_STRIDE[0]).transpose(0, 1)  # [4, T]
    return mask[:, :, None, None].expand(MASK_CHANNELS, T, lat_h, lat_w).contiguous()


def build_y(mask: torch.Tensor, image_latent: torch.Tensor) -> torch.Tensor:
    """``y = cat(mask, image_latent)`` along channels -> 20 channels.

    ``image_latent`` is the normalized latent of the reference image followed by F-1 zero (gray, 0 in [-1,1])
    frames, [16,T,h,w] or [B,16,T,h,w]; ``mask`` from ``build_i2v_mask`` ([4,T,h,w], broadcast over B).
    """
    batched = image_latent.ndim == 5
    if image_latent.ndim not in (4, 5) or image_latent.shape[-4] != LATENT_CHANNELS:
        raise ValueError(f"image_latent must be [(B,)16,T,h,w], got {tuple(image_latent.shape)}")
    if mask.ndim == 4:
        mask = mask.unsqueeze(0) if batched else mask
    if batched and mask.ndim == 5 and mask.shape[0] == 1 and image_latent.shape[0] != 1:
        mask = mask.expand(image_latent.shape[0], *mask.shape[1:])
    if mask.shape[-4] != MASK_CHANNELS or mask.shape[-3:] != image_latent.shape[-3:]:
        raise ValueError(f"mask {tuple(mask.shape)} does not fit image latent {tuple(image_latent.shape)}")
    return torch.cat([mask.to(image_latent), image_latent], dim=-4)


def _one_frame(z: torch.Tensor, name: str) -> torch.Tensor:
    if z.ndim == 3:  # [16,h,w]
        z = z.unsqueeze(1)
    if z.ndim not in (4, 5) or z.shape[-4] != LATENT_CHANNELS or z.shape[-3] != 1:
        raise ValueError(f"{name} must be a one-frame latent [(B,)16,1,h,w], got {tuple(z.shape)}")
    return z


def build_ref_x(ref_latent: torch.Tensor) -> torch.Tensor:
    """``ref_x = cat(Zr, ones[4], Zr)`` -> 36 channels; Zr = latent of the reference image alone."""
    z = _one_frame(ref_latent, "ref_latent")
    ones = torch.ones_like(z[..., :MASK_CHANNELS, :, :, :])
    return torch.cat([z, ones, z], dim=-4)


def build_ref_c(pose_latent: torch.Tensor, channels: int = 36) -> torch.Tensor:
    """``ref_c = cat(Zp0, zeros[4], Zp0)`` (36 ch, official) or ``Zp0`` (16 ch); Zp0 = latent of the first
    positive pose frame alone. The DiT uses only the first 16 channels, so both give the same result."""
    z = _one_frame(pose_latent, "pose_latent")
    if channels == LATENT_CHANNELS:
        return z
    if channels != 2 * LATENT_CHANNELS + MASK_CHANNELS:
        raise ValueError("channels must be 16 or 36")
    zeros = torch.zeros_like(z[..., :MASK_CHANNELS, :, :, :])
    return torch.cat([z, zeros, z], dim=-4)


# ----------------------------------------------------------------------------------------------------------
# the conditioning bundle
# ----------------------------------------------------------------------------------------------------------
def _batch(t: torch.Tensor, ndim: int, name: str) -> torch.Tensor:
    if t.ndim == ndim - 1:
        t = t.unsqueeze(0)
    if t.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim - 1} or {ndim} dims, got shape {tuple(t.shape)}")
    return t


def pad_context(contexts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate [B_i, L_i, C] text embeddings along batch, zero-padding L to the longest.

    Zero padding is exactly what the official DiT does internally (every context is zero-padded to 512
    tokens), so padding to a shorter common length first changes nothing.
    """
    L = max(c.shape[1] for c in contexts)
    return torch.cat([F.pad(c, (0, 0, 0, L - c.shape[1])) if c.shape[1] < L else c for c in contexts], 0)


@dataclass
class SteadyDancerConditioning:
    """Everything the SteadyDancer DiT needs besides the noisy latent and the timestep.

    Tensors are batched ([B, ...]); unbatched inputs get a batch dim of 1 on construction.

    - ``context`` / ``context_null``: umT5 embeddings of prompt / negative prompt, [B, L, 4096], L <= 512
      (the two may have different L).
    - ``clip_fea`` / ``clip_fea_c``: CLIP-ViT-H penultimate features of the reference image / first pose
      frame, [B, 257, 1280].
    - ``y``: [B, 20, T, h, w] = ``build_y(build_i2v_mask(...), latent(ref image + zero frames))``.
    - ``cond_pos`` / ``cond_neg``: pose-video latents [B, 16, T, h, w]; ``cond_neg`` (the randomly rescaled
      negative poses) is needed only for pose guidance.
    - ``ref_x``: [B, 36, 1, h, w] = ``build_ref_x(Zr)``; ``ref_c``: [B, 16 or 36, 1, h, w] = ``build_ref_c(Zp0)``.
    """

    context: torch.Tensor
    context_null: torch.Tensor
    clip_fea: torch.Tensor
    clip_fea_c: torch.Tensor
    y: torch.Tensor
    cond_pos: torch.Tensor
    ref_x: torch.Tensor
    ref_c: torch.Tensor
    cond_neg: Optional[torch.Tensor] = None

    def __post_init__(self):
        self.context = _batch(self.context, 3, "context")
        self.context_null = _batch(self.context_null, 3, "context_null")
        self.clip_fea = _batch(self.clip_fea, 3, "clip_fea")
        self.clip_fea_c = _batch(self.clip_fea_c, 3, "clip_fea_c")
        self.y = _batch(self.y, 5, "y")
        self.cond_pos = _batch(self.cond_pos, 5, "cond_pos")
        self.ref_x = _batch(self.ref_x, 5, "ref_x")
        self.ref_c = _batch(self.ref_c, 5, "ref_c")
        if self.cond_neg is not None:
            self.cond_neg = _batch(self.cond_neg, 5, "cond_neg")
        self.validate()

    # -- shape checks -----------------------------------------------------------------------------------
    def validate(self) -> None:
        B = self.y.shape[0]
        C, T, h, w = self.latent_shape
        if self.y.shape[1] != MASK_CHANNELS + LATENT_CHANNELS:
            raise ValueError(f"y must have 20 channels, got {tuple(self.y.shape)}")
        for name in ("cond_pos", "cond_neg"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (B, LATENT_CHANNELS, T, h, w):
                raise ValueError(f"{name} {tuple(t.shape)} must be {(B, LATENT_CHANNELS, T, h, w)} like y")
        if tuple(self.ref_x.shape) != (B, 36, 1, h, w):
            raise ValueError(f"ref_x {tuple(self.ref_x.shape)} must be {(B, 36, 1, h, w)}")
        if self.ref_c.shape[0] != B or self.ref_c.shape[1] not in (16, 36) or tuple(self.ref_c.shape[2:]) != (1, h, w):
            raise ValueError(f"ref_c {tuple(self.ref_c.shape)} must be {(B, '16|36', 1, h, w)}")
        # text/CLIP widths are the model's business (4096 / 257x1280 for the real model, smaller in tests)
        for name in ("context", "context_null"):
            t = getattr(self, name)
            if t.shape[0] != B or t.shape[1] > TEXT_LEN or t.shape[2] != self.context.shape[2]:
                raise ValueError(f"{name} {tuple(t.shape)} must be [{B}, L<=512, C] (C = 4096 for umT5-XXL)")
        for name in ("clip_fea", "clip_fea_c"):
            t = getattr(self, name)
            if t.shape[0] != B or t.shape[1:] != self.clip_fea.shape[1:]:
                raise ValueError(f"{name} {tuple(t.shape)} must be [{B}, 257, 1280] (both alike)")
        if h % 2 or w % 2:
            raise ValueError(f"latent height/width must be even (patch 2), got {h}x{w}")

    @property
    def batch_size(self) -> int:
        return self.y.shape[0]

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """(16, T, h, w) of the noise latent for one sample."""
        _, _, T, h, w = self.y.shape
        return (LATENT_CHANNELS, T, h, w)

    @property
    def device(self) -> torch.device:
        return self.y.device

    @property
    def has_negative_pose(self) -> bool:
        return self.cond_neg is not None

    # -- passes -----------------------------------------------------------------------------------------
    def model_kwargs(self, text: str = "pos", pose: str = "pos") -> dict:
        """Keyword arguments of one DiT pass (everything but x and timestep), in ``KWARG_ORDER``."""
        if text not in ("pos", "neg") or pose not in ("pos", "neg"):
            raise ValueError("text and pose must be 'pos' or 'neg'")
        if pose == "neg" and self.cond_neg is None:
            raise ValueError("pose guidance needs cond_neg (negative pose latents)")
        return {
            "context": self.context if text == "pos" else self.context_null,
            "clip_fea": self.clip_fea,
            "clip_fea_c": self.clip_fea_c,
            "y": self.y,
            "cond": self.cond_pos if pose == "pos" else self.cond_neg,
            "ref_x": self.ref_x,
            "ref_c": self.ref_c,
        }

    def batched_kwargs(self, passes: Sequence[tuple[str, str]]) -> dict:
        """One forward for several passes: the ``model_kwargs`` of each (text, pose) pair concatenated along
        batch in the given order (pass k occupies rows k*B .. (k+1)*B-1); contexts zero-padded to a common
        length."""
        if not passes:
            raise ValueError("no passes")
        parts = [self.model_kwargs(t, p) for t, p in passes]
        if len(parts) == 1:
            return parts[0]
        return concat_kwargs(parts)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "SteadyDancerConditioning":
        """A copy with every tensor moved to ``device`` and floating tensors cast to ``dtype``."""

        def mv(t):
            if t is None:
                return None
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return dataclasses.replace(self, **{f.name: mv(getattr(self, f.name)) for f in dataclasses.fields(self)})


def concat_kwargs(parts: Sequence[dict]) -> dict:
    """Concatenate several passes' kwargs along batch (contexts zero-padded)."""
    out = {}
    for key in KWARG_ORDER:
        vals = [p[key] for p in parts]
        out[key] = pad_context(vals) if key == "context" else torch.cat(vals, 0)
    return out
