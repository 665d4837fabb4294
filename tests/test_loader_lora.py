"""LoRA: every key layout, strength, stacking, merged (float weights) vs runtime-patched (fp8 / GGUF) equality,
unmatched-key warning and wrong-model errors.

The expected weights are computed here from the LoRA tensors with plain float64 math
(W + strength * alpha / rank * up @ down; W + strength * diff), independently of the loader.
"""
import warnings

import pytest
import torch
from safetensors.torch import save_file

import _loader_util as U
from steadydancer_turbo.steadydancer.checkpoints import CheckpointError
from steadydancer_turbo.steadydancer.weights.loader import apply_loras, load_steadydancer
from steadydancer_turbo.steadydancer.weights.lora import LoraKeyWarning
from steadydancer_turbo.steadydancer.weights.quant import QuantLinear

F32 = torch.float32
DIM = U.CFG["dim"]


def lora_tensors(seed=0, rank=4):
    """Deltas for a few targets, as {official param key: (kind, tensors, alpha)}."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.05  # noqa: E731
    return {
        "blocks.0.self_attn.q.weight": ("lowrank", (r(DIM, rank), r(rank, DIM)), 2.0),
        "blocks.1.ffn.0.weight": ("lowrank", (r(2 * DIM, rank), r(rank, DIM)), None),
        "blocks.2.cross_attn.k_img.weight": ("lowrank", (r(DIM, rank), r(rank, DIM)), 8.0),
        "blocks.1.cross_attn.o.bias": ("diff_b", (r(DIM),), None),
        "blocks.2.modulation": ("diff_m", (r(1, 6, DIM),), None),
        "blocks.0.cross_attn.norm_k_img.weight": ("diff", (r(DIM),), None),
        "head.head.weight": ("lowrank", (r(64, rank), r(rank, DIM)), 4.0),
    }


def write_lora(path, deltas, layout):
    """layout: 'kijai' (diffusion_model. + lora_down/up/alpha + diff/diff_b/diff_m), 'peft' (lora_A/B, no
    alpha), 'kohya' (lora_unet_ underscore paths), 'diffusers' (transformer. + diffusers Wan module names)."""
    from steadydancer_turbo.steadydancer.model.keymap import official_to_diffusers_key
    out = {}
    for key, (kind, ts, alpha) in deltas.items():
        module = key.rsplit(".", 1)[0]
        if kind == "lowrank":
            up, down = ts
            if layout == "kohya":
                base = "lora_unet_" + module.replace(".", "_")
            elif layout == "diffusers":
                base = "transformer." + official_to_diffusers_key(module + ".weight")[: -len(".weight")]
            else:
                base = "diffusion_model." + module
            if layout in ("peft", "diffusers"):
                out[base + ".lora_A.weight"], out[base + ".lora_B.weight"] = down, up
            else:
                out[base + ".lora_down.weight"], out[base + ".lora_up.weight"] = down, up
                if alpha is not None:
                    out[base + ".alpha"] = torch.tensor(alpha)
        else:
            if layout in ("peft", "diffusers") and kind == "diff_m":
                continue  # PEFT files carry no full deltas
            if kind == "diff_m":
                name = f"diffusion_model.{module}.diff_m" if module != "blocks.2" else "diffusion_model.blocks.2.diff_m"
            elif kind == "diff_b":
                name = f"diffusion_model.{module}.diff_b"
            else:
                name = f"diffusion_model.{module}.diff"
            if layout == "kohya":
                name = "lora_unet_" + module.replace(".", "_") + "." + name.rsplit(".", 1)[1]
            out[name] = ts[0]
    save_file({k: v.contiguous() for k, v in out.items()}, str(path))
    return path


def expected_state(sd, deltas, strength, layout):
    exp = {k: v.double().clone() for k, v in sd.items()}
    for key, (kind, ts, alpha) in deltas.items():
        tkey = key if kind != "diff_m" else "blocks.2.modulation"
        if kind == "lowrank":
            up, down = ts
            rank = down.shape[0]
            scale = (alpha if (alpha is not None and layout not in ("peft", "diffusers")) else rank) / rank
            exp[tkey] += strength * scale * (up.double() @ down.double())
        else:
            if layout in ("peft", "diffusers") and kind == "diff_m":
                continue
            exp[tkey] += strength * ts[0].double().reshape(exp[tkey].shape)
    return exp


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    ref = U.reference_model()
    sd = U.state_dict(ref)
    U.write_safetensors(sd, d / "base.safetensors")
    return d, sd


@pytest.mark.parametrize("layout", ["kijai", "peft", "kohya", "diffusers"])
def test_merged_lora_every_layout(setup, layout):
    d, sd = setup
    deltas = lora_tensors()
    path = write_lora(d / f"lora_{layout}.safetensors", deltas, layout)
    m = load_steadydancer(d / "base.safetensors", compute_dtype=F32, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key matches: no warning
        apply_loras(m, [(path, 0.7)])
    exp = expected_state(sd, deltas, 0.7, layout)
    got = m.state_dict()
    for k in exp:
        torch.testing.assert_close(got[k].double(), exp[k], rtol=0, atol=1e-6, msg=k)
    changed = sum(not torch.equal(got[k], sd[k]) for k in sd)
    assert changed == len(deltas) - (1 if layout in ("peft", "diffusers") else 0)


def test_stacked_loras_and_strength(setup):
    d, sd = setup
    d1, d2 = lora_tensors(1), lora_tensors(2)
    p1, p2 = write_lora(d / "a.safetensors", d1, "kijai"), write_lora(d / "b.safetensors", d2, "kohya")
    m = load_steadydancer(d / "base.safetensors", compute_dtype=F32, device="cpu")
    apply_loras(m, [(p1, 1.0), (p2, -0.5)])
    exp = expected_state(expected_state(sd, d1, 1.0, "kijai"), d2, -0.5, "kohya")
    got = m.state_dict()
    for k in exp:
        torch.testing.assert_close(got[k].double(), exp[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("fmt", ["fp8", "gguf"])
def test_runtime_patch_equals_merge(setup, fmt):
    """Same stored weights: patched at runtime on fp8/GGUF layers == merged into the dequantized weights."""
    d, sd = setup
    path = d / f"base_{fmt}.{fmt if fmt == 'gguf' else 'safetensors'}"
    if fmt == "fp8":
        U.write_fp8(sd, path, layout="kijai")
    else:
        import gguf
        U.write_gguf(sd, path, [gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q8_0])
    lora = write_lora(d / "l.safetensors", lora_tensors(3), "kijai")
    patched = load_steadydancer(path, compute_dtype=F32, device="cpu")
    merged = load_steadydancer(path, compute_dtype=F32, device="cpu", storage="dequantize")
    apply_loras(patched, [(lora, 0.8)])
    apply_loras(merged, [(lora, 0.8)])
    q = patched.blocks[0].self_attn.q
    assert isinstance(q, QuantLinear) and len(q._patches) == 1  # stored bytes untouched, patch kept aside
    assert not isinstance(merged.blocks[0].self_attn.q, QuantLinear)
    torch.testing.assert_close(q.dequantized_weight(F32), merged.blocks[0].self_attn.q.weight, rtol=0, atol=1e-6)
    inp = U.inputs()
    a, b = U.run(patched, inp), U.run(merged, inp)
    assert U.rel_err(a, b) <= 1e-5
    # and the LoRA changed the output at all
    assert U.rel_err(a, U.run(load_steadydancer(path, compute_dtype=F32, device="cpu"), inp)) > 1e-3


def test_unmatched_keys_one_warning(setup):
    d, sd = setup
    deltas = lora_tensors()
    p = d / "partly.safetensors"
    write_lora(p, deltas, "kijai")
    from safetensors.torch import load_file
    t = load_file(str(p))
    t["diffusion_model.blocks.7.self_attn.q.lora_down.weight"] = torch.zeros(4, DIM)
    t["diffusion_model.blocks.7.self_attn.q.lora_up.weight"] = torch.zeros(DIM, 4)
    t["diffusion_model.vace_blocks.0.diff_m"] = torch.zeros(1, 6, DIM)
    save_file(t, str(p))
    m = load_steadydancer(d / "base.safetensors", compute_dtype=F32, device="cpu")
    with pytest.warns(LoraKeyWarning) as rec:
        apply_loras(m, [(p, 1.0)])
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "3 LoRA keys" in msg and "blocks.7.self_attn.q.lora_down.weight" in msg and str(p) in msg


def test_lora_for_another_model_is_an_error_and_changes_nothing(setup):
    d, sd = setup
    m = load_steadydancer(d / "base.safetensors", compute_dtype=F32, device="cpu")
    good = write_lora(d / "good.safetensors", lora_tensors(), "kijai")
    sdxl = d / "sdxl_lora.safetensors"
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(320, 4),
               "lora_unet_input_blocks_4_1_proj_in.alpha": torch.tensor(4.0)}, str(sdxl))
    with pytest.raises(CheckpointError, match="matches no weight") as e:
        apply_loras(m, [(good, 1.0), (sdxl, 1.0)])
    assert str(sdxl) in str(e.value)
    # a Wan 1.3B LoRA: same key names, other width
    small = d / "wan13b_lora.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 1536),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(1536, 4)}, str(small))
    with pytest.raises(CheckpointError, match="does not fit") as e:
        apply_loras(m, [(small, 1.0)])
    assert str(small) in str(e.value)
    got = m.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in sd)  # the good LoRA before the bad one was not applied
