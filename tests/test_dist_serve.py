"""The multi-GPU pool in serving mode (what the ComfyUI Multi-GPU node drives), on CPU with gloo: this process is
rank 0 and runs the sampler; one worker subprocess (rank 1) holds a replica built from rank 0's tensors by
broadcast (steadydancer/parallel/replica.py; it never sees a file) and joins every DiT forward.

Checked against the single-process samplers on rank 0's own model (no pool): the official sampler (guidance
passes batched) and rCM within 1e-6 relative, on a token count that the 2 ranks must pad; after a LoRA-style
patch of float weights and after a strength change (a re-broadcast each time, the file is not read again); a
GGUF model whose layers stay packed on the worker, with a host per-call patch on some layers (those travel
resolved: the float weight their forward computes). A worker killed mid-run gives a WorkerPoolError naming the
rank and leaves no process; shutdown leaves none either; workers of a rank 0 that is killed (no shutdown) exit by
themselves."""
from __future__ import annotations

import os
import signal
import sys

import pytest
import torch

import _dist_workers as W
import _loader_util as LU
from steadydancer_turbo.steadydancer.parallel import distributed as D
from steadydancer_turbo.steadydancer.parallel import replica
from steadydancer_turbo.steadydancer.parallel.pool import WorkerPool, WorkerPoolError
from steadydancer_turbo.steadydancer.sampling.official import sample_official
from steadydancer_turbo.turbo.rcm import sample_rcm

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32",
                                reason="needs torch.distributed with gloo")




class Host:
    """Rank 0's side as a host application does it: describe its model, send the tensors when they change,
    run each sampling on a replica bound to its own tensors."""

    def __init__(self, pool):
        self.pool, self.key, self.spec, self.r0 = pool, None, None, None

    def served(self, model, key, resolved=(), override=None):
        spec = replica.describe(model, resolved)
        tensors = replica.values(model, spec, override)
        if key != self.key:
            self.pool.load_weights(spec, tensors)
            self.key = key
        if self.spec is None or replica.fingerprint(spec) != replica.fingerprint(self.spec):
            self.r0, self.spec = replica.build(spec, "cpu", allocate=False), spec
        replica.bind(self.r0, spec, tensors, "cpu")
        return self.pool.served(self.r0)


def _lora(model, strength, seed=3):
    """ComfyUI-style patches on two block Linears: W + strength * up @ down (float32), as a host's override."""
    g = torch.Generator().manual_seed(seed)
    patched = {}
    for name in ("blocks.0.self_attn.q.weight", "blocks.1.ffn.0.weight"):
        w = model.get_parameter(name)
        up, down = torch.randn(w.shape[0], 2, generator=g) * 0.05, torch.randn(2, w.shape[1], generator=g) * 0.05
        patched[name] = (w.float() + strength * (up @ down)).to(w.dtype)
    return patched


def _merged(patched, seed=0):
    m = W.tiny_model(seed)
    with torch.no_grad():
        for k, v in patched.items():
            m.get_parameter(k).copy_(v)
    return m


def test_serving_pool_matches_one_process_with_patches_and_reports_a_killed_worker(tmp_path):
    model = W.tiny_model()
    cond = W.cond_for(model, W.LONG)  # 21 tokens: padded on rank 1
    ref_off = sample_official(model, cond, seed=4, steps=3, batch_passes=True)
    ref_rcm = sample_rcm(model, cond, seed=5, steps=2)

    pool = WorkerPool(["cpu", "cpu"], D.Layout(1, 2), None, threads=1)
    pool.start(None)
    pids = pool.pids
    host = Host(pool)
    try:
        served = host.served(model, "base")
        assert W.rel(sample_official(served, cond, seed=4, steps=3, batch_passes=True), ref_off) <= 1e-6
        assert W.rel(sample_rcm(served, cond, seed=5, steps=2), ref_rcm) <= 1e-6
        assert pool.weights_sent == 1

        # a LoRA on rank 0 (not merged into its module: the host overrides two tensors), then a strength change
        for n, strength in enumerate((1.0, 0.4), start=2):
            patched = _lora(model, strength)
            ref = sample_rcm(_merged(patched), cond, seed=5, steps=2)
            served = host.served(model, f"lora {strength}", override=lambda k, t: patched.get(k, t))
            assert pool.weights_sent == n
            assert W.rel(sample_rcm(served, cond, seed=5, steps=2), ref) <= 1e-6
            assert W.rel(ref, ref_rcm) > 1e-4  # the patch changes the output: the check above can fail

        # GGUF: block Linears stay packed Q8_0 on the worker; two carry a host per-call patch (travel resolved)
        import gguf
        src = LU.reference_model()
        path = LU.write_gguf(LU.state_dict(src), tmp_path / "tiny.gguf", gguf.GGMLQuantizationType.Q8_0) and \
            tmp_path / "tiny.gguf"
        from steadydancer_turbo.steadydancer.weights.loader import load_steadydancer
        mq = load_steadydancer(path, compute_dtype=torch.float32, device="cpu")
        patched_layers = ["blocks.0.self_attn.o", "blocks.2.ffn.2"]
        for i, name in enumerate(patched_layers):
            lay = mq.get_submodule(name)
            delta = torch.randn(lay.weight_shape, generator=torch.Generator().manual_seed(i)) * 0.01
            lay.weight_patch_fn = lambda w, d=delta: w + 0.7 * d
        qcond = W.cond_for(mq, W.SHORT)
        ref_q = sample_rcm(mq, qcond, seed=6, steps=2)
        spec = replica.describe(mq, patched_layers)
        assert spec["quant"]["blocks.1.self_attn.q"]["kind"] == "QuantLinear"   # stored form travels
        assert spec["quant"]["blocks.0.self_attn.o"]["kind"] == "ResolvedLinear"
        assert "path" not in repr({k: v for k, v in spec.items() if k != "tensors"})
        served = host.served(mq, "gguf", resolved=patched_layers)
        assert W.rel(sample_rcm(served, qcond, seed=6, steps=2), ref_q) <= 1e-6

        # a worker killed while rank 0 is in the sampler
        served = host.served(model, "base again")
        calls = []

        def dying(*a):
            calls.append(1)
            if len(calls) == 2:
                os.kill(pids[0], signal.SIGKILL)
            return served(*a)

        dying.config, dying.compute_dtype = served.config, served.compute_dtype
        with pytest.raises(WorkerPoolError, match=r"rank 1 on cpu died \(exit code -9\)"):
            sample_official(dying, cond, seed=4, steps=3, batch_passes=True)
        assert not pool.alive and not torch.distributed.is_initialized()
    finally:
        pool.shutdown()
    assert W.gone(pids)


def test_serving_pool_shutdown_and_bad_spec():
    pool = WorkerPool(["cpu", "cpu"], D.Layout(1, 2), None, threads=1)
    pool.start(None)
    pids = pool.pids
    try:
        model = W.tiny_model()
        with pytest.raises(D.DistributedSetupError, match="only those can be resolved"):
            replica.describe(model, ["blocks.0.self_attn.q"])
        spec = replica.describe(model)
        tensors = replica.values(model, spec)
        pool.load_weights(spec, tensors)
        r0 = replica.build(spec, "cpu", allocate=False)
        replica.bind(r0, spec, tensors, "cpu")
        x, t, kw = W.forward_inputs(model, W.SHORT, batch=2)
        args = [kw[k] for k in ("context", "clip_fea", "clip_fea_c", "y", "cond", "ref_x", "ref_c")]
        with torch.no_grad():
            ref = model(x, t, *args)
        assert W.rel(pool.served(r0)(x, t, *args), ref) <= 1e-6
        replica.release(r0, spec)
        assert all(p.is_meta for p in r0.parameters())
    finally:
        pool.shutdown()
    assert pool.procs == [] and not torch.distributed.is_initialized()
    assert W.gone(pids)


def test_workers_exit_when_rank_0_dies(tmp_path):
    """ComfyUI killed (no atexit, no shutdown): its idle workers notice the closed socket and exit."""
    import subprocess
    import textwrap
    script = tmp_path / "rank0.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = {[p for p in sys.path if p]!r}
        import _dist_workers  # noqa: F401  (registers this checkout as steadydancer_turbo)
        from steadydancer_turbo.steadydancer.parallel import distributed as D
        from steadydancer_turbo.steadydancer.parallel.pool import WorkerPool
        pool = WorkerPool(["cpu", "cpu", "cpu"], D.Layout(1, 3), None, threads=1)
        pool.start(None)
        print("PIDS", *pool.pids, flush=True)
        time.sleep(600)
    """))
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("PIDS"), line
        pids = [int(v) for v in line.split()[1:]]
        assert len(pids) == 2 and not W.gone(pids, wait=0)
    finally:
        p.kill()
        p.wait()
    assert W.gone(pids, wait=20)
