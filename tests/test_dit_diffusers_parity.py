"""Parity of the Wan2.1-I2V part of our DiT with diffusers' WanTransformer3DModel (independent implementation).

A tiny I2V config gets random weights in diffusers' layout; they are loaded into our model through
keymap (official names). The plain Wan I2V path (36-channel patch_embedding -> time/text/CLIP embeddings ->
all blocks -> head -> unpatchify) is assembled from our model's pieces and compared with diffusers' forward,
in float32 (relative error < 1e-5) and float64.

diffusers conventions handled here: it expects the text already padded to 512 tokens (it splits the context at
len - 512), it computes the sinusoidal timestep embedding in float32 (we do float64, as the official code), and
it takes one CLIP image (no first-pose CLIP term).
"""
import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from steadydancer_turbo.steadydancer.model import keymap
from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT

CFG = SteadyDancerConfig.tiny(dim=256, num_heads=2, ffn_dim=320, num_layers=2, text_dim=64, freq_dim=64, clip_dim=96)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(1234)
    ref = WanTransformer3DModel(
        patch_size=CFG.patch_size, num_attention_heads=CFG.num_heads, attention_head_dim=CFG.head_dim,
        in_channels=CFG.in_dim, out_channels=CFG.out_dim, text_dim=CFG.text_dim, freq_dim=CFG.freq_dim,
        ffn_dim=CFG.ffn_dim, num_layers=CFG.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=CFG.eps, image_dim=CFG.clip_dim, added_kv_proj_dim=CFG.dim).eval()
    with torch.no_grad():  # non-trivial values everywhere (norm weights, biases, modulation tables too)
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 1 else 1.0 / p.shape[-1] ** 0.5) +
                    (1.0 if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_k.weight")) else 0.0))
    ours = SteadyDancerDiT(CFG)
    sd = keymap.diffusers_to_official(ref.state_dict())
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected
    assert all(k.startswith(("patch_embedding_", "condition_embedding_")) for k in missing), missing
    return ref, ours


def _inputs(dtype, b=2, f=3, h=4, w=6, t=(999.0, 437.0)):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(b, CFG.in_dim, f, h, w, generator=g, dtype=dtype)
    n_txt = (5, 11)[:b]
    txt = [torch.randn(n, CFG.text_dim, generator=g, dtype=dtype) for n in n_txt]
    txt512 = torch.stack([torch.cat([u, u.new_zeros(512 - len(u), CFG.text_dim)]) for u in txt])
    clip = torch.randn(b, 257, CFG.clip_dim, generator=g, dtype=dtype)
    return x, torch.tensor(t[:b], dtype=dtype), txt, txt512, clip


def _ours_plain_i2v(model, x, t, txt, clip):
    """Our pieces, wired as the plain Wan I2V forward (no pose modules, no reference frames)."""
    cd = model.compute_dtype
    tok = model.patch_embedding(x.to(cd))
    grid = tuple(tok.shape[2:])
    tok = tok.flatten(2).transpose(1, 2)
    e, e0 = model.embed_time(t, cd)
    ctx_txt = model.embed_text(txt, x.shape[0], cd)
    ctx_img = model.embed_clip(clip, None, cd)
    out = model.run_blocks(tok, e0, ctx_img, ctx_txt, model.rope(grid, tok.device))
    return model.unpatchify(model.head(out, e), grid)


@pytest.mark.parametrize("t", [(999.0, 437.0), (0.0, 1.0)])
def test_full_wan_stack_matches_diffusers(pair, t):
    # float32 only: diffusers does its LayerNorms, RoPE tables and timestep sinusoid in float32 even for a
    # float64 model, so a float64 comparison would be limited to ~1e-7 by diffusers' own rounding
    ref, ours = pair
    x, t, txt, txt512, clip = _inputs(torch.float32, t=t)
    with torch.no_grad():
        want = ref(x, t, txt512, encoder_hidden_states_image=clip, return_dict=False)[0]
        got = _ours_plain_i2v(ours, x, t, txt, clip)
    assert got.shape == want.shape == (2, CFG.out_dim, 3, 4, 6)
    assert _rel(got, want) < 1e-5, _rel(got, want)
    # the comparison is sensitive: one extra text token (of 512) is detected
    with torch.no_grad():
        bad = _ours_plain_i2v(ours, x, t, [torch.cat([u, u[:1]]) for u in txt], clip)
    assert _rel(bad, want) > 5e-5   # (the match itself is ~1e-7)


def test_embeddings_match_diffusers_piecewise(pair):
    ref, ours = pair
    x, t, txt, txt512, clip = _inputs(torch.float32)
    with torch.no_grad():
        temb, tproj, ctx, img = ref.condition_embedder(t, txt512, clip)
        e, e0 = ours.embed_time(t, torch.float32)
        assert _rel(e, temb) < 1e-5 and _rel(e0.flatten(1), tproj) < 1e-5
        assert _rel(ours.embed_text(txt, 2, torch.float32), ctx) < 1e-6
        assert _rel(ours.embed_clip(clip, None, torch.float32), img) < 1e-6
        # one block with identical inputs
        tok = torch.randn(2, 3 * 2 * 3, CFG.dim)
        ctx_all = torch.cat([img, ctx], dim=1)
        want = ref.blocks[0](tok, ctx_all, tproj.unflatten(1, (6, -1)), ref.rope(torch.zeros(1, 1, 3, 4, 6)))
        got = ours.blocks[0](tok, e0, ours.embed_clip(clip, None, torch.float32),
                             ours.embed_text(txt, 2, torch.float32), ours.rope((3, 2, 3), tok.device))
        assert _rel(got, want) < 1e-5


def test_rope_matches_diffusers_tables(pair):
    _, ours = pair
    rope = WanRotaryPosEmbed(CFG.head_dim, CFG.patch_size, 1024)
    cos, sin = rope(torch.zeros(1, 1, 5, 6, 8))         # [1, L, 1, D] (repeat-interleaved) float64
    f = ours.rope((5, 3, 4), "cpu")                       # [L, 1, D/2] complex128
    assert f.dtype == torch.complex128
    # diffusers stores its tables as float32; ours stay complex128 (official rope_params)
    torch.testing.assert_close(f.real[:, 0].float(), cos[0, :, 0, 0::2], rtol=0, atol=1e-7)
    torch.testing.assert_close(f.imag[:, 0].float(), sin[0, :, 0, 1::2], rtol=0, atol=1e-7)
