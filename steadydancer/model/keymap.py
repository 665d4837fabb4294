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
# official -> diffusers, whole parameter names: the modulation tables (head and per block)
_TOP_PARAM_O2D = {"head.modulation": "scale_shift_table"}
_BLOCK_PARAM_O2D = {"modulation": "scale_shift_table"}
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _inverse(d: Dict[str, str]) -> Dict[str, str]:
    inv = {v: k for k, v in d.items()}
    assert len(inv) == len(d), "key maps must be one-to-one"
    return inv


# (top-level parameters, top-level modules, block parameters, block modules), one tuple per direction
_O2D = (_TOP_PARAM_O2D, _TOP_O2D, _BLOCK_PARAM_O2D, _BLOCK_O2D)
_D2O = tuple(_inverse(d) for d in _O2D)


def strip_prefix(sd: Mapping[str, V]) -> Dict[str, V]:
    """Remove a container prefix shared by the DiT keys (e.g. ``model.diffusion_model.``, TurboDiffusion's
    ``net.``) and checkpoint-wrapper infixes: the checkpoint readers' rule (``common_prefix`` +
    ``normalize_key``) applied to a whole dict."""
    prefix = common_prefix(sd)
    return {normalize_key(k, prefix): v for k, v in sd.items()}


def _split_param(key: str):
    stem, _, param = key.rpartition(".")
    return stem, param


def _map_key(key: str, maps) -> str:
    top_params, top_modules, block_params, block_modules = maps
    if key in top_params:
        return top_params[key]
    m = _BLOCK_RE.match(key)
    if m:
        idx, rest = m.groups()
        if rest in block_params:
            return f"blocks.{idx}.{block_params[rest]}"
        stem, param = _split_param(rest)
        if stem in block_modules:
            return f"blocks.{idx}.{block_modules[stem]}.{param}"
        return key
    stem, param = _split_param(key)
    if stem in top_modules:
        return f"{top_modules[stem]}.{param}"
    return key


def official_to_diffusers_key(key: str) -> str:
    """Official (model_dancer.py) key -> diffusers WanTransformer3DModel key (unknown keys unchanged)."""
    return _map_key(key, _O2D)


def diffusers_to_official_key(key: str) -> str:
    """diffusers WanTransformer3DModel key -> official key (unknown keys unchanged)."""
    return _map_key(key, _D2O)


def official_to_diffusers(sd: Mapping[str, V]) -> Dict[str, V]:
    return {official_to_diffusers_key(k): v for k, v in sd.items()}


def diffusers_to_official(sd: Mapping[str, V]) -> Dict[str, V]:
    return {diffusers_to_official_key(k): v for k, v in sd.items()}



# =============================================================================================
# Loader / LoRA key spellings (owner: loader)
# =============================================================================================
# Spellings beyond the prefixes above:
# - TurboDiffusion training checkpoints: ``net.<key>``; FSDP activation checkpointing inserts
#   ``_checkpoint_wrapped_module.`` after each wrapped module (``blocks.0._checkpoint_wrapped_module.self_attn.q.weight``)
#   and the Conv3d patch embeddings are stored flattened to 2-D ``[dim, C*1*2*2]`` (a Linear over patches).
# - kohya-style LoRAs spell the module path with underscores: ``lora_unet_blocks_0_self_attn_q``.

#: Prefixes stripped by the checkpoint readers (longest first: ``model.`` is a prefix of
#: ``model.diffusion_model.``): KNOWN_PREFIXES plus TurboDiffusion's ``net.``.
CHECKPOINT_PREFIXES = KNOWN_PREFIXES + ("net.",)
#: Prefixes stripped from LoRA keys (before the kohya underscore form is resolved).
LORA_PREFIXES = KNOWN_PREFIXES + ("base_model.model.",)
KOHYA_PREFIX = "lora_unet_"
CHECKPOINT_WRAPPER_INFIX = "_checkpoint_wrapped_module."
#: Non-weight bookkeeping entries some writers add; never parameters.
IGNORED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")
IGNORED_KEYS = ("scaled_fp8",)

#: Conv3d weights that TurboDiffusion stores flattened to 2-D.
PATCH_EMBED_KEYS = ("patch_embedding.weight", "patch_embedding_fuse.weight", "patch_embedding_ref_c.weight")


def strip_key_prefix(key: str, prefixes=CHECKPOINT_PREFIXES) -> str:
    for p in prefixes:
        if key.startswith(p):
            return key[len(p):]
    return key


def common_prefix(keys, prefixes=CHECKPOINT_PREFIXES) -> str:
    """The prefix (from ``prefixes``) carried by the checkpoint's transformer keys, or ''.

    Chosen by majority so a few stray top-level entries (``scaled_fp8``) don't decide it.
    """
    counts = {p: 0 for p in prefixes}
    n = 0
    for k in keys:
        n += 1
        for p in prefixes:
            if k.startswith(p):
                counts[p] += 1
                break
    best = max(prefixes, key=lambda p: counts[p])
    return best if counts[best] * 2 > n else ""


def normalize_key(key: str, prefix: str = "") -> str:
    """Checkpoint key -> official key (prefix stripped, checkpoint-wrapper infixes removed)."""
    if prefix and key.startswith(prefix):
        key = key[len(prefix):]
    if CHECKPOINT_WRAPPER_INFIX in key:
        key = key.replace(CHECKPOINT_WRAPPER_INFIX, "")
    return key


def is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.endswith(IGNORED_SUFFIXES)


# ---------------------------------------------------------------------------------------------
# LoRA key layouts
# ---------------------------------------------------------------------------------------------
#: suffix -> (role, target parameter name relative to the module path)
LORA_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff_m", "diff_m"),
    (".diff", "diff"),
)


def split_lora_key(key: str):
    """``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` -> (``blocks.0.self_attn.q``, 'down').

    Returns (module_path, role) with the module path still in the file's spelling except for the
    stripped prefixes (the kohya underscore form is resolved by :func:`resolve_module_path`), or
    None when the key has no known LoRA suffix.
    """
    for suffix, role in LORA_SUFFIXES:
        if key.endswith(suffix):
            path = key[: -len(suffix)]
            if path.startswith(KOHYA_PREFIX):
                return path, role
            return normalize_key(strip_key_prefix(path, LORA_PREFIXES)), role
    return None


def target_param(module_path: str, role: str) -> str:
    """Parameter a LoRA entry modifies: low-rank and ``diff`` -> weight, ``diff_b`` -> bias,
    ``diff_m`` -> the modulation parameter of that module (``blocks.N.diff_m`` -> ``blocks.N.modulation``)."""
    if role == "diff_b":
        return module_path + ".bias"
    if role == "diff_m":
        return (module_path + "." if module_path else "") + "modulation"
    return module_path + ".weight"


def kohya_lookup(module_names) -> dict:
    """``lora_unet_blocks_0_self_attn_q`` -> ``blocks.0.self_attn.q`` for the given module paths."""
    return {KOHYA_PREFIX + re.sub(r"\.", "_", n): n for n in module_names}


def resolve_module_path(path: str, kohya: dict) -> str:
    if path.startswith(KOHYA_PREFIX):
        return kohya.get(path, path)
    return path


def diffusers_module_to_official(path: str) -> str:
    """Module path in diffusers' Wan layout (``blocks.0.attn1.to_q``) -> official (``blocks.0.self_attn.q``)."""
    if path in ("scale_shift_table",) or path.endswith(".scale_shift_table"):
        return diffusers_to_official_key(path).rpartition(".")[0] or ""
    return diffusers_to_official_key(path + ".weight")[: -len(".weight")]
