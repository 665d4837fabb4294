"""Load SteadyDancer from bf16/fp16/fp32, fp8 (plain / scaled) and GGUF files; LoRAs; block swap.

Public API::

    from steadydancer_turbo.steadydancer.weights.loader import load_steadydancer, apply_loras, offload_model

    model = load_steadydancer(path, compute_dtype=torch.bfloat16, storage="auto", device=None,
                              offload_device="cpu", block_swap=0, vram_budget_gb=None, fp8_matmul=False)
    apply_loras(model, [("lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors", 1.0)])
    v = model(x, timestep, context, clip_fea, clip_fea_c, y, cond, ref_x, ref_c)
    offload_model(model)          # everything to the offload device, CUDA cache freed
    ensure_on_device(model)       # back (non-swapped weights) before the next run

``path``: a ``.safetensors`` file, a diffusers-style folder (``config.json`` + shard index + shards),
a ``.gguf`` file or a torch-zip ``.pth`` (read with ``weights_only=True``). Format, dtypes and model
type come from the file contents; see :mod:`.checkpoint`. Anything that is not SteadyDancer-14B (or a
smaller model of the same structure) is refused with :class:`~.checkpoint.CheckpointError` naming the
file and saying what it looks like (Wan T2V, Wan2.2, SDXL ...).

``storage``:

- ``"auto"``: fp8 and GGUF-quantized Linear weights (and patch embeddings) stay in their stored form
  and are dequantized per layer at forward time; every float tensor is stored in ``compute_dtype``.
  Quantized tensors of other kinds of module (tiny pose-module weights) are dequantized at load.
- ``"dequantize"``: everything is dequantized to ``compute_dtype`` at load (fastest forward, most memory).
- ``"fp8_e4m3fn"`` / ``"fp8_e5m2"``: like auto, and float Linear weights of the transformer blocks are
  quantized at load to per-tensor-scaled fp8 (halves the memory of a bf16 file).

``block_swap``: number of transformer blocks kept on ``offload_device`` and streamed to ``device``
just before they run (see :mod:`.blockswap`); ``vram_budget_gb`` picks the smallest such number whose
resident weights fit the budget (activations not included). ``fp8_matmul``: run fp8 e4m3 layers with
``torch._scaled_mm`` (:func:`.fp8_linear.scaled_mm_linear`) on GPUs with fp8 tensor cores (compute
capability >= 8.9), using the stored fp8 weights as they are; with ``storage="auto"`` the float Linear
weights of the blocks of a bf16/fp16/fp32 file are quantized to e4m3 at load for it (as with
``storage="fp8_e4m3fn"``). Elsewhere, and for weights it cannot use (e5m2, GGUF, ``"dequantize"``), it
is ignored; ``model.load_info["notes"]`` says why.

Memory: the model is built on the meta device and every tensor is copied straight from the memory
map to its final place (device, pinned host memory or host), one tensor at a time; the pages of the
file are dropped from the process after each tensor. No full-size intermediate copy (and no fp32
copy) is ever made: peak host RAM is about the host-resident part of the model plus one tensor.
A failure at any point leaves no model behind (everything allocated is released before the error
propagates).
"""
from __future__ import annotations

import gc
import logging
import traceback
import warnings

import torch
import torch.nn as nn

from .blockswap import (BlockSwap, HostArena, blocks_to_swap_for_budget, ensure_on_device, module_bytes,
                        offload_model)
from ..checkpoints import CheckpointError, CheckpointReader
from ..model import keymap
from .lora import LoraKeyWarning, apply_loras
from ..kernels.fp8_linear import fp8_matmul_supported, quantize_per_tensor
from .probe import check_tensors, config_of
from .quant import QuantConv, QuantLinear, dequantize_fp8, dequantize_gguf

log = logging.getLogger(__name__)

STORAGE_MODES = ("auto", "dequantize", "fp8_e4m3fn", "fp8_e5m2")
#: compute dtype choices, by the names the Model Loader node offers (its list is this mapping's keys)
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
#: the patch-embedding Conv3d modules (keymap's PATCH_EMBED_KEYS without ".weight")
PATCH_EMBEDS = tuple(k[:-len(".weight")] for k in keymap.PATCH_EMBED_KEYS)

__all__ = ["load_steadydancer", "apply_loras", "offload_model", "ensure_on_device", "BlockSwap",
           "blocks_to_swap_for_budget", "CheckpointError", "LoraKeyWarning", "STORAGE_MODES", "COMPUTE_DTYPES"]


def _dtype(x):
    if isinstance(x, str):
        x = COMPUTE_DTYPES.get(_DTYPE_ALIASES.get(x.lower(), x.lower()), x)
    if x not in COMPUTE_DTYPES.values():
        raise ValueError(f"compute_dtype must be one of {' / '.join(COMPUTE_DTYPES)}, got {x!r}")
    return x


def _set_module(root: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _plan_quant_modules(model, reader, storage, cd):
    """Swap Linear / patch-embedding Conv modules whose weight stays quantized (on the meta device)."""
    replaced = {}
    fp8_target = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}.get(storage)
    for name, mod in list(model.named_modules()):
        is_linear = type(mod) is nn.Linear
        is_patch = isinstance(mod, nn.Conv3d) and name in PATCH_EMBEDS
        if not (is_linear or is_patch):
            continue
        info = reader.infos.get(name + ".weight")
        if info is None:
            continue
        kind = info.kind
        if storage == "dequantize" or kind not in ("fp8", "gguf"):
            if fp8_target is not None and is_linear and kind == "float" and name.startswith("blocks."):
                kind, qtype = "fp8_new", fp8_target
            else:
                continue
        else:
            qtype = info.dtype if kind == "fp8" else info.qtype
        qkind = "gguf" if kind == "gguf" else "fp8"
        if is_linear:
            new = QuantLinear(mod.in_features, mod.out_features, mod.bias is not None, qkind, qtype, cd)
        else:
            new = QuantConv(mod, qkind, qtype, cd)
        # meta placeholders with the stored dtype/shape, so sizes are known before loading
        if qkind == "gguf":
            new.weight = torch.empty(info.stored_shape, dtype=torch.uint8, device="meta")
        else:
            new.weight = torch.empty(tuple(new.weight_shape) if kind == "fp8_new" else info.shape,
                                     dtype=qtype, device="meta")
            n_scale = 1
            if kind == "fp8" and info.scale_key is not None:
                for d in info.scale_source.shape(info.scale_key):
                    n_scale *= d
            new.weight_scale = torch.empty(max(1, n_scale), dtype=torch.float32, device="meta")
        new._source_kind = kind
        _set_module(model, name, new)
        replaced[name] = new
    return replaced


class _Alloc:
    """Where the tensors of one module go: ``device`` memory, or a swapped block's host arena."""

    def __init__(self, device, arena=None):
        self.device, self.arena = device, arena

    def __call__(self, shape, dtype):
        if self.arena is not None:
            return self.arena.empty(shape, dtype)
        return torch.empty(tuple(shape), dtype=dtype, device=self.device)


def _float_value(reader, key, cd, work):
    """Any stored tensor -> float tensor in cd (used for tensors that are not kept quantized).

    Dequantization runs on ``work`` (the GPU when loading to one: decoding 14 B weights on the CPU takes
    minutes); float tensors are returned as the zero-copy view of the file.
    """
    info = reader.infos[key]
    raw = reader.read(key)
    if info.kind == "gguf":
        return dequantize_gguf(raw.to(work), info.qtype, info.shape, cd)
    if info.kind == "fp8":
        w, s = raw
        return dequantize_fp8(w.to(work), s, cd)
    return raw


def _resolve_device(device):
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def load_steadydancer(path, compute_dtype=torch.bfloat16, storage="auto", device=None, offload_device="cpu",
                      block_swap=0, vram_budget_gb=None, fp8_matmul=False, attention="sdpa", compute_device=None):
    """Load a SteadyDancer DiT from ``path`` (see the module docstring). Returns ``SteadyDancerDiT``
    in eval mode with ``model.compute_dtype = compute_dtype``, ``model.block_swap`` (the
    :class:`~.blockswap.BlockSwap` controller, also for ``block_swap=0``) and ``model.load_info``.

    ``compute_device``: where the model will run when that is not ``device`` (a host that loads to CPU RAM and
    moves the weights itself, e.g. ComfyUI's ModelPatcher): decides fp8_matmul support and where dequantizing /
    quantizing at load runs. Default: ``device``."""
    from ..model.dit import build_meta

    cd = _dtype(compute_dtype)
    if storage not in STORAGE_MODES:
        raise ValueError(f"storage must be one of {STORAGE_MODES}, got {storage!r}")
    device = _resolve_device(device)
    offload_device = torch.device(offload_device)
    run_device = torch.device(compute_device) if compute_device is not None else device

    reader = CheckpointReader(path)
    model = None
    try:
        cfg = config_of(path, reader)
        model = build_meta(cfg, attention)
        # the check the Model Loader's VALIDATE_INPUTS makes too
        unexpected = check_tensors(path, reader, {k: v.shape for k, v in model.state_dict().items()})
        if unexpected:
            warnings.warn(f"{path}: {len(unexpected)} tensors are not part of the SteadyDancer model and were "
                          f"ignored: {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}", stacklevel=2)

        notes = []
        eff_storage = storage
        if fp8_matmul:
            if not fp8_matmul_supported(run_device):
                notes.append(f"fp8_matmul ignored: {run_device} has no fp8 tensor cores (needs an NVIDIA GPU of "
                             "compute capability 8.9+: Ada / Hopper or newer)")
                fp8_matmul = False
            elif storage == "dequantize":
                notes.append("fp8_matmul ignored: weight_storage 'dequantize' keeps no fp8 weights")
                fp8_matmul = False
            elif storage == "fp8_e5m2":
                notes.append("fp8_matmul ignored for the e5m2 weights quantized at load (needs e4m3)")
            elif storage == "auto":
                eff_storage = "fp8_e4m3fn"  # float block Linears -> e4m3 at load; stored fp8/GGUF kept as is
        quant = _plan_quant_modules(model, reader, eff_storage, cd)
        model.compute_dtype = cd

        # placement
        n_blocks = len(model.blocks)
        if vram_budget_gb is not None:
            # sizes of the weights as they will be stored: float tensors in cd
            sized = _sized_meta_copy(model, cd)
            n_swap = blocks_to_swap_for_budget(sized, float(vram_budget_gb))
            if block_swap:
                n_swap = max(n_swap, int(block_swap))
        else:
            n_swap = int(block_swap or 0)
        if not 0 <= n_swap <= n_blocks:
            raise ValueError(f"block_swap must be in 0..{n_blocks}, got {n_swap}")
        pin = device.type == "cuda" and offload_device.type == "cpu" and n_swap > 0
        allocs, arenas = {}, []
        for i in range(n_swap):
            if offload_device.type == "cpu":
                sized = _sized_meta_copy(model.blocks[i], cd)
                arena = HostArena(HostArena.size_for(list(sized.buffers())), pin)
                arenas.append(arena)
                a = _Alloc(offload_device, arena)
            else:
                a = _Alloc(offload_device)
            for m in model.blocks[i].modules():
                allocs[id(m)] = a
        on_device = _Alloc(device)
        work = run_device if run_device.type == "cuda" else torch.device("cpu")

        # stream the weights in, one tensor at a time
        for mname, mod in model.named_modules():
            pre = mname + "." if mname else ""
            alloc = allocs.get(id(mod), on_device)
            if isinstance(mod, (QuantLinear, QuantConv)):
                _load_quant(mod, pre, reader, alloc, work)
                names = ["bias"] if mod.bias is not None else []
            else:
                names = [n for n, p in mod._parameters.items() if p is not None]
            for pname in names:
                key = pre + pname
                src = _float_value(reader, key, cd, work)
                dst = alloc(tuple(src.shape), cd)
                dst.copy_(src)
                del src
                reader.release(key)
                mod._parameters[pname] = nn.Parameter(dst, requires_grad=False)
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if left:
            raise CheckpointError(path, f"internal error: {len(left)} tensors were not loaded, e.g. {left[:3]}")

        n_fp8mm = 0
        for m in quant.values():
            m.fp8_matmul = bool(fp8_matmul) and isinstance(m, QuantLinear) and m.fp8_matmul_capable()
            n_fp8mm += m.fp8_matmul
        if fp8_matmul:
            other = sum(isinstance(m, QuantLinear) and not m.fp8_matmul for m in quant.values())
            if other:
                notes.append(f"fp8_matmul: {other} Linear layers are not fp8 e4m3 with a per-tensor scale (GGUF / "
                             f"e5m2 / per-channel scales) and keep the dequantized matmul")
        for n in notes:
            log.warning("SteadyDancer: %s", n)
        model.requires_grad_(False)
        model.eval()
        model.block_swap = BlockSwap(model, n_swap, device, offload_device, arenas=arenas)
        model.load_info = {
            "path": str(path), "format": reader.format, "stored": reader.kinds(), "storage": storage,
            "compute_dtype": cd, "quantized_layers": len(quant), "blocks_to_swap": n_swap,
            "device": str(device), "pinned_blocks": sum(a.pinned for a in arenas),
            "fp8_matmul": bool(fp8_matmul), "fp8_matmul_layers": int(n_fp8mm), "notes": notes,
            "weight_bytes": module_bytes(model),
        }
        log.info("SteadyDancer loaded: %s", model.load_info)
        return model
    except BaseException as e:
        # The traceback keeps this frame and the ones below it alive, with their locals, for as long as the caller
        # holds the error: drop every reference to what was loaded here and clear the finished frames below, so
        # the memory really goes back now (gc + empty_cache), not whenever the caller lets go of the error.
        model = quant = sized = arena = arenas = a = allocs = on_device = alloc = mod = m = src = dst = None
        traceback.clear_frames(e.__traceback__)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise
    finally:
        reader.close()


def _load_quant(mod, pre, reader, alloc, work):
    key = pre + "weight"
    info = reader.infos[key]
    kind = mod._source_kind
    raw = None
    if kind == "gguf":
        raw = reader.read(key)
        w = alloc(tuple(raw.shape), torch.uint8)
        w.copy_(raw)
        scale = None
    elif kind == "fp8":
        raw, s = reader.read(key)
        w = alloc(tuple(raw.shape), raw.dtype)
        w.copy_(raw)
        scale = s if s is not None else torch.ones(1)
    else:  # "fp8_new": quantize a float weight at load
        src = reader.read(key)
        q, scale = quantize_per_tensor(src.to(work), mod.qtype)
        w = alloc(tuple(q.shape), q.dtype)
        w.copy_(q)
        del q, src
    del raw
    reader.release(key)
    mod.weight = w
    sc = alloc((max(1, scale.numel()),), torch.float32) if scale is not None else None
    if sc is not None:
        sc.copy_(scale.reshape(-1).to(torch.float32))
    mod.weight_scale = sc
    del mod._source_kind
    if info.kind == "fp8" and kind == "fp8" and tuple(w.shape) != tuple(mod.weight_shape):
        mod.weight = w.reshape(mod.weight_shape)


def _sized_meta_copy(model, cd):
    """A stand-in exposing ``blocks`` whose byte counts use cd for float parameters (meta, no memory)."""

    class _Sized(nn.Module):
        pass

    def sized(mod):
        m = nn.ModuleList() if isinstance(mod, nn.ModuleList) else _Sized()
        for n, p in mod._parameters.items():
            if p is not None:
                m.register_buffer(n, torch.empty(p.shape, dtype=cd, device="meta"))
        for n, b in mod._buffers.items():
            if b is not None:
                m.register_buffer(n, b)
        for n, c in mod._modules.items():
            if c is not None:
                if isinstance(m, nn.ModuleList):
                    m.append(sized(c))
                else:
                    m.add_module(n, sized(c))
        return m

    return sized(model)
