"""Changing / removing LoRAs on a loaded model without re-reading the base file.

fp8 / GGUF layers carry LoRAs as runtime patches (dropped and re-added); merged float weights (biases, norms,
modulations, non-block layers, or a whole float model) are restored from copies kept at the first merge. The
references are fresh loads of the same file with the new recipe (a new process-cache entry), compared
bit-for-bit; reads of the base file are counted at the loader entry point the node cache calls.
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

mn = importlib.import_module("steadydancer_turbo.nodes.model_nodes")
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


@pytest.fixture
def loads(monkeypatch):
    """Counts reads of a base checkpoint (the node cache's only way to build a model)."""
    calls = []
    orig = loader.load_steadydancer
    monkeypatch.setattr(loader, "load_steadydancer", lambda path, **k: calls.append(path) or orig(path, **k))
    mn._CACHE.clear()
    yield calls
    mn._CACHE.clear()


def handle(path, loras=()):
    h = mn.SteadyDancerModelHandle(path, mn.LoadOptions(compute_dtype="fp32", attention="sdpa",
                                                        offload_after=False))
    for p, s in loras:
        h = h.with_lora(p, s)
    return h


def out(module):
    return U.run(module, U.inputs())


def fresh(path, loras):
    """Output of a fresh load with this recipe (the cache emptied first)."""
    mn._CACHE.clear()
    return out(handle(path, loras).materialize())


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fmt", ["fp8", "gguf"])
def test_quantized_strength_change_and_removal_without_reload(files, loads, fmt):
    fp8, a, b = files[fmt], files["a"], files["b"]
    ref_base = fresh(fp8, ())
    ref_a05 = fresh(fp8, [(a, 0.5)])
    ref_ab = fresh(fp8, [(a, -0.8), (b, 1.3)])
    ref_b = fresh(fp8, [(b, 1.3)])
    assert U.rel_err(ref_a05, ref_base) > 1e-3 and U.rel_err(ref_ab, ref_a05) > 1e-3  # the LoRAs matter
    mn._CACHE.clear()
    n = len(loads)

    m = handle(fp8, [(a, 1.0)]).materialize()
    q = m.blocks[0].self_attn.q
    assert isinstance(q, QuantLinear) and len(q._patches) == 1
    base_head = m.head.head.weight  # float in this file: merged
    assert torch.equal(out(handle(fp8, [(a, 0.5)]).materialize()), ref_a05)  # strength changed
    assert len(q._patches) == 1  # old patch dropped, not stacked
    assert torch.equal(out(handle(fp8, [(a, -0.8), (b, 1.3)]).materialize()), ref_ab)  # strength + appended
    assert torch.equal(out(handle(fp8, [(b, 1.3)]).materialize()), ref_b)  # first one removed
    base_state_now = handle(fp8, ()).materialize()
    assert torch.equal(out(base_state_now), ref_base)  # all removed: base output exactly
    assert all(not mod._patches for mod in m.modules() if isinstance(mod, _Patched))
    assert m.head.head.weight is base_head and mn._CACHE.module is m
    assert len(loads) == n + 1  # one read of the base file for all five recipes


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


def test_float_model(files, loads, monkeypatch):
    """A float model merges LoRAs; a change is undone from the kept originals when they fit the RAM limit,
    otherwise the file is read again. Both give the fresh-load result exactly."""
    f32, a, b = files["f32"], files["a"], files["b"]
    ref_a = fresh(f32, [(a, 0.7)])
    ref_b = fresh(f32, [(b, -1.1)])
    mn._CACHE.clear()
    n = len(loads)
    handle(f32, [(b, 1.0)]).materialize()
    assert torch.equal(out(handle(f32, [(a, 0.7)]).materialize()), ref_a)
    assert len(loads) == n + 1  # the merged weights (a few small tensors here) were restored
    monkeypatch.setattr(mn, "LORA_UNDO_RAM_BYTES", 0)  # as a bf16 14B model with a full-size LoRA
    mn._CACHE.clear()
    handle(f32, [(a, 0.7)]).materialize()
    assert len(loads) == n + 2
    assert torch.equal(out(handle(f32, [(b, -1.1)]).materialize()), ref_b)
    assert len(loads) == n + 3  # merged without copies: the change needs a fresh load


def test_bad_lora_leaves_a_clean_model(files, loads):
    fp8, a, bad = files["fp8"], files["a"], files["bad"]
    ref_base = fresh(fp8, ())
    ref_a07 = fresh(fp8, [(a, 0.7)])
    mn._CACHE.clear()
    n = len(loads)
    handle(fp8, [(a, 1.0)]).materialize()
    with pytest.raises(CheckpointError, match="does not fit"):
        handle(fp8, [(a, 0.5), (bad, 1.0)]).materialize()
    assert mn._CACHE.module is not None and mn._CACHE.loras == ()  # old recipe removed, new one not half-applied
    assert torch.equal(out(mn._CACHE.module), ref_base)
    assert torch.equal(out(handle(fp8, [(a, 0.7)]).materialize()), ref_a07)
    # appending a bad file: refused before anything changes, the recipe stays
    with pytest.raises(CheckpointError):
        handle(fp8, [(a, 0.7), (bad, 1.0)]).materialize()
    assert mn._CACHE.loras == ((a, 0.7),) and torch.equal(out(mn._CACHE.module), ref_a07)
    # a bad LoRA right after a fresh load keeps the loaded base model
    mn._CACHE.clear()
    with pytest.raises(CheckpointError):
        handle(fp8, [(bad, 1.0)]).materialize()
    assert torch.equal(out(handle(fp8, [(a, 0.7)]).materialize()), ref_a07)
    assert len(loads) == n + 2


def test_failure_while_applying_rolls_back(files, loads, monkeypatch):
    """An error after the first patch went in (e.g. out of memory) removes the partial recipe."""
    fp8, a, b = files["fp8"], files["a"], files["b"]
    ref_base = fresh(fp8, ())
    ref_b = fresh(fp8, [(b, 0.6)])
    mn._CACHE.clear()
    n = len(loads)
    handle(fp8, [(b, 0.6)]).materialize()
    orig, count = _Patched.add_patch, [0]

    def flaky(self, *args):
        count[0] += 1
        if count[0] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return orig(self, *args)

    monkeypatch.setattr(_Patched, "add_patch", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        handle(fp8, [(b, 0.6), (a, 1.0)]).materialize()  # append path, fails half-way
    assert mn._CACHE.loras == () and torch.equal(out(mn._CACHE.module), ref_base)
    monkeypatch.setattr(_Patched, "add_patch", orig)
    assert torch.equal(out(handle(fp8, [(b, 0.6)]).materialize()), ref_b)
    assert len(loads) == n + 1
