"""Attention kernels behind one small interface.

``attention(q, k, v, backend="sdpa")`` with q [B, Lq, H, D], k/v [B, Lk, H, D] returns [B, Lq, H, D] in
q's dtype. Full (unmasked, non-causal) attention with the default 1/sqrt(D) scale, which is all the
SteadyDancer DiT needs (the official code passes no masks: all sequences in a batch have equal length and
the text context is zero-padded, not masked).

Backends live in a registry so more can be added without touching the model::

    register_backend("my_kernel", fn, is_available=lambda: True)

``fn(q, k, v)`` takes and returns the [B, L, H, D] layout. This module holds the registry and ``"sdpa"``
(PyTorch ``scaled_dot_product_attention``, always available) and imports no backend: the others (cuDNN,
flash, sage, top-k sparse; ``backends.py``) are registered explicitly through ``register_builtin_backends()``,
which the ``kernels`` package calls once on import.
"""
from __future__ import annotations

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


def is_registered(name: str) -> bool:
    return name in _REGISTRY


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
def sdpa(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


register_backend("sdpa", sdpa, doc="torch.nn.functional.scaled_dot_product_attention (PyTorch picks the kernel)")
