"""Quantized weights kept in their stored form and dequantized per layer at forward time.

- :class:`QuantLinear` / :class:`QuantConv` replace ``nn.Linear`` / ``nn.Conv{2,3}d`` in place. Their
  ``weight`` buffer holds the stored bytes (fp8 tensor, or packed GGML blocks as ``uint8``), plus
  ``weight_scale`` (fp8). At every forward the weight is dequantized to the layer's compute dtype, LoRA
  runtime patches are added, and the ordinary float op runs.
- GGUF dequantization uses diffusers' pure-torch GGML block decoders
  (``diffusers.quantizers.gguf.utils.dequantize_functions``), evaluated in float32 so the result is
  bit-identical to gguf-py's reference ``gguf.quants.dequantize`` (checked in the tests), then cast.
- fp8: ``weight.float() * scale`` then cast (one rounding). Optional fp8 matmul (``fp8_matmul = True``)
  for ``float8_e4m3fn`` weights with a per-tensor scale: the stored weight goes straight into
  :func:`.fp8_linear.scaled_mm_linear` (the package's one fp8 matmul: activation quantized to e4m3 on the
  fly, one ``torch._scaled_mm`` with the bias fused), only where the device has fp8 tensor cores (CUDA
  capability >= 8.9). LoRA patches then stay un-merged: a low-rank patch adds ``scale * (x @ down.T) @ up.T``
  in the compute dtype next to the fp8 product (rank-r cost, no dequantized weight); a full-difference
  patch ("diff") falls back to the dequantized matmul with the patch merged.
- A host application's per-call patch (``weight_patch_fn``: ``fn(weight_fp32) -> weight``) runs on the
  dequantized path. When the host can also write that patch as low-rank side terms
  (:meth:`QuantLinear.set_lowrank_terms`), the fp8 matmul path stays active and adds them instead of calling
  the function (nodes/native_model.py does this for ComfyUI's plain LoRA patches).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..kernels import fp8_linear as _f8


def _gguf():
    import gguf
    return gguf


@functools.lru_cache(maxsize=None)
def _diffusers_dequant():
    try:
        from diffusers.quantizers.gguf.utils import GGML_QUANT_SIZES, dequantize_functions
    except ImportError as e:  # pragma: no cover - environment problem, reported clearly
        raise ImportError("dequantizing GGUF weights needs 'diffusers' (its GGUF utilities) and 'gguf'") from e
    return dequantize_functions, GGML_QUANT_SIZES


def dequantize_gguf(raw: torch.Tensor, qtype: int, shape, dtype=torch.float32) -> torch.Tensor:
    """Packed GGML blocks (``uint8``, any shape) -> float tensor of ``shape`` in ``dtype``.

    Decoded in float32 by diffusers' block decoders, then cast once.
    """
    fns, sizes = _diffusers_dequant()
    gguf = _gguf()
    qt = gguf.GGMLQuantizationType(int(qtype))
    block_size, type_size = sizes[qt]
    blocks = raw.reshape(-1, type_size)
    out = fns[qt](blocks, block_size, type_size, dtype=torch.float32)
    out = out.reshape(tuple(shape))
    return out if dtype == torch.float32 else out.to(dtype)


def dequantize_fp8(w: torch.Tensor, scale, dtype) -> torch.Tensor:
    out = w.to(torch.float32)
    if scale is not None:
        s = scale.to(device=w.device, dtype=torch.float32)
        if s.numel() > 1 and s.dim() == 1 and w.dim() >= 2 and s.shape[0] == w.shape[0]:
            s = s.view(-1, *([1] * (w.dim() - 1)))  # per-output-channel scales
        out = out * s
    return out.to(dtype)


# ---------------------------------------------------------------------------------------------
# LoRA runtime patches (shared by the quantized layers)
# ---------------------------------------------------------------------------------------------
class _Patched(nn.Module):
    """Mixin: weight dequantization + LoRA runtime patches as buffers (they follow .to() / block swap)."""

    def _init_quant(self, qkind, qtype, weight_shape, compute_dtype):
        self.qkind = qkind              # "fp8" | "gguf"
        self.qtype = qtype              # torch fp8 dtype or GGML type int
        self.weight_shape = tuple(weight_shape)
        self.compute_dtype = compute_dtype
        self.fp8_matmul = False         # QuantLinear only: fp8 tensor-core matmul where possible
        self.fp8_act_scaling = "tensor"  # its activation scaling / accumulation (the fastest measured on H100,
        self.fp8_fast_accum = True       # bench/perf_notes.md; same error as per-token at the FFN shape)
        self._patches = []              # (kind, buffer names, scale)
        # optional ``fn(weight_fp32) -> weight``: extra patches from a host application (e.g. ComfyUI's
        # ModelPatcher LoRA patches, attached by nodes/native_model.py), applied after ours, before the cast
        self.weight_patch_fn = None
        self._host_rank = None          # rank of weight_patch_fn's low-rank form (QuantLinear.set_lowrank_terms)
        self.register_buffer("weight", None)
        self.register_buffer("weight_scale", None)

    def add_patch(self, kind, tensors, scale):
        """kind 'lowrank': tensors (up, down); kind 'diff': (delta,). Stored in the compute dtype."""
        names = []
        for t in tensors:
            name = f"lora_{len(self._patches)}_{len(names)}"
            self.register_buffer(name, t.detach().to(device=self.weight.device, dtype=self.compute_dtype))
            names.append(name)
        self._patches.append((kind, tuple(names), float(scale)))

    def clear_patches(self):
        for _, names, _ in self._patches:
            for n in names:
                delattr(self, n)
        self._patches = []

    def dequantized_weight(self, dtype=None, device=None) -> torch.Tensor:
        """The float weight in ``dtype`` on ``device`` (default: where the stored weight is). A stored weight
        left in host RAM (a memory manager's partial load) is copied over in its stored (quantized) form."""
        dtype = dtype or self.compute_dtype
        has_patch = bool(self._patches) or self.weight_patch_fn is not None
        base_dtype = torch.float32 if has_patch else dtype
        raw, scale = self.weight, self.weight_scale
        if device is not None and raw.device != torch.device(device):
            raw = raw.to(device, non_blocking=True)
            scale = scale.to(device, non_blocking=True) if scale is not None else None
        if self.qkind == "fp8":
            w = dequantize_fp8(raw, scale, base_dtype).reshape(self.weight_shape)
        else:
            w = dequantize_gguf(raw, self.qtype, self.weight_shape, base_dtype)
        if self._patches:
            w = w + self.patch_delta(torch.float32).to(w.device)
        if self.weight_patch_fn is not None:
            w = self.weight_patch_fn(w)
        if has_patch:
            w = w.to(dtype)
        return w

    def _bias(self, x):
        return self.bias.to(x.device, self.compute_dtype) if self.bias is not None else None

    def patch_delta(self, dtype=torch.float32) -> torch.Tensor:
        delta = None
        for kind, names, scale in self._patches:
            ts = [getattr(self, n).to(dtype) for n in names]
            if kind == "lowrank":
                up, down = ts
                d = (up.flatten(1) @ down.flatten(1)).reshape(self.weight_shape)
            else:
                d = ts[0].reshape(self.weight_shape)
            d = d * scale
            delta = d if delta is None else delta + d
        return delta

    def extra_repr(self):
        q = self.qtype if self.qkind == "fp8" else _gguf().GGMLQuantizationType(self.qtype).name
        host = "" if self._host_rank is None else f", host_lowrank_rank={self._host_rank}"
        return f"{self.weight_shape}, stored={q}, compute={self.compute_dtype}, patches={len(self._patches)}{host}"


class QuantLinear(_Patched):
    def __init__(self, in_features, out_features, bias: bool, qkind, qtype, compute_dtype, device="meta"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self._init_quant(qkind, qtype, (out_features, in_features), compute_dtype)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=compute_dtype),
                                 requires_grad=False) if bias else None

    def fp8_matmul_capable(self) -> bool:
        """Whether the stored weight can feed the fp8 matmul as it is: e4m3 with one per-tensor scale."""
        return (self.qkind == "fp8" and self.qtype == torch.float8_e4m3fn
                and self.weight_scale is not None and self.weight_scale.numel() == 1)

    def fp8_matmul_eligible(self) -> bool:
        """The device-independent part of :meth:`fp8_matmul_active`: fp8 matmul asked for, e4m3 per-tensor
        weights, sizes /16, no full-difference patch of ours (the host's patch not considered)."""
        return (self.fp8_matmul and self.fp8_matmul_capable()
                and _f8.scaled_mm_shape_ok(self.in_features, self.out_features)
                and all(kind == "lowrank" for kind, _, _ in self._patches))

    def fp8_matmul_active(self, x: torch.Tensor) -> bool:
        """Whether this forward runs on fp8 tensor cores (:meth:`fp8_matmul_eligible`, the stored weight on x's
        device, an sm_89+ GPU, and no host patch, or one that has its low-rank form set)."""
        return (self.fp8_matmul_eligible()
                and (self.weight_patch_fn is None or self._host_rank is not None)
                and self.weight.device == x.device
                and _f8.fp8_matmul_supported(x.device))

    def set_lowrank_terms(self, terms) -> None:
        """The host patch of this layer (``weight_patch_fn``) written as low-rank side terms, for the fp8 matmul
        path: ``terms`` = [(up [out, r], down [r, in], scale), ...] meaning ``W + sum(scale * up @ down)``.

        Kept as two buffers in the compute dtype on the stored weight's device (they follow ``.to()`` and count
        in the module's size): the ranks concatenated, each scale folded into its ``up`` in float32 (or the
        compute dtype if wider) before the cast. The fp8 path adds ``(x @ down.T) @ up.T`` next to the fp8
        product and never calls ``weight_patch_fn``; every other path calls it (exact) and ignores the terms. They are
        the function's other form, so they act only while ``weight_patch_fn`` is set. ``[]``: the patch adds
        nothing (every scale 0); ``None``: removes them (the fp8 path then stays off while a host patch is
        set)."""
        for name in ("host_lowrank_down", "host_lowrank_up"):
            if name in self._buffers:
                delattr(self, name)
        self._host_rank = None
        if terms is None:
            return
        terms = [(u.flatten(1), d.flatten(1), float(s)) for u, d, s in terms]
        for u, d, _ in terms:
            if u.shape[0] != self.out_features or d.shape[1] != self.in_features or u.shape[1] != d.shape[0]:
                raise ValueError(f"low-rank term up {tuple(u.shape)} / down {tuple(d.shape)} does not fit a "
                                 f"{self.out_features}x{self.in_features} weight")
        self._host_rank = sum(d.shape[0] for _, d, _ in terms)
        if not terms:
            return
        dev, cd = self.weight.device, self.compute_dtype
        acc = torch.promote_types(cd, torch.float32)
        f = lambda t: t.detach().to(device=dev, dtype=acc)  # noqa: E731
        self.register_buffer("host_lowrank_down", torch.cat([f(d) for _, d, _ in terms], 0).to(cd))
        self.register_buffer("host_lowrank_up", torch.cat([f(u) * s for u, _, s in terms], 1).to(cd))

    def forward(self, x):
        cd = self.compute_dtype
        x = x.to(cd)
        if self.fp8_matmul_active(x):
            out = _f8.scaled_mm_linear(x, self.weight, self.weight_scale, self.bias, self.fp8_act_scaling,
                                       self.fp8_fast_accum, cd)
            for _, (up, down), scale in self._patches:  # low-rank LoRA terms, never merged into fp8
                up, down = getattr(self, up), getattr(self, down)
                out = out + F.linear(F.linear(x, down.flatten(1)), up.flatten(1)) * scale
            if self.weight_patch_fn is not None and self._host_rank:  # the host patch's low-rank form
                out = out + F.linear(F.linear(x, self.host_lowrank_down), self.host_lowrank_up)
            return out
        return F.linear(x, self.dequantized_weight(cd, x.device), self._bias(x))


class QuantConv(_Patched):
    """Quantized ``nn.Conv3d`` / ``nn.Conv2d`` (the patch embeddings)."""

    def __init__(self, conv: nn.Module, qkind, qtype, compute_dtype, device="meta"):
        super().__init__()
        self.dims = 3 if isinstance(conv, nn.Conv3d) else 2
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self._init_quant(qkind, qtype, tuple(conv.weight.shape), compute_dtype)
        self.bias = nn.Parameter(torch.empty(conv.out_channels, device=device, dtype=compute_dtype),
                                 requires_grad=False) if conv.bias is not None else None

    def forward(self, x):
        cd = self.compute_dtype
        w, b = self.dequantized_weight(cd, x.device), self._bias(x)
        op = F.conv3d if self.dims == 3 else F.conv2d
        return op(x.to(cd), w, b, self.stride, self.padding, self.dilation, self.groups)

