"""Every checkpoint format loads to the same architecture and computes what its stored weights say.

Checks per format, in fp32 compute (so only the weights differ):

1. every weight of the loaded model, dequantized the way the forward pass does it, is bit-identical to
   the weights the file stores decoded by an independent route (torch dtype casts x scale for fp8;
   gguf-py's numpy reference dequantizer for GGUF);
2. the output against the original fp32 model the file was made from, within the format's own rounding
   error (bounds below, each about 3x what was measured, derived from the format's mantissa width);
3. where 2 does not apply (K-quant files hold hand-built random blocks, since gguf-py cannot quantize
   K-quants; plain unscaled fp8): the output against an fp32 model holding the decoded weights,
   relative L2 error <= 1e-5 (the same fp32 ops; only summation order may differ, ~3e-7 measured).
"""
import os

import pytest
import torch

import _loader_util as U
from steadydancer_turbo.steadydancer.weights.loader import load_steadydancer
from steadydancer_turbo.steadydancer.weights.quant import QuantConv, QuantLinear

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
F32 = torch.float32

# Relative output error vs the original fp32 model. A weight rounded to m mantissa bits has relative error
# <= 2^-(m+1), ~2^-(m+1)/sqrt(3) rms; through 3 blocks of residual updates the output error stays of that
# order. bf16 (m=7): rms 2.3e-3 -> bound 1.5e-2; fp16 (m=10): 3e-4 -> 2e-3; fp8 e4m3 scaled (m=3): 3.6e-2 ->
# bound 0.1; e5m2 (m=2): 7e-2 -> 0.2; Q8_0 (8-bit per 32-block, step amax/127): ~5e-3 -> 3e-2;
# Q4_0/Q4_1 (step amax/7..15): ~0.1 -> 0.4; Q5_*: ~0.05 -> 0.2.
BOUND = {"fp32": 1e-6, "bf16": 1.5e-2, "fp16": 2e-3, "fp8_e4m3fn": 0.1, "fp8_e5m2": 0.2,
         "Q8_0": 3e-2, "Q5_0": 0.2, "Q5_1": 0.2, "Q4_0": 0.4, "Q4_1": 0.4}


@pytest.fixture(scope="module")
def base():
    ref = U.reference_model()
    sd = U.state_dict(ref)
    return ref, sd, U.run(ref)


def _check(path, deq, base, bound=None, **kw):
    ref, sd, out_ref = base
    m = load_steadydancer(path, compute_dtype=F32, device="cpu", **kw)
    assert m.config == ref.config
    assert {k for k in m.state_dict() if not k.endswith(".weight_scale")} == set(sd)
    for k, want in deq.items():
        mod_name, _, pname = k.rpartition(".")
        mod = m.get_submodule(mod_name)
        got = mod.dequantized_weight(F32) if isinstance(mod, (QuantLinear, QuantConv)) and pname == "weight" \
            else getattr(mod, pname)
        assert got.dtype == F32 and torch.equal(got, want.reshape(got.shape)), k
    out = U.run(m)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    if bound is not None:
        assert U.rel_err(out, out_ref) <= bound
    else:
        assert U.rel_err(out, U.run(U.model_from_state(deq))) <= 1e-5
    return m


@pytest.mark.parametrize("dtype,name,prefix", [(torch.float32, "fp32", ""), (torch.bfloat16, "bf16", "model."),
                                               (torch.float16, "fp16", "diffusion_model."),
                                               (torch.bfloat16, "bf16", "model.diffusion_model.")])
def test_safetensors_float(tmp_path, base, dtype, name, prefix):
    sd = base[1]
    path = U.write_safetensors(sd, tmp_path / "m.safetensors", dtype=dtype, prefix=prefix)
    deq = {k: v.to(dtype).float() for k, v in sd.items()}
    m = _check(path, deq, base, BOUND[name])
    assert not any(isinstance(x, (QuantLinear, QuantConv)) for x in m.modules())
    assert m.load_info["format"] == "safetensors"


@pytest.mark.parametrize("layout,fp8", [("kijai", torch.float8_e4m3fn), ("comfy", torch.float8_e4m3fn),
                                        ("comfy_meta", torch.float8_e5m2), ("plain", torch.float8_e5m2)],
                         ids=["kijai-e4m3fn", "comfy-e4m3fn", "comfy_meta-e5m2", "plain-e5m2"])
def test_fp8(tmp_path, base, layout, fp8):
    path = tmp_path / "m_fp8.safetensors"
    deq = U.write_fp8(base[1], path, layout=layout, fp8=fp8, prefix="diffusion_model." if layout == "kijai" else "")
    # plain (unscaled) fp8 of weights ~U(-0.06, 0.06) sits in the subnormal range: no useful accuracy bound
    bound = None if layout == "plain" else BOUND["fp8_e4m3fn" if fp8 == torch.float8_e4m3fn else "fp8_e5m2"]
    m = _check(path, deq, base, bound)
    q = [x for x in m.modules() if isinstance(x, QuantLinear)]
    assert len(q) == 3 * 12  # every Linear of every block stays fp8
    assert all(x.weight.dtype == fp8 for x in q)


def test_sharded_folder_with_index(tmp_path, base):
    folder = U.write_sharded(base[1], tmp_path / "SteadyDancer-14B", dtype=torch.bfloat16)
    deq = {k: v.to(torch.bfloat16).float() for k, v in base[1].items()}
    m = _check(str(folder), deq, base, BOUND["bf16"])
    assert m.load_info["format"] == "sharded"


def test_turbodiffusion_pth_with_wrapper_infixes_and_2d_patch_embeds(tmp_path, base):
    sd = {}
    for k, v in base[1].items():
        if k.startswith("blocks."):
            i, rest = k[len("blocks."):].split(".", 1)
            k2 = f"net.blocks.{i}._checkpoint_wrapped_module.{rest}"
        else:
            k2 = "net." + k
        if k.startswith("patch_embedding") and k.endswith(".weight"):
            v = v.reshape(v.shape[0], -1)  # TurboDiffusion's Linear patch embedding
        sd[k2] = v.to(torch.bfloat16)
    path = tmp_path / "turbo.pth"
    torch.save(sd, path)
    deq = {k: v.to(torch.bfloat16).float() for k, v in base[1].items()}
    m = _check(path, deq, base, BOUND["bf16"])
    assert m.patch_embedding_fuse.weight.dim() == 5


QUANT_GGUF = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def test_gguf_every_quant_type_in_one_mixed_file(tmp_path, base):
    """All 10 quant types, each on >= 3 of the 36 block Linear layers (like llama.cpp's mixed *_K_M files)."""
    path = tmp_path / "m.gguf"
    deq = U.write_gguf(base[1], path, QUANT_GGUF, five_d="fix")
    m = _check(path, deq, base, None)
    q = [x for x in m.modules() if isinstance(x, QuantLinear)]
    assert len(q) == 36 and all(x.weight.dtype == torch.uint8 for x in q)
    assert {int(x.qtype) for x in q} == {int(t) for t in QUANT_GGUF}
    assert m.load_info["format"] == "gguf"


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.F16, Q.BF16], ids=lambda q: q.name)
def test_gguf_quantized_from_the_weights(tmp_path, base, qtype):
    """Files quantized from the fp32 weights by gguf-py: output within the type's rounding error."""
    path = tmp_path / "m.gguf"
    deq = U.write_gguf(base[1], path, qtype, five_d="fix")
    m = _check(path, deq, base, BOUND.get(qtype.name, BOUND["fp16"]))
    q = [x for x in m.modules() if isinstance(x, QuantLinear)]
    assert len(q) == (0 if qtype in (Q.F16, Q.BF16) else 36)  # GGUF float tensors become plain weights


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K], ids=lambda q: q.name)
@pytest.mark.parametrize("five_d", ["fix", "orig_shape"])
def test_gguf_5d_tensors_both_layouts(tmp_path, base, qtype, five_d):
    path = tmp_path / "m.gguf"
    deq = U.write_gguf(base[1], path, qtype, five_d=five_d, prefix="model.diffusion_model.")
    r = gguf.GGUFReader(str(path))
    pe = next(t for t in r.tensors if t.name.endswith("patch_embedding_fuse.weight"))
    assert len(pe.shape) == (5 if five_d == "fix" else 2)  # really stored both ways
    m = _check(path, deq, base, BOUND.get(qtype.name))
    for name in ("patch_embedding", "patch_embedding_fuse", "patch_embedding_ref_c"):
        mod = getattr(m, name)
        if five_d == "orig_shape":
            assert isinstance(mod, QuantConv) and mod.weight_shape == tuple(base[1][name + ".weight"].shape)
        else:
            assert mod.weight.shape == base[1][name + ".weight"].shape


def test_bf16_compute_default(tmp_path, base):
    """Default compute dtype bf16: weights stored in bf16, output close to fp32 within bf16 arithmetic."""
    path = U.write_safetensors(base[1], tmp_path / "m.safetensors", dtype=torch.bfloat16)
    m = load_steadydancer(path, device="cpu")
    assert m.compute_dtype == torch.bfloat16
    assert m.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    # bf16 activations through every Linear add ~2^-9 relative error per op: measured ~1e-2
    assert U.rel_err(U.run(m), base[2]) < 5e-2


def test_storage_modes(tmp_path, base):
    path = tmp_path / "m.gguf"
    deq = U.write_gguf(base[1], path, Q.Q8_0)
    m = _check(path, deq, base, BOUND["Q8_0"], storage="dequantize")
    assert not any(isinstance(x, QuantLinear) for x in m.modules())
    # bf16 file quantized to fp8 at load: half the block memory, fp8-sized error
    p2 = U.write_safetensors(base[1], tmp_path / "m.safetensors", dtype=torch.bfloat16)
    m8 = load_steadydancer(p2, compute_dtype=F32, device="cpu", storage="fp8_e4m3fn")
    q = [x for x in m8.modules() if isinstance(x, QuantLinear)]
    assert len(q) == 36 and all(x.weight.dtype == torch.float8_e4m3fn for x in q)
    assert U.rel_err(U.run(m8), base[2]) <= BOUND["fp8_e4m3fn"]


def test_format_detected_from_content_not_name(tmp_path, base):
    path = tmp_path / "looks_like.safetensors"   # a GGUF file with a misleading name
    deq = U.write_gguf(base[1], tmp_path / "x.gguf", Q.Q8_0)
    os.replace(tmp_path / "x.gguf", path)
    m = _check(path, deq, base)
    assert m.load_info["format"] == "gguf"


def test_diffusers_layout_keys(tmp_path, base):
    """A file with diffusers' WanTransformer3DModel names for the base blocks (SteadyDancer keys unchanged)."""
    from steadydancer_turbo.steadydancer.model.keymap import official_to_diffusers_key
    sd = {official_to_diffusers_key(k): v for k, v in base[1].items()}
    assert "blocks.0.attn1.to_q.weight" in sd
    path = U.write_safetensors(sd, tmp_path / "diffusers.safetensors", dtype=torch.bfloat16)
    deq = {k: v.to(torch.bfloat16).float() for k, v in base[1].items()}
    _check(path, deq, base, BOUND["bf16"])


def test_gguf_patch_embeds_stored_without_unit_dims(tmp_path, base):
    """Some converters drop the size-1 temporal kernel dim of the Conv3d weights (5-D -> 4-D): same data."""
    import numpy as np
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), arch="wan")
    for k, v in base[1].items():
        a = v.float().numpy()
        if a.ndim == 5:
            a = a.reshape([d for d in a.shape if d != 1] if a.shape[2] == 1 else a.shape)
        w.add_tensor(k, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m = _check(path, {k: v.float() for k, v in base[1].items()}, base, BOUND["fp32"])
    assert m.patch_embedding_fuse.weight.dim() == 5
