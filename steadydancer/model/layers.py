"""Small numeric helpers shared by the DiT modules.

Precision model (see dit.py): the official SteadyDancer pipeline runs the whole DiT under CUDA
``autocast(bfloat16)`` with bf16 weights. Autocast runs convolutions/linears/matmuls in bf16 and layer_norm /
group_norm / softmax / rsqrt / pow in fp32 (returning fp32), and leaves everything else (adds, muls,
activations, mean/var) in the dtype of its inputs. We reproduce that explicitly, without autocast, with a
``compute dtype`` (cd): activations are cast to cd right before every Linear/Conv, and the fp32 ops are done
in fp32 as autocast would. With cd = float32 everything is plain float32 (what the parity tests use).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_PLAIN = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def apply_cd(mod: nn.Module, x: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    """Run a Linear/Conv on ``x`` cast to the compute dtype, like autocast does.

    Plain torch layers whose weights are stored in another float dtype (e.g. small modules kept in fp32 while
    cd is bf16) get their weights cast on the fly, as autocast would; any other (swapped-in, e.g. fp8/GGUF)
    module is simply called with ``x`` in cd and must return cd.
    """
    x = x.to(cd)
    if type(mod) in _PLAIN:
        w = mod.weight
        if w.dtype != cd and w.dtype.is_floating_point:
            b = mod.bias.to(cd) if mod.bias is not None else None
            w = w.to(cd)
            if isinstance(mod, nn.Linear):
                return F.linear(x, w, b)
            return mod._conv_forward(x, w, b)
    return mod(x)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """To fp32 for the normalisation statistics (float64 stays float64, for high-precision reference runs)."""
    return x if x.dtype == torch.float64 else x.float()


def _affine_as(mod: nn.Module, dtype: torch.dtype, device=None):
    """A norm's optional weight and bias, in ``dtype`` on ``device`` (a host-resident weight, e.g. a layer
    that a memory manager left in CPU RAM, is copied over for the call)."""
    return tuple(None if p is None else p.to(device, dtype) for p in (mod.weight, mod.bias))


def layer_norm_fp32(x: torch.Tensor, mod: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm computed in fp32 (official: ``super().forward(x.float())`` / autocast layer_norm). Returns fp32."""
    x = upcast(x)
    w, b = _affine_as(mod, x.dtype, x.device)
    return F.layer_norm(x, mod.normalized_shape, w, b, mod.eps)


def group_norm_fp32(x: torch.Tensor, mod: nn.GroupNorm) -> torch.Tensor:
    """GroupNorm in fp32 (autocast runs group_norm in fp32 and returns fp32)."""
    x = upcast(x)
    w, b = _affine_as(mod, x.dtype, x.device)
    return F.group_norm(x, mod.num_groups, w, b, mod.eps)


class RMSNorm(nn.Module):
    """Wan RMSNorm over the last dim (across all heads): x * rsqrt(mean(x^2) + eps) * weight.

    Official (WanRMSNorm): the normalisation runs in fp32, the result is cast back to the input dtype
    *before* the multiply with the weight, and the multiply happens in the (bf16) weight/input dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype)
        return y * self.weight.to(x.device, x.dtype)


def hsigmoid(x: torch.Tensor) -> torch.Tensor:
    """Hard sigmoid of the DCD code: relu6(x + 3) / 3 (note: /3, not /6, as in the official module)."""
    return F.relu6(x + 3.0) / 3.0
