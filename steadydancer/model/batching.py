"""Rows of a batched DiT call, and a batched call run one item at a time.

``rows(a, b, lo, hi)`` is how every caller that splits a batched DiT call cuts its arguments: tensors whose
first dimension is the batch ``b`` and lists / tuples of ``b`` items (per-item text contexts) are cut to rows
``lo:hi``; everything else (None, batch-1 tensors the model broadcasts, 0-d tensors, numbers) is passed whole.
``per_item(fn, args, b)`` calls ``fn`` once per item and concatenates the outputs along the batch.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


def rows(a: Any, b: int, lo: int, hi: int) -> Any:
    if torch.is_tensor(a):
        if a.dim() == 0 or a.shape[0] != b:
            return a
        return a[lo:hi]
    if isinstance(a, (list, tuple)) and len(a) == b:
        return type(a)(a[lo:hi])
    return a


def per_item(fn: Callable[..., torch.Tensor], args: Sequence[Any], b: int) -> torch.Tensor:
    """``fn(*args)`` as ``b`` calls of one item each (one plain call for ``b`` <= 1), outputs concatenated."""
    if b <= 1:
        return fn(*args)
    return torch.cat([fn(*(rows(a, b, i, i + 1) for a in args)) for i in range(b)])
