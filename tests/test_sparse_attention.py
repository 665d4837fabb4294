"""Top-k block-sparse attention: block selection against a float64 brute force, and the flex-attention path
against an independent per-block softmax computed by hand."""

import math

import numpy as np
import pytest
import torch

from steadydancer_turbo.steadydancer.kernels.sparse_attention import (
    SparseAttentionConfig,
    kept_block_mask,
    select_kv_blocks,
    sparse_attention,
    sparse_attention_reference,
)


def _brute_force_blocks(q, k, cfg):
    """Independent numpy float64 version of the SLA selection rule."""
    q = q.double().numpy()
    k = k.double().numpy()
    b, lq, h, d = q.shape
    lk = k.shape[1]
    nq = math.ceil(lq / cfg.block_q)
    nk = math.ceil(lk / cfg.block_k)
    kept = max(1, int(cfg.topk * nk))
    out = np.zeros((b, h, nq, kept), dtype=np.int64)
    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                qbar = q[bi, i * cfg.block_q:(i + 1) * cfg.block_q, hi].mean(0)
                sc = np.array([qbar @ k[bi, j * cfg.block_k:(j + 1) * cfg.block_k, hi].mean(0) for j in range(nk)])
                for j in range(nk):
                    lo, hi_tok = j * cfg.block_k, min((j + 1) * cfg.block_k, lk)
                    qlo, qhi = i * cfg.block_q, min((i + 1) * cfg.block_q, lq)
                    if cfg.force_diagonal and lo < qhi and qlo < hi_tok:
                        sc[j] = np.inf
                    if cfg.keep_tail_tokens and hi_tok > lk - cfg.keep_tail_tokens:
                        sc[j] = np.inf
                out[bi, hi, i] = np.sort(np.argsort(-sc, kind="stable")[:kept])
    return out


@pytest.mark.parametrize("cfg", [
    SparseAttentionConfig(topk=0.3, block_q=32, block_k=32, force_diagonal=False),
    SparseAttentionConfig(topk=0.25, block_q=32, block_k=16, force_diagonal=True),
    SparseAttentionConfig(topk=0.4, block_q=16, block_k=32, force_diagonal=True, keep_tail_tokens=40),
])
def test_block_selection_matches_brute_force(cfg):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 301, 3, 8, generator=g)
    k = torch.randn(2, 301, 3, 8, generator=g) + 0.5  # a shared offset (see the smooth-k test below)
    got = select_kv_blocks(q, k, cfg)
    assert got.dtype == torch.int32
    ref = _brute_force_blocks(q, k, cfg)
    np.testing.assert_array_equal(got.numpy(), ref)
    nk = math.ceil(301 / cfg.block_k)
    assert got.shape[-1] == max(1, int(cfg.topk * nk))


@pytest.mark.parametrize("offset", [0.0, 0.5, -3.0])
def test_smooth_k_cannot_change_the_top_k_choice(offset):
    """SLA's smooth-k (k - mean_k over all tokens, per head) shifts each query block's scores by one constant,
    so the float64 brute force picks the same blocks with and without it: the step is not needed."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 257, 4, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 257, 4, 8, generator=g, dtype=torch.float64) + offset * torch.randn(8, generator=g,
                                                                                           dtype=torch.float64)
    cfg = SparseAttentionConfig(topk=0.3, block_q=32, block_k=16, force_diagonal=False)
    centred = k - k.mean(dim=1, keepdim=True)
    np.testing.assert_array_equal(_brute_force_blocks(q, centred, cfg), _brute_force_blocks(q, k, cfg))
    np.testing.assert_array_equal(select_kv_blocks(q, k, cfg).numpy(), _brute_force_blocks(q, centred, cfg))


def test_selection_prefers_the_matching_block():
    # Plant a query block that points at one key block; that block must be chosen.
    torch.manual_seed(1)
    q = torch.randn(1, 256, 1, 16) * 0.01
    k = torch.randn(1, 256, 1, 16) * 0.01
    direction = torch.randn(16)
    q[0, 0:32, 0] += direction
    k[0, 160:192, 0] += direction  # key block 5 of 8
    idx = select_kv_blocks(q, k, SparseAttentionConfig(topk=0.125, block_q=32, block_k=32, force_diagonal=False))
    assert idx[0, 0, 0].tolist() == [5]


@pytest.mark.parametrize("bq,bk,topk", [(32, 32, 0.3), (64, 32, 0.2), (32, 64, 0.5)])
def test_flex_path_matches_per_block_softmax(bq, bk, topk):
    g = torch.Generator().manual_seed(2)
    b, L, h, d = 1, 333, 2, 16
    q, k, v = (torch.randn(b, L, h, d, generator=g, dtype=torch.float64) for _ in range(3))
    cfg = SparseAttentionConfig(topk=topk, block_q=bq, block_k=bk)
    idx = select_kv_blocks(q, k, cfg)
    out = sparse_attention(q, k, v, cfg, kv_indices=idx)
    assert out.shape == q.shape and torch.isfinite(out).all()
    # Independent reference: softmax over the gathered kept key tokens, per query block, by hand.
    ref = torch.empty_like(q)
    scale = 1 / math.sqrt(d)
    for hi in range(h):
        for i in range(idx.shape[2]):
            toks = torch.cat([torch.arange(j * bk, min((j + 1) * bk, L)) for j in idx[0, hi, i].tolist()])
            qs = q[0, i * bq:(i + 1) * bq, hi]
            w = torch.softmax(qs @ k[0, toks, hi].T * scale, dim=-1)
            ref[0, i * bq:(i + 1) * bq, hi] = w @ v[0, toks, hi]
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sparse_attention_reference(q, k, v, idx, bq, bk), ref, rtol=1e-9, atol=1e-9)


def test_topk_one_is_dense_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 200, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    out = sparse_attention(q, k, v, SparseAttentionConfig(topk=1.0, block_q=32, block_k=32))
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                           v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


def test_kept_block_mask_counts():
    idx = torch.tensor([[[[0, 3], [1, 2]]]], dtype=torch.int32)
    m = kept_block_mask(idx, 4)
    assert m.tolist() == [[[[True, False, False, True], [False, True, True, False]]]]
