"""The opt-in SageAttention 2 backend ("sage"), on CPU with a stand-in ``sageattention`` module in sys.modules.

The stand-in checks what thu-ml/SageAttention's ``sageattn(q, k, v, tensor_layout="HND", is_causal=False,
sm_scale=None, return_lse=False)`` requires (its docstring and asserts: "NHD" = [batch, len, heads, head_dim],
fp16/bf16 only, q/k/v of one dtype, a contiguous last dimension, head_dim <= 128) and returns float64
attention computed here, so the routing of its result (layout, dtype back to the caller's) is checked against
an independent reference. Its error on a GPU: bench/attention_backends.py.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from steadydancer_turbo.steadydancer.kernels import backends
from steadydancer_turbo.steadydancer.kernels.attention import attention, available_backends, get_backend
from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT
from steadydancer_turbo.steadydancer.weights import speed_options as accel


def _ref(q, k, v):
    s = torch.einsum("blhd,bmhd->bhlm", q.double(), k.double()) / q.shape[-1] ** 0.5
    return torch.einsum("bhlm,bmhd->blhd", s.softmax(-1), v.double())


class FakeSage:
    """sys.modules["sageattention"]: records each call and checks its arguments as the real sageattn needs them."""

    def __init__(self):
        self.calls = []
        self.module = types.ModuleType("sageattention")
        self.module.sageattn = self.sageattn

    def sageattn(self, q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kw):
        assert tensor_layout == "NHD" and is_causal is False and sm_scale is None and not return_lse and not kw
        assert q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
        assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
        assert q.shape[-1] <= 128 and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2]
        self.calls.append((tuple(q.shape), tuple(k.shape), q.dtype))
        return _ref(q, k, v).to(q.dtype)  # NHD in, NHD out, in the input dtype


@pytest.fixture
def sage(monkeypatch):
    fake = FakeSage()
    monkeypatch.setitem(sys.modules, "sageattention", fake.module)
    monkeypatch.setattr(backends, "_has_sage", lambda: True)
    monkeypatch.setattr(backends, "_sage_device_check", lambda q: None)  # CPU tensors stand in for CUDA ones
    return fake


def test_sage_is_listed_only_when_importable(monkeypatch):
    monkeypatch.setattr(backends, "_has_sage", lambda: False)
    assert "sage" not in available_backends()
    with pytest.raises(RuntimeError, match="not available"):
        get_backend("sage")
    assert "pip install sageattention" in backends.sage_problem()
    monkeypatch.setattr(backends, "_has_sage", lambda: True)
    assert "sage" in available_backends()


def test_sage_self_attention_layout_and_dtypes(sage):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 40, 3, 16, generator=g, dtype=torch.bfloat16) for _ in range(3))
    out = attention(q, k, v, "sage")
    assert sage.calls == [((2, 40, 3, 16), (2, 40, 3, 16), torch.bfloat16)] and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), _ref(q, k, v).to(torch.bfloat16).double())
    # fp32 inputs go in as bf16 and come back fp32; a non-contiguous last dim is made contiguous
    qf, kf, vf = (torch.randn(1, 24, 2, 32, generator=g).transpose(-1, -2).contiguous().transpose(-1, -2)
                  for _ in range(3))
    assert qf.stride(-1) != 1
    out = attention(qf, kf, vf, "sage")
    assert sage.calls[-1][2] == torch.bfloat16 and out.dtype == torch.float32
    want = _ref(*(t.to(torch.bfloat16) for t in (qf, kf, vf))).to(torch.bfloat16).float()
    torch.testing.assert_close(out, want)


def test_sage_leaves_cross_attention_dense(sage):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 50, 2, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 7, 2, 16, generator=g, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(attention(q, k, v, "sage"), _ref(q, k, v))
    assert sage.calls == []


def test_sage_in_the_dit_runs_every_self_attention_through_sageattn(sage):
    """The tiny DiT with "sage": one sageattn call per block (self-attention; cross-attention stays dense), and
    with the stand-in's exact kernel the output equals the same model on float64-accurate attention up to the
    bf16 rounding of q/k/v and the result."""
    from test_dit_steadydancer import CFG as cfg, _inputs, _randomize  # the tiny model and its inputs
    m = _randomize(SteadyDancerDiT(cfg)).eval()
    inp = _inputs()
    accel.use_attention(m, "sdpa")
    with torch.no_grad():
        dense = m(**inp)
    accel.use_attention(m, "sage")
    with torch.no_grad():
        out = m(**inp)
    assert len(sage.calls) == cfg.num_layers
    rel = (out - dense).norm() / dense.norm()
    assert 0 < rel < 0.05, rel


def test_sage_errors_say_which_option_and_what_to_do(monkeypatch):
    def unsupported(*a, **k):
        raise ValueError("Unsupported CUDA architecture: sm75")

    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=unsupported))
    monkeypatch.setattr(backends, "_has_sage", lambda: True)
    q = torch.randn(1, 8, 1, 16)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):  # the real check: CPU tensors are refused
        attention(q, q, q, "sage")
    monkeypatch.setattr(backends, "_sage_device_check", lambda q: None)
    with pytest.raises(RuntimeError, match="attention 'sage'.*sm75.*auto / sdpa"):
        attention(q, q, q, "sage")
    big = torch.randn(1, 8, 1, 256)
    with pytest.raises(RuntimeError, match="head dims up to 128"):
        attention(big, big, big, "sage")
    if not torch.cuda.is_available():
        assert "NVIDIA GPU" in backends.sage_problem("cpu")


def test_sparse_and_sage_are_not_combined():
    m = SteadyDancerDiT(SteadyDancerConfig.tiny())
    with pytest.raises(ValueError, match="cannot be combined"):
        accel.optimize(m, attention="sage", sparse_topk=0.1)
    accel.optimize(m, sparse_topk=0.1)
    assert m.attention_backend.startswith("flex_sparse")


def test_model_loader_offers_sage_and_refuses_it_clearly_when_missing(monkeypatch, tmp_path):
    """Always listed (a shared workflow opens); without the package, or off CUDA, the loader node fails before
    reading the file, with the install hint; ComfyUI's own list check stays (VALIDATE_INPUTS takes only
    model_name, so a bad file is reported once)."""
    import inspect

    from _loader_util import offline_model_loader
    from steadydancer_turbo.nodes import model_nodes as mn
    assert mn.attention_choices()[-1] == "sage"
    assert list(inspect.signature(mn.SteadyDancerModelLoader.VALIDATE_INPUTS).parameters) == ["model_name"]
    node, f, read = offline_model_loader(monkeypatch, tmp_path)
    args = ("auto", "bf16", "sage", 0.15, False, False)
    monkeypatch.setattr(backends, "_has_sage", lambda: False)
    with pytest.raises(RuntimeError, match=r"m\.safetensors: attention 'sage' needs the sageattention package.*"
                                           r"pip install sageattention"):
        node.load(str(f), *args)
    monkeypatch.setattr(backends, "_has_sage", lambda: True)
    with pytest.raises(RuntimeError, match="attention 'sage' needs an NVIDIA GPU"):
        node.load(str(f), *args)
    assert not read  # refused before the file is read


def test_sage_inside_a_compiled_region(sage):
    """Compiled blocks call the backend inside torch.compile: the sageattn call runs outside the graph (a graph
    break), with the same arguments and result (dynamo with the eager backend: no C++ compiler needed)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 32, 2, 16, generator=g, dtype=torch.bfloat16) for _ in range(3))
    f = torch.compile(lambda q, k, v: attention(q, k, v, "sage") * 2, backend="eager")
    out = f(q, k, v)
    assert sage.calls == [((1, 32, 2, 16), (1, 32, 2, 16), torch.bfloat16)]
    torch.testing.assert_close(out.double(), (_ref(q, k, v).to(torch.bfloat16) * 2).double())
    torch._dynamo.reset()
