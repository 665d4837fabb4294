"""Block swap gives the same output as no swap, streams the swapped blocks through the hooks, and the
budget rule picks the smallest number of swapped blocks that fits. CPU only: the same code path as on a
GPU (side stream and pinned memory are skipped when the device is the CPU)."""
import pytest
import torch

import _loader_util as U
from steadydancer_turbo.steadydancer.weights.blockswap import blocks_to_swap_for_budget, module_bytes, offload_model
from steadydancer_turbo.steadydancer.weights.loader import apply_loras, load_steadydancer
from steadydancer_turbo.steadydancer.kernels import fp8_linear as f8
from steadydancer_turbo.steadydancer.weights.quant import QuantLinear

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


def _quant_linear(q, s, bias=None, dtype=torch.bfloat16):
    lin = QuantLinear(q.shape[1], q.shape[0], bias is not None, "fp8", torch.float8_e4m3fn, dtype, device="cpu")
    lin.weight, lin.weight_scale = q, s
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.to(dtype), requires_grad=False)
    return lin


def test_fp8_matmul_path_is_the_fp8_linear_primitive(monkeypatch):
    """QuantLinear's fp8 matmul runs the stored e4m3 weight through fp8_linear.scaled_mm_linear (the package's
    one fp8 matmul): the same numbers as an FP8Linear holding the same tensors, close to the float64 product of
    the quantized operands, with a low-rank LoRA patch added un-merged; a full-difference patch and a device
    without fp8 tensor cores fall back to the dequantized matmul. _scaled_mm runs on the CPU in recent torch;
    the capability probe is forced on so the CPU exercises the GPU code path."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.05
    bias = torch.randn(64, generator=g) * 0.1
    x = torch.randn(3, 10, 128, generator=g).bfloat16()
    q, s = U.fp8_quantize(w, torch.float8_e4m3fn)
    lin = _quant_linear(q, s, bias)
    lin.fp8_matmul = True
    deq = lin(x)  # CPU: no fp8 tensor cores -> exact dequantized matmul
    assert not lin.fp8_matmul_active(x)
    assert torch.equal(deq, torch.nn.functional.linear(x, (q.float() * s).bfloat16(), bias.bfloat16()))
    monkeypatch.setattr(f8, "fp8_matmul_supported", lambda device=None: True)
    try:
        out = lin(x)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"_scaled_mm not available on this CPU build: {e}")
    assert lin.fp8_matmul_active(x) and out.dtype == torch.bfloat16 and out.shape == (3, 10, 64)
    twin = f8.FP8Linear.from_fp8(q, s, bias, use_scaled_mm=True, act_scaling=lin.fp8_act_scaling,
                                 fast_accum=lin.fp8_fast_accum)
    assert torch.equal(out, twin(x))
    xq, xs = f8.quantize_tensorwise(x.reshape(-1, 128))
    ref = (xq.double() * xs.double()) @ (q.double() * s.double()).T + bias.bfloat16().double()
    torch.testing.assert_close(out.reshape(-1, 64).double(), ref, rtol=2e-2, atol=2e-2)
    # e4m3 activation (3 mantissa bits, rms relative error ~2^-4/sqrt(3) = 3.6%) against the dequantized matmul
    assert U.rel_err(out.float(), deq.float()) < 0.07

    up, down = torch.randn(64, 4, generator=g) * 0.1, torch.randn(4, 128, generator=g) * 0.1
    lin.add_patch("lowrank", (up, down), 0.7)
    assert lin.fp8_matmul_active(x)
    got = lin(x)
    lora = (x.double() @ (0.7 * up.bfloat16().double() @ down.bfloat16().double()).T)
    torch.testing.assert_close(got.double(), out.double() + lora, rtol=1e-2, atol=1e-2)
    assert U.rel_err(got.float(), out.float()) > 0.05  # the patch really contributed
    lin.clear_patches()
    lin.add_patch("diff", (torch.randn(64, 128, generator=g) * 0.01,), 1.0)
    assert not lin.fp8_matmul_active(x)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.dequantized_weight(), lin.bias))


def test_use_fp8_reuses_stored_fp8_weights(files):
    """accel.use_fp8 on a model loaded from an fp8 file switches the stored e4m3 layers to the fp8 matmul
    without re-quantizing (same weight tensors), and converts the float Linears left in the blocks."""
    from steadydancer_turbo.steadydancer.weights import speed_options as accel
    m = load_steadydancer(files / "fp8.safetensors", compute_dtype=F32, device="cpu")
    ql = [x for x in m.blocks.modules() if isinstance(x, QuantLinear)]
    before = {id(x): x.weight for x in ql}
    n = accel.use_fp8(m)
    assert n == len(ql) > 0
    assert all(x.fp8_matmul and x.weight is before[id(x)] for x in ql)
    assert not any(type(x) is torch.nn.Linear for x in m.blocks.modules())


def test_loader_fp8_matmul_off_gpu_is_ignored_with_a_note(files):
    m = load_steadydancer(files / "f32.safetensors", compute_dtype=F32, device="cpu", fp8_matmul=True)
    assert m.load_info["fp8_matmul"] is False and "no fp8 tensor cores" in m.load_info["notes"][0]
    assert not any(isinstance(x, QuantLinear) for x in m.modules())  # a float file stays float


def test_loader_fp8_matmul_quantizes_a_float_file_at_load(files, monkeypatch):
    """With fp8 tensor cores (probe forced on here) fp8_matmul on a float file with storage auto quantizes the
    block Linears to e4m3 at load (as storage fp8_e4m3fn), and only those: embeddings and head stay float."""
    import steadydancer_turbo.steadydancer.weights.loader as L
    monkeypatch.setattr(L, "fp8_matmul_supported", lambda device=None: True)
    m = load_steadydancer(files / "f32.safetensors", compute_dtype=F32, device="cpu", fp8_matmul=True)
    ql = {n: x for n, x in m.named_modules() if isinstance(x, QuantLinear)}
    assert ql and all(n.startswith("blocks.") for n in ql)
    assert all(x.fp8_matmul and x.weight.dtype == torch.float8_e4m3fn for x in ql.values())
    assert m.load_info["fp8_matmul_layers"] == len(ql) and m.load_info["notes"] == []


def test_a_loaded_model_is_freed_when_dropped_without_the_cycle_collector(files):
    """model.block_swap refers back to the model only weakly: dropping the last reference frees the weights at
    once (ComfyUI's server runs the cycle collector only every 10 s of idle time; a cycle kept every replaced
    model's weights alive until then)."""
    import gc
    import weakref
    gc.collect()
    gc.disable()
    try:
        m = load_steadydancer(str(files / "f32.safetensors"), compute_dtype="fp32", device="cpu")
        assert m.block_swap.model is m
        ref = weakref.ref(m)
        del m
        assert ref() is None
    finally:
        gc.enable()
