"""fused_qkv: one q/k/v product gives the unfused model's output, keeps the state dict, and adds no memory."""

import torch

from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
from steadydancer_turbo.steadydancer.kernels.fp8_linear import convert_linears_to_fp8
from steadydancer_turbo.steadydancer.model.fused_qkv import FusedQKVSelfAttention, fuse_qkv, unfuse_qkv
from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT


def _inputs(cfg, g, dtype=torch.float32):
    f, h, w = 3, 4, 6
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    zr = r(1, cfg.out_dim, 1, h, w)
    return dict(x=r(1, cfg.out_dim, f, h, w), timestep=torch.tensor([700.0]),
                context=r(1, 7, cfg.text_dim), clip_fea=r(1, 257, cfg.clip_dim), clip_fea_c=r(1, 257, cfg.clip_dim),
                y=r(1, cfg.in_dim - cfg.out_dim, f, h, w), cond=r(1, cfg.in_dim_c, f, h, w),
                ref_x=torch.cat([zr, torch.ones(1, 4, 1, h, w, dtype=dtype), zr], 1), ref_c=r(1, cfg.in_dim_c, 1, h, w))


def _model(dtype, seed=0):
    torch.manual_seed(seed)
    m = SteadyDancerDiT(SteadyDancerConfig.tiny()).to(dtype)
    for p in m.parameters():  # non-zero biases, so a dropped or misplaced bias shows
        if p.dim() == 1:
            p.data.normal_(0, 0.1)
    return m.eval()


@torch.no_grad()
def test_fused_linear_matches_float64():
    g = torch.Generator().manual_seed(1)
    m = _model(torch.float64)
    inp = _inputs(m.config, g, torch.float64)
    ref = m(**inp)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    assert fuse_qkv(m) == m.config.num_layers
    assert all(type(b.self_attn) is FusedQKVSelfAttention for b in m.blocks)
    out = m(**inp)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-12
    sd2 = m.state_dict()
    assert list(sd2) == list(sd) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # the layers' weights are views into the fused buffer: no second copy
    sa = m.blocks[0].self_attn
    assert sa.k.weight.data_ptr() == sa.qkv_weight.data_ptr() + sa.q.weight.numel() * sa.q.weight.element_size()
    assert unfuse_qkv(m) == m.config.num_layers
    out2 = m(**inp)
    assert ((out2 - ref).norm() / ref.norm()).item() < 1e-12


@torch.no_grad()
def test_fused_fp8_matches_unfused_fp8():
    g = torch.Generator().manual_seed(2)
    m = _model(torch.float32, seed=3)
    convert_linears_to_fp8(m, act_scaling="tensor", fast_accum=True)
    scales = {b.self_attn.q.scale_weight.item() for b in m.blocks} | {b.self_attn.v.scale_weight.item()
                                                                     for b in m.blocks}
    assert len(scales) > 1  # distinct per-layer scales: the fused product must keep each
    inp = _inputs(m.config, g)
    ref = m(**inp)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    assert fuse_qkv(m) == m.config.num_layers
    out = m(**inp)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-6
    sd2 = m.state_dict()
    assert list(sd2) == list(sd) and all(torch.equal(sd[k].float(), sd2[k].float()) for k in sd)
