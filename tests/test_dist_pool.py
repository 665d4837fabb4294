"""The persistent multi-GPU worker pool in sampling mode (every rank runs the sampler; the serving mode that the
ComfyUI Multi-GPU node uses is tests/test_dist_serve.py), on CPU with gloo: this process is rank 0, one worker
subprocess is rank 1.
Checked against the unsharded model in this process: both samplers within 1e-6 relative; an interrupt in rank
0's callback stops both ranks and leaves the pool usable; a factory error and a killed worker give
WorkerPoolError naming the rank, and no worker process survives."""
from __future__ import annotations

import os
import signal
import sys

import pytest
import torch

import _dist_workers as W
from steadydancer_turbo.steadydancer.parallel import distributed as D
from steadydancer_turbo.steadydancer.parallel.pool import WorkerPool, WorkerPoolError
from steadydancer_turbo.steadydancer.sampling.official import sample_official
from steadydancer_turbo.turbo.rcm import sample_rcm

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo")

OFFICIAL, RCM = "steadydancer.sampling.official:sample_official", "turbo.rcm:sample_rcm"




def test_pool_samples_interrupts_and_reports_a_killed_worker():
    ref_model = W.tiny_model()
    cond = W.cond_for(ref_model, W.LONG)  # 21 tokens: padded on rank 1
    ref_off = sample_official(ref_model, cond, seed=4, steps=3, batch_passes=True)
    ref_rcm = sample_rcm(ref_model, cond, seed=5, steps=2)

    pool = WorkerPool(["cpu", "cpu"], D.Layout(1, 2), ("_dist_workers", "tiny_factory", ()), threads=1)
    pool.start(W.tiny_model())
    pids = pool.pids
    try:
        assert W.rel(pool.sample(OFFICIAL, cond, seed=4, steps=3), ref_off) <= 1e-6
        assert W.rel(pool.sample(RCM, cond, seed=5, steps=2), ref_rcm) <= 1e-6

        seen = []

        def interrupt(i, n, x0):
            seen.append(i)
            if i == 1:
                raise KeyboardInterrupt("user interrupt")

        with pytest.raises(KeyboardInterrupt):
            pool.sample(OFFICIAL, cond, callback=interrupt, seed=4, steps=3)
        assert seen == [0, 1] and pool.alive
        assert W.rel(pool.sample(RCM, cond, seed=5, steps=2), ref_rcm) <= 1e-6  # still usable

        def kill(i, n, x0):  # the worker dies mid-run, while rank 0 goes on into the next step's collectives
            if i == 0:
                os.kill(pids[0], signal.SIGKILL)

        with pytest.raises(WorkerPoolError, match=r"rank 1 on cpu died \(exit code -9\)"):
            pool.sample(OFFICIAL, cond, callback=kill, seed=4, steps=3)
        assert not pool.alive and not torch.distributed.is_initialized()
    finally:
        pool.shutdown()
    assert W.gone(pids)


def test_pool_start_reports_a_worker_load_error():
    pool = WorkerPool(["cpu", "cpu"], D.Layout(1, 2), ("_dist_workers", "broken_factory", ()), threads=1)
    with pytest.raises(WorkerPoolError, match=r"rank 1 on cpu failed: RuntimeError: cannot load the model here"):
        pool.start(W.tiny_model())
    assert pool.procs == [] and not torch.distributed.is_initialized()


def test_pool_rejects_missing_gpus_and_bad_layouts():
    with pytest.raises(WorkerPoolError, match="needs 4 devices"):
        WorkerPool(["cpu", "cpu"], D.Layout(2, 2), ("_dist_workers", "tiny_factory", ()))
    if not torch.cuda.is_available():
        pool = WorkerPool(["cuda:0", "cuda:7"], D.Layout(1, 2), ("_dist_workers", "tiny_factory", ()))
        with pytest.raises(WorkerPoolError, match="do not exist"):
            pool.start(W.tiny_model())
