"""One GEMM for the self-attention q/k/v projections (opt-in runtime swap; state-dict keys unchanged).

    from steadydancer_turbo.steadydancer.model.fused_qkv import fuse_qkv
    fuse_qkv(model)      # after fp8 conversion (if any), before compile_blocks

Each block's ``self_attn`` gets one [3*dim, dim] weight built from its ``q``, ``k`` and ``v`` layers; those
layers' weights become views into it, so memory does not grow and ``state_dict()`` returns the same keys and
values as before (the fused copies are non-persistent buffers). The three projections read the same input, so
one product with N = 3*dim replaces three with N = dim and the input is quantized once (fp8).

- bf16/fp32 ``nn.Linear`` q/k/v: one ``F.linear`` over the concatenated weight; each output element is the same
  dot product as before (the GEMM may block it differently: float rounding only).
- ``FP8Linear`` q/k/v with per-tensor activation scaling: the three weights keep their own per-tensor scales, so
  the fused product runs as a row-wise scaled ``torch._scaled_mm`` (activation scale broadcast to [M, 1], weight
  scale per output channel [1, 3*dim] = each layer's scale over its third): the same scales as three separate
  products, one launch. Off fp8-capable GPUs the layers dequantize, as ``FP8Linear`` does.

Measured (H100, torch 2.11, 35,880 tokens, bench/perf_notes.md run 4): **not faster** there. Three tensor-wise
fp8 products take 3.86 ms (inside a compiled block they already share one activation quantization through
AOTAutograd's CSE); the fused row-wise product takes 4.22 ms. So it is opt-in and off by default.

Not for block-swapped models (the swap moves parameters one by one and would separate the views from the fused
buffer). ``unfuse_qkv`` restores the plain class.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels.fp8_linear import FP8Linear, fp8_matmul_supported, quantize_tensorwise
from ..kernels.attention import attention
from .dit import WanSelfAttention, rope_apply
from .layers import apply_cd

__all__ = ["FusedQKVSelfAttention", "fuse_qkv", "unfuse_qkv"]


def _fusable(sa: nn.Module) -> str | None:
    layers = (sa.q, sa.k, sa.v)
    if all(type(m) is nn.Linear for m in layers):
        ws = [m.weight for m in layers]
        if len({(w.dtype, w.device, w.shape) for w in ws}) == 1 and all(m.bias is not None for m in layers):
            return "linear"
    if all(type(m) is FP8Linear for m in layers):
        if all(m.act_scaling == "tensor" and m.bias is not None for m in layers) and \
                len({(m.weight.shape, m.weight.device, m.fast_accum, m.compute_dtype) for m in layers}) == 1:
            return "fp8"
    return None


class FusedQKVSelfAttention(WanSelfAttention):
    """``WanSelfAttention`` whose q/k/v projections run as one product (see module doc). Same parameters, same
    state-dict keys; the fused weight is the non-persistent buffer ``qkv_weight`` (+ ``qkv_bias``,
    ``qkv_scale`` for fp8)."""

    qkv_kind: str

    def _qkv(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [M, dim] in the compute dtype -> [M, 3*dim] in the same dtype."""
        if self.qkv_kind == "linear":
            w = self.qkv_weight
            b = self.qkv_bias
            if w.dtype != x2.dtype:
                w, b = w.to(x2.dtype), b.to(x2.dtype)
            return F.linear(x2, w, b)
        bias = self.qkv_bias if self.qkv_bias.dtype == x2.dtype else self.qkv_bias.to(x2.dtype)
        if not (x2.is_cuda and fp8_matmul_supported(x2.device) and x2.dtype in (torch.bfloat16, torch.float16)):
            acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
            w = (self.qkv_weight.to(acc) * self.qkv_scale.reshape(-1, 1).to(acc)).to(x2.dtype)
            return F.linear(x2, w, bias)
        xq, xs = quantize_tensorwise(x2)
        sa = xs.reshape(1, 1).expand(x2.shape[0], 1).contiguous()
        return torch._scaled_mm(xq, self.qkv_weight.t(), scale_a=sa, scale_b=self.qkv_scale.reshape(1, -1),
                                bias=bias, out_dtype=x2.dtype, use_fast_accum=self.q.fast_accum)

    def forward(self, x, freqs, backend: str, rope_dtype=torch.float64):
        b, l, dim = x.shape
        cd = x.dtype
        shape = (b, l, self.num_heads, self.head_dim)
        qkv = self._qkv(x.reshape(b * l, dim)).view(b, l, 3 * dim)
        q = rope_apply(self.norm_q(qkv[..., :dim]).view(shape), freqs, cd, rope_dtype)
        k = rope_apply(self.norm_k(qkv[..., dim:2 * dim]).view(shape), freqs, cd, rope_dtype)
        v = qkv[..., 2 * dim:].reshape(shape)
        out = self.attend(q, k, v, backend)
        return apply_cd(self.o, out.reshape(b, l, -1), cd)


def _fuse_one(sa: WanSelfAttention) -> bool:
    kind = _fusable(sa)
    if kind is None:
        return False
    layers = (sa.q, sa.k, sa.v)
    n = sa.q.weight.shape[0]
    with torch.no_grad():
        w = torch.cat([m.weight.detach() for m in layers], 0)
        b = torch.cat([m.bias.detach() for m in layers], 0)
        for i, m in enumerate(layers):  # the layers' own weights become views: no second copy
            m.weight = nn.Parameter(w[i * n:(i + 1) * n], requires_grad=False)
            m.bias = nn.Parameter(b[i * n:(i + 1) * n], requires_grad=False)
        if kind == "fp8":
            scale = torch.cat([m.scale_weight.detach().float().reshape(1).expand(n) for m in layers]).contiguous()
            sa.register_buffer("qkv_scale", scale, persistent=False)
    sa.register_buffer("qkv_weight", w, persistent=False)
    sa.register_buffer("qkv_bias", b, persistent=False)
    sa.qkv_kind = kind
    sa.__class__ = FusedQKVSelfAttention
    return True


def fuse_qkv(model: nn.Module) -> int:
    """Fuse q/k/v of every block's self-attention where the three layers are alike (all ``nn.Linear`` of one
    dtype, or all per-tensor-activation ``FP8Linear``). Returns how many blocks were fused."""
    return sum(_fuse_one(blk.self_attn) for blk in model.blocks
               if type(blk.self_attn) is WanSelfAttention)


def unfuse_qkv(model: nn.Module) -> int:
    """Back to the plain class (the q/k/v weights stay views into the former fused buffer; values unchanged)."""
    n = 0
    for blk in model.blocks:
        sa = blk.self_attn
        if type(sa) is FusedQKVSelfAttention:
            for name in ("qkv_weight", "qkv_bias", "qkv_scale"):
                sa._buffers.pop(name, None)
            sa.__class__ = WanSelfAttention
            n += 1
    return n
