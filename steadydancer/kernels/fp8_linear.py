"""fp8 (e4m3) linear layer with a per-tensor weight scale and fp8 tensor-core matmuls (opt-in).

Weights: ``weight`` float8_e4m3fn [out, in] and ``scale_weight`` (float32 scalar) such that
``W ~= weight.float() * scale_weight`` (the layout of "fp8 scaled" Wan checkpoints, which name the scale
``scale_weight``).

Activations are quantized on the fly, per token (``act_scaling="rowwise"``, default: row-wise amax / 448) or
per call (``"tensor"``), and the product runs as one ``torch._scaled_mm`` call (row-wise: activation scale
[M, 1], the weight's per-tensor scale broadcast to [1, N]; tensor-wise: two scalars) with the bias fused and the
result in the compute dtype (bf16). ``fast_accum=True`` uses the fp8 fast-accumulation mode. On GPUs without fp8 tensor cores (before
sm_89), or when ``use_scaled_mm`` is False, the weight is dequantized to the input dtype and a plain
``F.linear`` runs instead (same weights, so the same function up to the activation rounding).

``scaled_mm_linear(x, weight_fp8, scale, bias, ...)`` is that matmul as a function; it is the one fp8 matmul of
the package (``FP8Linear`` and the loader's ``quant.QuantLinear`` with ``fp8_matmul`` both call it).

``convert_linears_to_fp8(model)`` swaps the ``nn.Linear`` layers inside ``model.blocks`` in place (q/k/v/o of
self- and cross-attention incl. k_img/v_img, and the FFN), leaving embeddings and the head in bf16, which is the
split TurboDiffusion's quantized checkpoints use.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FP8_MAX", "FP8Linear", "quantize_per_tensor", "quantize_rowwise", "quantize_tensorwise",
           "quantize_tensorwise_two_stage", "set_tensorwise_amax", "scaled_mm_linear", "scaled_mm_shape_ok",
           "convert_linears_to_fp8", "fp8_matmul_supported"]

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def quantize_per_tensor(w: torch.Tensor, dtype: torch.dtype = FP8_DTYPE) -> tuple[torch.Tensor, torch.Tensor]:
    """w -> (w8 in ``dtype`` (e4m3 default, or e5m2), scale float32 scalar) with w ~= w8 * scale
    (stored = w / scale, scale = amax / fmax: the convention of ComfyUI / Kijai "fp8 scaled" files)."""
    fmax = float(torch.finfo(dtype).max)
    wf = w.float()
    scale = (wf.abs().amax() / fmax).clamp(min=1e-12)
    w8 = (wf / scale).clamp(-fmax, fmax).to(dtype)
    return w8, scale.reshape(())


def _quantize_rowwise_eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_tensorwise_two_stage(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-tensor quantizer (``quantize_per_tensor``, e4m3) with its amax taken in two stages: one amax per
    row (last dimension), then the max over rows. A max is exact in any order, so the amax, the scale and every
    fp8 byte are identical to ``quantize_per_tensor``; the point is the shape of the reduction under
    torch.compile: a row reduction that inductor tiles over all SMs and can fuse with the producer of x (the
    GELU before FFN2), followed by a tiny max over M values, instead of one flat reduction over M*K elements."""
    xf = x.float()
    rows = xf.reshape(-1, xf.shape[-1]) if xf.dim() > 0 else xf.reshape(1, 1)
    amax = rows.abs().amax(dim=-1).amax()
    scale = (amax / FP8_MAX).clamp(min=1e-12)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale.reshape(())


# tensor-wise activations: the weight quantizer's math with a two-stage amax (bit-identical, faster compiled)
_EAGER = {"rowwise": _quantize_rowwise_eager, "tensor": quantize_tensorwise_two_stage}
_TENSOR_AMAX = {"flat": quantize_per_tensor, "two_stage": quantize_tensorwise_two_stage}
_compiled: dict = {}
_compile_failed = False


def set_tensorwise_amax(how: str = "two_stage") -> None:
    """How the per-tensor activation quantizer (``act_scaling="tensor"``) takes its amax: ``"two_stage"``
    (default: per-row amax, then max over rows) or ``"flat"`` (one reduction over the whole tensor). Both give
    bit-identical fp8 tensors and scales; compiled on an H100 the GELU + FFN2-input quantization takes 1.51 ms
    two-stage vs 1.70 ms flat (bench/perf_notes.md run 6).
    Compiled blocks read this when they are traced: call ``torch._dynamo.reset()`` after changing it."""
    if how not in _TENSOR_AMAX:
        raise ValueError(f"tensor-wise amax must be one of {sorted(_TENSOR_AMAX)}, got {how!r}")
    _EAGER["tensor"] = _TENSOR_AMAX[how]
    _compiled.pop("tensor", None)


def _quantize(x: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """On CUDA the quantizer is compiled once (dynamic in M), so amax and cast are one or two fused passes over
    x instead of five eager kernels with a float32 intermediate. Inside an outer torch.compile region the eager
    function is traced into that graph instead."""
    global _compile_failed
    if x.is_cuda and not _compile_failed and not torch.compiler.is_compiling():
        try:
            fn = _compiled.get(mode)
            if fn is None:
                fn = _compiled[mode] = torch.compile(_EAGER[mode], dynamic=True)
            return fn(x)
        except torch.cuda.OutOfMemoryError:
            raise  # a real OOM is the caller's to handle; it says nothing about the compiler
        except Exception as e:  # no triton / inductor: stay correct, just slower
            _compile_failed = True
            log.warning("fp8 activation quantizer: torch.compile failed (%s: %s); using the eager quantizer "
                        "from now on (correct, slower)", type(e).__name__, e)
    return _EAGER[mode](x)


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x8 [M, K] float8_e4m3fn, scale [M, 1] float32), per-row amax scaling."""
    return _quantize(x, "rowwise")


def quantize_tensorwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (x8 float8_e4m3fn, scale float32 scalar), one amax for the whole tensor."""
    return _quantize(x, "tensor")


def fp8_matmul_supported(device: torch.device | str | None = None) -> bool:
    """fp8 tensor cores: CUDA compute capability 8.9 (Ada) or 9.x (Hopper) and later."""
    if not torch.cuda.is_available():
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type != "cuda":
        return False
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(dev) >= (8, 9)


def scaled_mm_shape_ok(in_features: int, out_features: int) -> bool:
    """``torch._scaled_mm`` needs both matrix dimensions divisible by 16."""
    return in_features % 16 == 0 and out_features % 16 == 0


def scaled_mm_linear(x: torch.Tensor, weight_fp8: torch.Tensor, scale_weight: torch.Tensor,
                     bias: torch.Tensor | None = None, act_scaling: str = "rowwise", fast_accum: bool = False,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ (weight_fp8 * scale_weight).T + bias`` as one ``torch._scaled_mm``: x is quantized to e4m3 on the
    fly (per token, or per call with ``act_scaling="tensor"``), the bias is fused, the result comes out in
    ``out_dtype`` (default: x's dtype if it is bf16/fp16/fp32, else bf16). ``weight_fp8`` is float8_e4m3fn
    [out, in] with a per-tensor ``scale_weight`` (any shape with one element)."""
    out_f, in_f = weight_fp8.shape
    if out_dtype is None:
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
    lead = x.shape[:-1]
    xq, xs = _quantize(x.reshape(-1, in_f), act_scaling)
    ws = scale_weight.to(torch.float32)
    ws = ws.reshape(1, 1).expand(1, out_f).contiguous() if act_scaling == "rowwise" else ws.reshape(())
    if bias is not None and bias.dtype != out_dtype:
        bias = bias.to(out_dtype)
    out = torch._scaled_mm(xq, weight_fp8.t(), scale_a=xs, scale_b=ws, bias=bias, out_dtype=out_dtype,
                           use_fast_accum=fast_accum)
    if isinstance(out, tuple):  # torch < 2.5 returned (out, amax)
        out = out[0]
    return out.reshape(*lead, out_f)


class FP8Linear(nn.Module):
    """Drop-in for ``nn.Linear`` holding fp8 weights. State-dict keys: ``weight`` (fp8), ``scale_weight``,
    ``bias``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 compute_dtype: torch.dtype = torch.bfloat16, use_scaled_mm: bool | None = None,
                 act_scaling: str = "rowwise", fast_accum: bool = False):
        super().__init__()
        if act_scaling not in _EAGER:
            raise ValueError(f"act_scaling must be one of {sorted(_EAGER)}, got {act_scaling!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.use_scaled_mm = use_scaled_mm  # None: auto (CUDA sm_89+)
        self.act_scaling = act_scaling      # "rowwise": one scale per token; "tensor": one per call
        self.fast_accum = fast_accum        # cuBLAS/CUTLASS fp8 fast accumulation (less exact, faster)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.register_buffer("scale_weight", torch.ones((), dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype | None = None,
                    use_scaled_mm: bool | None = None, **options) -> "FP8Linear":
        w = linear.weight.detach()
        compute_dtype = compute_dtype or (w.dtype if w.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16)
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                compute_dtype=compute_dtype, use_scaled_mm=use_scaled_mm, **options)
        w8, scale = quantize_per_tensor(w)
        m.weight = nn.Parameter(w8, requires_grad=False)
        m.scale_weight = scale.to(w.device)
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
        return m

    @classmethod
    def from_fp8(cls, weight_fp8: torch.Tensor, scale: torch.Tensor | float, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.bfloat16, use_scaled_mm: bool | None = None,
                 **options) -> "FP8Linear":
        """Wrap already-quantized checkpoint tensors (e.g. Wan "fp8_e4m3fn_scaled" files)."""
        out_f, in_f = weight_fp8.shape
        m = cls(in_f, out_f, bias is not None, device="meta", compute_dtype=compute_dtype,
                use_scaled_mm=use_scaled_mm, **options)
        m.weight = nn.Parameter(weight_fp8.to(FP8_DTYPE), requires_grad=False)
        m.scale_weight = torch.as_tensor(scale, dtype=torch.float32, device=weight_fp8.device).reshape(())
        if bias is not None:
            m.bias = nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        return m

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        return (self.weight.to(acc) * self.scale_weight.to(acc)).to(dtype)

    def _fast(self, x: torch.Tensor) -> bool:
        if self.use_scaled_mm is not None:
            return self.use_scaled_mm
        return x.is_cuda and fp8_matmul_supported(x.device) and scaled_mm_shape_ok(self.in_features,
                                                                                   self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast(x):
            bias = self.bias.to(x.dtype) if self.bias is not None else None
            return F.linear(x, self.dequantized_weight(x.dtype), bias)
        # output in the caller's dtype (the DiT passes its compute dtype), else the layer's compute dtype
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else self.compute_dtype
        return scaled_mm_linear(x, self.weight, self.scale_weight, self.bias, self.act_scaling, self.fast_accum,
                                out_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp8=e4m3 per-tensor weight, act={self.act_scaling}, fast_accum={self.fast_accum}")


def convert_linears_to_fp8(model: nn.Module, root: str = "blocks", compute_dtype: torch.dtype | None = None,
                           use_scaled_mm: bool | None = None, skip: tuple[str, ...] = (), **options) -> int:
    """Replace every ``nn.Linear`` under ``model.<root>`` by an ``FP8Linear`` (in place, freeing the original
    weight as it goes). Returns the number of layers converted."""
    base = model.get_submodule(root) if root else model
    targets = [(n, m) for n, m in base.named_modules() if type(m) is nn.Linear and not any(s in n for s in skip)]
    for name, lin in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = base.get_submodule(parent_name) if parent_name else base
        setattr(parent, attr, FP8Linear.from_linear(lin, compute_dtype=compute_dtype, use_scaled_mm=use_scaled_mm,
                                                    **options))
        del lin
    return len(targets)
