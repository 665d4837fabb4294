"""Small helpers shared by the node classes: frame-count / size rules, image resizing, ComfyUI-shaped types.

No ComfyUI imports here (those live in comfy_bridge.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..steadydancer.sampling.conditioning import latent_frames
from ..steadydancer.sampling.latents import LATENT_CHANNELS, VAE_STRIDE

CATEGORY = "SteadyDancer"
MODEL_TYPE = "MODEL"
CONTEXT_TYPE = "STEADYDANCER_CONTEXT"  # steadydancer.sampling.context_windows.ContextOptions
POSE_TYPE = "POSE_KEYPOINT"  # the type comfyui_controlnet_aux and others use: list of per-frame OpenPose dicts

VAE_STRIDE_T = VAE_STRIDE[0]
SIZE_MULTIPLE = 2 * VAE_STRIDE[1]  # 8 (VAE) x 2 (patch) pixels
FIT_MODES = ["crop", "pad", "stretch"]


def adjust_length(n: int) -> tuple[int, str | None]:
    """Wan needs 4k+1 frames. Round *down* (never invent frames); 1..4 become 1. Returns (length, warning)."""
    n = int(n)
    if n < 1:
        raise ValueError(f"length must be at least 1 frame, got {n}")
    good = ((n - 1) // VAE_STRIDE_T) * VAE_STRIDE_T + 1
    if good == n:
        return n, None
    return good, f"length {n} is not 4n+1; using {good} frames (the model works on 4-frame latent steps + 1)."


def adjust_size(width: int, height: int) -> tuple[int, int, str | None]:
    """Round width/height to the nearest multiple of 16 (at least 16). Returns (w, h, warning)."""
    def snap(v):
        return max(SIZE_MULTIPLE, int(math.floor(v / SIZE_MULTIPLE + 0.5)) * SIZE_MULTIPLE)  # half up
    w, h = snap(width), snap(height)
    if (w, h) == (int(width), int(height)):
        return w, h, None
    return w, h, f"size {width}x{height} is not a multiple of 16; using {w}x{h}."


def latent_shape(width: int, height: int, length: int) -> tuple[int, int, int, int]:
    """[C, T, H, W] of a Wan2.1 latent for a video of this pixel size and frame count."""
    return LATENT_CHANNELS, latent_frames(length), height // VAE_STRIDE[1], width // VAE_STRIDE[2]


def resize_images(images: torch.Tensor, width: int, height: int, fit: str = "crop", pad_value: float = 0.0) -> torch.Tensor:
    """Resize an IMAGE batch [B,H,W,C] (0..1) to width x height with bicubic interpolation (as the official code).

    fit: "crop" keeps the aspect ratio and center-crops, "pad" keeps it and pads with ``pad_value``,
    "stretch" ignores it.
    """
    if images.ndim == 3:
        images = images[None]
    x = images[..., :3].movedim(-1, 1).float()
    B, C, H, W = x.shape
    if (H, W) == (height, width):
        return images[..., :3].float()
    if fit not in FIT_MODES:
        raise ValueError(f"unknown fit mode {fit!r}; use one of {FIT_MODES}")
    nw, nh, ox, oy = fit_geometry(W, H, width, height, fit)
    r = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False)
    if fit == "stretch":
        out = r
    elif fit == "crop":
        out = r[:, :, -oy:-oy + height, -ox:-ox + width]
    else:
        out = torch.full((B, C, height, width), float(pad_value), dtype=r.dtype)
        out[:, :, oy:oy + nh, ox:ox + nw] = r
    return out.clamp_(0.0, 1.0).movedim(1, -1).contiguous()  # out is this call's own tensor (or a view of it)


def fit_geometry(src_w: int, src_h: int, width: int, height: int, fit: str) -> tuple[int, int, int, int]:
    """(scaled w, scaled h, x offset, y offset) of a src_w x src_h image placed on a width x height canvas by
    ``fit`` (offsets are negative for crop). The one rule for images (``resize_images``) and poses alike."""
    if fit == "stretch":
        return width, height, 0, 0
    scale = (max if fit == "crop" else min)(width / src_w, height / src_h)
    nw, nh = max(1, round(src_w * scale)), max(1, round(src_h * scale))
    if fit == "crop":
        return nw, nh, -((nw - width) // 2), -((nh - height) // 2)
    return nw, nh, (width - nw) // 2, (height - nh) // 2


def resample_indices(n_src: int, src_fps: float, dst_fps: float, max_frames: int = 0) -> list[int]:
    """Frame indices that play the source at ``dst_fps`` with the same speed (nearest earlier frame)."""
    if n_src <= 0:
        return []
    if src_fps <= 0 or dst_fps <= 0:
        raise ValueError(f"frame rates must be positive, got source {src_fps} and target {dst_fps}")
    duration = n_src / src_fps
    n_dst = max(1, int(math.floor(duration * dst_fps + 1e-6)))
    idx = [min(n_src - 1, int(math.floor(i * src_fps / dst_fps + 1e-6))) for i in range(n_dst)]
    if max_frames and max_frames > 0:
        idx = idx[:max_frames]
    return idx


def tooltip(text: str, **opts) -> dict:
    d = dict(opts)
    d["tooltip"] = text
    return d
