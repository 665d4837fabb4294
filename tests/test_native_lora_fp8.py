"""ComfyUI LoRA patches on fp8-matmul layers as low-rank side terms (issue 15), without ComfyUI: stand-ins for
ComfyUI's ``LoRAAdapter`` and ``ModelPatcher.patches`` entries, the pack's real ``QuantLinear`` and the real glue
functions of nodes/native_model.py (``lora_side_terms``, ``attach_quant_patches``, ``detach_quant_patches``).

The reference for the math is ComfyUI 0.33's merge written out in float64 (comfy/weight_adapter/lora.py
``LoRAAdapter.calculate_weight``: ``W += (strength * alpha / rank) * up @ down``, alpha / rank = 1 without alpha,
rank = ``down.shape[0]``). fp8 tensor cores are absent on the CPU: the device probe is forced on and the fp8
product replaced by the float product of the same stored operands (``emulate_fp8``), so the side terms are checked
alone; the real-ComfyUI check (tests/integration/native_checks.py ``check_lora_fp8``) runs the same on core
LoraLoaderModelOnly patches, and tests/test_gpu_paths.py / bench/lora_fp8_bench.py the real fp8 matmul.
"""
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import _loader_util as U
from steadydancer_turbo.nodes import native_model as nm
from steadydancer_turbo.steadydancer.kernels import fp8_linear as f8
from steadydancer_turbo.steadydancer.weights.quant import QuantLinear, dequantize_fp8

OUT, IN = 64, 128


class LoRAAdapter:
    """Stand-in for comfy.weight_adapter.lora.LoRAAdapter: weights = (up, down, alpha, mid, dora_scale, reshape)."""

    def __init__(self, up, down, alpha=None, mid=None, dora_scale=None, reshape=None):
        self.weights = (up, down, alpha, mid, dora_scale, reshape)


class LoKrAdapter(LoRAAdapter):
    """Another adapter kind (a subclass even: only the exact LoRA class counts as plain)."""


def comfy_merge64(w, patches):
    """ComfyUI's merged weight in float64 for plain LoRA and "diff" patches (the formula of comfy/lora.py)."""
    w = w.double().clone()
    for strength, v, strength_model, offset, function in patches:
        assert strength_model == 1.0 and offset is None and function is None
        if isinstance(v, LoRAAdapter):
            up, down, alpha = v.weights[:3]
            a = alpha / down.shape[0] if alpha is not None else 1.0
            # ComfyUI casts the patch tensors to the weight's device (model_management.cast_to_device)
            w += (strength * a) * (up.to(w.device).double().flatten(1) @ down.to(w.device).double().flatten(1))
        else:  # ("diff", (delta,))
            w += strength * v[1][0].to(w.device).double()
    return w


def patch(v, strength=1.0, strength_model=1.0, offset=None, function=None):
    return (strength, v, strength_model, offset, function)


def lora(seed, rank=4, alpha=None):
    g = torch.Generator().manual_seed(seed)
    return LoRAAdapter(torch.randn(OUT, rank, generator=g) * 0.1, torch.randn(rank, IN, generator=g) * 0.1, alpha)


def fp8_linear(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s = U.fp8_quantize(torch.randn(OUT, IN, generator=g) * 0.05, torch.float8_e4m3fn)
    lin = QuantLinear(IN, OUT, True, "fp8", torch.float8_e4m3fn, dtype, device="cpu")
    lin.weight, lin.weight_scale = q, s
    lin.bias = nn.Parameter((torch.randn(OUT, generator=g) * 0.1).to(dtype), requires_grad=False)
    lin.fp8_matmul = True
    return lin


@pytest.fixture
def emulate_fp8(monkeypatch):
    """fp8 matmul 'supported' on the CPU, its product the float product of the stored operands; counts calls."""
    calls = []

    def scaled_mm(x, w, s, b, act_scaling, fast_accum, cd):
        calls.append(tuple(x.shape))
        return F.linear(x, dequantize_fp8(w, s, cd), None if b is None else b.to(cd))

    monkeypatch.setattr(f8, "fp8_matmul_supported", lambda device=None: True)
    monkeypatch.setattr(f8, "scaled_mm_linear", scaled_mm)
    return calls


def counting_merge(patches, key, calls):
    """weight_patch_fn as the glue makes it (comfy.lora.calculate_weight on the fp32 weight), here the float64
    reference merge, counting its calls."""
    def fn(w):
        calls.append(key)
        return comfy_merge64(w, patches).to(w.dtype)
    return fn


def x_in(dtype=torch.float64):
    return torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(9)).to(dtype)


def merged_out64(lin, patches, x):
    w = comfy_merge64(dequantize_fp8(lin.weight, lin.weight_scale, torch.float64), patches)
    return F.linear(x.double(), w, lin.bias.double())


# ------------------------------------------------------------------------------------------- conversion
def test_plain_lora_patches_become_side_terms_with_comfys_scale():
    a, b = lora(1, rank=4, alpha=2.0), lora(2, rank=8)
    terms = nm.lora_side_terms([patch(a, 0.7), patch(b, -1.5)], (OUT, IN), LoRAAdapter)
    assert [t[2] for t in terms] == pytest.approx([0.7 * 2.0 / 4, -1.5])
    assert terms[0][0] is not None and torch.equal(terms[0][0], a.weights[0]) and torch.equal(terms[1][1], b.weights[1])
    # strength 0 adds nothing, as ComfyUI's merge adds 0 * up @ down
    assert nm.lora_side_terms([patch(a, 0.0)], (OUT, IN), LoRAAdapter) == []


@pytest.mark.parametrize("bad", [
    patch(("diff", (torch.zeros(OUT, IN),))),                       # full difference (lightx2v diff, model merges)
    patch(LoKrAdapter(torch.zeros(OUT, 2), torch.zeros(2, IN))),    # another adapter kind
    patch(LoRAAdapter(torch.zeros(OUT, 2), torch.zeros(2, IN), mid=torch.zeros(2, 2))),         # LoCon mid
    patch(LoRAAdapter(torch.zeros(OUT, 2), torch.zeros(2, IN), dora_scale=torch.ones(OUT, 1))),  # DoRA
    patch(LoRAAdapter(torch.zeros(OUT, 2), torch.zeros(2, IN), reshape=[OUT, IN])),
    patch(LoRAAdapter(torch.zeros(OUT, 2), torch.zeros(2, IN)), strength_model=0.5),
    patch(LoRAAdapter(torch.zeros(OUT, 2), torch.zeros(2, IN)), offset=(0, 0, 32)),
    patch(LoRAAdapter(torch.zeros(OUT, 2), torch.zeros(2, IN)), function=lambda a: a),
    patch(LoRAAdapter(torch.zeros(OUT // 2, 2), torch.zeros(2, IN))),  # does not fit the weight
    patch([(torch.zeros(OUT, IN), lambda w, inplace: w)]),            # nested patch list
])
def test_any_other_patch_kind_keeps_the_exact_path(bad):
    plain = patch(lora(1))
    assert nm.lora_side_terms([bad], (OUT, IN), LoRAAdapter) is None
    assert nm.lora_side_terms([plain, bad], (OUT, IN), LoRAAdapter) is None


# ------------------------------------------------------------------------------------------- the op
def test_host_patch_alone_turns_fp8_matmul_off_today(emulate_fp8):
    """What the bench saw (issue 15): a ComfyUI patch (weight_patch_fn) on an fp8-matmul layer makes every forward
    dequantize + merge + run the float matmul; the fp8 matmul never runs."""
    lin, calls = fp8_linear(), []
    x = x_in()
    assert lin.fp8_matmul_active(x)
    lin(x)
    assert len(emulate_fp8) == 1
    patches = [patch(lora(1, alpha=2.0), 0.8)]
    lin.weight_patch_fn = counting_merge(patches, "k", calls)
    assert not lin.fp8_matmul_active(x)
    out = lin(x)
    lin(x)
    assert calls == ["k", "k"] and len(emulate_fp8) == 1      # merged twice, fp8 matmul not called again
    assert U.rel_err(out, merged_out64(lin, patches, x)) < 1e-6  # the merge runs on the fp32 weight


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_side_terms_keep_the_fp8_path_and_equal_the_merged_weight(emulate_fp8, dtype, tol):
    lin, calls = fp8_linear(dtype), []
    patches = [patch(lora(1, rank=4, alpha=2.0), 0.8), patch(lora(2, rank=8), -0.6)]
    lin.weight_patch_fn = counting_merge(patches, "k", calls)
    lin.set_lowrank_terms(nm.lora_side_terms(patches, lin.weight_shape, LoRAAdapter))
    x = x_in(dtype)
    assert lin.fp8_matmul_active(x)
    assert lin.host_lowrank_down.shape == (12, IN) and lin.host_lowrank_up.dtype == dtype  # ranks concatenated
    got = lin(x)
    assert calls == [] and len(emulate_fp8) == 1             # no per-call merge, the fp8 product ran
    want = merged_out64(lin, patches, x)
    assert U.rel_err(got, want) < tol
    base = F.linear(x.double(), dequantize_fp8(lin.weight, lin.weight_scale, torch.float64), lin.bias.double())
    assert U.rel_err(want, base) > 0.05                       # the LoRA matters at this size


def test_terms_act_only_with_the_host_patch_and_clear(emulate_fp8):
    lin = fp8_linear()
    x = x_in()
    base = lin(x)
    patches = [patch(lora(3, alpha=1.0))]
    lin.set_lowrank_terms(nm.lora_side_terms(patches, lin.weight_shape, LoRAAdapter))
    assert torch.equal(lin(x), base)                          # terms without weight_patch_fn: stale, ignored
    lin.weight_patch_fn = counting_merge(patches, "k", [])
    assert not torch.equal(lin(x), base)
    lin.set_lowrank_terms(None)
    assert not lin.fp8_matmul_active(x)                       # a host patch without its low-rank form: exact path
    assert "host_lowrank_up" not in dict(lin.named_buffers())
    lin.set_lowrank_terms([])                                 # a zero patch (strength 0) keeps the fp8 path
    assert lin.fp8_matmul_active(x) and torch.equal(lin(x), base)
    with pytest.raises(ValueError, match="does not fit"):
        lin.set_lowrank_terms([(torch.zeros(OUT, 2), torch.zeros(2, IN // 2), 1.0)])


def test_terms_are_buffers_that_follow_the_module():
    lin = fp8_linear(torch.bfloat16)
    lin.set_lowrank_terms([(torch.randn(OUT, 4), torch.randn(4, IN), 0.5)])
    sd = lin.state_dict()
    assert {"host_lowrank_up", "host_lowrank_down"} <= set(sd)   # counted by ComfyUI's module_size
    lin.to(torch.device("meta"))
    assert lin.host_lowrank_up.device.type == "meta"


# ------------------------------------------------------------------------------------------- the glue
class Tiny(nn.Module):
    """The shape of a BaseModel: diffusion_model.<layers>; one fp8 layer, one float layer, one fp8 layer whose
    fp8 matmul is off."""

    def __init__(self):
        super().__init__()
        self.diffusion_model = nn.Module()
        self.diffusion_model.q = fp8_linear(torch.float64, seed=0)
        self.diffusion_model.k = fp8_linear(torch.float64, seed=1)
        self.diffusion_model.k.fp8_matmul = False
        self.diffusion_model.f = nn.Linear(IN, OUT)


def attach(model, patches, uuid, calls):
    nm.attach_quant_patches(model, patches, uuid, lambda p, key: counting_merge(p, key, calls), LoRAAdapter)


def test_attach_follows_strength_changes_and_detach_leaves_nothing(emulate_fp8):
    m, calls = Tiny(), []
    dm = m.diffusion_model
    x = x_in()
    plain_q, plain_k = dm.q(x), dm.k(x)
    a = lora(4, alpha=2.0)
    for uuid, s in (("u1", 1.0), ("u2", 0.5)):   # LoraLoaderModelOnly at another strength: a clone, a new uuid
        patches = {"diffusion_model.q.weight": [patch(a, s)], "diffusion_model.k.weight": [patch(a, s)],
                   "diffusion_model.f.weight": [patch(a, s)]}
        attach(m, patches, uuid, calls)
        assert dm.q._host_rank == 4 and dm.k._host_rank is None     # k: fp8 matmul off -> exact path only
        held = sum(b.nbytes for n, b in m.named_buffers() if "host_lowrank" in n)
        assert nm.side_terms_bytes(m, patches, LoRAAdapter) == held == 4 * (IN + OUT) * 8   # what model_size adds
        assert torch.allclose(dm.q.host_lowrank_up.double(), a.weights[0].double() * s * 2.0 / 4)
        calls.clear()
        got_q, got_k = dm.q(x), dm.k(x)
        assert calls == ["diffusion_model.k.weight"]               # q ran the fp8 path with its side terms
        assert U.rel_err(got_q, merged_out64(dm.q, patches["diffusion_model.q.weight"], x)) < 1e-12
        assert U.rel_err(got_k, merged_out64(dm.k, patches["diffusion_model.k.weight"], x)) < 1e-6  # fp32 merge
        up = dm.q.host_lowrank_up
        attach(m, patches, uuid, calls)                             # load() again, same patch set: kept
        assert dm.q.host_lowrank_up is up
    # a full difference on q (another LoRA stacked): q falls back to the exact merge
    patches = {"diffusion_model.q.weight": [patch(a), patch(("diff", (torch.randn(OUT, IN) * 0.01,)))]}
    attach(m, patches, "u3", calls)
    assert dm.q._host_rank is None and dm.k.weight_patch_fn is None and not dm.q.fp8_matmul_active(x)
    calls.clear()
    assert U.rel_err(dm.q(x), merged_out64(dm.q, patches["diffusion_model.q.weight"], x)) < 1e-6
    assert calls == ["diffusion_model.q.weight"]
    nm.detach_quant_patches(m)                                      # unpatch_model
    assert all(l.weight_patch_fn is None and l._host_rank is None for l in (dm.q, dm.k))
    assert not [n for n, _ in m.named_buffers() if "host_lowrank" in n]
    assert torch.equal(dm.q(x), plain_q) and torch.equal(dm.k(x), plain_k)


def test_fp8_matmul_off_registers_nothing():
    """Default numerics: without the fp8_matmul option no side term exists; the exact merge runs."""
    m, calls = Tiny(), []
    m.diffusion_model.q.fp8_matmul = False
    attach(m, {"diffusion_model.q.weight": [patch(lora(5))]}, "u", calls)
    assert m.diffusion_model.q._host_rank is None and m.diffusion_model.q.weight_patch_fn is not None
    assert not [n for n, _ in m.named_buffers() if "host_lowrank" in n]


def test_the_real_fp8_matmul_on_cpu_with_side_terms(monkeypatch):
    """The real fp8 product (torch._scaled_mm on the CPU where this torch has it) with the side terms, bf16:
    within the fp8 activation rounding of the merged float64 result (as test_loader_blockswap bounds it)."""
    monkeypatch.setattr(f8, "fp8_matmul_supported", lambda device=None: True)
    lin = fp8_linear(torch.bfloat16)
    patches = [patch(lora(6, alpha=4.0), 1.0)]
    lin.weight_patch_fn = functools.partial(lambda w: w)  # never called on this path
    lin.set_lowrank_terms(nm.lora_side_terms(patches, lin.weight_shape, LoRAAdapter))
    x = x_in(torch.bfloat16)
    try:
        got = lin(x)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"_scaled_mm not available on this CPU build: {e}")
    assert U.rel_err(got, merged_out64(lin, patches, x)) < 0.07
