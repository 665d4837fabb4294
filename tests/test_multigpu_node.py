"""The Multi-GPU node layer without ComfyUI: device choice and layout checks (clear errors), the "Unload models"
detection, and nodes/native_multigpu.MultiGPU driven the way ComfyUI's SAMPLER_SAMPLE wrapper drives it, with a
stand-in ModelPatcher (patches / backup / patches_uuid / patch_weight_to_device as ComfyUI 0.33 has them) and one
CPU worker rank (gloo): the served forward equals the one-process sampler, a new patches_uuid re-sends the
weights (a patched weight that ComfyUI did not merge in place reaches the worker through the patcher's own
``patch_weight_to_device``), the same uuid does not, rank 0's replica lets go of the tensors after the run, and a
freed MultiGPU stops its worker. The real-ComfyUI run is tests/integration/test_comfyui_multigpu.py."""
from __future__ import annotations

import gc
import sys
import types

import pytest
import torch

import _dist_workers as W
from steadydancer_turbo.nodes import comfy_bridge as cb
from steadydancer_turbo.nodes import multigpu_nodes as mg
from steadydancer_turbo.nodes import native_multigpu as nmg
from steadydancer_turbo.nodes.native_model import MULTIGPU_RUN_KEY
from steadydancer_turbo.steadydancer.parallel import distributed as D
from steadydancer_turbo.turbo.rcm import sample_rcm



def test_devices_rank0_is_comfyuis_gpu_then_the_others():
    assert nmg.choose_devices(torch.device("cuda", 1), 3, 4) == ["cuda:1", "cuda:0", "cuda:2"]
    assert nmg.choose_devices("cuda", 2, 2) == ["cuda:0", "cuda:1"]
    with pytest.raises(nmg.MultiGPUError, match="4 GPUs asked for, this machine shows 2"):
        nmg.choose_devices("cuda:0", 4, 2)
    with pytest.raises(nmg.MultiGPUError, match="needs NVIDIA GPUs; ComfyUI runs this model on the CPU"):
        nmg.choose_devices("cpu", 2, 0)
    assert nmg.choose_devices("cpu", 2, 0, cpu_test=True) == ["cpu", "cpu"]
    with pytest.raises(nmg.MultiGPUError, match="CUDA GPUs"):
        nmg.choose_devices("mps", 2, 0)


def test_layouts_and_head_counts():
    assert nmg.parse_layout("sequence", 8, 40) == D.Layout(1, 8)
    assert nmg.parse_layout("2 x sequence", 8, 40) == D.Layout(2, 4)
    assert nmg.parse_layout("3 x sequence", 6, 40) == D.Layout(3, 2)
    with pytest.raises(nmg.MultiGPUError, match="divisible by 2, got 3"):
        nmg.parse_layout("2 x sequence", 3, 40)
    with pytest.raises(nmg.MultiGPUError, match=r"3 GPUs per sequence group do not divide the model's 40 attention "
                                                r"heads; with layout 'sequence' use 2, 4, 5, 8, 10 GPUs"):
        nmg.parse_layout("sequence", 3, 40)
    with pytest.raises(nmg.MultiGPUError, match="this model cannot split its heads: use layout '2 x sequence'"):
        nmg.parse_layout("sequence", 2, 1)
    assert nmg.parse_layout("2 x sequence", 2, 1) == D.Layout(2, 1)
    assert [c for c in mg.LAYOUTS] == ["sequence", "2 x sequence", "3 x sequence"]


def test_unload_all_models_is_told_apart_from_an_eviction():
    code = compile("def unload_all_models(f):\n    return f()\n", "/x/comfy/model_management.py", "exec")
    ns = {}
    exec(code, ns)
    assert ns["unload_all_models"](nmg._in_unload_all) is True
    assert nmg._in_unload_all() is False
    other = {}
    exec(compile("def unload_all_models(f):\n    return f()\n", "/x/mypack/util.py", "exec"), other)
    assert other["unload_all_models"](nmg._in_unload_all) is False


def test_node_errors_without_comfyui_and_on_other_models():
    node = mg.SteadyDancerMultiGPU()
    with pytest.raises(ValueError, match="connect a SteadyDancer Model Loader output"):
        node.apply(types.SimpleNamespace(model=object()), 2, "sequence")
    sd = types.SimpleNamespace(model=types.SimpleNamespace(is_steadydancer=True))
    with pytest.raises(ValueError, match="layout must be one of"):
        node.apply(sd, 2, "4x")
    with pytest.raises(cb.ComfyUnavailable, match="Multi-GPU node needs ComfyUI"):
        node.apply(sd, 2, "sequence")


class FakeBaseModel:
    """ComfyUI's BaseModel, as far as MultiGPU reads it (clones of one MODEL share this object)."""

    def __init__(self, dit):
        self.diffusion_model = dit


class FakePatcher:
    """What MultiGPU reads of a ComfyUI ModelPatcher."""

    def __init__(self, base, patches=None, backup=(), uuid="u0"):
        self.model = base
        self.patches, self.backup, self.patches_uuid = dict(patches or {}), set(backup), uuid
        self.patched_on = []

    def patch_weight_to_device(self, key, device_to=None, return_weight=False):
        assert return_weight
        self.patched_on.append(key)
        w = self.model.diffusion_model.get_parameter(key[len("diffusion_model."):])
        return w + self.patches[key]


def _sample(state, patcher, cond):
    """A ComfyUI sampler run: SAMPLER_SAMPLE wrapper -> sampler -> DiT calls through transformer_options."""
    def executor(guider, sigmas, extra_args, *a):
        run = extra_args["model_options"]["transformer_options"][MULTIGPU_RUN_KEY]
        return sample_rcm(run, cond, seed=5, steps=2)

    extra = {"model_options": {"transformer_options": {}}}
    out = state.sampler_sample(executor, types.SimpleNamespace(model_patcher=patcher), None, extra)
    assert MULTIGPU_RUN_KEY not in extra["model_options"]["transformer_options"]
    return out


@pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32", reason="needs gloo")
def test_multigpu_state_serves_the_sampler_and_resends_on_new_patches():
    dit = W.tiny_model()
    cond = W.cond_for(dit, W.LONG)
    ref = sample_rcm(dit, cond, seed=5, steps=2)
    key = "diffusion_model.blocks.1.self_attn.k.weight"
    delta = torch.randn(dit.get_parameter(key[16:]).shape, generator=torch.Generator().manual_seed(2)) * 0.05
    patched = W.tiny_model()
    with torch.no_grad():
        patched.get_parameter(key[16:]).add_(delta)
    ref_patched = sample_rcm(patched, cond, seed=5, steps=2)
    assert W.rel(ref_patched, ref) > 1e-4

    state = nmg.MultiGPU(["cpu", "cpu"], D.Layout(1, 2), threads=1)
    state.start()
    pool = state.pool
    pids = pool.pids
    base, merged_base = FakeBaseModel(dit), FakeBaseModel(patched)
    try:
        assert W.rel(_sample(state, FakePatcher(base), cond), ref) <= 1e-6
        assert pool.weights_sent == 1 and all(p.is_meta for p in state.r0.parameters())
        assert W.rel(_sample(state, FakePatcher(base), cond), ref) <= 1e-6  # a clone of the same MODEL
        assert pool.weights_sent == 1  # same base model, same patches_uuid: nothing re-sent
        lora = FakePatcher(base, {key: delta}, uuid="u1")  # a patch ComfyUI did not merge (partial load)
        assert W.rel(_sample(state, lora, cond), ref_patched) <= 1e-6
        assert pool.weights_sent == 2 and lora.patched_on == [key]
        merged = FakePatcher(merged_base, {key: delta}, backup={key}, uuid="u2")  # merged in place: sent as is
        assert W.rel(_sample(state, merged, cond), ref_patched) <= 1e-6
        assert pool.weights_sent == 3 and merged.patched_on == []
        assert W.rel(_sample(state, FakePatcher(FakeBaseModel(dit), uuid="u2"), cond), ref) <= 1e-6
        assert pool.weights_sent == 4  # another base model with the same uuid: sent again
        hooked = FakePatcher(base, uuid="u3")
        hooked.hook_patches = {"hook": {}}  # ComfyUI weight hooks: refused, not silently ignored
        with pytest.raises(nmg.MultiGPUError, match="weight hooks"):
            _sample(state, hooked, cond)
        assert pool.alive
    finally:
        state.shutdown()
    assert state.pool is None and not torch.distributed.is_initialized()
    assert W.gone(pids)

    # a MultiGPU that nothing holds any more (ComfyUI freed the MODEL) stops its worker
    state = nmg.MultiGPU(["cpu", "cpu"], D.Layout(1, 2), threads=1)
    state.start()
    pids = state.pool.pids
    del state
    gc.collect()
    assert W.gone(pids)
    assert not torch.distributed.is_initialized()
