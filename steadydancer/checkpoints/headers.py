"""File headers read without mapping or reading any weight: safetensors headers, GGUF tensor tables, and
``torch.load(weights_only=True)`` with a message for people.

- :func:`safetensors_header`: the JSON header, checked completely (every entry's dtype/shape/byte size, the data
  offsets covering the data exactly once, the file length) with plain file reads. The safetensors library's
  ``safe_open`` maps the whole file privately to do the same, which fails for a file larger than free RAM + swap
  ("Cannot allocate memory") although the file is fine.
- :func:`gguf_check_length`: walks a GGUF file's key/value section and tensor table (the layout gguf-py's
  ``GGUFReader`` reads; sizes from ``gguf.GGML_QUANT_SIZES``) and says "truncated" when the file is shorter than
  its header or its tensor table needs. ``GGUFReader`` itself fails on such a file with numpy's reshape /
  IndexError text.
- :func:`torch_load_weights_only`: a torch zip ``.pth`` as plain tensors, never unpickling code; a refused file
  gets the reason without torch's advice to retry with ``weights_only=False`` (that runs the file's code).
"""
from __future__ import annotations

import json
import os
import re
import struct

import torch


class CheckpointError(ValueError):
    """A checkpoint (or LoRA) file that cannot be used; the message names the file and the problem."""

    __module__ = "steadydancer_turbo.steadydancer.checkpoints.checkpoint"  # readable in ComfyUI's error (see dwpose.models.ModelNotFoundError)

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


# ---------------------------------------------------------------------------------------------- safetensors
def safetensors_header(path):
    """``(entries, metadata, data_start)`` of a safetensors file; raises :class:`CheckpointError`."""
    path = str(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(path, f"file is too short to be a safetensors file: {TRUNCATED}")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(path, f"safetensors header says {n} header bytes but the file has {size} bytes: "
                                        f"{TRUNCATED}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(path, f"safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "safetensors header is not a JSON object: not a valid safetensors file")
    md = header.pop("__metadata__", None) or {}
    if not isinstance(md, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in md.items()):
        raise CheckpointError(path, "safetensors __metadata__ must map strings to strings: not a valid safetensors file")
    _check_entries(path, header, size - 8 - n)
    return header, md, 8 + n


def _check_entries(path, header, data_len):
    spans = []
    for k, e in header.items():
        try:
            dt, shape, (a, b) = e["dtype"], e["shape"], e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"malformed safetensors header entry {k!r}") from None
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(a, int) and isinstance(b, int) and 0 <= a <= b):
            raise CheckpointError(path, f"malformed safetensors header entry {k!r}")
        item = SAFETENSORS_DTYPES[dt].itemsize if dt in SAFETENSORS_DTYPES else None
        n = 1
        for d in shape:
            n *= d
        if item is not None and b - a != n * item:
            raise CheckpointError(path, f"tensor {k!r}: {b - a} bytes for shape {shape} of {dt}")
        spans.append((a, b))
    spans.sort()
    end = 0
    for a, b in spans:
        if a != end:
            raise CheckpointError(path, "safetensors data offsets overlap or leave gaps")
        end = b
    if end > data_len:
        raise CheckpointError(path, f"the header describes {end} data bytes but only {data_len} follow: {TRUNCATED}")
    if end != data_len:
        raise CheckpointError(path, f"{data_len - end} bytes after the last tensor: not a valid safetensors file")


# ---------------------------------------------------------------------------------------------- GGUF
class _Cut(Exception):
    pass


class _Stream:
    def __init__(self, f, size):
        self.f, self.size = f, size

    def read(self, fmt):
        n = struct.calcsize(fmt)
        b = self.f.read(n)
        if len(b) < n:
            raise _Cut()
        return struct.unpack(fmt, b)

    def skip(self, n):
        if self.f.tell() + n > self.size:
            raise _Cut()
        self.f.seek(n, os.SEEK_CUR)

    def string(self):
        (n,) = self.read("<Q")
        if self.f.tell() + n > self.size:
            raise _Cut()
        return self.f.read(n)


# GGUFValueType -> struct format of one scalar
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _value(s: _Stream, vtype: int, keep: bool):
    if vtype == _STRING:
        return s.string()
    if vtype == _ARRAY:
        etype, count = s.read("<IQ")
        if etype in _SCALARS and not keep:
            s.skip(struct.calcsize(_SCALARS[etype]) * count)
            return None
        return [_value(s, etype, keep) for _ in range(count)]
    if vtype not in _SCALARS:
        raise ValueError(f"unknown GGUF value type {vtype}")
    return s.read(_SCALARS[vtype])[0]


def gguf_check_length(path) -> int:
    """Check a GGUF file's length against its header and tensor table; returns the bytes the table needs.

    Raises :class:`CheckpointError` saying "truncated" (with the byte counts) when the file ends inside its header
    or before the end of its last tensor. Files this walker cannot follow (GGUF v1, the other byte order, an
    unknown value type or quantization type) pass through: ``GGUFReader`` then decides.
    """
    import gguf

    path = str(path)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            s = _Stream(f, size)
            magic, version = s.read("<4sI")
            if magic != b"GGUF" or version not in (2, 3):
                return 0
            n_tensors, n_kv = s.read("<QQ")
            alignment = gguf.GGUF_DEFAULT_ALIGNMENT
            for _ in range(n_kv):
                key = s.string()
                (vtype,) = s.read("<I")
                v = _value(s, vtype, keep=key == b"general.alignment")
                if key == b"general.alignment" and isinstance(v, int) and v > 0:
                    alignment = v
            need = 0
            for _ in range(n_tensors):
                name = s.string()
                (n_dims,) = s.read("<I")
                dims = s.read(f"<{n_dims}Q")
                qtype, offset = s.read("<IQ")
                try:
                    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
                except (ValueError, KeyError):
                    return 0  # unknown type: GGUFReader / the loader report it
                n = 1
                for d in dims:
                    n *= d
                need = max(need, offset + n // block * type_size)
            start = f.tell()
            start += (-start) % alignment
    except _Cut:
        raise CheckpointError(path, f"the GGUF header is cut off at byte {size}: {TRUNCATED}") from None
    except ValueError:
        return 0
    if start + need > size:
        raise CheckpointError(path, f"the GGUF tensor table needs {start + need} bytes but the file has {size}: "
                                    f"{TRUNCATED}")
    return start + need


# ---------------------------------------------------------------------------------------------- .pth
def torch_load_weights_only(path, mmap: bool = True):
    """``torch.load(path, weights_only=True)``; a refused file -> :class:`CheckpointError` with the reason only."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError (not a zip), EOFError ...
        raise CheckpointError(path, f"cannot be read as plain tensors ({_torch_reason(e)}); only tensor state dicts "
                                    "are accepted and pickled code is never executed: convert the file to "
                                    "safetensors") from None


def _torch_reason(e: Exception) -> str:
    """torch's refusal without its advice to set weights_only=False (which would run the file's code)."""
    msg = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\n|$)", msg)
    if m:
        reason = m.group(1).strip()
        reason = re.split(r"\.\s+(?:Please|Check|To |If you|Use )", reason)[0]
        return f"the file holds pickled Python objects: {reason.rstrip('.')}"
    if "weights_only" in msg:
        return type(e).__name__
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return f"{type(e).__name__}: {first}"
