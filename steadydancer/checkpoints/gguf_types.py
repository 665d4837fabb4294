"""The GGML block-quantized types the GGUF reader accepts (and weights/quant.py dequantizes): one list, read
lazily so that importing the pack does not import ``gguf``."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def _gguf_types():
    """The GGML block-quantized types this pack reads (and weights/quant.py dequantizes)."""
    try:
        import gguf
    except ImportError:
        return ()
    Q = gguf.GGMLQuantizationType
    return (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)


class _LazyTypes:
    """``GGUF_QUANT_TYPES`` without importing gguf at module import time."""

    def __iter__(self):
        return iter(_gguf_types())

    def __contains__(self, item):
        return item in _gguf_types()


GGUF_QUANT_TYPES = _LazyTypes()
