"""State-dict key names: the one place that maps between layouts.

Our model uses the official (MCG-NJU/SteadyDancer, ``wan/modules/model_dancer.py``) unprefixed key names.
This module strips container prefixes (ComfyUI ``model.diffusion_model.`` …) and maps the Wan2.1 base keys
between the official layout and diffusers' ``WanTransformer3DModel`` layout. The SteadyDancer-only keys
(patch_embedding_fuse, patch_embedding_ref_c, condition_embedding_*) have no diffusers equivalent and keep
their names in both directions.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, TypeVar

V = TypeVar("V")

# Prefixes seen on Wan DiT files: ComfyUI checkpoints/saves, some repackagings.
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "transformer.", "dit.")

# A key only diffusers' Wan layout has (used to recognise that layout).
DIFFUSERS_MARKER_KEY = "condition_embedder.time_embedder.linear_1.weight"

# official -> diffusers, for keys outside the blocks
_TOP_O2D = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
}
# official -> diffusers, inside ``blocks.N.``
_BLOCK_O2D = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    # official norm3 is the affine cross-attention norm; diffusers calls it norm2 (and the FFN norm norm3,
    # but neither FFN nor self-attention norm has parameters)
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_TOP_D2O = {v: k for k, v in _TOP_O2D.items()}
_BLOCK_D2O = {v: k for k, v in _BLOCK_O2D.items()}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def strip_prefix(sd: Mapping[str, V]) -> Dict[str, V]:
    """Remove a container prefix shared by the DiT keys (e.g. ``model.diffusion_model.``)."""
    for p in KNOWN_PREFIXES:
        if any(k.startswith(p + "blocks.") or k.startswith(p + "patch_embedding") for k in sd):
            return {(k[len(p):] if k.startswith(p) else k): v for k, v in sd.items()}
    return dict(sd)


def _split_param(key: str):
    stem, _, param = key.rpartition(".")
    return stem, param


def official_to_diffusers_key(key: str) -> str:
    """Official (model_dancer.py) key -> diffusers WanTransformer3DModel key (unknown keys unchanged)."""
    if key == "head.modulation":
        return "scale_shift_table"
    m = _BLOCK_RE.match(key)
    if m:
        idx, rest = m.groups()
        if rest == "modulation":
            return f"blocks.{idx}.scale_shift_table"
        stem, param = _split_param(rest)
        if stem in _BLOCK_O2D:
            return f"blocks.{idx}.{_BLOCK_O2D[stem]}.{param}"
        return key
    stem, param = _split_param(key)
    if stem in _TOP_O2D:
        return f"{_TOP_O2D[stem]}.{param}"
    return key


def diffusers_to_official_key(key: str) -> str:
    """diffusers WanTransformer3DModel key -> official key (unknown keys unchanged)."""
    if key == "scale_shift_table":
        return "head.modulation"
    m = _BLOCK_RE.match(key)
    if m:
        idx, rest = m.groups()
        if rest == "scale_shift_table":
            return f"blocks.{idx}.modulation"
        stem, param = _split_param(rest)
        if stem in _BLOCK_D2O:
            return f"blocks.{idx}.{_BLOCK_D2O[stem]}.{param}"
        return key
    stem, param = _split_param(key)
    if stem in _TOP_D2O:
        return f"{_TOP_D2O[stem]}.{param}"
    return key


def official_to_diffusers(sd: Mapping[str, V]) -> Dict[str, V]:
    return {official_to_diffusers_key(k): v for k, v in sd.items()}


def diffusers_to_official(sd: Mapping[str, V]) -> Dict[str, V]:
    return {diffusers_to_official_key(k): v for k, v in sd.items()}
