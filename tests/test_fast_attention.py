"""Fast attention backends / speed switches: each must compute the same function as the plain path."""

import pytest
import torch
import torch.nn.functional as F

from steadydancer_turbo.steadydancer.weights import speed_options as accel
from steadydancer_turbo.steadydancer.kernels.attention import attention, available_backends, get_backend
from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT, rope_apply, rope_freqs


def _ref_attention(q, k, v):
    """float64 softmax(q k^T / sqrt(d)) v written out, [B, L, H, D]."""
    s = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) / q.shape[-1] ** 0.5
    return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v.double())


def test_backends_registered():
    names = available_backends()
    for n in ("sdpa", "sdpa_cudnn", "auto", "flex_sparse"):
        assert n in names


@pytest.mark.parametrize("backend", ["sdpa_cudnn", "auto"])
def test_dense_backends_match_reference(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 3, 16, generator=g) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, backend).double(), _ref_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_sparse_backend_is_dense_for_cross_attention_and_topk_one():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 200, 2, 16, generator=g, dtype=torch.float64)
    kc, vc = (torch.randn(1, 33, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    name = accel.sparse(0.1, block_q=32, block_k=32)
    assert name == accel.sparse(0.1, block_q=32, block_k=32)  # registered once
    torch.testing.assert_close(attention(q, kc, vc, name), _ref_attention(q, kc, vc))
    full = accel.sparse(1.0, block_q=32, block_k=32)
    torch.testing.assert_close(attention(q, q, q, full), _ref_attention(q, q, q))
    # a real top-k differs from dense, and equals the block-masked reference
    from steadydancer_turbo.steadydancer.kernels.sparse_attention import (SparseAttentionConfig, select_kv_blocks,
                                                                  sparse_attention_reference)
    out = attention(q, q, q, name)
    idx = select_kv_blocks(q, q, SparseAttentionConfig(topk=0.1, block_q=32, block_k=32))
    torch.testing.assert_close(out, sparse_attention_reference(q, q, q, idx, 32, 32))
    assert (out - _ref_attention(q, q, q)).abs().max() > 1e-3


def test_use_attention_rejects_unknown_backend():
    m = SteadyDancerDiT(SteadyDancerConfig.tiny())
    with pytest.raises(ValueError):
        accel.use_attention(m, "no_such_kernel")
    accel.use_attention(m, "auto")
    assert m.attention_backend == "auto"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_fp32_forms_match_float64(dtype):
    freqs = rope_freqs((3, 4, 5), 16)
    x = torch.randn(2, 60, 4, 16).to(dtype)
    ref = rope_apply(x, freqs, torch.float64, torch.float64)
    for real in (False, True):
        out = rope_apply(x, freqs, torch.float64, torch.float32, real=real)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_block_traces_without_graph_breaks(monkeypatch):
    """As on CUDA, where flex_attention is traced into the compiled block: no graph break anywhere in the block
    (top-k selection and block mask included). Off CUDA flex runs eagerly: the only breaks are at that call."""
    from steadydancer_turbo.steadydancer.kernels import sparse_attention as SA

    cfg = SteadyDancerConfig.tiny()
    m = SteadyDancerDiT(cfg).requires_grad_(False)
    m.rope_dtype = torch.float32
    blk = m.blocks[0]
    L = 24
    x = torch.randn(1, L, cfg.dim)
    e0 = torch.randn(1, 6, cfg.dim)
    ctx_img, ctx_txt = torch.randn(1, 257, cfg.dim), torch.randn(1, 512, cfg.dim)
    freqs = rope_freqs((2, 3, 4), cfg.head_dim)
    sparse = accel.sparse(0.5, block_q=8, block_k=8)
    with torch.no_grad():
        ex = torch._dynamo.explain(blk)(x, e0, ctx_img, ctx_txt, freqs, sparse, torch.float32)
    reasons = [b.reason for b in ex.break_reasons]
    assert reasons and all("torch.compiler.disable" in r for r in reasons), reasons
    torch._dynamo.reset()
    monkeypatch.setattr(SA, "_flex_in_graph", lambda q: True)
    for backend in ("auto", sparse):
        with torch.no_grad():
            ex = torch._dynamo.explain(blk)(x, e0, ctx_img, ctx_txt, freqs, backend, torch.float32)
        assert ex.graph_break_count == 0, [b.reason for b in ex.break_reasons]
        assert ex.graph_count == 1


def test_optimize_keeps_the_function():
    """fp8 + sparse(topk=1) + the switches: same outputs as the plain model up to fp8 weight rounding."""
    from steadydancer_turbo.steadydancer.kernels.fp8_linear import FP8Linear

    torch.manual_seed(0)
    cfg = SteadyDancerConfig.tiny()
    m = SteadyDancerDiT(cfg).requires_grad_(False)
    B, F_, H, W = 1, 2, 4, 4
    inp = dict(x=torch.randn(B, 16, F_, H, W), timestep=torch.tensor([500]),
               context=torch.randn(B, 7, cfg.text_dim), clip_fea=torch.randn(B, 257, cfg.clip_dim),
               clip_fea_c=torch.randn(B, 257, cfg.clip_dim), y=torch.randn(B, 20, F_, H, W),
               cond=torch.randn(B, 16, F_, H, W), ref_x=torch.randn(B, 36, 1, H, W), ref_c=torch.randn(B, 16, 1, H, W))
    with torch.no_grad():
        ref = m(**inp)
        accel.optimize(m, fp8=True, sparse_topk=1.0)
        assert isinstance(m.blocks[0].ffn[0], FP8Linear) and m.attention_backend.startswith("flex_sparse")
        out = m(**inp)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05
