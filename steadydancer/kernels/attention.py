"""Attention kernels behind one small interface.

``attention(q, k, v, backend="sdpa")`` with q [B, Lq, H, D], k/v [B, Lk, H, D] returns [B, Lq, H, D] in
q's dtype. Full (unmasked, non-causal) attention with the default 1/sqrt(D) scale, which is all the
SteadyDancer DiT needs (the official code passes no masks: all sequences in a batch have equal length and
the text context is zero-padded, not masked).

Backends live in a registry so more can be added without touching the model::

    register_backend("my_kernel", fn, is_available=lambda: True)

``fn(q, k, v)`` takes and returns the [B, L, H, D] layout. ``"sdpa"`` (PyTorch
``scaled_dot_product_attention``) is always available; ``"flash_attn"`` (FlashAttention 3 or 2) and
``"sage"`` (SageAttention) register themselves only when their package imports, and are used only when
chosen.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class _Backend:
    fn: AttnFn
    is_available: Callable[[], bool]
    doc: str = ""


_REGISTRY: Dict[str, _Backend] = {}


def register_backend(name: str, fn: AttnFn, is_available: Callable[[], bool] = lambda: True, doc: str = "",
                     overwrite: bool = False) -> None:
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"attention backend {name!r} is already registered")
    _REGISTRY[name] = _Backend(fn, is_available, doc)


def available_backends() -> List[str]:
    """Names of the registered backends that can run here."""
    out = []
    for name, b in _REGISTRY.items():
        try:
            if b.is_available():
                out.append(name)
        except Exception:  # a probe must never break model construction
            pass
    return out


def get_backend(name: str) -> AttnFn:
    b = _REGISTRY.get(name)
    if b is None:
        raise ValueError(f"unknown attention backend {name!r}; registered: {sorted(_REGISTRY)}")
    if not b.is_available():
        raise RuntimeError(f"attention backend {name!r} is not available here; available: {available_backends()}")
    return b.fn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    return get_backend(backend)(q, k, v)


# ---------------------------------------------------------------------- sdpa
def _sdpa(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


register_backend("sdpa", _sdpa, doc="torch.nn.functional.scaled_dot_product_attention (PyTorch picks the kernel)")


# ---------------------------------------------------------------------- optional kernels
def _importable(mod: str) -> Callable[[], bool]:
    state = {}

    def probe() -> bool:
        if "ok" not in state:
            try:
                importlib.import_module(mod)
                state["ok"] = True
            except Exception:
                state["ok"] = False
        return state["ok"]

    return probe


# one probe per module, made once: attention() checks availability on every call, so the result must be cached
_has_flash3 = _importable("flash_attn_interface")
_has_flash2 = _importable("flash_attn")


def _flash_available() -> bool:
    return _has_flash3() or _has_flash2()


_HALF = (torch.float16, torch.bfloat16)


def _flash(q, k, v):
    dtype = q.dtype
    if dtype not in _HALF:  # FlashAttention needs half inputs (official code casts to bf16 the same way)
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    if _has_flash3():
        import flash_attn_interface  # FlashAttention 3 (Hopper)
        out = flash_attn_interface.flash_attn_func(q, k, v)
        out = out[0] if isinstance(out, tuple) else out
    else:
        import flash_attn
        out = flash_attn.flash_attn_func(q, k, v)
    return out.to(dtype)


register_backend("flash_attn", _flash, _flash_available, doc="FlashAttention 3 if importable, else 2")


def _sage(q, k, v):
    import sageattention
    dtype = q.dtype
    if dtype not in _HALF:
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    out = sageattention.sageattn(q, k, v, tensor_layout="NHD", is_causal=False)
    return out.to(dtype)


register_backend("sage", _sage, _importable("sageattention"), doc="SageAttention (quantised QK, lossy)")


# Faster kernels (cuDNN attention, "auto", top-k block-sparse "flex_sparse"); imported last because it registers
# into the registry above.
from . import backends as fast_attention  # noqa: E402,F401
