"""The Multi-GPU node and the samplers' multi-GPU route, outside ComfyUI (CPU, gloo pool of 2 ranks).

The sampler nodes run through a real WorkerPool (this process rank 0, one worker subprocess) and must give
the same latent as the same node without the Multi-GPU mark (1e-6 relative); the node's checks (GPU count,
heads, layouts) give errors that say what to choose."""
from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

import _dist_workers as W
import steadydancer_turbo as pack
from steadydancer_turbo.nodes import multigpu_nodes as mg
from steadydancer_turbo.nodes import sampler_nodes as sn
from steadydancer_turbo.nodes.model_nodes import LoadOptions, SteadyDancerModelHandle
from steadydancer_turbo.steadydancer.parallel import distributed as D
from steadydancer_turbo.steadydancer.parallel.pool import WorkerPool

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo pool")


@dataclasses.dataclass(frozen=True)
class _Handle(SteadyDancerModelHandle):
    """A handle whose model is the tiny test DiT (no file)."""

    def materialize(self, device=None):
        return _MODEL


_MODEL = W.tiny_model()


class _Bundle:
    def __init__(self, cond):
        self.cond = cond


def test_node_registered_and_checks_gpus(monkeypatch):
    assert pack.NODE_CLASS_MAPPINGS["SteadyDancerMultiGPU"] is mg.SteadyDancerMultiGPU
    h = SteadyDancerModelHandle("/x/model.safetensors", LoadOptions())
    node = mg.SteadyDancerMultiGPU()
    assert node.apply(h, 1, "sequence")[0].multi_gpu == ()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="4 GPUs requested, this machine shows 0 CUDA GPU"):
        node.apply(h, 4, "sequence")
    with pytest.raises(ValueError, match="do not divide the model's 40 attention heads; use 2, 4, 5, 8"):
        node.apply(h, 3, "sequence")
    with pytest.raises(ValueError, match="even GPU count"):
        node.apply(h, 3, "guidance x sequence")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    h8 = node.apply(h, 8, "guidance x sequence")[0]
    assert h8.multi_gpu == (8, "guidance x sequence") and h8.with_lora("/l.safetensors", 1.0).multi_gpu
    assert mg.layout_for(8, "guidance x sequence") == D.Layout(2, 4)
    assert mg.devices_for(4, torch.device("cuda", 2)) == ["cuda:2", "cuda:0", "cuda:1", "cuda:3"]
    r = mg.recipe_for(h.with_lora("/l.safetensors", 0.5))
    assert r["path"] == "/x/model.safetensors" and r["loras"] == [("/l.safetensors", 0.5)]
    assert r["load"]["compute_dtype"] == "bf16" and r["attention"] == "auto"


def test_sampler_nodes_run_on_the_pool_like_one_process(monkeypatch):
    cond = W.cond_for(_MODEL, W.LONG)
    opts = LoadOptions(attention="sdpa", offload_after=False)
    single = _Handle("/tiny", opts)
    multi = dataclasses.replace(single, multi_gpu=(2, "sequence"))
    pool = WorkerPool(["cpu", "cpu"], D.Layout(1, 2), ("_dist_workers", "tiny_factory", ()), threads=1)
    used = []

    def pool_for(handle, module, device):
        if not pool.alive:
            pool.start(module)
        used.append(handle.multi_gpu)
        return pool

    monkeypatch.setattr(mg, "pool_for", pool_for)
    try:
        official = dict(seed=3, steps=3, shift=5.0, text_guidance=5.0, pose_guidance=1.0, pose_guidance_start=0.1,
                        pose_guidance_end=0.4, solver="unipc")
        a = sn.SteadyDancerSampler().sample(single, _Bundle(cond), **official)[0]["samples"]
        b = sn.SteadyDancerSampler().sample(multi, _Bundle(cond), **official)[0]["samples"]
        turbo = dict(seed=4, steps=2, schedule="shift", shift=5.0, sigma_max=200.0, mode="sde")
        c = sn.SteadyDancerTurboSampler().sample(single, _Bundle(cond), **turbo)[0]["samples"]
        d = sn.SteadyDancerTurboSampler().sample(multi, _Bundle(cond), **turbo)[0]["samples"]
    finally:
        pool.shutdown()
    assert used == [(2, "sequence")] * 2
    for x, y in ((b, a), (d, c)):
        assert ((x - y).abs().max() / y.abs().max()).item() <= 1e-6
    assert _MODEL.sequence_parallel is None  # the cached module works unsharded again after a pool run
