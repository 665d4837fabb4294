"""What every checkpoint reader answers: CheckpointError (names the file) and TensorInfo (key, shape,
storage kind, dtype of one tensor), and the dtype tables the readers share.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


class CheckpointError(ValueError):
    """A checkpoint (or LoRA) file that cannot be used; the message names the file and the problem."""

    __module__ = "steadydancer_turbo.steadydancer.checkpoints"  # readable in ComfyUI's error (see dwpose.models.ModelNotFoundError)

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
TRUNCATED = "the file is truncated or was not completely downloaded"

FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass
class TensorInfo:
    """Where one official-key tensor lives and how it is stored."""
    key: str                      # official key
    file_key: str                 # name in the file
    shape: tuple                  # logical shape (what the model parameter has)
    kind: str                     # "float" | "fp8" | "gguf" | "other"
    dtype: Optional[torch.dtype]  # stored torch dtype (float/fp8); None for gguf-packed
    qtype: Optional[int] = None   # GGML quantization type (gguf kind, and GGUF floats)
    scale_key: Optional[str] = None  # file key of the fp8 scale
    scale_source: object = None   # reader part that holds the scale
    source: object = None         # reader part that holds the bytes
    stored_shape: tuple = ()      # shape as stored (2-D patch embeds, GGUF byte shape)

    @property
    def nbytes(self) -> int:
        if self.kind == "gguf":
            import gguf
            bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(self.qtype)]
            n = 1
            for d in self.shape:
                n *= d
            return n // bs * ts
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize
