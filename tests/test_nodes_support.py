"""Stand-ins for the ComfyUI objects our nodes receive, shaped exactly like ComfyUI 0.33's (no tests here).

- CONDITIONING from CLIPTextEncode with umt5-xxl (CLIPLoader type wan): ``[[cond, {"pooled_output": None}]]`` with
  ``cond`` [1, max(512, n), 4096]: n real-token rows then zero rows (ComfyUI's tokenizer pads to min_length 512
  and the encoder zeroes masked positions).
- CLIP_VISION_OUTPUT from CLIPVisionEncode: an object with item and attribute access holding
  ``penultimate_hidden_states`` [B,257,1280] (clip_vision_h), ``last_hidden_state``, ``image_embeds``.
- VAE (Wan2.1 through VAELoader): ``encode(IMAGE [F,H,W,3] 0..1)`` -> *raw* latent [1,16,T,H/8,W/8] with the Wan
  VAE's causal time layout (latent 0 <- frame 0, latent k <- frames 4k-3..4k, frame count cropped to 4n+1 like
  ComfyUI's Wan VAE), ``decode(latent)`` -> IMAGE [(T-1)*4+1, H, W, 3]. Here a fixed random linear map of
  8x8-pooled pixels, so a test can recompute every expected latent independently.
"""
from __future__ import annotations

import torch

# ComfyUI comfy/latent_formats.py Wan21 (0.33.0): the normalization ComfyUI applies in process_in.
COMFY_WAN21_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
COMFY_WAN21_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                   3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def comfy_process_in(raw: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(COMFY_WAN21_MEAN, dtype=torch.float64).view(1, 16, 1, 1, 1)
    std = torch.tensor(COMFY_WAN21_STD, dtype=torch.float64).view(1, 16, 1, 1, 1)
    return (raw.double() - mean) / std


def comfy_process_out(z: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(COMFY_WAN21_MEAN, dtype=torch.float64).view(1, 16, 1, 1, 1)
    std = torch.tensor(COMFY_WAN21_STD, dtype=torch.float64).view(1, 16, 1, 1, 1)
    return z.double() * std + mean


def text_conditioning(n_tokens: int, seed: int = 0, dim: int = 4096, min_length: int = 512):
    g = torch.Generator().manual_seed(seed)
    L = max(min_length, n_tokens)
    cond = torch.zeros(1, L, dim)
    cond[0, :n_tokens] = torch.randn(n_tokens, dim, generator=g)
    return [[cond, {"pooled_output": None}]]


class ClipVisionOutput:
    """comfy.clip_vision.Output: attribute storage with __getitem__/__setitem__."""

    def __getitem__(self, key):
        return getattr(self, key)

    def __setitem__(self, key, item):
        setattr(self, key, item)


def clip_vision_output(seed: int = 0, batch: int = 1, tokens: int = 257, dim: int = 1280):
    g = torch.Generator().manual_seed(seed)
    out = ClipVisionOutput()
    out["last_hidden_state"] = torch.randn(batch, tokens, dim, generator=g)
    out["penultimate_hidden_states"] = torch.randn(batch, tokens, dim, generator=g)
    out["image_embeds"] = torch.randn(batch, 1024, generator=g)
    return out


class FakeWanVAE:
    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(16, 3, generator=g, dtype=torch.float64)
        self.b = torch.randn(16, generator=g, dtype=torch.float64)
        self.encode_calls = []

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.ndim == 4 and pixels.shape[-1] == 3, pixels.shape
        F_, H, W, _ = pixels.shape
        assert H % 8 == 0 and W % 8 == 0
        self.encode_calls.append(tuple(pixels.shape))
        F_ = 1 + ((F_ - 1) // 4) * 4
        x = pixels[:F_].double() * 2 - 1  # ComfyUI's process_input
        x = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), 8)  # [F,3,h,w]
        groups = [x[:1].mean(0)] + [x[1 + 4 * k:5 + 4 * k].mean(0) for k in range((F_ - 1) // 4)]
        x = torch.stack(groups, 1)  # [3,T,h,w]
        z = torch.einsum("oc,cthw->othw", self.w, x) + self.b.view(16, 1, 1, 1)
        return z[None].float()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        assert z.ndim == 5 and z.shape[1] == 16, z.shape
        x = torch.einsum("co,bothw->bcthw", torch.linalg.pinv(self.w), z.double() - self.b.view(1, 16, 1, 1, 1))
        x = x[0]  # [3,T,h,w]
        frames = torch.cat([x[:, :1], x[:, 1:].repeat_interleave(4, dim=1)], 1)  # [3,F,h,w]
        frames = torch.nn.functional.interpolate(frames.permute(1, 0, 2, 3), scale_factor=8, mode="nearest")
        return ((frames.permute(0, 2, 3, 1) + 1) / 2).clamp(0, 1).float()
