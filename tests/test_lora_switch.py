"""Core API: removing LoRAs from a loaded model (``lora.remove_loras``) without re-reading the base file.

fp8 / GGUF layers carry LoRAs as runtime patches (dropped and re-added); merged float weights (biases, norms,
modulations, non-block layers) are restored from copies kept at the first merge. Inside ComfyUI the nodes do not
use this: LoRAs are ComfyUI patches on a clone of the MODEL (tests/integration/test_comfyui_native.py checks that a
strength change reads nothing and equals this path).
"""
import importlib

import pytest
import torch
from safetensors.torch import save_file

import _loader_util as U
from test_loader_lora import lora_tensors, write_lora
from steadydancer_turbo.steadydancer.weights import loader, lora
from steadydancer_turbo.steadydancer.checkpoints import CheckpointError
from steadydancer_turbo.steadydancer.weights.quant import QuantLinear, _Patched

F32 = torch.float32
DIM = U.CFG["dim"]


def block_only_deltas(seed):
    """Low-rank deltas on fp8-stored block Linears only (no float target at all)."""
    return {k: v for k, v in lora_tensors(seed).items() if k.startswith("blocks.") and v[0] == "lowrank"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_switch")
    sd = U.state_dict(U.reference_model())
    U.write_fp8(sd, d / "fp8.safetensors", layout="kijai")
    import gguf
    U.write_gguf(sd, d / "q.gguf", [gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q8_0])
    U.write_safetensors(sd, d / "f32.safetensors")
    # lora_tensors: block Linears (fp8 -> runtime patch) + bias / modulation / norm diffs and head.head
    # (float in an fp8 file -> merged)
    a = write_lora(d / "a.safetensors", lora_tensors(1), "kijai")
    b = write_lora(d / "b.safetensors", lora_tensors(2), "kohya")
    blocks = write_lora(d / "blocks.safetensors", block_only_deltas(3), "kijai")
    bad = d / "other_model.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 1536),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(1536, 4)}, str(bad))
    return dict(d=d, fp8=str(d / "fp8.safetensors"), gguf=str(d / "q.gguf"), f32=str(d / "f32.safetensors"), a=str(a), b=str(b),
                blocks=str(blocks), bad=str(bad))


def out(module):
    return U.run(module, U.inputs())


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_removed_lora_restores_every_weight_bit_for_bit(files):
    """Core API: remove_loras restores the state dict exactly; a re-apply equals a fresh load + apply."""
    m = loader.load_steadydancer(files["fp8"], compute_dtype=F32, device="cpu")
    base = state(m)
    loader.apply_loras(m, [(files["a"], 0.9), (files["b"], -0.4)], undo_limit_bytes=1 << 30)
    assert not torch.equal(m.head.head.weight, base["head.head.weight"])
    assert not torch.equal(m.blocks[2].modulation, base["blocks.2.modulation"])
    assert lora.can_remove_loras(m)
    lora.remove_loras(m)
    assert_same_state(state(m), base)
    loader.apply_loras(m, [(files["b"], 0.3)], undo_limit_bytes=1 << 30)
    other = loader.load_steadydancer(files["fp8"], compute_dtype=F32, device="cpu")
    loader.apply_loras(other, [(files["b"], 0.3)])
    assert_same_state(state(m), state(other))
    assert torch.equal(out(m), out(other))


def test_undo_limit(files):
    """Past the RAM limit for copies of merged float weights nothing can be undone (and nothing is kept);
    runtime patches alone need no copy."""
    m = loader.load_steadydancer(files["fp8"], compute_dtype=F32, device="cpu")
    loader.apply_loras(m, [(files["blocks"], 1.0)])  # fp8 block Linears only: patches
    assert lora.can_remove_loras(m) and not m._sd_lora_undo["originals"]
    loader.apply_loras(m, [(files["a"], 1.0)], undo_limit_bytes=1000)  # head + biases... > 1000 bytes
    assert not lora.can_remove_loras(m) and not m._sd_lora_undo["originals"]
    before = state(m)
    with pytest.raises(RuntimeError, match="reload"):
        lora.remove_loras(m)
    assert_same_state(state(m), before)


