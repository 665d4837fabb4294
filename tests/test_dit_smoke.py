"""Quick smoke test of the SteadyDancer DiT: tiny model runs, batched, right shape/dtype."""
import torch

from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT


def test_tiny_forward_shape_dtype_and_batch_independence():
    torch.manual_seed(0)
    cfg = SteadyDancerConfig.tiny()
    model = SteadyDancerDiT(cfg)
    b, f, h, w = 2, 3, 4, 6
    x, y, cond = torch.randn(b, 16, f, h, w), torch.randn(b, 20, f, h, w), torch.randn(b, 16, f, h, w)
    ref_x, ref_c = torch.randn(b, 36, 1, h, w), torch.randn(b, 36, 1, h, w)
    ctx = [torch.randn(7, cfg.text_dim), torch.randn(9, cfg.text_dim)]
    clip, clip_c = torch.randn(b, 257, cfg.clip_dim), torch.randn(b, 257, cfg.clip_dim)
    t = torch.tensor([999, 500])
    with torch.no_grad():
        v = model(x, t, ctx, clip, clip_c, y, cond, ref_x, ref_c)
        v1 = model(x[1:], t[1:], ctx[1:], clip[1:], clip_c[1:], y[1:], cond[1:], ref_x[1:], ref_c[1:])
    assert v.shape == (b, 16, f, h, w) and v.dtype == torch.float32
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v1, v[1:], rtol=1e-5, atol=1e-5)
