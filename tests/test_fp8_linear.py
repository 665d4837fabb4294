"""fp8 linear layer: quantization math against float64 references, and the module swap."""

import pytest
import torch
import torch.nn as nn

from steadydancer_turbo.steadydancer.kernels.fp8_linear import (
    FP8_MAX,
    FP8Linear,
    convert_linears_to_fp8,
    quantize_per_tensor,
    quantize_rowwise,
    quantize_tensorwise,
)


def _cpu_scaled_mm_works():
    try:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), torch.ones(16, 1), torch.ones(1, 16), bias=torch.zeros(16, dtype=torch.bfloat16),
                         out_dtype=torch.bfloat16)
        return True
    except Exception:
        return False


def test_per_tensor_quantization_roundtrip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g, dtype=torch.float64) * 3
    w8, s = quantize_per_tensor(w)
    assert w8.dtype == torch.float8_e4m3fn and s.shape == ()
    assert s.item() == pytest.approx(w.abs().max().item() / FP8_MAX, rel=1e-6)
    deq = w8.double() * s.double()
    # e4m3 has 3 mantissa bits: relative rounding error <= 2^-4 per element (normal range)
    big = w.abs() > 1e-2 * w.abs().max()
    assert ((deq - w).abs()[big] / w.abs()[big]).max() <= 2 ** -4 + 1e-6
    assert deq.abs().max() <= w.abs().max() * (1 + 1e-6)


def test_rowwise_quantization_scales():
    x = torch.randn(10, 32, dtype=torch.float64)
    x[3] *= 100  # one loud token must not crush the others' resolution
    x8, s = quantize_rowwise(x)
    assert s.shape == (10, 1)
    torch.testing.assert_close(s.squeeze(1), x.abs().amax(1).float() / FP8_MAX)
    rel = (x8.double() * s.double() - x).norm(dim=1) / x.norm(dim=1)
    assert rel.max() < 0.05


def test_fallback_forward_is_dequantized_linear():
    torch.manual_seed(1)
    lin = nn.Linear(48, 32).double()
    f8 = FP8Linear.from_linear(lin, compute_dtype=torch.float64, use_scaled_mm=False)
    x = torch.randn(3, 5, 48, dtype=torch.float64)
    w = f8.weight.double() * f8.scale_weight.double()
    ref = x @ w.T + lin.bias.detach()
    torch.testing.assert_close(f8(x), ref, rtol=1e-12, atol=1e-12)
    # and it is close to the unquantized layer (e4m3 weights only)
    exact = lin(x)
    assert ((f8(x) - exact).norm() / exact.norm()).item() < 0.05


@pytest.mark.skipif(not _cpu_scaled_mm_works(), reason="torch._scaled_mm unavailable on this CPU build")
@pytest.mark.parametrize("act_scaling", ["rowwise", "tensor"])
def test_scaled_mm_path_matches_float64_of_quantized_operands(act_scaling):
    torch.manual_seed(2)
    lin = nn.Linear(64, 48).to(torch.bfloat16)
    f8 = FP8Linear.from_linear(lin, use_scaled_mm=True, act_scaling=act_scaling)
    x = torch.randn(2, 7, 64, dtype=torch.bfloat16)
    x[0, 3] *= 20  # a loud token
    out = f8(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 7, 48)
    xq, xs = (quantize_rowwise if act_scaling == "rowwise" else quantize_tensorwise)(x.reshape(-1, 64))
    ref = (xq.double() * xs.double()) @ (f8.weight.double() * f8.scale_weight.double()).T + lin.bias.double()
    torch.testing.assert_close(out.reshape(-1, 48).double(), ref, rtol=2e-2, atol=2e-2)
    exact = lin(x).double()
    assert ((out.double() - exact).norm() / exact.norm()).item() < 0.08


def test_convert_only_blocks_and_keeps_keys():
    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.q = nn.Linear(32, 32)
            self.ffn = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.text_embedding = nn.Linear(16, 32)
            self.blocks = nn.ModuleList([Blk(), Blk()])
            self.head = nn.Linear(32, 8)

    m = M().to(torch.bfloat16)
    before = set(m.state_dict())
    n = convert_linears_to_fp8(m)
    assert n == 6
    assert type(m.text_embedding) is nn.Linear and type(m.head) is nn.Linear
    assert isinstance(m.blocks[1].ffn[2], FP8Linear) and m.blocks[1].ffn[2].weight.dtype == torch.float8_e4m3fn
    after = set(m.state_dict())
    assert before <= after and after - before == {k.replace("weight", "scale_weight") for k in before
                                                   if k.startswith("blocks.") and k.endswith("weight")}


@pytest.mark.skipif(not _cpu_scaled_mm_works(), reason="torch._scaled_mm unavailable on this CPU build")
def test_scaled_mm_path_returns_the_input_dtype():
    lin = nn.Linear(32, 16)
    f8 = FP8Linear.from_linear(lin, use_scaled_mm=True)
    for dt in (torch.bfloat16, torch.float32):
        out = f8(torch.randn(4, 32).to(dt))
        assert out.dtype == dt


def test_out_of_memory_in_the_compiled_quantizer_is_raised_not_treated_as_a_compile_failure(monkeypatch):
    from steadydancer_turbo.steadydancer.kernels import fp8_linear as F

    class CudaLike:  # stands in for a CUDA tensor: only the attribute _quantize looks at before calling fn
        is_cuda = True

    def oom(_x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(F, "_compile_failed", False)
    monkeypatch.setitem(F._compiled, "tensor", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        F._quantize(CudaLike(), "tensor")
    assert F._compile_failed is False  # the fast path stays enabled for the next call
