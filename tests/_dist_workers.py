"""Rank functions for tests/test_distributed.py (spawned processes import this module by name).

``conftest`` is imported first so that ``steadydancer_turbo`` resolves to this checkout in the spawned
interpreter too (the parent's sys.path, with tests/ on it, is passed to spawned children)."""
from __future__ import annotations

import copy
import os

import conftest  # noqa: F401  (registers this checkout as steadydancer_turbo)
import torch
import torch.distributed as dist

from _samplers_fakes import init_tiny_weights, make_cond
from steadydancer_turbo.steadydancer.parallel import launch as dist_launch
from steadydancer_turbo.steadydancer.parallel import distributed as D
from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
from steadydancer_turbo.steadydancer.kernels.backends import sparse_backend
from steadydancer_turbo.steadydancer.kernels.fp8_linear import convert_linears_to_fp8
from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT
from steadydancer_turbo.steadydancer.sampling.official import sample_official
from steadydancer_turbo.turbo.rcm import sample_rcm

# (frames, lat_h, lat_w): tokens L = (T + 2) * lat_h/2 * lat_w/2 with T = (frames - 1)//4 + 1
SHORT = (5, 4, 4)    # T = 2, L = 16: divides by 2 and 4
LONG = (17, 6, 2)    # T = 5, L = 21: a longer latent; divides by neither 2 nor 4 (padded on the last rank)


def tiny_model(seed: int = 0) -> SteadyDancerDiT:
    cfg = SteadyDancerConfig.tiny(dim=64, ffn_dim=96, num_heads=4, text_dim=32, freq_dim=32, clip_dim=48)
    return init_tiny_weights(SteadyDancerDiT(cfg), seed)


def cond_for(model, size):
    cfg = model.config
    frames, h, w = size
    return make_cond(frames=frames, lat_h=h, lat_w=w, text_dim=cfg.text_dim, clip_dim=cfg.clip_dim,
                     clip_tokens=cfg.clip_tokens, text_len=(6, 4))


def forward_inputs(model, size, batch=3, seed=7):
    """One batched forward's inputs (batch rows with different timesteps and contexts)."""
    cond = cond_for(model, size)
    g = torch.Generator().manual_seed(seed)
    kw = cond.batched_kwargs([("pos", "pos"), ("neg", "pos"), ("pos", "neg")][:batch])
    x = torch.randn((batch, *cond.latent_shape), generator=g)
    t = torch.tensor([999, 620, 300][:batch])
    return x, t, kw


def run_cases(model, model_call) -> dict:
    """Everything compared against one process: both samplers on both sizes (the official one with its guidance
    passes batched, and once unbatched), batched forwards with top-k sparse attention and with fp8 layers."""
    out = {}
    for name, size in (("short", SHORT), ("long", LONG)):
        cond = cond_for(model, size)
        out[f"official_{name}"] = sample_official(model_call, cond, seed=1, steps=3, batch_passes=True)
        out[f"rcm_{name}"] = sample_rcm(model_call, cond, seed=2, steps=2)
    out["official_short_unbatched"] = sample_official(model_call, cond_for(model, SHORT), seed=3, steps=2,
                                                      batch_passes=False)
    x, t, kw = forward_inputs(model, LONG)
    args = [kw[k] for k in ("context", "clip_fea", "clip_fea_c", "y", "cond", "ref_x", "ref_c")]
    # top-k sparse: 4-token blocks, keep half of the key blocks (L = 21: 6 blocks, the last one partial)
    backend = model.attention_backend
    model.attention_backend = sparse_backend(0.5, block_q=4, block_k=4)
    try:
        with torch.no_grad():
            out["forward_sparse"] = model_call(x, t, *args)
    finally:
        model.attention_backend = backend
    return out


def fp8_copy(model) -> SteadyDancerDiT:
    """An fp8 copy of the (not yet parallelized) model: every block Linear an FP8Linear (off-GPU they dequantize)."""
    m8 = copy.deepcopy(model)
    convert_linears_to_fp8(m8)
    return m8


def fp8_case(m8, call) -> torch.Tensor:
    """A batched forward of the fp8 model through ``call`` (m8 itself or its parallel wrapper)."""
    x, t, kw = forward_inputs(m8, SHORT)
    args = [kw[k] for k in ("context", "clip_fea", "clip_fea_c", "y", "cond", "ref_x", "ref_c")]
    with torch.no_grad():
        return call(x, t, *args)


def reference() -> dict:
    model = tiny_model()
    out = run_cases(model, model)
    m8 = fp8_copy(model)
    out["forward_fp8"] = fp8_case(m8, m8)
    return out


def worker(rank: int, world: int, port: int, layouts, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist_launch.init_rank(rank, world, port, backend="gloo", timeout_s=60)
    try:
        model = tiny_model()
        m8 = fp8_copy(model)
        results = {}
        for lay in layouts:
            ctx = D.init_parallel(D.Layout(*lay))
            res = run_cases(model, D.parallelize(model, ctx))
            res["forward_fp8"] = fp8_case(m8, D.parallelize(m8, ctx))
            results[f"{lay[0]}x{lay[1]}"] = res
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


class _DieAt:
    def __init__(self, model, call: int):
        self.model, self.calls, self.call = model, 0, call

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def __call__(self, *a):
        self.calls += 1
        if self.calls == self.call:
            os._exit(3)
        return self.model(*a)


def dying_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank 1 exits hard in its second forward, while rank 0 is inside the same forward's collectives."""
    torch.set_num_threads(1)
    with open(os.path.join(out_dir, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
    dist_launch.init_rank(rank, world, port, backend="gloo", timeout_s=60)
    model = tiny_model()
    ctx = D.init_parallel(D.Layout(1, world))
    call = D.parallelize(model, ctx)
    if rank == 1:
        call = _DieAt(call, 2)
    sample_official(call, cond_for(model, SHORT), seed=1, steps=3, batch_passes=True)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- pool
def rel(a, b) -> float:
    """Max-abs relative difference (the pool / serving tests' 1e-6 measure)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def gone(pids, wait: float = 10.0) -> bool:
    """Whether every process in ``pids`` has exited (waiting up to ``wait`` seconds)."""
    import time
    end = time.monotonic() + wait
    while True:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive or time.monotonic() > end:
            return not alive
        time.sleep(0.1)


def tiny_factory(device):
    """WorkerPool factory: the same tiny model on every rank."""
    return tiny_model().to(device)


def broken_factory(device):
    raise RuntimeError("cannot load the model here (test)")
