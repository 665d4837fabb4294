"""Key set, shapes and config detection of the SteadyDancer DiT, against independent references.

Expected 14B key set = diffusers' WanTransformer3DModel (Wan2.1-I2V-14B config) keys renamed to the official
layout, plus the 42 SteadyDancer tensors listed in the spec (written out literally below). The renaming is
cross-checked against diffusers' own official->diffusers converter, so the expectation does not rest on our
keymap alone.
"""
import math

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from steadydancer_turbo.steadydancer.model import keymap
from steadydancer_turbo.steadydancer.model.config import NotSteadyDancerError, SteadyDancerConfig
from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT, build_meta

# spec §3: the 42 SteadyDancer tensors of the 14B checkpoint (dim 5120, pose channels 16, align width 128)
STEADYDANCER_42 = {
    "patch_embedding_fuse.weight": (5120, 68, 1, 2, 2),
    "patch_embedding_fuse.bias": (5120,),
    "patch_embedding_ref_c.weight": (5120, 16, 1, 2, 2),
    "patch_embedding_ref_c.bias": (5120,),
    "condition_embedding_spatial.conv.weight": (16, 16, 1, 1),
    "condition_embedding_spatial.conv_q.weight": (4, 16, 1, 1),
    "condition_embedding_spatial.fc.0.weight": (4, 16),
    "condition_embedding_spatial.fc.1.fc.0.weight": (4, 4),
    "condition_embedding_spatial.fc_phi.weight": (16, 4),
    "condition_embedding_spatial.fc_scale.weight": (16, 4),
    "condition_embedding_spatial.conv_p.weight": (16, 4, 1, 1),
    "condition_embedding_spatial.bn1.weight": (4,),
    "condition_embedding_spatial.bn1.bias": (4,),
    "condition_embedding_spatial.bn2.weight": (4,),
    "condition_embedding_spatial.bn2.bias": (4,),
    **{k: v for i in (0, 2, 4) for k, v in {
        f"condition_embedding_temporal.{i}.spatial.weight": (16, 1, 1, 3, 3),
        f"condition_embedding_temporal.{i}.temporal.weight": (16, 16, 3, 1, 1),
        f"condition_embedding_temporal.{i}.temporal.bias": (16,),
    }.items()},
    "condition_embedding_align.proj_p.weight": (128, 16, 1, 1),
    "condition_embedding_align.proj_p.bias": (128,),
    "condition_embedding_align.proj_r.weight": (128, 16, 1, 1),
    "condition_embedding_align.proj_r.bias": (128,),
    "condition_embedding_align.proj_p_back.weight": (16, 128, 1, 1),
    "condition_embedding_align.proj_p_back.bias": (16,),
    "condition_embedding_align.cross_attn.in_proj_weight": (384, 128),
    "condition_embedding_align.cross_attn.in_proj_bias": (384,),
    "condition_embedding_align.cross_attn.out_proj.weight": (128, 128),
    "condition_embedding_align.cross_attn.out_proj.bias": (128,),
    "condition_embedding_align.ffn_pose.0.weight": (128, 128, 1, 1),
    "condition_embedding_align.ffn_pose.0.bias": (128,),
    "condition_embedding_align.ffn_pose.2.weight": (128, 128, 1, 1),
    "condition_embedding_align.ffn_pose.2.bias": (128,),
    "condition_embedding_align.norm1.weight": (1, 128, 1, 1),
    "condition_embedding_align.norm1.bias": (1, 128, 1, 1),
    "condition_embedding_align.norm2.weight": (1, 128, 1, 1),
    "condition_embedding_align.norm2.bias": (1, 128, 1, 1),
}


def _diffusers_meta(**kw):
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36,
               out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120)
    cfg.update(kw)
    with torch.device("meta"):
        m = WanTransformer3DModel(**cfg)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def diffusers_i2v_14b():
    return _diffusers_meta()


@pytest.fixture(scope="module")
def expected_14b(diffusers_i2v_14b):
    base = keymap.diffusers_to_official(diffusers_i2v_14b)
    # independent check of the renaming: diffusers' own official->diffusers converter must map the
    # official-named base keys back onto exactly diffusers' key set
    back = convert_wan_transformer_to_diffusers({k: v for k, v in base.items()})
    assert back == diffusers_i2v_14b
    assert len(STEADYDANCER_42) == 42
    assert not set(base) & set(STEADYDANCER_42)
    return {**base, **STEADYDANCER_42}


def test_full_14b_meta_has_exact_official_keys_and_shapes(expected_14b):
    model = build_meta(SteadyDancerConfig.full_14b())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert all(v.is_meta for v in model.state_dict().values())
    assert set(got) == set(expected_14b), (sorted(set(got) - set(expected_14b))[:5],
                                           sorted(set(expected_14b) - set(got))[:5])
    assert got == expected_14b
    n = sum(math.prod(s) for s in got.values())
    assert n == sum(p.numel() for p in model.parameters())      # no tied / buffer tensors
    assert round(n / 1e9, 2) == 16.40                             # spec / paper: ~16.39-16.40 B
    n_base = sum(math.prod(s) for k, s in got.items() if k not in STEADYDANCER_42)
    assert len(got) - 42 == 1303 and n_base == 16_394_878_784    # Wan2.1-I2V-14B
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 40
    assert not list(model.buffers())


def test_keymap_round_trip_and_agrees_with_diffusers_converter(expected_14b):
    base = {k: v for k, v in expected_14b.items() if k not in STEADYDANCER_42}
    ours = keymap.official_to_diffusers(base)
    assert ours == convert_wan_transformer_to_diffusers(dict(base))
    assert keymap.diffusers_to_official(ours) == base
    # SteadyDancer keys pass through unchanged both ways
    for k in STEADYDANCER_42:
        assert keymap.official_to_diffusers_key(k) == k == keymap.diffusers_to_official_key(k)


def test_config_from_14b_shapes(expected_14b):
    cfg = SteadyDancerConfig.from_state_dict_shapes(expected_14b)
    assert cfg == SteadyDancerConfig.full_14b()
    assert (cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.num_heads, cfg.head_dim) == (5120, 13824, 40, 40, 128)
    assert (cfg.in_dim, cfg.in_dim_c, cfg.out_dim, cfg.text_dim, cfg.fuse_in_dim) == (36, 16, 16, 4096, 68)
    # with a ComfyUI prefix, extra fp8 scale tensors, and torch.Size values
    pref = {"model.diffusion_model." + k: torch.Size(v) for k, v in expected_14b.items()}
    pref["model.diffusion_model.blocks.0.self_attn.q.scale_weight"] = torch.Size([1])
    assert SteadyDancerConfig.from_state_dict_shapes(pref) == cfg
    # diffusers layout for the Wan part + SteadyDancer modules under their own names
    diff = keymap.official_to_diffusers(expected_14b)
    assert SteadyDancerConfig.from_state_dict_shapes(diff) == cfg


def test_config_reads_the_key_spellings_the_checkpoint_reader_reads(expected_14b):
    # TurboDiffusion training checkpoints: ``net.`` prefix and FSDP ``_checkpoint_wrapped_module.`` infixes
    # (the readers normalise both through keymap; the config must see the same names)
    wrapped = {}
    for k, v in expected_14b.items():
        if k.startswith("blocks."):
            i, rest = k[len("blocks."):].split(".", 1)
            k = f"blocks.{i}._checkpoint_wrapped_module.{rest}"
        wrapped["net." + k] = v
    wrapped["net.scaled_fp8"] = (0,)
    assert SteadyDancerConfig.from_state_dict_shapes(wrapped) == SteadyDancerConfig.full_14b()


def test_config_round_trips_a_small_model():
    cfg = SteadyDancerConfig.tiny(num_layers=3, ffn_dim=200, text_dim=40, freq_dim=32)
    sd = SteadyDancerDiT(cfg).state_dict()
    assert SteadyDancerConfig.from_state_dict_shapes({k: v.shape for k, v in sd.items()}) == cfg


@pytest.mark.parametrize("kind, words", [
    ("t2v", "text-to-video"),
    ("wan22_5b", "Wan2.2"),
    ("wan22_i2v", "Wan2.2-I2V"),
    ("wan21_i2v", "plain Wan2.1 image-to-video"),
    ("vace", "VACE"),
    ("partial", "incomplete SteadyDancer"),
    ("flux", "Flux"),
    ("random", "not a Wan DiT"),
])
def test_refuses_non_steadydancer_checkpoints(kind, words, expected_14b):
    base = {k: v for k, v in expected_14b.items() if k not in STEADYDANCER_42}
    if kind == "t2v":
        s = keymap.diffusers_to_official(_diffusers_meta(in_channels=16, image_dim=None, added_kv_proj_dim=None))
    elif kind == "wan22_5b":
        s = keymap.diffusers_to_official(_diffusers_meta(
            num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30, image_dim=None,
            added_kv_proj_dim=None, text_dim=4096))
    elif kind == "wan22_i2v":
        s = keymap.diffusers_to_official(_diffusers_meta(image_dim=None, added_kv_proj_dim=None))
    elif kind == "wan21_i2v":
        s = base
    elif kind == "vace":
        s = dict(base, **{"vace_blocks.0.before_proj.weight": (5120, 5120),
                          "vace_patch_embedding.weight": (5120, 96, 1, 2, 2)})
        s = {k: v for k, v in s.items() if not k.startswith("img_emb") and "_img" not in k}
        s["patch_embedding.weight"] = (5120, 16, 1, 2, 2)
    elif kind == "partial":
        s = {k: v for k, v in expected_14b.items() if not k.startswith("condition_embedding_align")}
    elif kind == "flux":
        s = {"double_blocks.0.img_attn.qkv.weight": (9216, 3072), "img_in.weight": (3072, 64)}
    else:
        s = {"foo.weight": (3, 3), "bar.bias": (3,)}
    with pytest.raises(NotSteadyDancerError) as err:
        SteadyDancerConfig.from_state_dict_shapes(s)
    msg = str(err.value)
    assert words in msg, msg
    assert "SteadyDancer-14B expects" in msg and "patch_embedding_fuse" in msg
