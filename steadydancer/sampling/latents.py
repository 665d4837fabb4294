"""Wan2.1 VAE latent normalization: the one place in the pack that knows the 16 channel means/stds.

The SteadyDancer DiT (a Wan2.1-I2V-14B fine-tune) works on *normalized* Wan2.1 VAE latents. The official
``WanVAE`` (wan/modules/vae.py) keeps ``scale = [mean, 1/std]`` and computes

    encode:  z  = (mu - mean) * (1/std)
    decode:  mu = z / (1/std) + mean

``normalize`` / ``denormalize`` below use exactly those operations (multiplying by the float32 reciprocal,
not dividing by std), so they reproduce the official latents bit for bit in float32. ComfyUI's
``latent_formats.Wan21`` uses the same 16 values.

Shapes: any tensor with the 16 latent channels on ``channel_dim`` (default 1, i.e. [B,16,T,H,W]; pass
``channel_dim=0`` for an unbatched [16,T,H,W] latent).
"""
from __future__ import annotations

import torch

LATENT_CHANNELS = 16
#: Wan2.1 VAE (z_dim 16) per-channel latent means, from the official wan/modules/vae.py.
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
#: Wan2.1 VAE per-channel latent standard deviations, from the official wan/modules/vae.py.
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
#: Wan2.1 VAE compression: 4 pixel frames per latent frame (the first latent frame holds 1), 8x8 pixels.
VAE_STRIDE = (4, 8, 8)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # at least float32 (the official VAE does this math in float32); float64 stays float64
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def latent_mean_std(device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The (mean, std) vectors, shape [16], on ``device`` in ``dtype``."""
    mean = torch.tensor(WAN21_LATENT_MEAN, dtype=dtype, device=device)
    std = torch.tensor(WAN21_LATENT_STD, dtype=dtype, device=device)
    return mean, std


def _view_shape(x: torch.Tensor, channel_dim: int) -> list[int]:
    dim = channel_dim % x.ndim
    if x.shape[dim] != LATENT_CHANNELS:
        raise ValueError(
            f"expected {LATENT_CHANNELS} latent channels on dim {channel_dim}, got shape {tuple(x.shape)}"
        )
    shape = [1] * x.ndim
    shape[dim] = LATENT_CHANNELS
    return shape


def normalize(mu: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """Raw VAE-encoder mean -> model latent: ``(mu - mean) * (1/std)`` (as the official VAE)."""
    dtype = _work_dtype(mu)
    shape = _view_shape(mu, channel_dim)
    mean, std = latent_mean_std(mu.device, torch.float32)
    inv_std = (1.0 / std).to(dtype)  # reciprocal formed in float32, as the official scale[1]
    return (mu.to(dtype) - mean.to(dtype).view(shape)) * inv_std.view(shape)


def denormalize(z: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """Model latent -> raw VAE-decoder input: ``z / (1/std) + mean`` (as the official VAE)."""
    dtype = _work_dtype(z)
    shape = _view_shape(z, channel_dim)
    mean, std = latent_mean_std(z.device, torch.float32)
    inv_std = (1.0 / std).to(dtype)
    return z.to(dtype) / inv_std.view(shape) + mean.to(dtype).view(shape)
