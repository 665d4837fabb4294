"""LoRA / full-delta patches for a loaded ``SteadyDancerDiT``.

Accepted key layouts (any mix, in one file):

- ``<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (ComfyUI, Kijai, kohya),
- ``<module>.lora_A.weight`` / ``.lora_B.weight`` (PEFT / diffusers; no alpha -> scale 1),
- ``<module>.diff`` (full weight delta), ``.diff_b`` (bias delta), ``<block>.diff_m`` (delta of the
  block's ``modulation``), as in lightx2v's distillation LoRAs (``blocks.N.diff_m``,
  ``blocks.N.cross_attn.norm_k_img.diff``),

with the prefixes ``diffusion_model.`` / ``model.diffusion_model.`` / ``transformer.`` or kohya's
``lora_unet_<module_path_with_underscores>``; module paths in diffusers' Wan layout are mapped to
the official names. Low-rank delta = ``strength * alpha / rank * up @ down``.

Float (fp32/fp16/bf16) weights get the delta merged in place (computed in fp32 per tensor, one
rounding back to the stored dtype). fp8 / GGUF layers keep their stored bytes and get a runtime patch
(added to the dequantized weight at every forward), so nothing is re-quantized.

Keys that match no weight are reported in ONE warning; a file that matches nothing, or whose shapes
do not fit the model, raises :class:`~.checkpoint.CheckpointError` naming the file - before anything
is changed.

Undo (``remove_loras``): runtime patches are simply dropped (``clear_patches``). A merged float weight can
be restored exactly only from a copy of its value before the first merge: ``apply_loras(...,
undo_limit_bytes=N)`` keeps such copies (in CPU RAM) while all of them together fit in ``N`` bytes. On fp8 /
GGUF models the float targets are biases, norms, modulations and the few non-block layers (small); on a
bf16 model a LoRA over every block Linear would need a second copy of the model, so past the limit no copies
are kept and ``can_remove_loras`` says False (the caller reloads the file instead). Restoring the copy gives
the bit-identical base weight, so ``remove_loras`` + ``apply_loras(new)`` equals a fresh load + ``apply_loras(new)``.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn

from ..model import keymap
from ..checkpoints import CheckpointError, sniff_format
from ..checkpoints.pth_file import torch_load_weights_only
from .quant import _Patched


class LoraKeyWarning(UserWarning):
    """Some LoRA keys matched no weight of the model."""


def _read_lora_file(path) -> dict:
    fmt = sniff_format(path)
    if fmt == "safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise CheckpointError(path, f"not a valid safetensors LoRA ({e})") from None
    if fmt == "pth":
        sd = torch_load_weights_only(path, mmap=False)
        return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    raise CheckpointError(path, f"a LoRA must be a safetensors (or .pth) file, this is {fmt}")


def _group(sd: dict, module_names) -> tuple[dict, list]:
    """file keys -> {module_path: {role: tensor}}, plus keys with no LoRA meaning."""
    kohya = keymap.kohya_lookup(module_names)
    groups, unknown = {}, []
    diffusers_layout = any(".attn1." in k or ".attn2." in k for k in sd)
    for k, v in sd.items():
        parsed = keymap.split_lora_key(k)
        if parsed is None:
            unknown.append(k)
            continue
        path, role = parsed
        path = keymap.resolve_module_path(path, kohya)
        if diffusers_layout:
            path = keymap.diffusers_module_to_official(path)
        groups.setdefault(path, {})[role] = (k, v)
    return groups, unknown


class _Target:
    __slots__ = ("module", "name", "quant", "shape", "dtype")

    def __init__(self, module, name, quant, shape, dtype):
        self.module, self.name, self.quant, self.shape, self.dtype = module, name, quant, shape, dtype


def _targets(model: nn.Module) -> dict:
    """official parameter key -> where it lives (float parameter or quantized layer weight)."""
    out = {}
    for mname, mod in model.named_modules():
        pre = mname + "." if mname else ""
        if isinstance(mod, _Patched):
            out[pre + "weight"] = _Target(mod, "weight", True, mod.weight_shape, mod.compute_dtype)
        for pname, p in mod.named_parameters(recurse=False):
            out[pre + pname] = _Target(mod, pname, False, tuple(p.shape), p.dtype)
    return out


def shape_target(key: str, shape) -> _Target:
    """A target known only by its shape (a checkpoint header): for checking a LoRA's fit without a model."""
    return _Target(None, key.rpartition(".")[2], False, tuple(shape), None)


def plan_lora(path, strength, targets, module_names, sd=None):
    """Validate one LoRA file (its tensors ``sd``, read from ``path`` when None; meta tensors are enough to check
    the fit) against ``targets``; returns (ops, unmatched keys). Changes nothing."""
    if sd is None:
        sd = _read_lora_file(path)
    groups, unknown = _group(sd, module_names)
    ops, unmatched, bad_shape = [], list(unknown), []
    for mpath, roles in groups.items():
        if "down" in roles or "up" in roles:
            if "down" not in roles or "up" not in roles:
                unmatched.extend(k for k, _ in roles.values())
                continue
            tkey = keymap.target_param(mpath, "down")
            t = targets.get(tkey)
            (dk, down), (uk, up) = roles["down"], roles["up"]
            if t is None:
                unmatched.extend([dk, uk] + ([roles["alpha"][0]] if "alpha" in roles else []))
            else:
                rank = down.shape[0]
                out_f, in_f = t.shape[0], int(torch.Size(t.shape[1:]).numel())
                if up.shape[0] != out_f or up.flatten(1).shape[1] != rank or down.flatten(1).shape[1] != in_f:
                    bad_shape.append(f"{dk}: up {tuple(up.shape)} / down {tuple(down.shape)} vs weight {t.shape}")
                else:
                    a = roles["alpha"][1] if "alpha" in roles else None
                    alpha = float(a) if a is not None and not a.is_meta else float(rank)
                    ops.append(("lowrank", tkey, t, (up, down), strength * alpha / rank))
        elif "alpha" in roles:
            unmatched.append(roles["alpha"][0])
        for role in ("diff", "diff_b", "diff_m"):
            if role not in roles:
                continue
            fk, delta = roles[role]
            tkey = keymap.target_param(mpath, role)
            t = targets.get(tkey)
            if t is None:
                unmatched.append(fk)
            elif delta.numel() != torch.Size(t.shape).numel():
                bad_shape.append(f"{fk}: {tuple(delta.shape)} vs {tkey} {t.shape}")
            else:
                ops.append(("diff", tkey, t, (delta,), strength))
    if bad_shape:
        raise CheckpointError(path, f"LoRA does not fit this model ({len(bad_shape)} shape mismatches, e.g. "
                                    f"{bad_shape[:3]}): it was made for another model or model size")
    if not ops:
        raise CheckpointError(path, f"LoRA matches no weight of this SteadyDancer model ({len(sd)} keys, e.g. "
                                    f"{sorted(sd)[:3]}): it is for another model or an unknown key layout")
    return ops, unmatched


_UNDO_ATTR = "_sd_lora_undo"


def _undo_state(model: nn.Module) -> dict:
    st = getattr(model, _UNDO_ATTR, None)
    if st is None:
        # originals: official param key -> CPU copy of the float value before the first merge.
        # exact: every change applied since load is in ``originals`` or a runtime patch.
        st = {"originals": {}, "exact": True}
        object.__setattr__(model, _UNDO_ATTR, st)  # plain attribute, not a submodule/buffer
    return st


def can_remove_loras(model: nn.Module) -> bool:
    """True when ``remove_loras`` can restore the exact base weights (no un-recorded merge happened)."""
    return _undo_state(model)["exact"]


@torch.no_grad()
def remove_loras(model: nn.Module) -> nn.Module:
    """Undo every LoRA applied to ``model``: drop all runtime patches, restore the recorded float weights.

    Raises ``RuntimeError`` (changing nothing) when a merge was not recorded (see ``can_remove_loras``).
    """
    st = _undo_state(model)
    if not st["exact"]:
        raise RuntimeError("LoRAs were merged into float weights without keeping the originals; reload the model")
    targets = _targets(model)
    for mod in model.modules():
        if isinstance(mod, _Patched) and mod._patches:
            mod.clear_patches()
    for tkey, orig in st["originals"].items():
        t = targets[tkey]
        p = getattr(t.module, t.name)
        p.data.copy_(orig.to(p.device))
    st["originals"].clear()
    return model


def _record_originals(model, plans, limit) -> None:
    """Keep CPU copies of the float weights these plans will merge into (first merge only), within ``limit``."""
    st = _undo_state(model)
    if not st["exact"]:
        return
    new = {}
    for ops in plans:
        for _, tkey, t, _, scale in ops:
            if scale != 0.0 and not t.quant and tkey not in st["originals"]:
                new[tkey] = t
    if not new:
        return
    have = sum(v.numel() * v.element_size() for v in st["originals"].values())
    need = sum(int(torch.Size(t.shape).numel()) * t.dtype.itemsize for t in new.values())
    if have + need > limit:
        st["exact"] = False
        st["originals"].clear()  # useless now: free the RAM
        return
    for tkey, t in new.items():
        st["originals"][tkey] = getattr(t.module, t.name).detach().to("cpu", copy=True)


@torch.no_grad()
def apply_loras(model: nn.Module, loras, undo_limit_bytes: int = 0) -> nn.Module:
    """Apply ``[(path, strength), ...]`` to ``model`` in order (stackable); returns the model.

    All files are validated before the first one is applied, so a bad file leaves the model untouched.
    ``undo_limit_bytes``: RAM allowed for copies of merged float weights, so ``remove_loras`` can undo them
    (runtime patches on fp8/GGUF layers need none).
    """
    loras = [(p, float(s)) for p, s in loras]
    targets = _targets(model)
    module_names = [n for n, _ in model.named_modules() if n]
    plans = []
    for path, strength in loras:
        if not os.path.exists(str(path)):
            raise CheckpointError(path, "no such LoRA file")
        ops, unmatched = plan_lora(path, strength, targets, module_names)
        if unmatched:
            warnings.warn(f"{path}: {len(unmatched)} LoRA keys match no weight of the model and were ignored: "
                          f"{sorted(unmatched)}", LoraKeyWarning, stacklevel=2)
        plans.append(ops)
    _record_originals(model, plans, int(undo_limit_bytes))
    for ops in plans:
        for kind, tkey, t, tensors, scale in ops:
            if scale == 0.0:
                continue
            if t.quant:
                t.module.add_patch("lowrank" if kind == "lowrank" else "diff", tensors, scale)
                continue
            p = getattr(t.module, t.name)
            dev = p.device
            if kind == "lowrank":
                up, down = (x.to(dev, torch.float32) for x in tensors)
                delta = (up.flatten(1) @ down.flatten(1)).reshape(p.shape)
            else:
                delta = tensors[0].to(dev, torch.float32).reshape(p.shape)
            p.data.copy_((p.data.to(torch.float32) + delta * scale).to(p.dtype))
    return model


_STANDARD_SUFFIX = {"down": ".lora_down.weight", "up": ".lora_up.weight", "alpha": ".alpha", "diff": ".diff",
                    "diff_b": ".diff_b"}


def standard_layout(sd: dict, module_names, prefix: str = "diffusion_model.") -> tuple[dict, list]:
    """The LoRA ``sd`` with every key in one standard spelling: ``<prefix><official module>`` + ``.lora_down.weight``
    / ``.lora_up.weight`` / ``.alpha`` / ``.diff`` / ``.diff_b``, whatever the file used (PEFT ``lora_A/B``, kohya
    ``lora_unet_...``, diffusers' Wan module names, no prefix). lightx2v's ``<block>.diff_m`` (modulation delta)
    becomes ``<block>.modulation.diff``: a full-difference patch on the ``modulation`` parameter. Pure renaming
    (tensors untouched), for hosts that apply patches themselves (ComfyUI's LoRA loader: nodes/model_nodes.py).
    Returns (renamed dict, keys with no LoRA meaning)."""
    groups, unknown = _group(sd, module_names)
    out = {}
    for mpath, roles in groups.items():
        for role, (k, v) in roles.items():
            if role == "diff_m":
                out[prefix + keymap.target_param(mpath, "diff_m") + ".diff"] = v
            elif role in _STANDARD_SUFFIX:
                out[prefix + mpath + _STANDARD_SUFFIX[role]] = v
            else:
                unknown.append(k)
    return out, unknown
