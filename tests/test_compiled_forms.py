"""Forms the compiled path uses (bench/perf_notes.md run 6): the two-stage per-tensor amax of the fp8 activation
quantizer and the (cos, sin)-table RoPE. Both must be exactly the functions they replace."""

import pytest
import torch

from steadydancer_turbo.steadydancer.kernels import fp8_linear as F8
from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
from steadydancer_turbo.steadydancer.model.dit import (SteadyDancerDiT, rope_apply, rope_freqs, rope_pair_swap,
                                                   rope_tables)


def _inputs(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    x = x * torch.exp(2 * torch.randn(*shape, generator=g, dtype=torch.float64))  # wide dynamic range
    return x.to(dtype)


def _bytes(t):
    return t.view(torch.uint8)


@pytest.mark.parametrize("shape", [(37, 96), (3, 11, 64), (1, 5), (130,)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_two_stage_amax_is_bit_identical_to_the_flat_quantizer(shape, dtype):
    x = _inputs(shape, dtype, seed=len(shape) * 7 + shape[-1])
    flat8, flat_s = F8.quantize_per_tensor(x)
    two8, two_s = F8.quantize_tensorwise_two_stage(x)
    assert two8.dtype == torch.float8_e4m3fn and two8.shape == x.shape and two_s.shape == ()
    assert torch.equal(_bytes(two8), _bytes(flat8))
    assert torch.equal(two_s, flat_s)


@pytest.mark.parametrize("where", ["first", "last", "middle", "negative"])
def test_two_stage_amax_picks_the_largest_magnitude_anywhere(where):
    """The global max lands in the scale wherever it is (one row only), also when it is negative."""
    x = torch.randn(9, 40, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    pos = {"first": (0, 0), "last": (8, 39), "middle": (4, 17), "negative": (6, 2)}[where]
    x[pos] = -1232.0 if where == "negative" else 1232.0  # exact in bf16
    # float64 reference of the same recipe: amax, scale = fp32(amax / 448), q = fp8(fp32(x / scale))
    x64 = x.double()
    amax64 = x64.abs().max()
    assert amax64.item() == 1232.0
    scale_ref = (amax64 / F8.FP8_MAX).float()
    q_ref = (x64 / scale_ref.double()).float().clamp(-F8.FP8_MAX, F8.FP8_MAX).to(torch.float8_e4m3fn)
    q, s = F8.quantize_tensorwise_two_stage(x)
    assert torch.equal(s, scale_ref)
    assert torch.equal(_bytes(q), _bytes(q_ref))
    assert q.float().abs().max().item() == F8.FP8_MAX  # the amax element maps onto the e4m3 maximum


def test_two_stage_amax_all_zero_input_uses_the_floor_scale():
    q, s = F8.quantize_tensorwise_two_stage(torch.zeros(4, 8, dtype=torch.bfloat16))
    q0, s0 = F8.quantize_per_tensor(torch.zeros(4, 8, dtype=torch.bfloat16))
    assert torch.equal(s, s0) and s.item() == pytest.approx(1e-12) and not q.float().any()


def test_set_tensorwise_amax_switches_the_activation_quantizer_and_back():
    x = _inputs((16, 32), torch.bfloat16, seed=1)
    assert F8._EAGER["tensor"] is F8.quantize_tensorwise_two_stage  # the default since run 6
    a8, a_s = F8.quantize_tensorwise(x)
    try:
        F8.set_tensorwise_amax("flat")
        assert F8._EAGER["tensor"] is F8.quantize_per_tensor
        b8, b_s = F8.quantize_tensorwise(x)
    finally:
        F8.set_tensorwise_amax()
    assert F8._EAGER["tensor"] is F8.quantize_tensorwise_two_stage
    assert torch.equal(_bytes(a8), _bytes(b8)) and torch.equal(a_s, b_s)
    with pytest.raises(ValueError):
        F8.set_tensorwise_amax("rowwise")


# ---------------------------------------------------------------------------------------------- RoPE tables
def test_pair_swap_and_table_layout():
    x = torch.arange(8.0).reshape(1, 1, 1, 8)
    assert rope_pair_swap(x).flatten().tolist() == [1, 0, 3, 2, 5, 4, 7, 6]
    freqs = rope_freqs((2, 3, 4), 12)
    cos, sin = rope_tables(freqs)
    assert cos.shape == sin.shape == (24, 1, 12) and cos.dtype == sin.dtype == torch.float32
    c, s = freqs.real.float(), freqs.imag.float()
    assert torch.equal(cos[..., 0::2], c) and torch.equal(cos[..., 1::2], c)
    assert torch.equal(sin[..., 0::2], -s) and torch.equal(sin[..., 1::2], s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_tables_match_float64_complex_rotation(dtype):
    """Against an independent float64 complex rotation (not rope_apply): error at fp32 rounding level."""
    grid, hd = (3, 4, 5), 128
    freqs = rope_freqs(grid, hd)
    x = _inputs((2, 60, 4, hd), torch.float64, seed=11).to(dtype)
    z = torch.view_as_complex(x.double().reshape(2, 60, 4, hd // 2, 2).contiguous())
    ref = torch.view_as_real(z * freqs).reshape(x.shape)
    out = rope_apply(x, rope_tables(freqs), torch.float32)
    assert out.dtype == torch.float32
    err = (out.double() - ref).abs()
    # each output is a*c + b*s with |c|,|s| <= 1: three fp32 roundings (two products, one sum) at most
    bound = 3 * 2.0 ** -24 * (x.double().abs() + rope_pair_swap(x.double()).abs())
    assert (err <= bound + 1e-300).all(), (err / bound.clamp_min(1e-30)).max()
    assert rope_apply(x, rope_tables(freqs), torch.bfloat16).dtype == torch.bfloat16


def test_rope_tables_are_bit_identical_to_the_real_fp32_path():
    freqs = rope_freqs((2, 5, 6), 64)
    x = _inputs((1, 60, 3, 64), torch.bfloat16, seed=5)
    real = rope_apply(x, freqs, torch.float32, torch.float32, real=True)
    tab = rope_apply(x, rope_tables(freqs), torch.float32, torch.float32)
    assert torch.equal(tab, real)


def test_model_rope_real_tables_only_on_the_fp32_path_and_keeps_the_forward():
    torch.manual_seed(0)
    cfg = SteadyDancerConfig.tiny()
    m = SteadyDancerDiT(cfg).requires_grad_(False)
    m.compute_dtype = torch.float32
    b, f, h, w = 1, 2, 4, 6
    kw = dict(x=torch.randn(b, 16, f, h, w), timestep=torch.tensor([500]), context=torch.randn(b, 7, cfg.text_dim),
              clip_fea=torch.randn(b, 257, cfg.clip_dim), clip_fea_c=torch.randn(b, 257, cfg.clip_dim),
              y=torch.randn(b, 20, f, h, w), cond=torch.randn(b, 16, f, h, w), ref_x=torch.randn(b, 36, 1, h, w),
              ref_c=torch.randn(b, 16, 1, h, w))
    grid = (f + 2, h // 2, w // 2)
    assert m.rope_real_tables  # on by default, but ignored while rope_dtype is the official float64
    assert torch.is_complex(m.block_freqs(grid, "cpu"))
    with torch.no_grad():
        ref = m(**kw)
        m.rope_dtype = torch.float32
        assert isinstance(m.block_freqs(grid, "cpu"), tuple)
        out = m(**kw)
        m.rope_real_tables = False  # the complex fp32 rotation: the same numbers in eager
        assert torch.is_complex(m.block_freqs(grid, "cpu"))
        out_c = m(**kw)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, out_c, rtol=1e-6, atol=1e-7)


def _compiled(fn, **kw):
    return torch.compile(fn, **kw)


def test_compiled_forms_equal_eager_on_cpu():
    """What the GPU bench will trace: the two-stage quantizer under inductor gives the same fp8 bytes and scale as
    the eager flat quantizer; the table RoPE under inductor matches its eager form (one fp32 rounding at most,
    should the compiler contract a product and the sum into an FMA)."""
    try:
        x = _inputs((300, 256), torch.bfloat16, seed=2)
        q, s = _compiled(F8.quantize_tensorwise_two_stage, dynamic=True)(x)
        freqs = rope_freqs((2, 5, 6), 64)
        tabs = rope_tables(freqs)
        xr = _inputs((1, 60, 3, 64), torch.bfloat16, seed=4)
        o = _compiled(lambda a, c, si: rope_apply(a, (c, si), torch.float32))(xr, *tabs)
    except torch._dynamo.exc.BackendCompilerFailed as e:  # no C++ toolchain for inductor's CPU backend
        pytest.skip(f"inductor CPU backend unavailable: {e}")
    q0, s0 = F8.quantize_per_tensor(x)
    assert torch.equal(_bytes(q), _bytes(q0)) and torch.equal(s, s0)
    o0 = rope_apply(xr, tabs, torch.float32)
    torch.testing.assert_close(o, o0, rtol=2.0 ** -22, atol=1e-30)


def test_block_with_rope_tables_traces_without_graph_breaks():
    cfg = SteadyDancerConfig.tiny()
    blk = SteadyDancerDiT(cfg).requires_grad_(False).blocks[0]
    L = 24
    args = (torch.randn(1, L, cfg.dim), torch.randn(1, 6, cfg.dim), torch.randn(1, 257, cfg.dim),
            torch.randn(1, 512, cfg.dim), rope_tables(rope_freqs((2, 3, 4), cfg.head_dim)), "sdpa", torch.float32)
    with torch.no_grad():
        ex = torch._dynamo.explain(blk)(*args)
        assert ex.graph_break_count == 0, [b.reason for b in ex.break_reasons]
        torch.testing.assert_close(blk(*args[:4], rope_freqs((2, 3, 4), cfg.head_dim), "sdpa", torch.float32),
                                   blk(*args), rtol=1e-5, atol=1e-5)


def test_compiled_blocks_with_flex_sparse_run_on_cpu_and_equal_eager():
    """Model Loader compile + flex_sparse on a CPU (ComfyUI --cpu): inductor has no CPU kernel for flex attention
    with our block masks (it raised NoValidChoicesError at the first step), so flex runs eagerly behind a graph
    break inside the compiled block; the output equals the uncompiled model's (same fp32 RoPE)."""
    from steadydancer_turbo.steadydancer.weights import speed_options as accel

    torch.manual_seed(0)
    cfg = SteadyDancerConfig.tiny()
    m = SteadyDancerDiT(cfg).requires_grad_(False)
    m.compute_dtype = torch.float32
    b, f, h, w = 1, 3, 8, 12     # 5 x 4 x 6 = 120 tokens: two 64-token query blocks, one of them partial
    kw = dict(x=torch.randn(b, 16, f, h, w), timestep=torch.tensor([500]), context=torch.randn(b, 7, cfg.text_dim),
              clip_fea=torch.randn(b, 257, cfg.clip_dim), clip_fea_c=torch.randn(b, 257, cfg.clip_dim),
              y=torch.randn(b, 20, f, h, w), cond=torch.randn(b, 16, f, h, w), ref_x=torch.randn(b, 36, 1, h, w),
              ref_c=torch.randn(b, 16, 1, h, w))
    try:  # inductor's CPU backend at all (it needs a C++ toolchain); a failure below is then ours
        _compiled(lambda a: a * 2 + 1)(torch.randn(8))
    except torch._dynamo.exc.BackendCompilerFailed as e:
        pytest.skip(f"inductor CPU backend unavailable: {e}")
    accel.use_attention(m, accel.sparse(0.5, block_q=64, block_k=64))
    with torch.no_grad():
        m.rope_dtype = torch.float32
        ref = m(**kw)
        accel.compile_blocks(m, fullgraph=False)
        try:
            out = m(**kw)
        finally:
            accel.uncompile_blocks(m)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
