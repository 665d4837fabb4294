"""SteadyDancer DiT configuration: the one place that knows the architecture's sizes.

``SteadyDancerConfig.from_state_dict_shapes`` reads every size from checkpoint tensor shapes and refuses
files that are not SteadyDancer (``NotSteadyDancerError``), saying what the file looks like instead.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

from .keymap import DIFFUSERS_MARKER_KEY, diffusers_to_official, strip_prefix

# The SteadyDancer-only modules (42 tensors in the released 14B checkpoint).
STEADYDANCER_PREFIXES = (
    "patch_embedding_fuse.",
    "patch_embedding_ref_c.",
    "condition_embedding_spatial.",
    "condition_embedding_temporal.",
    "condition_embedding_align.",
)

HEAD_DIM = 128  # every Wan2.1 DiT uses 128-wide heads; num_heads = dim / 128 (as diffusers assumes too)


class NotSteadyDancerError(ValueError):
    """The checkpoint is not a SteadyDancer DiT (its message says what it looks like instead)."""

    __module__ = "steadydancer_turbo.steadydancer.model.config"  # readable in ComfyUI's error (see dwpose.models.ModelNotFoundError)


@dataclass(frozen=True)
class SteadyDancerConfig:
    dim: int = 5120
    ffn_dim: int = 13824
    num_layers: int = 40
    num_heads: int = 40
    in_dim: int = 36          # patch_embedding: 16 noise + 4 mask + 16 image latent (used for the ref-image frame)
    in_dim_c: int = 16        # pose latent channels (cond, ref_c)
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512       # the text context is zero-padded to this many tokens before text_embedding
    freq_dim: int = 256
    clip_dim: int = 1280
    clip_tokens: int = 257
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    align_hidden: int = 128   # condition_embedding_align (PoseRefNetNoBNV3) width
    align_heads: int = 8
    align_dropout: float = 0.1  # only active in training mode

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")
        if self.align_hidden % self.align_heads:
            raise ValueError("align_hidden must be divisible by align_heads")
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def fuse_in_dim(self) -> int:
        """patch_embedding_fuse input channels: 36-ch I2V input + fused pose + aligned pose."""
        return self.in_dim + 2 * self.in_dim_c

    @property
    def latent_channels(self) -> int:
        """Channels of the noisy latent x (and of the velocity the model returns)."""
        return self.out_dim

    @classmethod
    def full_14b(cls) -> "SteadyDancerConfig":
        """SteadyDancer-14B (Wan2.1-I2V-14B + the SteadyDancer pose modules)."""
        return cls()

    @classmethod
    def tiny(cls, **overrides) -> "SteadyDancerConfig":
        """A small configuration with the real structure, for tests."""
        # clip_dim / align sizes stay at the official values: the official code hard-codes them
        # num_heads = dim / 128 as in every real checkpoint, so from_state_dict_shapes round-trips
        base = dict(dim=256, ffn_dim=320, num_layers=2, num_heads=2, text_dim=64, freq_dim=64)
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> "SteadyDancerConfig":
        return replace(self, **changes)

    # ------------------------------------------------------------------ from a checkpoint
    @classmethod
    def from_state_dict_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> "SteadyDancerConfig":
        """Build the config from ``{key: shape}`` of a checkpoint (torch shape order).

        Keys may carry a ComfyUI prefix (``model.diffusion_model.`` …) or use diffusers' Wan layout for the
        base blocks; both are normalised through ``keymap``. Extra keys (e.g. fp8 ``scale_weight``) are
        ignored. Raises ``NotSteadyDancerError`` for anything that is not a SteadyDancer DiT.
        """
        s = {k: tuple(int(d) for d in v) for k, v in strip_prefix(dict(shapes)).items()}
        if DIFFUSERS_MARKER_KEY in s:
            s = diffusers_to_official(s)
        _check_is_steadydancer(s)

        pe = s["patch_embedding.weight"]            # (dim, in_dim, pt, ph, pw)
        dim, in_dim, patch = pe[0], pe[1], tuple(pe[2:])
        head = s["head.head.weight"]                 # (prod(patch) * out_dim, dim)
        out_dim = head[0] // math.prod(patch)
        layers = sorted({int(m.group(1)) for k in s if (m := re.match(r"blocks\.(\d+)\.", k))})
        if layers != list(range(len(layers))):
            raise NotSteadyDancerError(f"transformer block indices are not contiguous: {layers[:5]}…")
        num_heads = dim // HEAD_DIM
        ref_c = s["patch_embedding_ref_c.weight"]
        fuse = s["patch_embedding_fuse.weight"]
        cfg = cls(
            dim=dim,
            ffn_dim=s["blocks.0.ffn.0.weight"][0],
            num_layers=len(layers),
            num_heads=num_heads,
            in_dim=in_dim,
            in_dim_c=ref_c[1],
            out_dim=out_dim,
            text_dim=s["text_embedding.0.weight"][1],
            freq_dim=s["time_embedding.0.weight"][1],
            clip_dim=s["img_emb.proj.1.weight"][1],
            patch_size=patch,
            qk_norm="blocks.0.self_attn.norm_q.weight" in s,
            cross_attn_norm="blocks.0.norm3.weight" in s,
            align_hidden=s["condition_embedding_align.proj_p.weight"][0],
        )
        if fuse[1] != cfg.fuse_in_dim or fuse[0] != dim:
            raise NotSteadyDancerError(
                f"patch_embedding_fuse.weight has shape {fuse}, expected ({dim}, {cfg.fuse_in_dim}, …) = "
                f"(dim, in_dim {in_dim} + 2 x pose channels {cfg.in_dim_c}); the file is inconsistent.")
        if out_dim != cfg.in_dim_c:
            raise NotSteadyDancerError(
                f"output channels {out_dim} differ from the pose latent channels {cfg.in_dim_c}; "
                "SteadyDancer uses the 16-channel Wan2.1 VAE for both.")
        return cfg


# ---------------------------------------------------------------------- detection
_EXPECTED = ("SteadyDancer-14B expects a Wan2.1-I2V-14B DiT (patch_embedding with 36 input channels, img_emb.* "
             "CLIP projection, cross-attention k_img/v_img) plus the SteadyDancer pose modules "
             "patch_embedding_fuse (68 input channels), patch_embedding_ref_c and "
             "condition_embedding_spatial/temporal/align.*")


def _describe(s: Mapping[str, tuple]) -> str:
    """Best guess of what a non-SteadyDancer checkpoint is, with the evidence."""
    keys = list(s)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if "blocks.0.self_attn.q.weight" not in s:
        for marker, what in (("double_blocks.", "a Flux-style DiT"), ("input_blocks.", "a Stable Diffusion UNet"),
                             ("joint_blocks.", "an SD3 MMDiT"), ("transformer_blocks.", "a diffusers transformer"),
                             ("encoder.block.", "a T5 text encoder"), ("decoder.", "a VAE"),
                             ("visual.", "a CLIP vision model")):
            if has(marker):
                return f"{what} (keys like '{next(k for k in keys if k.startswith(marker))}'), not a Wan DiT"
        sample = ", ".join(sorted(keys)[:4])
        return f"not a Wan DiT (no 'blocks.0.self_attn.q.weight'; {len(keys)} tensors, e.g. {sample})"
    pe = s.get("patch_embedding.weight")
    in_ch = pe[1] if pe else None
    head = s.get("head.head.weight")
    out_dim = head[0] // 4 if head else None
    dim = pe[0] if pe else None
    size = {1536: "1.3B", 5120: "14B", 3072: "5B"}.get(dim, f"dim {dim}")
    if has("vace_blocks."):
        return f"a Wan VACE model ({size}, has vace_blocks.*)"
    if has("motion_encoder.") or has("face_adapter.") or has("pose_patch_embedding."):
        return f"a Wan2.2-Animate model ({size}, has motion_encoder/face_adapter)"
    if has("casual_audio_encoder.") or has("audio_injector."):
        return f"a Wan2.2-S2V model ({size}, has audio modules)"
    if out_dim == 48 or in_ch == 48 and not has("img_emb."):
        return (f"a Wan2.2 model with the 48-channel VAE (TI2V-5B style: patch_embedding in {in_ch}, "
                f"output {out_dim} channels)")
    if not has("img_emb."):
        if in_ch == 16:
            return f"a Wan text-to-video model ({size}, 16 input channels, no img_emb)"
        if in_ch == 36:
            return (f"a Wan2.2-I2V-A14B-style model ({size}, 36 input channels but no CLIP img_emb / k_img), "
                    "not Wan2.1-I2V")
        return f"a Wan model without CLIP image embedding ({size}, {in_ch} input channels)"
    if "img_emb.emb_pos" in s:
        return f"a Wan2.1 first-last-frame (FLF2V) model ({size}, img_emb.emb_pos present)"
    present = [p.rstrip(".") for p in STEADYDANCER_PREFIXES if has(p)]
    if not present:
        if in_ch == 36:
            return f"a plain Wan2.1 image-to-video model ({size}, 36 input channels, no SteadyDancer pose modules)"
        return f"a Wan2.1 image-conditioned variant ({size}, {in_ch} input channels, e.g. Fun InP/Control)"
    missing = [p.rstrip(".") for p in STEADYDANCER_PREFIXES if not has(p)]
    return f"an incomplete SteadyDancer file: has {present} but is missing {missing}"


_REQUIRED = (
    "patch_embedding.weight", "head.head.weight", "text_embedding.0.weight", "time_embedding.0.weight",
    "blocks.0.ffn.0.weight", "img_emb.proj.1.weight", "blocks.0.cross_attn.k_img.weight",
    "patch_embedding_fuse.weight", "patch_embedding_ref_c.weight", "condition_embedding_align.proj_p.weight",
    "condition_embedding_spatial.conv.weight", "condition_embedding_temporal.0.temporal.weight",
)


def _check_is_steadydancer(s: Mapping[str, tuple]) -> None:
    missing = [k for k in _REQUIRED if k not in s]
    bad_in = s.get("patch_embedding.weight", (0, 0))[1] != 36
    is_wan = "blocks.0.self_attn.q.weight" in s
    if missing or bad_in:
        raise NotSteadyDancerError(f"This checkpoint looks like {_describe(s)}. {_EXPECTED}."
                                   + (f" Missing: {', '.join(missing)}." if missing and is_wan else ""))
    if s["patch_embedding.weight"][0] % HEAD_DIM:
        raise NotSteadyDancerError(f"model width {s['patch_embedding.weight'][0]} is not a multiple of {HEAD_DIM}")
