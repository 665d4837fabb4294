"""The opt-in 8-bit top-k sparse self-attention backend ("int8_sparse", our Triton kernel in
steadydancer/kernels/int8_sparse.py).

The kernel itself runs in Triton's CPU interpreter (``TRITON_INTERPRET=1``) in a subprocess
(tests/_int8_interpreted.py prints its measurements as JSON), against float64 references written
independently of it (tests/_int8_ref.py and the pack's dense-mask ``sparse_attention_reference``). Those tests
need the ``triton`` package (in the pyproject ``test`` extra; a checkout without it skips them, saying so). The
registry / Model Loader tests below run without triton. The GPU form: tests/test_gpu_paths.py; speed and the
whole-model error: bench/attention_backends.py.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from steadydancer_turbo.steadydancer.kernels import backends
from steadydancer_turbo.steadydancer.kernels.attention import available_backends, get_backend
from steadydancer_turbo.steadydancer.weights import speed_options as accel

HAS_TRITON = importlib.util.find_spec("triton") is not None
WORKER = pathlib.Path(__file__).with_name("_int8_interpreted.py")


def _ref(q, k, v):
    s = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) / q.shape[-1] ** 0.5
    return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v.double())


# ------------------------------------------------------------------------------ the kernel, in the interpreter
def _triton_version() -> tuple:
    from importlib.metadata import version
    return tuple(int(p) for p in version("triton").split(".")[:2])


@pytest.fixture(scope="module")
def run():
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install triton, or the pack's test extra): the int8 kernel "
                    "tests run it in Triton's CPU interpreter")
    if _triton_version() < (3, 7):
        pytest.skip(f"triton {_triton_version()} < 3.7: its CPU interpreter cannot run these kernels")
    env = dict(os.environ, TRITON_INTERPRET="1")
    p = subprocess.run([sys.executable, str(WORKER)], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-6000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["interpreting"]
    return res


def test_quantizer_equals_the_float64_block_quantizer(run):
    """int8 values and per-block scales of Q (plain) and K (smoothed by its per-head mean) against float64:
    equal up to a rare off-by-one where a value sits on a rounding tie (the kernel's mean is fp32)."""
    for case in run["kernel"]:
        for name in ("quant_q", "quant_k"):
            qd = case[name]
            assert qd["max_int_diff"] <= 1 and qd["frac_diff"] < 1e-3, (case["shape"], name, qd)
            assert qd["scale_rel"] < 1e-5, (case["shape"], name, qd)


def test_kernel_equals_the_8bit_scheme_computed_in_float64(run):
    """Against float64 attention on the same kept blocks of the independently quantized-dequantized Q and K:
    what is left is P (and the bf16 output) rounded to bf16, the error dense bf16 SDPA has against float64
    (~0.2% here). Batch 2, 2-3 heads, a partial last block (queries and keys), block_q != block_k, D 128 and 64.
    A wrong key block, a missing mask of the tokens past the end or a wrong scale gives 10-100x more."""
    for case in run["kernel"]:
        assert case["finite"] and case["dtype"] == "bfloat16"
        err = case["vs_8bit_float64"]
        bf16_own = case["bf16_dense_vs_float64"]  # dense bf16 SDPA vs float64 on the same inputs
        assert err["rel_l2"] < 2 * bf16_own and err["max_abs"] < 0.02, (case["shape"], err, bf16_own)
        assert case["last_block_vs_8bit_float64"] < 2 * bf16_own, case
        assert case["blockwise_reference_vs_dense_mask_reference"] < 1e-12  # the two float64 references agree


def test_kernel_error_against_exact_sparse_attention_is_the_8bit_quantization(run):
    """Against exact float64 attention on the same kept blocks: ~1.8% relative L2 on these inputs, almost all of
    it the int8 rounding of Q and K (the same scheme in float64 is that far off)."""
    for case in run["kernel"]:
        err, scheme = case["vs_exact_sparse"]["rel_l2"], case["scheme_8bit_vs_exact_sparse"]
        assert err < 0.03, case
        assert abs(err - scheme) < 0.2 * scheme, (err, scheme)


def test_backend_selects_blocks_and_keeps_cross_attention_dense(run):
    b = run["backend"]
    assert b["name"] == "int8_sparse:0.7" and b["problem"] is None and b["dtype"] == "bfloat16"
    assert b["settings"] == dict(topk=0.7, block_q=128, block_k=128, force_diagonal=True, keep_tail_tokens=0,
                                 kernel="int8")
    assert b["rel_l2_vs_exact_sparse"] < 0.03  # the blocks of select_kv_blocks, as in the kernel tests
    assert b["cross_vs_dense_bf16"] == 0.0  # cross-attention (40 queries, 300 keys) is the dense bf16 kernel


def test_compiled_block_keeps_the_kernel_in_its_graph(run):
    """A DiT block with int8_sparse under dynamo: no graph break (the kernels are one custom op with a fake
    implementation), and the compiled block (aot_eager) gives the eager bytes."""
    c = run["compiled"]
    assert c["graph_breaks"] == 0 and c["graphs"] == 1, c["reasons"]
    assert c["compiled_equals_eager"] and c["finite"]


def test_tiny_dit_with_int8_sparse_is_close_to_flex_sparse_on_the_same_blocks(run):
    m = run["model"]
    assert m["finite"] and m["int8_vs_flex_same_blocks"] < 5e-3, m
    assert abs(m["int8_vs_dense"] - m["flex_vs_dense"]) < 5e-3, m


# ------------------------------------------------------------------------------ registry, names, Model Loader
def test_names_and_settings_have_one_source():
    name = accel.sparse(0.1, kernel="int8")
    assert name == "int8_sparse:0.1" == backends.sparse_backend(0.1, kernel="int8")
    s = backends.sparse_settings(name)
    assert s == dict(topk=0.1, block_q=128, block_k=128, force_diagonal=True, keep_tail_tokens=0, kernel="int8")
    assert backends.sparse_backend(**s) == name  # how steadydancer/parallel/replica.py registers it elsewhere
    flex = accel.sparse(0.1)
    assert flex == "flex_sparse:0.1" and backends.sparse_settings(flex)["kernel"] == "flex"
    assert accel.sparse(0.2, block_q=64, keep_tail_tokens=7, force_diagonal=False, kernel="int8") == \
        "int8_sparse:0.2:b64x128:tail7:nodiag"
    with pytest.raises(ValueError, match="unknown sparse attention kernel"):
        backends.sparse_backend(0.1, kernel="fp4")


def test_replica_spec_registers_the_int8_backend():
    from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
    from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT
    from steadydancer_turbo.steadydancer.parallel import replica

    m = SteadyDancerDiT(SteadyDancerConfig.tiny()).requires_grad_(False)
    m.attention_backend = accel.sparse(0.13, kernel="int8")  # as use_attention sets it, on a GPU
    spec = replica.describe(m)
    assert spec["sparse"]["kernel"] == "int8" and spec["sparse"]["topk"] == 0.13
    assert backends.sparse_backend(**spec["sparse"]) == "int8_sparse:0.13"


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="checks the off-GPU refusal")
def test_off_gpu_it_is_unavailable_and_says_why():
    name = accel.sparse(0.1, kernel="int8")
    assert name not in available_backends() and "int8_sparse" not in available_backends()
    with pytest.raises(RuntimeError, match="not available"):
        get_backend(name)
    msg = backends.int8_sparse_problem("cpu")
    assert "attention 'int8_sparse' needs" in msg and "flex_sparse" in msg
    assert ("needs an NVIDIA GPU" in msg) if HAS_TRITON else ("triton" in msg)
    g = torch.Generator().manual_seed(0)  # cross-attention never reaches the kernel: dense, here too
    q = torch.randn(1, 50, 2, 16, generator=g, dtype=torch.float64)
    kc, vc = (torch.randn(1, 7, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(backends._SPARSE_FNS[name](q, kc, vc), _ref(q, kc, vc))


def test_problem_messages(monkeypatch):
    import types

    monkeypatch.setattr(backends, "_INT8_STATE", {"problem": "ModuleNotFoundError: No module named 'triton'"})
    msg = backends.int8_sparse_problem("cuda")
    assert "needs the triton package" in msg and "No module named 'triton'" in msg and "flex_sparse" in msg
    fake = types.SimpleNamespace(interpreting=lambda: False)
    monkeypatch.setattr(backends, "_INT8_STATE", {"problem": None, "module": fake})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    assert "compute capability 8.9 or newer" in backends.int8_sparse_problem("cuda") and "sm86" in \
        backends.int8_sparse_problem("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert backends.int8_sparse_problem("cuda") is None
    assert "needs an NVIDIA GPU" in backends.int8_sparse_problem("cpu")
    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):  # a direct call with CPU tensors
        backends._int8_sparse(q, q, q, dict(topk=0.5, block_q=128, block_k=128, force_diagonal=True,
                                            keep_tail_tokens=0))


def test_model_loader_offers_int8_sparse_and_refuses_it_clearly(monkeypatch, tmp_path):
    """Listed always, opt-in (never the default); the topk widget drives it like flex_sparse; off an sm_89+ GPU
    the loader fails before reading the file with what is missing."""
    from steadydancer_turbo.nodes import model_nodes as mn

    req = mn.SteadyDancerModelLoader.INPUT_TYPES()["required"]
    assert "int8_sparse" in req["attention"][0] and req["attention"][1]["default"] == "auto"
    o = mn.LoadOptions(attention="int8_sparse", sparse_topk=0.12)
    assert o.attention_backend() == "int8_sparse:0.12" and mn.compiles(o)
    assert mn.LoadOptions(attention="flex_sparse", sparse_topk=0.12).attention_backend() == "flex_sparse:0.12"
    if backends.int8_sparse_problem("cpu") is None:
        pytest.skip("int8_sparse can run here (interpreter)")
    from _loader_util import offline_model_loader

    node, f, read = offline_model_loader(monkeypatch, tmp_path)
    with pytest.raises(RuntimeError, match=r"m\.safetensors: attention 'int8_sparse' needs .*choose flex_sparse"):
        node.load(str(f), "auto", "bf16", "int8_sparse", 0.15, False, False)
    assert not read
