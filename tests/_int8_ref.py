"""float64 references for the int8 top-k sparse attention kernel (steadydancer/kernels/int8_sparse.py), written
independently of it: the int8 block quantizer of its scheme, and attention over the kept key blocks gathered
block by block (no L x L mask, so it runs at 35,880 tokens on a GPU; checked against the pack's dense-mask
``sparse_attention_reference`` on CPU in tests/_int8_interpreted.py)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def quant_ref(x: torch.Tensor, block: int, smooth: bool):
    """float64 int8 block quantizer of x [B, L, H, D]: (the integers as float64 [B, L, H, D], scales [B, H, nb]):
    ``smooth`` subtracts the per-head mean over tokens first; scale = amax / 127 per (batch, head, block of
    ``block`` tokens) over all dims; round half away from zero."""
    x = x.double()
    if smooth:
        x = x - x.mean(dim=1, keepdim=True)
    b, n, h, d = x.shape
    nb = math.ceil(n / block)
    xb = F.pad(x, (0, 0, 0, 0, 0, nb * block - n)).reshape(b, nb, block, h, d)
    scale = xb.abs().amax(dim=(2, 4)) / 127  # [B, nb, H]
    y = xb / scale[:, :, None, :, None]
    y = torch.sign(y) * torch.floor(y.abs() + 0.5)
    return y.reshape(b, nb * block, h, d)[:, :n], scale.transpose(1, 2).contiguous()


def dequant(vals: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    per_token = scale.repeat_interleave(block, dim=2)[:, :, : vals.shape[1]]  # [B, H, L]
    return vals * per_token.transpose(1, 2)[..., None]


def blockwise_sparse_reference(q, k, v, kv_indices, block_q: int, block_k: int, scale: float | None = None,
                               chunk: int = 16) -> torch.Tensor:
    """float64 softmax attention of every query block over its kept key blocks (``kv_indices`` int [B, H, nq, K]),
    keys past the sequence end masked. q, k, v [B, L, H, D] -> float64 [B, L, H, D]."""
    b, n, h, d = q.shape
    scale = scale if scale is not None else 1 / math.sqrt(d)
    nq, nk = math.ceil(n / block_q), math.ceil(n / block_k)

    def blocks(x, blk, nb):  # [B, H, nb, blk, D]
        x = F.pad(x.double(), (0, 0, 0, 0, 0, nb * blk - n))
        return x.reshape(b, nb, blk, h, d).permute(0, 3, 1, 2, 4)

    qb, kb, vb = blocks(q, block_q, nq), blocks(k, block_k, nk), blocks(v, block_k, nk)
    valid = (torch.arange(nk * block_k, device=q.device) < n).reshape(nk, block_k)
    out = torch.empty(b, h, nq, block_q, d, dtype=torch.float64, device=q.device)
    bi = torch.arange(b, device=q.device)[:, None, None, None]
    hi = torch.arange(h, device=q.device)[None, :, None, None]
    for s in range(0, nq, chunk):
        idx = kv_indices[:, :, s:s + chunk].long()  # [B, H, c, K]
        kg, vg = kb[bi, hi, idx].flatten(3, 4), vb[bi, hi, idx].flatten(3, 4)  # [B, H, c, K*bk, D]
        ok = valid[idx].flatten(3)  # [B, H, c, K*bk]
        sc = (qb[:, :, s:s + chunk] @ kg.transpose(-1, -2)) * scale
        sc = sc.masked_fill(~ok[:, :, :, None, :], float("-inf"))
        out[:, :, s:s + chunk] = sc.softmax(-1) @ vg
    return out.permute(0, 2, 3, 1, 4).reshape(b, nq * block_q, h, d)[:, :n]


def structured_inputs(b: int, n: int, h: int, d: int, seed: int, device="cpu"):
    """bf16 q/k/v: q a little sharper than N(0, 1); k with a per-head channel offset (the case smooth-K is for)."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = 1.5 * torch.randn(b, n, h, d, generator=g, device=device)
    k = torch.randn(b, n, h, d, generator=g, device=device) + 3 * torch.randn(1, 1, h, d, generator=g, device=device)
    v = torch.randn(b, n, h, d, generator=g, device=device)
    return tuple(t.to(torch.bfloat16) for t in (q, k, v))
