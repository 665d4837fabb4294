"""The SteadyDancer pose-conditioning modules (state-dict names as in the official checkpoint).

- ``SpatialDynamicConv``   -> ``condition_embedding_spatial``  (official ``DYModule``, DCD dynamic conv)
- ``TemporalFactorConv``   -> ``condition_embedding_temporal`` (Sequential of 3 x (FactorConv3d, SiLU))
- ``PoseAlignment``        -> ``condition_embedding_align``    (official ``PoseRefNetNoBNV3``)

Every forward takes the compute dtype ``cd`` and follows the official bf16-autocast casts (see layers.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import apply_cd, group_norm_fp32, hsigmoid


# ---------------------------------------------------------------------- spatial: dynamic conv (DCD)
class _Hsigmoid(nn.Module):
    def forward(self, x):
        return hsigmoid(x)


class _SqueezeExciteSmall(nn.Module):
    """y * hsigmoid(W y) (official SEModule_small; key ``fc.0.weight``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels, bias=False), _Hsigmoid())

    def forward(self, y, cd):
        return y * hsigmoid(apply_cd(self.fc[0], y, cd))


class SpatialDynamicConv(nn.Module):
    """Per-frame 2-D dynamic convolution ("Spatial Structure Adaptive Extractor").

    out = conv_p(GN2(phi(x) @ GN1(conv_q x)) + GN1(conv_q x)) + hsigmoid(fc_scale(s)) * conv(x), where
    s = SE(fc(avgpool(x))) and phi(x) = fc_phi(s) reshaped to a dim x dim matrix per sample.
    bn1/bn2 are GroupNorm(4 groups) despite their names.
    """

    def __init__(self, inp: int, oup: int, fc_squeeze: int = 8):
        super().__init__()
        # sizes exactly as the DCD/official constructor derives them (inp = oup = 16 -> dim 4, squeeze 4)
        if inp < oup:
            self.mul, reduction, pool = 4, 8, 2
        else:
            self.mul, reduction, pool = 1, 2, 1
        self.pool = pool
        dim = min((inp * self.mul) // reduction, oup // reduction)
        while dim ** 2 > inp * self.mul * 2:
            reduction *= 2
            dim = min((inp * self.mul) // reduction, oup // reduction)
        dim = max(dim, 4)
        squeeze = max(max(inp * self.mul, dim ** 2) // fc_squeeze, 4)
        self.dim = dim

        self.conv = nn.Conv2d(inp, oup, 1, 1, 0, bias=False)
        self.conv_q = nn.Conv2d(inp, dim, 1, 1, 0, bias=False)
        self.fc = nn.Sequential(nn.Linear(inp * self.mul, squeeze, bias=False), _SqueezeExciteSmall(squeeze))
        self.fc_phi = nn.Linear(squeeze, dim ** 2, bias=False)
        self.fc_scale = nn.Linear(squeeze, oup, bias=False)
        self.conv_p = nn.Conv2d(dim, oup, 1, 1, 0, bias=False)
        self.bn1 = nn.GroupNorm(num_groups=4, num_channels=dim)
        self.bn2 = nn.GroupNorm(num_groups=4, num_channels=dim)

    def forward(self, x: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
        """x [N, C, H, W] (N = batch x frames; each frame independent) -> [N, oup, H, W] in cd."""
        b, c, h, w = x.shape
        r = apply_cd(self.conv, x, cd)
        # avg pool runs in the input dtype (not an autocast op); fp32 latents in -> fp32 here
        y = F.adaptive_avg_pool2d(x, self.pool).reshape(b, c * self.mul)
        y = self.fc[1](apply_cd(self.fc[0], y, cd), cd)
        phi = apply_cd(self.fc_phi, y, cd).view(b, self.dim, self.dim)
        scale = hsigmoid(apply_cd(self.fc_scale, y, cd)).view(b, -1, 1, 1)
        r = scale * r
        q = group_norm_fp32(apply_cd(self.conv_q, x, cd), self.bn1).view(b, self.dim, h * w)  # fp32
        q = group_norm_fp32(torch.matmul(phi, q.to(cd)), self.bn2) + q                          # fp32
        return apply_cd(self.conv_p, q.view(b, self.dim, h, w), cd) + r


# ---------------------------------------------------------------------- temporal: factorised 3-D convs
class FactorConv3d(nn.Module):
    """(2+1)-D conv: depthwise 1xkxk spatial conv (no bias) -> SiLU -> full kx1x1 temporal conv (bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3):
        super().__init__()
        kt, kh, kw = (kernel_size,) * 3 if isinstance(kernel_size, int) else kernel_size
        self.spatial = nn.Conv3d(in_channels, in_channels, (1, kh, kw), padding=(0, kh // 2, kw // 2),
                                 groups=in_channels, bias=False)
        self.temporal = nn.Conv3d(in_channels, out_channels, (kt, 1, 1), padding=(kt // 2, 0, 0), bias=True)

    def forward(self, x, cd):
        return apply_cd(self.temporal, F.silu(apply_cd(self.spatial, x, cd)), cd)


class TemporalFactorConv(nn.Sequential):
    """``condition_embedding_temporal``: (FactorConv3d, SiLU) x 3 ("Temporal Motion Coherence Module").

    Zero padding in time (kernel 3, pad 1): the first/last latent frames see a zero neighbour.
    """

    def __init__(self, channels: int, depth: int = 3):
        mods = []
        for _ in range(depth):
            mods += [FactorConv3d(channels, channels, 3), nn.SiLU()]
        super().__init__(*mods)

    def forward(self, x, cd):  # x [B, C, T, H, W]
        for m in self:
            x = m(x, cd) if isinstance(m, FactorConv3d) else F.silu(x)
        return x


# ---------------------------------------------------------------------- alignment unit
class LayerNorm2D(nn.Module):
    """LayerNorm over the channel dim of [N, C, H, W] (biased variance, eps 1e-5).

    Precision: computed in the dtype of its input, as the official module does under autocast (mean, var and
    sqrt are not autocast ops, so the official run does this in bf16). Deliberately not upcast.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        mean = x.mean(dim=1, keepdim=True)
        var = x.var(dim=1, keepdim=True, unbiased=False)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight.to(x.device, x.dtype) + self.bias.to(x.device, x.dtype)


class PixelTemporalAttention(nn.Module):
    """Multi-head attention whose parameters are named like ``nn.MultiheadAttention``'s.

    Operates on [N, T, E] and attends along T. In the alignment unit N = batch x pixels and T = latent frames:
    this is what the official ``nn.MultiheadAttention(batch_first=False)`` fed with (frames, pixels, E)
    actually computes (the "sequence" axis is the frame axis), so each pixel attends across frames only.
    Math = the need_weights path of ``F.multi_head_attention_forward``: q scaled by 1/sqrt(d) before QK^T,
    softmax in fp32 (an autocast fp32 op), dropout on the weights in training mode only.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: torch.Tensor, kv: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
        n, t, e = query.shape
        h, d = self.num_heads, e // self.num_heads
        w = self.in_proj_weight.to(query.device, cd)
        b = self.in_proj_bias.to(query.device, cd)
        q = F.linear(query.to(cd), w[:e], b[:e])
        kvp = F.linear(kv.to(cd), w[e:], b[e:])
        k, v = kvp[..., :e], kvp[..., e:]
        q, k, v = (z.reshape(n, -1, h, d).transpose(1, 2) for z in (q, k, v))   # [n, h, t, d]
        s = torch.matmul(q * math.sqrt(1.0 / d), k.transpose(-1, -2))
        a = torch.softmax(s.float(), dim=-1)
        if self.training and self.dropout > 0:
            a = F.dropout(a, p=self.dropout)
        o = torch.matmul(a.to(cd), v).transpose(1, 2).reshape(n, t, e)
        return apply_cd(self.out_proj, o, cd)


class PoseAlignment(nn.Module):
    """``condition_embedding_align`` ("Frame-wise Attention Alignment Unit", official PoseRefNetNoBNV3).

    Queries come from the noisy latent (proj_r), keys/values from the fused pose (proj_p), per pixel across
    the latent frames (see PixelTemporalAttention); then LayerNorm2D, a residual 1x1-conv FFN, LayerNorm2D,
    and a 1x1 projection back to the pose channels.
    """

    def __init__(self, in_channels_c: int, in_channels_x: int, hidden_dim: int = 128, num_heads: int = 8,
                 dropout: float = 0.1):
        super().__init__()
        self.proj_p = nn.Conv2d(in_channels_c, hidden_dim, kernel_size=1)
        self.proj_r = nn.Conv2d(in_channels_x, hidden_dim, kernel_size=1)
        self.proj_p_back = nn.Conv2d(hidden_dim, in_channels_c, kernel_size=1)
        self.cross_attn = PixelTemporalAttention(hidden_dim, num_heads, dropout)
        self.ffn_pose = nn.Sequential(nn.Conv2d(hidden_dim, hidden_dim, 1), nn.SiLU(),
                                      nn.Conv2d(hidden_dim, hidden_dim, 1))
        self.norm1 = LayerNorm2D(hidden_dim)
        self.norm2 = LayerNorm2D(hidden_dim)

    def forward(self, pose: torch.Tensor, ref: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
        """pose [B, Cc, T, H, W], ref [B, Cx, T, H, W] -> [B, Cc, T, H, W] in cd."""
        bsz, _, t, hh, ww = pose.shape
        frames = lambda z: z.transpose(1, 2).reshape(bsz * t, z.shape[1], hh, ww)  # noqa: E731
        p = apply_cd(self.proj_p, frames(pose), cd)                  # [B*T, E, H, W]
        r = apply_cd(self.proj_r, frames(ref), cd)
        e = p.shape[1]
        per_pixel = lambda z: z.view(bsz, t, e, hh * ww).permute(0, 3, 1, 2).reshape(bsz * hh * ww, t, e)  # noqa
        out = self.cross_attn(per_pixel(r), per_pixel(p), cd)        # [B*H*W, T, E]
        out = out.view(bsz, hh * ww, t, e).permute(0, 2, 3, 1).reshape(bsz * t, e, hh, ww)
        out = self.norm1(out)
        f = apply_cd(self.ffn_pose[2], F.silu(apply_cd(self.ffn_pose[0], out, cd)), cd)
        out = self.norm2(out + f)
        out = apply_cd(self.proj_p_back, out, cd)                    # [B*T, Cc, H, W]
        return out.view(bsz, t, -1, hh, ww).transpose(1, 2)
