"""Replicas of a loaded DiT in other processes, from rank 0's tensors (never from the file).

A host application (ComfyUI: nodes/native_multigpu.py) owns rank 0's model, with whatever it did to it (LoRA
patches merged into float weights, per-call patches on fp8 / GGUF layers, a partial load). The workers get:

- ``describe(model, resolved)``: a picklable *spec*: the config, the speed switches (attention backend, RoPE
  dtype, compiled blocks), every quantized layer (fp8 / GGUF: kind, stored dtype, shape, fp8-matmul flags, the
  pack's own runtime patches) and the list of tensors (name, shape, dtype) in a fixed order. Layers named in
  ``resolved`` (quantized layers that the host patches per call) are described as *resolved*: they hold the
  float weight the layer's forward computes (``dequantized_weight``: dequantize, patch, cast), so a worker
  computes exactly what rank 0 computes, without the host's patch code. Every other tensor keeps its stored form
  (fp8 as fp8, GGUF as its packed blocks).
- ``build(spec, device)``: the same module tree on ``device`` with empty tensors (``SteadyDancerDiT`` from the
  meta device, the quantized layers swapped in), in eval mode, compiled when rank 0's blocks are.
- ``broadcast(tensors, src_tensors)``: one ``torch.distributed.broadcast`` per tensor from rank 0 (as bytes, so
  fp8 / packed GGUF / bf16 travel unchanged on NCCL and gloo). Rank 0 passes its values, workers their empty
  tensors (filled in place).
- ``bind(model, tensors)`` / ``release(model)``: rank 0's own replica uses rank 0's tensors in place (shared
  storage when they are already on its device) for one run, and lets go of them afterwards, so the host's
  memory manager can move or free its weights between runs.

Module types this module does not know (fused q/k/v, FP8Linear from ``speed_options.use_fp8``) are refused with
``DistributedSetupError`` instead of being replicated wrongly. Imports: model/, weights/, kernels/ only.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..kernels import backends
from ..model.dit import SteadyDancerDiT, blocks_compiled, build_meta
from ..weights.quant import QuantConv, QuantLinear, _Patched
from .distributed import DistributedSetupError

__all__ = ["describe", "build", "values", "broadcast", "bind", "release", "tensor_names", "fingerprint",
           "ResolvedLinear", "ResolvedConv", "as_bytes"]


class _Resolved:
    """A quantized layer that holds its final float weight (``weight`` in the compute dtype, already
    dequantized and patched): the forward of the quantized class, without dequantization."""

    def dequantized_weight(self, dtype=None, device=None) -> torch.Tensor:
        w = self.weight
        return w.to(device=device if device is not None else w.device, dtype=dtype or self.compute_dtype)

    def fp8_matmul_active(self, x) -> bool:
        return False


class ResolvedLinear(_Resolved, QuantLinear):
    pass


class ResolvedConv(_Resolved, QuantConv):
    pass


_QUANT = {"QuantLinear": QuantLinear, "QuantConv": QuantConv, "ResolvedLinear": ResolvedLinear,
          "ResolvedConv": ResolvedConv}


def _core_type(m: nn.Module) -> type:
    """The torch / pack-core class a (possibly host-subclassed) module behaves as: ComfyUI's manual_cast Linear
    is an ``nn.Linear``, its DiT subclass a ``SteadyDancerDiT``."""
    core = SteadyDancerDiT.__module__.rsplit(".model.", 1)[0]  # <pack>.steadydancer
    for cls in type(m).__mro__:
        if cls.__module__.startswith(("torch.", core)):
            return cls
    return type(m)


def describe(model: SteadyDancerDiT, resolved: Iterable[str] = ()) -> dict:
    """The spec of ``model`` (see the module docstring). ``resolved``: names of quantized layers to describe as
    resolved (they must be ``_Patched`` layers)."""
    resolved = set(resolved)
    ref = dict(build_meta(model.config, "sdpa").named_modules())
    quant, tensors = {}, []
    for name, m in model.named_modules():
        if isinstance(m, _Patched):
            r = name in resolved
            kind = ("Resolved" if r else "Quant") + ("Linear" if isinstance(m, QuantLinear) else "Conv")
            quant[name] = dict(kind=kind, qkind=m.qkind, qtype=m.qtype, weight_shape=tuple(m.weight_shape),
                               compute_dtype=m.compute_dtype, fp8_matmul=bool(m.fp8_matmul) and not r,
                               fp8_act_scaling=m.fp8_act_scaling, fp8_fast_accum=m.fp8_fast_accum,
                               patches=[] if r else list(m._patches), bias=m.bias is not None)
            if r:
                tensors.append((f"{name}.weight", tuple(m.weight_shape), m.compute_dtype, "buffer"))
                if m.bias is not None:
                    tensors.append((f"{name}.bias", tuple(m.bias.shape), m.bias.dtype, "param"))
                continue
        elif name in resolved:
            raise DistributedSetupError(f"{name} is not a quantized layer; only those can be resolved")
        elif name not in ref or _core_type(m) is not type(ref[name]):
            raise DistributedSetupError(f"module {name or '<root>'} ({type(m).__name__}) cannot be replicated on "
                                        f"other GPUs (expected {type(ref.get(name)).__name__})")
        for attr, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None:
                kind = "param" if attr in m._parameters else "buffer"
                tensors.append((f"{name}.{attr}" if name else attr, tuple(t.shape), t.dtype, kind))
    attention = model.attention_backend
    return dict(config=model.config, attention=attention, sparse=backends.sparse_settings(attention),
                rope_dtype=model.rope_dtype, rope_real_tables=model.rope_real_tables,
                compute_dtype=model._compute_dtype, compiled=blocks_compiled(model), quant=quant, tensors=tensors)


def fingerprint(spec: dict) -> str:
    """A short hash of everything in ``spec`` (a replica built from an equal spec has the same structure)."""
    return hashlib.sha1(repr(sorted((k, repr(v)) for k, v in spec.items())).encode()).hexdigest()[:16]


def tensor_names(spec: dict) -> list:
    return [t[0] for t in spec["tensors"]]


def _set(model: nn.Module, name: str, t: torch.Tensor, kind: str) -> None:
    mname, _, attr = name.rpartition(".")
    mod = model.get_submodule(mname) if mname else model
    if kind == "param":
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[attr] = t


def build(spec: dict, device, allocate: bool = True) -> SteadyDancerDiT:
    """The replica of ``spec`` on ``device``: empty tensors (``allocate``) or meta tensors (rank 0's replica,
    which ``bind`` fills with rank 0's own tensors)."""
    if spec["sparse"] is not None:
        backends.sparse_backend(**spec["sparse"])  # the same registered name as on rank 0
    model = build_meta(spec["config"], spec["attention"])
    for name, q in spec["quant"].items():
        old = model.get_submodule(name)
        cls = _QUANT[q["kind"]]
        if issubclass(cls, QuantLinear):
            new = cls(old.in_features, old.out_features, q["bias"], q["qkind"], q["qtype"], q["compute_dtype"])
        else:
            new = cls(old, q["qkind"], q["qtype"], q["compute_dtype"])
        new.weight_shape = tuple(q["weight_shape"])
        new.fp8_matmul, new.fp8_act_scaling, new.fp8_fast_accum = (q["fp8_matmul"], q["fp8_act_scaling"],
                                                                    q["fp8_fast_accum"])
        new._patches = list(q["patches"])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    for name, shape, dtype, kind in spec["tensors"]:
        t = torch.empty(shape, dtype=dtype, device=device if allocate else "meta")
        _set(model, name, t, kind)
    model.rope_dtype, model.rope_real_tables = spec["rope_dtype"], spec["rope_real_tables"]
    model.compute_dtype = spec["compute_dtype"]
    model.requires_grad_(False)
    model.eval()
    if spec["compiled"]:
        from ..weights import speed_options as accel
        accel.compile_blocks(model, fullgraph=False)
        model.rope_dtype = spec["rope_dtype"]
    return model


def values(model: SteadyDancerDiT, spec: dict, override=None) -> list:
    """Rank 0's tensors for ``spec`` (spec order): a resolved layer's ``dequantized_weight()`` (what its forward
    computes: dequantize, patch, cast), every other tensor as ``model`` holds it. ``override(name, tensor)``
    (optional) may return another value for a tensor (a host's patched weight that is not merged in place)."""
    out = []
    for name, *_ in spec["tensors"]:
        mname, _, attr = name.rpartition(".")
        mod = model.get_submodule(mname) if mname else model
        q = spec["quant"].get(mname)
        if q is not None and q["kind"].startswith("Resolved") and attr == "weight":
            with torch.no_grad():
                t = mod.dequantized_weight(q["compute_dtype"])
        else:
            t = getattr(mod, attr)
            if override is not None:
                t = override(name, t)
        out.append(t)
    return out


def _tensors_of(model: nn.Module, spec: dict) -> list:
    out = []
    for name, *_ in spec["tensors"]:
        mname, _, attr = name.rpartition(".")
        mod = model.get_submodule(mname) if mname else model
        out.append(getattr(mod, attr))
    return out


def bind(model: SteadyDancerDiT, spec: dict, tensors: Sequence[torch.Tensor], device) -> None:
    """Rank 0's replica runs on ``tensors`` (spec order), moved to ``device`` where they are not there."""
    for (name, shape, dtype, kind), t in zip(spec["tensors"], tensors, strict=True):
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise DistributedSetupError(f"{name}: {tuple(t.shape)} {t.dtype}, the spec says {shape} {dtype}")
        _set(model, name, t.detach().to(device), kind)


def release(model: SteadyDancerDiT, spec: dict) -> None:
    """Drop rank 0's tensors from its replica (back to meta placeholders)."""
    for name, shape, dtype, kind in spec["tensors"]:
        _set(model, name, torch.empty(shape, dtype=dtype, device="meta"), kind)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view (what the broadcasts send: any dtype, fp8 included)."""
    return t.reshape(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


@torch.no_grad()
def broadcast(spec: dict, tensors: Optional[Sequence[torch.Tensor]] = None, model: Optional[nn.Module] = None,
              device=None, group=None) -> int:
    """Send rank 0's ``tensors`` (spec order; rank 0) into every worker's ``model`` (built by ``build``;
    workers). One broadcast per tensor, as bytes, through ``device`` (the rank's GPU on NCCL, CPU on gloo).
    Returns the bytes sent / received."""
    rank = dist.get_rank()
    if rank == 0:
        if tensors is None:
            raise DistributedSetupError("rank 0 broadcasts its tensors")
        items = tensors
    else:
        items = _tensors_of(model, spec)
    total = 0
    for t in items:
        if t.numel() == 0:
            continue
        if rank == 0:
            buf = as_bytes(t.detach().to(device).contiguous())
        else:
            buf = as_bytes(t)  # freshly allocated, contiguous: received in place
        dist.broadcast(buf, 0, group=group)
        total += buf.numel()
    return total
