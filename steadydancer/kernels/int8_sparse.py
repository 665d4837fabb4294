"""8-bit top-k block-sparse self-attention: our own Triton kernel (SageAttention-2 idea, for our block lists).

Imported only when triton is importable (``backends.int8_sparse_problem`` says when it is not); the
``"int8_sparse:<topk>"`` backends (``backends.sparse_backend(..., kernel="int8")``) call
:func:`int8_sparse_attention` with the kv block indices of ``sparse_attention.select_kv_blocks``.

Scheme, per (batch, head):

1. K is smoothed: its mean over all tokens (per head and channel, fp32) is subtracted. Exact for softmax: it
   shifts every score of a query row by the same ``q_i . mean_k``; it removes the channel offsets that would
   otherwise take most of K's 8-bit range.
2. Q and smoothed K are quantized to int8 with one scale per block of ``block_q`` (Q) / ``block_k`` (K) tokens
   x all head dims: ``scale = amax / 127``, round half away from zero (:func:`quantize_blocks`, a small Triton
   kernel: one read of the tensor, one int8 write).
3. One program per (query block, batch x head) loops over that block's kept key blocks only: ``S = Q8 K8^T`` on
   int8 tensor cores (int32 accumulate), times ``q_scale * k_scale * softmax_scale * log2(e)`` in fp32; online
   softmax in fp32 with ``exp2``; ``P`` rounded to bf16 (fp16 for fp16 V) and ``P V`` on bf16 tensor cores with
   fp32 accumulation; tokens past the sequence end (the partial last block) are masked by index, for keys
   (score -inf) and queries (not stored).

The kernels run inside one ``torch.library.custom_op`` with a fake (shape) implementation, so a compiled DiT
block keeps the op in its graph (no graph break; inductor calls it as an opaque kernel: there is nothing to
fuse into it). Not ``torch.library.triton_op``: under Triton's CPU interpreter (the CI test) ``wrap_triton``
hands back the raw interpreted kernel, which tracing then calls with fake tensors (torch 2.13), so that form
could not be checked on CPU; this one traces the same way on CPU and GPU.

Layout: q, k, v [B, L, H, D] (the registry's); q and k the same length (self-attention); the output has q's
dtype and layout. D must be a power of two from 16 to 256 (128 in the DiT).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["int8_sparse_attention", "quantize_blocks", "attend_quantized", "set_int8_kernel_options",
           "kernel_options", "check_shapes", "interpreting"]

LOG2E = 1.4426950408889634

# Launch options of the attention kernel (BLOCK 128 x 128, D 128): on Hopper 4 warps with 2 pipeline stages, the
# fastest of the 4/8 warps x 2/3/4 stages sweep on an H200 (top-k 0.1 at 35,880 tokens: 5.56 ms against 6.07 ms for
# 8 warps / 3 stages; bench/RESULTS.md); elsewhere 8 warps, 2 stages (Ada has ~100 KB of shared memory a block; a
# launch that does not fit retries with fewer stages; not measured). bench/attention_backends.py --sections int8
# sweeps them.
HOPPER_OPTIONS = {"num_warps": 4, "num_stages": 2}
OTHER_OPTIONS = {"num_warps": 8, "num_stages": 2}
_OPTIONS: dict = {}  # set_int8_kernel_options; empty: by GPU as above


def set_int8_kernel_options(options: dict | None = None) -> None:
    """num_warps / num_stages of the attention kernel (None: by GPU, see HOPPER_OPTIONS). Takes effect at the
    next call (Triton compiles one kernel per setting)."""
    _OPTIONS.clear()
    _OPTIONS.update(options or {})


def kernel_options(device: torch.device | None = None) -> dict:
    if _OPTIONS:
        return dict(_OPTIONS)
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available() and \
            torch.cuda.get_device_capability(dev)[0] >= 9:
        return dict(HOPPER_OPTIONS)
    return dict(OTHER_OPTIONS)


_OutOfResources = getattr(getattr(triton, "runtime", None), "OutOfResources", None)
if _OutOfResources is None:  # older layouts of the triton package
    from triton.runtime.errors import OutOfResources as _OutOfResources
_FITTED: dict = {}  # launch key -> the num_stages that fit the GPU's shared memory


# ------------------------------------------------------------------------------------------------------ kernels
@triton.jit
def _quant_int8_kernel(X, MEAN, X8, SCALE, stride_b, stride_l, stride_h, L, H, NB,
                       BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_MEAN: tl.constexpr):
    """One program per (token block, batch x head): X[b, block, h, :] (minus MEAN[b, h, :]) -> int8 and one fp32
    scale. X8 is a contiguous [B, L, H, D] int8 tensor, SCALE [B, H, NB]."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = blk * BLOCK + tl.arange(0, BLOCK)
    dims = tl.arange(0, HEAD_DIM)
    valid = rows[:, None] < L
    src = X + b.to(tl.int64) * stride_b + rows[:, None].to(tl.int64) * stride_l + h * stride_h + dims[None, :]
    x = tl.load(src, mask=valid, other=0.0).to(tl.float32)
    if HAS_MEAN:
        mean = tl.load(MEAN + bh * HEAD_DIM + dims)
        x = tl.where(valid, x - mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    scale = tl.maximum(amax, 1e-20) / 127.0
    y = x / scale
    y = tl.where(y >= 0, y + 0.5, y - 0.5)  # round half away from zero (the int8 cast truncates)
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    dst = X8 + (b.to(tl.int64) * L + rows[:, None].to(tl.int64)) * (H * HEAD_DIM) + h * HEAD_DIM + dims[None, :]
    tl.store(dst, y.to(tl.int8), mask=valid)
    tl.store(SCALE + bh * NB + blk, scale)


@triton.jit
def _round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32: what the GPU's fp32 -> bf16 cast gives; only
    for the CPU interpreter, whose cast truncates (triton 3.8 / 3.9) and whose bf16 tl.dot is wrong."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _attn_int8_sparse_kernel(Q8, K8, V, QS, KS, IDX, O,
                             stride_vb, stride_vl, stride_vh, stride_ob, stride_ol, stride_oh,
                             L, H, NQ, NK, KEPT, qk_scale,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                             PV_FP16: tl.constexpr, INTERPRET: tl.constexpr):
    """One program per (query block, batch x head), over the KEPT key blocks listed in IDX[b, h, qblock, :]."""
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    cols0 = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    row_stride = H * HEAD_DIM  # Q8 / K8 are contiguous [B, L, H, D]
    qk_base = b.to(tl.int64) * L * row_stride + h * HEAD_DIM
    q = tl.load(Q8 + qk_base + rows[:, None].to(tl.int64) * row_stride + dims[None, :],
                mask=rows[:, None] < L, other=0)
    q_scale = tl.load(QS + bh * NQ + qb) * qk_scale
    idx = IDX + (bh.to(tl.int64) * NQ + qb) * KEPT
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for i in range(0, KEPT):
        kb = tl.load(idx + i)
        cols = kb * BLOCK_N + cols0
        col_ok = cols < L
        kt = tl.load(K8 + qk_base + cols[None, :].to(tl.int64) * row_stride + dims[:, None],
                     mask=col_ok[None, :], other=0)  # [HEAD_DIM, BLOCK_N]: K^T
        k_scale = tl.load(KS + bh * NK + kb)
        s = tl.dot(q, kt, out_dtype=tl.int32).to(tl.float32) * (q_scale * k_scale)  # log2 units
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vl + dims[None, :], mask=col_ok[:, None],
                     other=0.0)
        if PV_FP16:
            acc = tl.dot(p.to(tl.float16), vt.to(tl.float16), acc * alpha[:, None])
        elif INTERPRET:  # the GPU's bf16 operands (rounded to nearest), multiplied in fp32: exact products
            vb = _round_bf16(vt.to(tl.float32))
            acc = tl.dot(_round_bf16(p), vb, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(tl.bfloat16), vt.to(tl.bfloat16), acc * alpha[:, None])
        m_i = m_new
    out = acc / l_i[:, None]
    dst = O + b.to(tl.int64) * stride_ob + rows[:, None].to(tl.int64) * stride_ol + h * stride_oh + dims[None, :]
    if INTERPRET:
        if O.dtype.element_ty == tl.bfloat16:
            out = _round_bf16(out)  # then the interpreter's truncating cast is exact
    tl.store(dst, out.to(O.dtype.element_ty), mask=rows[:, None] < L)


# ------------------------------------------------------------------------------------------------------ the op
def _quantize(x: torch.Tensor, mean: torch.Tensor | None, block: int):
    b, n, h, d = x.shape
    nb = triton.cdiv(n, block)
    x8 = torch.empty((b, n, h, d), dtype=torch.int8, device=x.device)
    scale = torch.empty((b, h, nb), dtype=torch.float32, device=x.device)
    _quant_int8_kernel[(nb, b * h)](
        x, mean if mean is not None else scale, x8, scale, x.stride(0), x.stride(1), x.stride(2), n, h, nb,
        BLOCK=block, HEAD_DIM=d, HAS_MEAN=mean is not None, num_warps=4)
    return x8, scale


def _free_op_name(namespace: str, name: str) -> str:
    """``namespace::name``, or ``name_2``, ``name_3``... when a second copy of this module (the pack imported
    under another name, e.g. by a test harness) registered it already: an op name can be defined only once."""
    ops, candidate, i = getattr(torch.ops, namespace), name, 1
    while hasattr(ops, candidate):
        i += 1
        candidate = f"{name}_{i}"
    return f"{namespace}::{candidate}"


@torch.library.custom_op(_free_op_name("steadydancer", "int8_sparse_attention"), mutates_args=())
def _int8_sparse_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor, block_q: int,
                    block_k: int, scale: float, num_warps: int, num_stages: int) -> torch.Tensor:
    q8, qs = quantize_blocks(q, block_q)
    k8, ks = quantize_blocks(k, block_k, smooth=True)  # smooth-K: exact for softmax
    return attend_quantized(q8, qs, k8, ks, v, kv_indices, block_q, block_k, scale, q.dtype, num_warps, num_stages)


def launch_key(q8, v, block_q, block_k, out_dtype, num_warps, num_stages) -> tuple:
    """Key of ``_FITTED``: the num_stages a launch with these settings ended up with (the bench reads it)."""
    return (str(q8.device), q8.shape[-1], block_q, block_k, v.dtype, out_dtype, num_warps, num_stages)


def attend_quantized(q8, qs, k8, ks, v, kv_indices, block_q: int, block_k: int, scale: float, out_dtype,
                     num_warps: int, num_stages: int) -> torch.Tensor:
    """The attention kernel alone, on Q / K already in int8 form (``quantize_blocks``); the op's second half,
    separate so the bench can time it."""
    b, n, h, d = q8.shape
    nq, kept = kv_indices.shape[2], kv_indices.shape[3]
    out = torch.empty((b, n, h, d), dtype=out_dtype, device=q8.device)
    key = launch_key(q8, v, block_q, block_k, out_dtype, num_warps, num_stages)
    stages = _FITTED.get(key, num_stages)
    while True:
        try:
            _attn_int8_sparse_kernel[(nq, b * h)](
                q8, k8, v, qs, ks, kv_indices, out,
                v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
                n, h, nq, ks.shape[-1], kept, scale * LOG2E,
                BLOCK_M=block_q, BLOCK_N=block_k, HEAD_DIM=d, PV_FP16=v.dtype == torch.float16,
                INTERPRET=interpreting(), num_warps=num_warps, num_stages=stages)
            break
        except _OutOfResources:  # shared memory: fewer pipeline stages (Ada), remembered for this launch key
            if stages <= 1:
                raise
            stages -= 1
    _FITTED[key] = stages
    return out


@_int8_sparse_op.register_fake
def _int8_sparse_fake(q, k, v, kv_indices, block_q, block_k, scale, num_warps, num_stages):
    return torch.empty((q.shape[0], q.shape[1], q.shape[2], q.shape[3]), dtype=q.dtype, device=q.device)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, tests). Its bf16 ``tl.dot``
    multiplies the raw uint16 bit patterns (triton 3.8 / 3.9: bf16 is stored as uint16 there and the dot is a
    plain numpy matmul) and its fp32 -> bf16 cast truncates, so there the kernel rounds P, V and the output to
    bf16 itself (to nearest, as the GPU does) and multiplies P V in fp32 (exact for bf16 operands)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_shapes(q, k, v, kv_indices, block_q: int, block_k: int) -> None:
    """The kernel's limits, as a clear error (not a Triton compile error mid-forward)."""
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"int8 sparse attention is self-attention: q {tuple(q.shape)}, k {tuple(k.shape)} and "
                         f"v {tuple(v.shape)} must have one shape")
    d = q.shape[-1]
    if not (_pow2(d) and 16 <= d <= 256):
        raise ValueError(f"int8 sparse attention needs a head dim that is a power of two from 16 to 256, got {d}")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if not (_pow2(blk) and 16 <= blk <= 256):
            raise ValueError(f"int8 sparse attention needs {name} a power of two from 16 to 256, got {blk}")
    nq, nk = triton.cdiv(q.shape[1], block_q), triton.cdiv(k.shape[1], block_k)
    if tuple(kv_indices.shape[:3]) != (q.shape[0], q.shape[2], nq) or kv_indices.shape[3] > nk:
        raise ValueError(f"kv_indices {tuple(kv_indices.shape)} do not fit q {tuple(q.shape)} with {nq} query "
                         f"and {nk} key blocks")


def quantize_blocks(x: torch.Tensor, block: int, smooth: bool = False):
    """The kernel's int8 form of x [B, L, H, D]: (int8 [B, L, H, D], fp32 scales [B, H, nblocks]); ``smooth``
    subtracts the per-head mean over tokens first (as for K). The op's first half; the tests and the bench call
    it alone."""
    mean = x.mean(dim=1, dtype=torch.float32).contiguous() if smooth else None
    return _quantize(x.contiguous() if x.stride(-1) != 1 else x, mean, block)


def int8_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_indices: torch.Tensor,
                          block_q: int = 128, block_k: int = 128, scale: float | None = None) -> torch.Tensor:
    """Softmax attention of q over the key blocks ``kv_indices`` (int32 [B, H, nq, K], as from
    ``select_kv_blocks``) with int8 Q/K. q, k, v [B, L, H, D] -> [B, L, H, D] in q's dtype."""
    check_shapes(q, k, v, kv_indices, block_q, block_k)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    opts = kernel_options(q.device)
    return _int8_sparse_op(q, k, v, kv_indices.to(torch.int32).contiguous(), int(block_q), int(block_k), scale,
                           int(opts["num_warps"]), int(opts["num_stages"]))
