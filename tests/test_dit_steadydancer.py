"""SteadyDancer-specific behaviour of the DiT, checked against independent expectations."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from steadydancer_turbo.steadydancer.kernels import attention as attn_mod
from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT
from steadydancer_turbo.steadydancer.model.pose_modules import PoseAlignment

CFG = SteadyDancerConfig.tiny(clip_dim=64)   # small CLIP width keeps these CPU tests fast


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 1.0 / max(p[0].numel(), 1) ** 0.5))
    return model


@pytest.fixture(scope="module")
def model():
    return _randomize(SteadyDancerDiT(CFG))


def _inputs(b=1, f=3, h=4, w=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(b, 16, f, h, w), timestep=torch.tensor([700] * b),
                context=[r(6 + i, CFG.text_dim) for i in range(b)],
                clip_fea=r(b, 257, CFG.clip_dim), clip_fea_c=r(b, 257, CFG.clip_dim), y=r(b, 20, f, h, w),
                cond=r(b, 16, f, h, w), ref_x=r(b, 36, 1, h, w), ref_c=r(b, 36, 1, h, w))


def _run(model, **kw):
    with torch.no_grad():
        return model(**kw)


# ---------------------------------------------------------------------- alignment unit
@pytest.fixture(scope="module")
def align():
    torch.manual_seed(3)
    return _randomize(PoseAlignment(16, 16, 128, 8, dropout=0.1), seed=3).eval()


def test_alignment_mixes_frames_at_one_pixel_never_across_pixels(align):
    g = torch.Generator().manual_seed(4)
    pose, ref = torch.randn(1, 16, 5, 3, 4, generator=g), torch.randn(1, 16, 5, 3, 4, generator=g)
    with torch.no_grad():
        base = align(pose, ref, torch.float32)
        p2 = pose.clone()
        p2[0, :, 2, 1, 3] += 3.0                      # one pixel of one frame
        out = align(p2, ref, torch.float32)
    diff = (out - base).abs().amax(dim=1)[0]          # [T, H, W]
    other = torch.ones_like(diff, dtype=torch.bool)
    other[:, 1, 3] = False
    assert diff[other].max() == 0                     # no other pixel changes, in any frame
    assert (diff[:, 1, 3] > 1e-4).all()               # that pixel changes in *every* frame (temporal attention)


def test_alignment_attention_is_torch_mha_with_batch_first_false_quirk(align):
    """The official code feeds (frames, pixels, E) to nn.MultiheadAttention(batch_first=False)."""
    mha = nn.MultiheadAttention(128, 8).eval()
    mha.load_state_dict(align.cross_attn.state_dict())  # same parameter names
    g = torch.Generator().manual_seed(5)
    q, kv = torch.randn(7, 12, 128, generator=g), torch.randn(7, 12, 128, generator=g)  # (T, H*W, E)
    with torch.no_grad():
        want = mha(q, kv, kv)[0]                                              # attends along dim 0 = T
        got = align.cross_attn(q.transpose(0, 1), kv.transpose(0, 1), torch.float32).transpose(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- whole model
@pytest.mark.parametrize("f", [1, 2, 5])
def test_reference_frame_predictions_are_dropped_not_leaked(model, f):
    """Official forward: the grid is F + 2 frames (video, reference image, first pose), and after the head it keeps
    ``u[:, :F]``: the reference frames' own predictions never reach the output. Overwrite what the head produces
    at the two reference frames' tokens: the output is bit-identical; overwrite one video frame's: exactly that
    output frame changes. (How the video tokens depend on the reference frames through attention is checked
    against the official model in test_dit_official_parity.py.)"""
    kw = _inputs(f=f)
    out = _run(model, **kw)
    hw = (4 // 2) * (6 // 2)

    def overwrite(lo, hi):
        def hook(mod, args, o):
            o = o.clone()
            o[:, lo:hi] = torch.randn(o[:, lo:hi].shape) * 10
            return o
        return model.head.register_forward_hook(hook)

    h = overwrite(f * hw, (f + 2) * hw)
    try:
        torch.testing.assert_close(_run(model, **kw), out, rtol=0, atol=0)
    finally:
        h.remove()
    h = overwrite((f - 1) * hw, f * hw)                # the last video frame
    try:
        changed = (_run(model, **kw) - out).abs().amax(dim=(0, 1, 3, 4))   # per output frame
    finally:
        h.remove()
    assert out.shape == (1, 16, f, 4, 6)
    assert changed[-1] > 1.0 and (changed[:-1] == 0).all()


def test_only_first_16_channels_of_ref_c_are_used(model):
    kw = _inputs()
    out = _run(model, **kw)
    junk = kw["ref_c"].clone()
    junk[:, 16:] = torch.randn_like(junk[:, 16:]) * 10
    torch.testing.assert_close(_run(model, **dict(kw, ref_c=junk)), out, rtol=0, atol=0)
    torch.testing.assert_close(_run(model, **dict(kw, ref_c=kw["ref_c"][:, :16])), out, rtol=0, atol=0)


def test_first_pose_clip_changes_output_and_is_summed_with_reference_clip(model):
    kw = _inputs()
    out = _run(model, **kw)
    # (a random change: a constant shift would be removed by img_emb's first LayerNorm)
    other = dict(kw, clip_fea_c=kw["clip_fea_c"] + 0.5 * torch.randn(kw["clip_fea_c"].shape))
    assert (_run(model, **other) - out).abs().max() > 1e-3
    # img_emb(ref) + img_emb(pose): swapping the two CLIP inputs gives the same output (sum is symmetric)
    swapped = dict(kw, clip_fea=kw["clip_fea_c"], clip_fea_c=kw["clip_fea"])
    torch.testing.assert_close(_run(model, **swapped), out, rtol=1e-6, atol=1e-6)
    # and without the pose CLIP the output differs (the term is really added)
    assert (_run(model, **dict(kw, clip_fea_c=None)) - out).abs().max() > 1e-3


def test_eval_mode_determinism_and_dropout_only_in_training():
    m = _randomize(SteadyDancerDiT(CFG))
    assert not m.training and not any(mod.training for mod in m.modules())
    kw = _inputs(f=4)
    a, b = _run(m, **kw), _run(m, **kw)
    assert torch.equal(a, b)
    m.train()                                          # alignment attention dropout (p=0.1) now active
    torch.manual_seed(0)
    c = _run(m, **kw)
    torch.manual_seed(1)
    d = _run(m, **kw)
    assert not torch.equal(c, d)
    m.eval()
    assert torch.equal(_run(m, **kw), a)


def test_batch_samples_are_independent_and_inputs_broadcast(model):
    kw = _inputs(b=3)
    kw["timestep"] = torch.tensor([999, 500, 3])
    out = _run(model, **kw)
    for i in range(3):
        one = {k: (v[i:i + 1] if torch.is_tensor(v) and v is not None else v[i:i + 1]) for k, v in kw.items()}
        torch.testing.assert_close(_run(model, **one), out[i:i + 1], rtol=1e-5, atol=1e-5)
    # batch-1 conditions broadcast over a batch of latents
    shared = {k: (v[:1] if k not in ("x",) else v) for k, v in kw.items()}
    shared["timestep"] = torch.tensor([500])
    out_b = _run(model, **shared)
    one = {k: (v[1:2] if k == "x" else v) for k, v in shared.items()}
    torch.testing.assert_close(out_b[1:2], _run(model, **one), rtol=1e-5, atol=1e-5)


def test_rows_and_per_item_cut_only_batched_arguments():
    """model/batching.py: a batched call run one item at a time equals the batched call of a per-item function;
    only tensors with the batch as first dimension and lists of batch items are cut, the rest passes whole."""
    from steadydancer_turbo.steadydancer.model.batching import per_item, rows
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(3, 4, 5, generator=g), [torch.randn(2 + i, 5, generator=g) for i in range(3)]
    t_shared, w, scalar = torch.tensor([500.0]), torch.randn(5, 5, generator=g), torch.tensor(2.0)
    seen = []

    def fn(x, t, ctx, none, w, s):
        seen.append((x.shape[0], t.shape[0], len(ctx), none, tuple(w.shape), s.dim()))
        return x @ w * s + torch.stack([c.mean(dim=0) for c in ctx]).unsqueeze(1) * t.reshape(-1, 1, 1) / 1000

    args = (x, t_shared, ctx, None, w, scalar)
    out = per_item(fn, args, 3)
    assert seen == [(1, 1, 1, None, (5, 5), 0)] * 3      # w (5 rows, not the batch) and the 0-d tensor pass whole
    torch.testing.assert_close(out, fn(*args), rtol=1e-6, atol=1e-6)
    t_items = torch.tensor([900.0, 500.0, 100.0])
    torch.testing.assert_close(per_item(fn, (x, t_items, ctx, None, w, scalar), 3)[2:],
                               fn(x[2:], t_items[2:], ctx[2:], None, w, scalar), rtol=1e-6, atol=1e-6)
    assert rows(tuple(ctx), 3, 1, 3) == tuple(ctx[1:]) and rows(ctx[:2], 3, 0, 1) == ctx[:2]
    seen.clear()
    per_item(fn, args, 1)
    assert [s[0] for s in seen] == [3]                   # batch 1: one plain call, nothing cut


def test_batch_split_runs_one_forward_per_item_with_the_batched_result(model, monkeypatch):
    """``batch_split=True``: a batch-3 forward (own timesteps, own text lengths, one batch-1 condition broadcast)
    runs as three batch-1 forwards whose concatenation is the batched forward's result."""
    kw = _inputs(b=3)
    kw["timestep"] = torch.tensor([999, 500, 3])
    kw["ref_x"] = kw["ref_x"][:1]                        # broadcast to every item
    batched = _run(model, **kw)
    calls = []
    inner = SteadyDancerDiT._forward
    monkeypatch.setattr(SteadyDancerDiT, "_forward", lambda self, *a: calls.append(a[0].shape[0]) or inner(self, *a))
    model.batch_split = True
    try:
        split = _run(model, **kw)
    finally:
        model.batch_split = None
    assert calls == [1, 1, 1]
    torch.testing.assert_close(split, batched, rtol=1e-5, atol=1e-5)
    calls.clear()
    _run(model, **kw)                                    # auto on the CPU: one batched forward
    assert calls == [3]


def test_splits_batch_only_for_flex_traced_into_compiled_blocks_on_cuda():
    """The automatic split (issue 15, runs 22-23): flex top-k attention inside compiled blocks on CUDA, nothing
    else (SDPA or int8 top-k in compiled blocks, flex without compiled blocks, any CPU run); ``batch_split``
    overrides it both ways. No CUDA is needed: only the rule is checked."""
    from steadydancer_turbo.steadydancer.kernels.backends import sparse_backend
    from steadydancer_turbo.steadydancer.weights import speed_options as accel
    m = SteadyDancerDiT(CFG)
    flex, int8 = sparse_backend(0.1), sparse_backend(0.1, kernel="int8")
    assert not m.splits_batch("cuda")                    # SDPA, eager
    accel.compile_blocks(m)                              # wraps only; nothing compiles until a call
    try:
        assert not m.splits_batch("cuda")                # SDPA, compiled
        m.attention_backend = int8
        assert not m.splits_batch("cuda")
        m.attention_backend = flex
        assert m.splits_batch("cuda") and m.splits_batch(torch.device("cuda", 1))
        assert not m.splits_batch("cpu")
        m.batch_split = False
        assert not m.splits_batch("cuda")
    finally:
        accel.uncompile_blocks(m)
    m.batch_split = None
    assert not m.splits_batch("cuda")                    # flex, eager blocks
    m.batch_split = True
    assert m.splits_batch("cpu")
    m.sequence_parallel = object()                       # a Ulysses rank: the rule only, alike on every rank
    assert not m.splits_batch("cpu")


def test_text_is_zero_padded_to_512(model):
    kw = _inputs(b=2)
    padded = torch.stack([torch.cat([u, u.new_zeros(512 - len(u), CFG.text_dim)]) for u in kw["context"]])
    torch.testing.assert_close(_run(model, **dict(kw, context=padded)), _run(model, **kw), rtol=0, atol=0)
    with pytest.raises(ValueError):
        _run(model, **dict(kw, context=[torch.zeros(513, CFG.text_dim)] * 2))


def test_int_and_float_timesteps_agree_and_timestep_matters(model):
    kw = _inputs()
    a = _run(model, **dict(kw, timestep=torch.tensor([437], dtype=torch.int64)))
    b = _run(model, **dict(kw, timestep=torch.tensor([437.0])))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (_run(model, **dict(kw, timestep=torch.tensor([438.0]))) - a).abs().max() > 1e-5


# ---------------------------------------------------------------------- dtype handling, module swapping, backends
def test_bf16_weights_with_fp32_latents(model):
    kw = _inputs()
    ref = _run(model, **kw)
    m16 = SteadyDancerDiT(CFG).to(torch.bfloat16)
    m16.load_state_dict(model.state_dict())
    assert m16.compute_dtype == torch.bfloat16
    out = _run(m16, **kw)                             # fp32 inputs, bf16 weights
    assert out.dtype == torch.float32
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-5 < rel < 3e-2                          # bf16 rounding, nothing worse


class _HalfStoredLinear(nn.Module):
    """Stand-in for a loader's quantised layer: stores fp16 weights, computes in the input dtype."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(lin.weight.detach().half(), requires_grad=False)
        self.bias = nn.Parameter(lin.bias.detach().half(), requires_grad=False)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def test_linear_layers_can_be_swapped_in_place(model):
    kw = _inputs()
    ref = _run(model, **kw)
    m = SteadyDancerDiT(CFG)
    m.load_state_dict(model.state_dict())
    swapped = []
    for block in m.blocks:
        for name, mod in list(block.named_modules()):
            if type(mod) is nn.Linear:
                parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
                new = _HalfStoredLinear(mod)
                setattr(parent, name.rpartition(".")[2], new) if not name.rpartition(".")[2].isdigit() \
                    else parent.__setitem__(int(name.rpartition(".")[2]), new)
                swapped.append(new)
    assert len(swapped) == CFG.num_layers * 12
    out = _run(m, **kw)
    assert all(s.calls == 1 for s in swapped)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 1e-2                             # fp16-rounded weights, same computation


def test_attention_backend_registry():
    assert "sdpa" in attn_mod.available_backends()
    with pytest.raises(ValueError):
        SteadyDancerDiT(CFG, attention="no_such_kernel")

    def naive(q, k, v):                               # float64 textbook attention, [B, L, H, D]
        s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
        return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.double()).to(q.dtype)

    attn_mod.register_backend("test_naive", naive, overwrite=True)
    try:
        m = _randomize(SteadyDancerDiT(CFG, attention="test_naive"))
        kw = _inputs()
        got = _run(m, **kw)
        m.attention_backend = "sdpa"
        torch.testing.assert_close(got, _run(m, **kw), rtol=1e-5, atol=1e-5)
    finally:
        attn_mod._REGISTRY.pop("test_naive", None)


def test_shape_errors_are_clear(model):
    kw = _inputs()
    with pytest.raises(ValueError, match="y must have shape"):
        _run(model, **dict(kw, y=kw["y"][:, :16]))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        k2 = _inputs(h=5)
        _run(model, **k2)


def test_rope_in_float32_is_a_close_option(model):
    """model.rope_dtype (official: float64) may be lowered for speed; in a float32 model the change is tiny."""
    kw = _inputs()
    ref = _run(model, **kw)
    try:
        model.rope_dtype = torch.float32
        out = _run(model, **kw)
    finally:
        model.rope_dtype = torch.float64
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 1e-5


def test_chunked_rope_is_bit_identical():
    from steadydancer_turbo.steadydancer.model.dit import rope_apply, rope_freqs
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 5 * 3 * 4, 3, 128, generator=g).bfloat16()
    fr = rope_freqs((5, 3, 4), 128)
    whole = rope_apply(x, fr, torch.bfloat16, chunk=10 ** 9)
    assert torch.equal(rope_apply(x, fr, torch.bfloat16, chunk=7), whole)
    # and it is a rotation of each (even, odd) pair: norms are kept (in float64)
    r64 = rope_apply(x.double(), fr, torch.float64)
    torch.testing.assert_close(r64.view(2, 60, 3, 64, 2).norm(dim=-1), x.double().view(2, 60, 3, 64, 2).norm(dim=-1))
