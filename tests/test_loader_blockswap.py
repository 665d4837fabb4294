"""Block swap gives the same output as no swap, streams the swapped blocks through the hooks, and the
budget rule picks the smallest number of swapped blocks that fits. CPU only: the same code path as on a
GPU (side stream and pinned memory are skipped when the device is the CPU)."""
import pytest
import torch

import _loader_util as U
from steadydancer_turbo.steadydancer.blockswap import blocks_to_swap_for_budget, module_bytes, offload_model
from steadydancer_turbo.steadydancer.loader import apply_loras, load_steadydancer
from steadydancer_turbo.steadydancer.quant import fp8_linear, QuantLinear

F32 = torch.float32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("swap")
    sd = U.state_dict(U.reference_model())
    U.write_fp8(sd, d / "fp8.safetensors", layout="kijai")
    U.write_safetensors(sd, d / "f32.safetensors")
    return d


@pytest.mark.parametrize("name", ["fp8.safetensors", "f32.safetensors"])
def test_block_swap_same_output(files, name):
    inp = U.inputs()
    m0 = load_steadydancer(files / name, compute_dtype=F32, device="cpu")
    out0 = U.run(m0, inp)
    for n in (1, 3):
        m = load_steadydancer(files / name, compute_dtype=F32, device="cpu", block_swap=n)
        assert m.block_swap.n == n
        out = U.run(m, inp)
        assert torch.equal(out, out0)
        # every swapped block went through the pre-hook; blocks after the first were prefetched
        assert m.block_swap.stats["loads"] + m.block_swap.stats["prefetches"] == n
        assert m.block_swap.stats["prefetches"] == n - 1
        assert not m.block_swap._ready  # device copies dropped after each block
        out_again = U.run(m, inp)
        assert torch.equal(out_again, out0)


def test_block_swap_with_runtime_lora_patch(files, tmp_path):
    from test_loader_lora import lora_tensors, write_lora
    lora = write_lora(tmp_path / "l.safetensors", lora_tensors(), "kijai")
    a = load_steadydancer(files / "fp8.safetensors", compute_dtype=F32, device="cpu")
    b = load_steadydancer(files / "fp8.safetensors", compute_dtype=F32, device="cpu", block_swap=2)
    apply_loras(a, [(lora, 1.0)])
    apply_loras(b, [(lora, 1.0)])
    inp = U.inputs()
    assert torch.equal(U.run(a, inp), U.run(b, inp))


def test_budget_picks_smallest_swap_that_fits(files):
    m = load_steadydancer(files / "f32.safetensors", compute_dtype=F32, device="cpu")
    per = module_bytes(m.blocks[0])
    total = module_bytes(m)
    fixed = total - 3 * per
    gib = 1 << 30
    assert blocks_to_swap_for_budget(m, total / gib) == 0
    # resident = fixed + (L - n) blocks + min(n, 1 + prefetch) in-flight copies. With L = 3 and one block
    # prefetched, n = 1 or 2 still needs 3 blocks' worth on the device; only n = 3 (2 in flight) saves one.
    assert blocks_to_swap_for_budget(m, (total - 1) / gib) == 3
    assert blocks_to_swap_for_budget(m, (fixed + 2 * per) / gib) == 3
    with pytest.raises(ValueError, match="cannot hold"):
        blocks_to_swap_for_budget(m, (fixed + 2 * per - 1) / gib)
    # without prefetch one block in flight is enough
    assert blocks_to_swap_for_budget(m, (fixed + per) / gib, prefetch=0) == 3
    assert blocks_to_swap_for_budget(m, (fixed + 2 * per) / gib, prefetch=0) == 2
    # through the loader
    m2 = load_steadydancer(files / "f32.safetensors", compute_dtype=F32, device="cpu",
                           vram_budget_gb=(total - 1) / gib)
    assert m2.block_swap.n == 3


def test_offload_model_moves_everything(files):
    m = load_steadydancer(files / "fp8.safetensors", compute_dtype=F32, device="cpu", block_swap=1)
    offload_model(m, "meta")  # any device works; meta shows every tensor moved
    assert all(t.is_meta for t in list(m.parameters()) + list(m.buffers()))


def test_fp8_scaled_mm_path_matches_dequantized_matmul():
    """The fp8 tensor-core path (torch._scaled_mm, runnable on CPU in recent torch) against the dequantized
    matmul: the activation is rounded to e4m3 (3 mantissa bits, rms relative error ~2^-4/sqrt(3) = 3.6%)."""
    if not hasattr(torch, "_scaled_mm"):
        pytest.skip("torch._scaled_mm missing")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.05
    x = torch.randn(3, 10, 128, generator=g)
    q, s = U.fp8_quantize(w, torch.float8_e4m3fn)
    ref = torch.nn.functional.linear(x, q.float() * s)
    try:
        out = fp8_linear(x, q, s, None, torch.float32)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"_scaled_mm not available on this CPU build: {e}")
    assert out.shape == ref.shape
    assert U.rel_err(out, ref) < 0.06
    out_bf16 = fp8_linear(x.bfloat16(), q, s, None, torch.bfloat16)  # the GPU path: bf16 activations
    assert out_bf16.dtype == torch.bfloat16 and U.rel_err(out_bf16.float(), ref) < 0.07
    # QuantLinear with fp8_matmul on a device without fp8 tensor cores falls back to the exact dequant path
    lin = QuantLinear(128, 64, False, "fp8", torch.float8_e4m3fn, F32, device="cpu")
    lin.weight, lin.weight_scale = q, s
    lin.fp8_matmul = True
    assert torch.equal(lin(x), ref)
