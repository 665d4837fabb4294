"""SteadyDancer-14B DiT (Wan2.1-I2V-14B + SteadyDancer pose modules), plain PyTorch.

Ground truth: MCG-NJU/SteadyDancer ``wan/modules/model_dancer.py`` (forward, casts), ``small_archs.py`` and
``mobilenetv2_dcd.py`` (pose modules). State-dict keys are the official unprefixed names.

Call (batched; every sample independent, all samples share F, H, W)::

    v = model(x, timestep, context, clip_fea, clip_fea_c, y, cond, ref_x, ref_c)   # -> [B, 16, F, H, W] fp32

Precision (see layers.py for the general rule). The official pipeline runs this DiT with bf16 weights under
CUDA autocast(bf16). That differs from base Wan2.1 (which keeps modulation and time embedding in fp32): here
the time embedding, the modulation vectors ``modulation + e`` and the residual updates ``x + y * gate`` are
all bf16. We reproduce each cast explicitly with the model's compute dtype ``cd`` (default: the dtype of
``patch_embedding_fuse.weight``; settable via ``model.compute_dtype``):

- inputs (latents, conditions) are upcast to fp32 (the official pipeline feeds fp32 VAE latents) and the
  pose sums ``cond + temporal + spatial`` happen in fp32, as type promotion does in the official code;
- every Linear/Conv runs in cd; LayerNorm/RMSNorm/GroupNorm statistics and softmax run in fp32;
- the sinusoidal time embedding is computed in float64 and cast straight to cd (official: ``.to(x.dtype)``);
- RoPE is applied in float64 (complex128) and the result cast straight to cd (official: rope_apply returns
  float64 and flash_attention casts it to bf16);
- CLIP tokens: img_emb ends in a LayerNorm that autocast runs in fp32, so ref + first-pose CLIP embeddings are
  summed in fp32 and then cast to cd for k_img/v_img.
With cd = float32 (or float64) the whole model is plain float32 (float64) math, which is what the parity tests
use. tests/test_dit_official_parity.py shows the bf16 path equals the official code under (emulated) CUDA
autocast bit for bit.

For loaders / offloading:
- build on the meta device (``build_meta``), then ``load_state_dict(sd, assign=True)``; there are no buffers.
- every Linear/Conv is a plain ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Conv3d`` reached as a module attribute
  (or a ``nn.Sequential`` index), so it can be replaced in place by any module whose ``forward(x)`` takes x in
  the compute dtype and returns the compute dtype (fp8 / GGUF layers). Plain layers whose weights are in another
  float dtype than cd are cast on the fly (fine for the small pose modules, slow for the big block layers).
- set ``model.compute_dtype`` explicitly when patch_embedding_fuse.weight's dtype is not the intended one
  (e.g. quantised files that keep that conv in fp32).
- ``model.blocks`` is an ``nn.ModuleList`` of ``WanAttentionBlock``; each is called once per forward as
  ``block(x, e0, ctx_img, ctx_txt, freqs, backend, rope_dtype)`` (forward pre/post hooks work for block swap).
- ``model.sequence_parallel`` (distributed.enable_sequence_parallel): the blocks and head then run on this rank's
  slice of the tokens; see distributed.py.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.attention import attention as _attention
from ..kernels.attention import get_backend
from .batching import per_item
from .config import SteadyDancerConfig
from .layers import RMSNorm, apply_cd, layer_norm_fp32
from .pose_modules import PoseAlignment, SpatialDynamicConv, TemporalFactorConv

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------- positional / time embeddings
def sinusoidal_embedding_1d(dim: int, position: torch.Tensor) -> torch.Tensor:
    """Wan time embedding: [cos(p * w_k), sin(p * w_k)], w_k = 10000^(-k / (dim/2)), in float64."""
    half = dim // 2
    p = position.to(torch.float64)
    w = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=p.device).div(half))
    s = torch.outer(p, w)
    return torch.cat([torch.cos(s), torch.sin(s)], dim=1)


def rope_axis_dims(head_dim: int) -> Tuple[int, int, int]:
    """Real-valued widths of the (t, h, w) RoPE parts of a head: 128 -> (44, 42, 42)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_freqs(grid: Tuple[int, int, int], head_dim: int, theta: float = 10000.0,
               device=None) -> torch.Tensor:
    """complex128 rotations [f*h*w, 1, head_dim/2] for a token grid (t-major, then h, then w)."""
    f, h, w = grid
    parts = []
    for n, d, shape in ((f, rope_axis_dims(head_dim)[0], (f, 1, 1)), (h, rope_axis_dims(head_dim)[1], (1, h, 1)),
                        (w, rope_axis_dims(head_dim)[2], (1, 1, w))):
        inv = 1.0 / torch.pow(theta, torch.arange(0, d, 2, dtype=torch.float64, device=device).div(d))
        ang = torch.outer(torch.arange(n, dtype=torch.float64, device=device), inv)
        z = torch.polar(torch.ones_like(ang), ang)                      # [n, d/2]
        parts.append(z.view(*shape, -1).expand(f, h, w, -1))
    return torch.cat(parts, dim=-1).reshape(f * h * w, 1, -1)


def rope_tables(freqs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """complex rotations [L, 1, D/2] -> fp32 (cos, sin) [L, 1, D] in the channel layout of x: cos repeated for
    each (even, odd) pair, sin signed (-sin, +sin), so that the rotation is ``x * cos + rope_pair_swap(x) * sin``.
    The values are freqs.real / freqs.imag rounded to fp32, as in the real fp32 path of rope_apply."""
    c = freqs.real.to(torch.float32)
    s = freqs.imag.to(torch.float32)
    cos = torch.stack([c, c], dim=-1).flatten(-2).contiguous()
    sin = torch.stack([-s, s], dim=-1).flatten(-2).contiguous()
    return cos, sin


def rope_pair_swap(x: torch.Tensor) -> torch.Tensor:
    """Swap the channels of each adjacent (even, odd) pair: (x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...)."""
    return x.unflatten(-1, (x.shape[-1] // 2, 2)).flip(-1).flatten(-2)


ROPE_CHUNK_TOKENS = 4096  # bounds the float64 temporaries (official: whole sequence at once, ~4 GB at 53k tokens)


def rope_apply(x: torch.Tensor, freqs: torch.Tensor, out_dtype: torch.dtype,
               rope_dtype: torch.dtype = torch.float64, chunk: int = ROPE_CHUNK_TOKENS,
               real: Optional[bool] = None) -> torch.Tensor:
    """Rotate adjacent (even, odd) channel pairs of x [B, L, H, D] by freqs [L, 1, D/2]; result in out_dtype.

    ``freqs`` may also be the ``(cos, sin)`` pair of ``rope_tables(freqs)`` (fp32 [L, 1, D]): then the rotation
    is ``x * cos + pair_swap(x) * sin`` in fp32 (no complex numbers, no interleave copy), bit-identical to the
    real fp32 form below in eager mode (same products and sums; -a*s added instead of a*s subtracted).

    Done in ``chunk``-token slices: elementwise, so bit-identical to one pass, with bounded float64 memory.

    ``rope_dtype=torch.float32`` (opt-in, e.g. ``accel.compile_blocks``, which passes the tables above unless
    ``model.rope_real_tables`` is off) with complex ``freqs`` rotates in complex64, or, with ``real`` (default:
    exactly when tracing for torch.compile, since inductor generates no code for complex tensors), as
    (x0 c - x1 s, x0 s + x1 c) in fp32 real tensors that compile fuses with the RMSNorm before it.
    Both agree with the float64 rotation to ~1e-7 relative, far below the bf16 rounding that follows.
    """
    b, l, n, d = x.shape
    if isinstance(freqs, tuple):  # (cos, sin) tables from rope_tables(): the compiled fp32 form (default)
        cos, sin = freqs
        xf = x.to(torch.float32)
        return (xf * cos + rope_pair_swap(xf) * sin).to(out_dtype)
    if rope_dtype == torch.float32 and (real if real is not None else torch.compiler.is_compiling()):
        c, s = freqs.real.to(torch.float32), freqs.imag.to(torch.float32)
        x0, x1 = x.to(torch.float32).reshape(b, l, n, d // 2, 2).unbind(-1)
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).reshape(b, l, n, d).to(out_dtype)
    f = freqs if rope_dtype == torch.float64 else freqs.to(torch.complex64)

    def rot(xs, fs):
        z = torch.view_as_complex(xs.to(rope_dtype).reshape(xs.shape[0], xs.shape[1], n, d // 2, 2))
        return torch.view_as_real(z * fs).reshape(xs.shape).to(out_dtype)

    if l <= chunk:
        return rot(x, f)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    for s in range(0, l, chunk):
        out[:, s:s + chunk] = rot(x[:, s:s + chunk], f[s:s + chunk])
    return out


# ---------------------------------------------------------------------- Wan blocks
class _WanAttention(nn.Module):
    """The q/k/v/o projections and q/k RMS norms both Wan attentions share (official key names)."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6, qk_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()


class WanSelfAttention(_WanAttention):
    # distributed.Ulysses while sequence parallelism is on (enable_sequence_parallel): x holds this rank's
    # tokens and the attention core runs over the whole sequence between two all-to-alls; None: one process.
    sequence_parallel = None

    def attend(self, q, k, v, backend: str):
        sp = self.sequence_parallel
        return _attention(q, k, v, backend) if sp is None else sp.attention(q, k, v, backend)

    def forward(self, x, freqs, backend: str, rope_dtype=torch.float64):
        b, l, _ = x.shape
        cd = x.dtype
        shape = (b, l, self.num_heads, self.head_dim)
        q = rope_apply(self.norm_q(apply_cd(self.q, x, cd)).view(shape), freqs, cd, rope_dtype)
        k = rope_apply(self.norm_k(apply_cd(self.k, x, cd)).view(shape), freqs, cd, rope_dtype)
        v = apply_cd(self.v, x, cd).view(shape)
        out = self.attend(q, k, v, backend)
        return apply_cd(self.o, out.reshape(b, l, -1), cd)


class WanI2VCrossAttention(_WanAttention):
    """Cross-attention to 512 text tokens plus a separate attention to the 257 CLIP tokens (k_img/v_img)."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6, qk_norm: bool = True):
        super().__init__(dim, num_heads, eps, qk_norm)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x, ctx_img, ctx_txt, backend: str):
        b, cd = x.shape[0], x.dtype
        heads = lambda t: t.view(b, -1, self.num_heads, self.head_dim)  # noqa: E731
        q = heads(self.norm_q(apply_cd(self.q, x, cd)))
        k = heads(self.norm_k(apply_cd(self.k, ctx_txt, cd)))
        v = heads(apply_cd(self.v, ctx_txt, cd))
        k_img = heads(self.norm_k_img(apply_cd(self.k_img, ctx_img, cd)))
        v_img = heads(apply_cd(self.v_img, ctx_img, cd))
        img = _attention(q, k_img, v_img, backend)
        txt = _attention(q, k, v, backend)
        return apply_cd(self.o, (txt + img).flatten(2), cd)


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: SteadyDancerConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, cfg.num_heads, cfg.eps, cfg.qk_norm)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else None
        self.cross_attn = WanI2VCrossAttention(dim, cfg.num_heads, cfg.eps, cfg.qk_norm)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e0, ctx_img, ctx_txt, freqs, backend: str = "sdpa", rope_dtype=torch.float64):
        """x [B, L, dim] in cd; e0 [B, 6, dim] in cd; ctx_img [B, 257, dim], ctx_txt [B, 512, dim] in cd."""
        cd = x.dtype
        # SteadyDancer: modulation + e in bf16 (official block runs it under bf16 autocast with bf16 params;
        # base Wan2.1 does this in fp32). ``1 + scale`` is therefore also rounded to cd, as in the official run.
        shift, scale, gate, c_shift, c_scale, c_gate = (self.modulation.to(e0.device, cd) + e0).chunk(6, dim=1)
        h = layer_norm_fp32(x, self.norm1).to(cd) * (1 + scale) + shift
        x = x + self.self_attn(h, freqs, backend, rope_dtype) * gate
        h = layer_norm_fp32(x, self.norm3).to(cd) if self.norm3 is not None else x
        x = x + self.cross_attn(h, ctx_img, ctx_txt, backend)
        h = layer_norm_fp32(x, self.norm2).to(cd) * (1 + c_scale) + c_shift
        h = apply_cd(self.ffn[2], F.gelu(apply_cd(self.ffn[0], h, cd), approximate="tanh"), cd)
        return x + h * c_gate


class Head(nn.Module):
    def __init__(self, cfg: SteadyDancerConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e):
        """x [B, L, dim], e [B, dim] (time embedding before time_projection), both in cd."""
        cd = x.dtype
        shift, scale = (self.modulation.to(e.device, cd) + e.unsqueeze(1)).chunk(2, dim=1)
        return apply_cd(self.head, layer_norm_fp32(x, self.norm).to(cd) * (1 + scale) + shift, cd)


class MLPProj(nn.Module):
    """img_emb: LayerNorm -> Linear -> GELU(exact) -> Linear -> LayerNorm on the 1280-d CLIP tokens."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim))

    def forward(self, clip: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
        """Returns fp32 (the final LayerNorm runs in fp32 under the official autocast)."""
        h = apply_cd(self.proj[1], layer_norm_fp32(clip, self.proj[0]), cd)
        h = apply_cd(self.proj[3], F.gelu(h), cd)
        return layer_norm_fp32(h, self.proj[4])


# ---------------------------------------------------------------------- the model
ContextArg = Union[torch.Tensor, Sequence[torch.Tensor]]


class SteadyDancerDiT(nn.Module):
    """SteadyDancer DiT with the official key names. Built in eval mode (the alignment unit has dropout)."""

    def __init__(self, config: Optional[SteadyDancerConfig] = None, attention: str = "sdpa"):
        super().__init__()
        cfg = config or SteadyDancerConfig.full_14b()
        self.config = cfg
        get_backend(attention)  # fail early on an unknown / unavailable backend
        self.attention_backend = attention
        self.rope_dtype = torch.float64  # official; perf work may trade it for complex64 (documented deviation)
        # with rope_dtype float32 (accel.compile_blocks), blocks get fp32 (cos, sin) tables (rope_tables) as
        # ``freqs`` instead of the complex rotations: bit-identical to the real fp32 rotation in eager, and
        # under torch.compile the RMSNorm+RoPE kernel runs 0.46 instead of 0.68 ms (H100, bench/perf_notes.md
        # run 6). Ignored while rope_dtype is the official float64. False = the complex fp32 rotation.
        self.rope_real_tables = True
        self._compute_dtype: Optional[torch.dtype] = None
        self._rope_cache = None
        self._rope_tables_cache = None  # (freqs it was built from, (cos, sin)); see block_freqs
        self.sequence_parallel = None   # distributed.Ulysses: tokens split over ranks after the embeddings
        self.batch_split: Optional[bool] = None  # one forward per batch item: None = where needed (splits_batch)
        dim, p = cfg.dim, cfg.patch_size

        # token embeddings
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=p, stride=p)              # ref image frame
        self.patch_embedding_fuse = nn.Conv3d(cfg.fuse_in_dim, dim, kernel_size=p, stride=p)    # video frames
        self.patch_embedding_ref_c = nn.Conv3d(cfg.in_dim_c, dim, kernel_size=p, stride=p)      # first-pose frame
        # pose modules
        self.condition_embedding_spatial = SpatialDynamicConv(cfg.in_dim_c, cfg.in_dim_c)
        self.condition_embedding_temporal = TemporalFactorConv(cfg.in_dim_c)
        self.condition_embedding_align = PoseAlignment(cfg.in_dim_c, cfg.out_dim, cfg.align_hidden, cfg.align_heads,
                                                       cfg.align_dropout)
        # conditioning embeddings
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([WanAttentionBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.img_emb = MLPProj(cfg.clip_dim, dim)
        self.eval()

    # ------------------------------------------------------------------ dtype
    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype of activations through Linear/Conv layers. Default: patch_embedding_fuse.weight's dtype."""
        if self._compute_dtype is not None:
            return self._compute_dtype
        w = self.patch_embedding_fuse.weight
        return w.dtype if w.dtype in _FLOAT_DTYPES else torch.bfloat16

    @compute_dtype.setter
    def compute_dtype(self, dtype: Optional[torch.dtype]) -> None:
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise ValueError(f"unsupported compute dtype {dtype}")
        self._compute_dtype = dtype

    # ------------------------------------------------------------------ pieces (also used by tests/tools)
    def embed_time(self, timestep: torch.Tensor, cd: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """timestep [B] -> (e [B, dim], e0 [B, 6, dim]) in cd."""
        sin = sinusoidal_embedding_1d(self.config.freq_dim, timestep)
        e = apply_cd(self.time_embedding[2], F.silu(apply_cd(self.time_embedding[0], sin, cd)), cd)
        e0 = apply_cd(self.time_projection[1], F.silu(e), cd).unflatten(1, (6, self.config.dim))
        return e, e0

    def pad_text(self, context: ContextArg, batch: int) -> torch.Tensor:
        """Zero-pad the text embeddings to text_len tokens (before text_embedding, as official) -> [B, 512, C]."""
        n = self.config.text_len
        if torch.is_tensor(context):
            items = list(context.unbind(0)) if context.dim() == 3 else [context]
        else:
            items = list(context)
        out = []
        for u in items:
            if u.dim() != 2 or u.shape[1] != self.config.text_dim:
                raise ValueError(f"text context items must be [L, {self.config.text_dim}], got {tuple(u.shape)}")
            if u.shape[0] > n:
                raise ValueError(f"text context has {u.shape[0]} tokens; at most {n} are supported")
            out.append(torch.cat([u, u.new_zeros(n - u.shape[0], u.shape[1])]) if u.shape[0] < n else u)
        ctx = torch.stack(out)
        return _bcast(ctx, batch, "context")

    def embed_text(self, context: ContextArg, batch: int, cd: torch.dtype) -> torch.Tensor:
        t = self.pad_text(context, batch)
        return apply_cd(self.text_embedding[2], F.gelu(apply_cd(self.text_embedding[0], t, cd), approximate="tanh"),
                        cd)

    def embed_clip(self, clip_fea: torch.Tensor, clip_fea_c: Optional[torch.Tensor], cd: torch.dtype) -> torch.Tensor:
        """img_emb(clip of reference) + img_emb(clip of first pose frame), summed in fp32, returned in cd."""
        ctx = self.img_emb(clip_fea, cd)
        if clip_fea_c is not None:
            ctx = ctx + self.img_emb(clip_fea_c, cd)
        return ctx.to(cd)

    def rope(self, grid: Tuple[int, int, int], device) -> torch.Tensor:
        key = (tuple(grid), str(device))
        if self._rope_cache is None or self._rope_cache[0] != key:
            self._rope_cache = (key, rope_freqs(grid, self.config.head_dim, self.config.rope_theta, device))
        return self._rope_cache[1]

    def block_freqs(self, grid: Tuple[int, int, int], device):
        """What the blocks get as ``freqs``: the complex rotations (official float64 path, or rope_real_tables
        off), or, when ``rope_real_tables`` is set and rope_dtype is float32, their fp32 (cos, sin) tables
        (cached per grid)."""
        freqs = self.rope(grid, device)
        if not (self.rope_real_tables and self.rope_dtype == torch.float32):
            return freqs
        cache = self._rope_tables_cache
        if cache is None or cache[0] is not freqs:
            cache = self._rope_tables_cache = (freqs, rope_tables(freqs))
        return cache[1]

    def embed_pose(self, x: torch.Tensor, cond: torch.Tensor, cd: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """(fused, aligned) pose latents [B, 16, F, H, W]: fused = cond + temporal + spatial (in x's dtype,
        fp32 for fp32 latents); aligned = alignment unit(fused, noisy latent) in cd."""
        b, _, f, h, w = cond.shape
        temporal = self.condition_embedding_temporal(cond, cd)
        spatial = self.condition_embedding_spatial(cond.transpose(1, 2).reshape(b * f, -1, h, w), cd)
        spatial = spatial.view(b, f, -1, h, w).transpose(1, 2)
        fused = cond + temporal + spatial
        aligned = self.condition_embedding_align(fused, x, cd)
        return fused, aligned

    def run_blocks(self, x, e0, ctx_img, ctx_txt, freqs):
        for block in self.blocks:
            x = block(x, e0, ctx_img, ctx_txt, freqs, self.attention_backend, self.rope_dtype)
        return x

    def unpatchify(self, x: torch.Tensor, grid: Tuple[int, int, int]) -> torch.Tensor:
        """[B, f*h*w, pt*ph*pw*C] -> [B, C, f*pt, h*ph, w*pw] (channel fastest in the token vector)."""
        b = x.shape[0]
        f, h, w = grid
        pt, ph, pw = self.config.patch_size
        c = self.config.out_dim
        x = x[:, : f * h * w].reshape(b, f, h, w, pt, ph, pw, c)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, c, f * pt, h * ph, w * pw)

    # ------------------------------------------------------------------ forward
    def splits_batch(self, device) -> bool:
        """Whether a forward of batch > 1 on ``device`` runs as one forward per item (``batch_split``; None =
        where the batched kernels cannot be trusted). That is flex top-k attention traced into compiled blocks on
        CUDA: there, at batch > 1, the kernel reads memory outside its inputs (torch 2.11 + triton 3.6 on an
        H200, issue 15: an illegal memory access with PyTorch's flex kernel options, outputs that change call to
        call under cudaMallocAsync with ours; flex compiled on its own, fp8 and SDPA in compiled blocks were all
        bit-reproducible at batch 2-3). One item at a time measured 2.6% faster over the official 40 steps.
        Under sequence parallelism only the rule applies (``batch_split`` is ignored): every rank of the group
        must make the same collective calls, and the rule gives every rank the same answer."""
        if self.batch_split is not None and self.sequence_parallel is None:
            return bool(self.batch_split)
        from ..kernels.backends import sparse_settings
        from ..kernels.sparse_attention import flex_traced_in_graph

        s = sparse_settings(self.attention_backend)
        if s is None or s.get("kernel") != "flex" or not flex_traced_in_graph(device):
            return False
        return blocks_compiled(self)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: ContextArg, clip_fea: torch.Tensor,
                clip_fea_c: Optional[torch.Tensor], y: torch.Tensor, cond: torch.Tensor, ref_x: torch.Tensor,
                ref_c: torch.Tensor) -> torch.Tensor:
        """Velocity [B, 16, F, H, W] (float32; float64 if the compute dtype is float64).

        x [B,16,F,H,W] noisy latent; timestep [B] (or one value for all); context [B,L,4096] / list of
        [Li,4096] (Li <= 512); clip_fea, clip_fea_c [B,257,1280] (clip_fea_c may be None: reference CLIP
        only); y [B,20,F,H,W] = mask(4) + image latent(16); cond [B,16,F,H,W] pose latent;
        ref_x [B,36,1,H,W] = cat(Zr, ones4, Zr); ref_c [B,>=16,1,H,W] (first 16 channels = first-pose latent).
        Inputs with batch 1 are broadcast to B. Batch items are independent; see ``splits_batch``.
        """
        args = (x, timestep, context, clip_fea, clip_fea_c, y, cond, ref_x, ref_c)
        if x.dim() == 5 and x.shape[0] > 1 and self.splits_batch(x.device):
            return per_item(functools.partial(SteadyDancerDiT._forward, self), args, x.shape[0])
        return self._forward(*args)

    def _forward(self, x, timestep, context, clip_fea, clip_fea_c, y, cond, ref_x, ref_c):
        cfg = self.config
        cd = self.compute_dtype
        acc = torch.promote_types(cd, torch.float32)   # the dtype of the official fp32 latent arithmetic
        if x.dim() != 5 or x.shape[1] != cfg.out_dim:
            raise ValueError(f"x must be [B, {cfg.out_dim}, F, H, W], got {tuple(x.shape)}")
        b, _, f, h, w = x.shape
        pt, ph, pw = cfg.patch_size
        if pt != 1 or h % ph or w % pw:
            raise ValueError(f"latent H, W ({h}, {w}) must be multiples of the patch size {cfg.patch_size[1:]}")
        x = x.to(acc)
        y = _check(_bcast(y, b, "y"), (b, cfg.in_dim - cfg.out_dim, f, h, w), "y").to(acc)
        cond = _check(_bcast(cond, b, "cond"), (b, cfg.in_dim_c, f, h, w), "cond").to(acc)
        ref_x = _check(_bcast(ref_x, b, "ref_x"), (b, cfg.in_dim, 1, h, w), "ref_x")
        ref_c = _bcast(ref_c, b, "ref_c")
        if ref_c.shape[1] < cfg.in_dim_c or ref_c.shape[2:] != (1, h, w):
            raise ValueError(f"ref_c must be [B, >={cfg.in_dim_c}, 1, {h}, {w}], got {tuple(ref_c.shape)}")
        ref_c = ref_c[:, : cfg.in_dim_c]

        # pose conditioning -> video tokens (68 channels through patch_embedding_fuse)
        fused, aligned = self.embed_pose(x, cond, cd)
        vid = apply_cd(self.patch_embedding_fuse, torch.cat([x, y, fused, aligned.to(acc)], dim=1), cd)
        # two clean reference frames appended after the video frames (RoPE t = F and F + 1)
        rx = apply_cd(self.patch_embedding, ref_x, cd)
        rc = apply_cd(self.patch_embedding_ref_c, ref_c, cd)
        tok = torch.cat([vid, rx, rc], dim=2)                              # [B, dim, F+2, h', w']
        grid = tuple(tok.shape[2:])
        tok = tok.flatten(2).transpose(1, 2).contiguous()                 # [B, L, dim]
        freqs = self.block_freqs(grid, tok.device)

        t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
        t = t.to(tok.device).reshape(-1)
        e, e0 = self.embed_time(_bcast(t, b, "timestep"), cd)
        ctx_txt = self.embed_text(context, b, cd)
        ctx_img = self.embed_clip(_bcast(clip_fea, b, "clip_fea"),
                                  None if clip_fea_c is None else _bcast(clip_fea_c, b, "clip_fea_c"), cd)

        sp = self.sequence_parallel
        if sp is not None:  # this rank's token slice and RoPE rows (distributed.py)
            tok, freqs = sp.scatter(tok, freqs)
        out = self.run_blocks(tok, e0, ctx_img, ctx_txt, freqs)
        out = self.head(out, e)
        if sp is not None:
            out = sp.gather(out)
        # output = the first F latent frames (the reference frames are dropped)
        return self.unpatchify(out, (f, grid[1], grid[2])).to(acc)


def blocks_compiled(model: nn.Module) -> bool:
    """Whether ``model.blocks`` are compiled: ``nn.Module.compile`` (or, for blocks with hooks, a compiled
    ``forward``; weights/speed_options.compile_blocks)."""
    return any(getattr(b, "_compiled_call_impl", None) is not None or "forward" in b.__dict__ for b in model.blocks)


def _bcast(t: torch.Tensor, b: int, name: str) -> torch.Tensor:
    if t.shape[0] == b:
        return t
    if t.shape[0] == 1:
        return t.expand(b, *t.shape[1:])
    raise ValueError(f"{name} has batch {t.shape[0]}, expected {b} (or 1)")


def _check(t: torch.Tensor, shape: tuple, name: str) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    return t


def build_meta(config: Optional[SteadyDancerConfig] = None, attention: str = "sdpa") -> SteadyDancerDiT:
    """The model with parameters on the meta device (no memory); load with ``load_state_dict(sd, assign=True)``."""
    with torch.device("meta"):
        return SteadyDancerDiT(config, attention)
