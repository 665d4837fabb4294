"""One .gguf file: its length checked against its tensor table first (gguf_check_length, no numpy errors on a
truncated file), then gguf-py's reader: GGML shapes (or comfy.gguf.orig_shape), raw packed blocks.
"""
from __future__ import annotations

import mmap
import os
import struct
import warnings

import torch

from .tensor_info import TRUNCATED, CheckpointError




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

class _GGUFFile:
    def __init__(self, path):
        self.path = str(path)
        try:
            import gguf
        except ImportError:
            raise CheckpointError(path, "reading GGUF files needs the 'gguf' package (pip install gguf)") from None
        self.gguf = gguf
        gguf_check_length(self.path)  # says "truncated" where GGUFReader would fail with numpy's reshape text
        size = os.path.getsize(self.path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:
            raise CheckpointError(path, f"not a readable GGUF file ({type(e).__name__}: {e}); "
                                        "it may be truncated or not completely downloaded") from None
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise CheckpointError(path, f"GGUF tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes} "
                                            f"but the file has {size} bytes: the file is truncated")
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.metadata = {}
        arch = self.reader.get_field("general.architecture")
        if arch is not None:
            try:
                self.metadata["general.architecture"] = str(arch.contents())
            except Exception:
                pass

    def orig_shape(self, name):
        f = self.reader.get_field(f"comfy.gguf.orig_shape.{name}")
        if f is None:
            return None
        try:
            return tuple(int(f.parts[i][0]) for i in f.data)
        except Exception:
            raise CheckpointError(self.path, f"bad comfy.gguf.orig_shape metadata for {name!r}") from None

    def shape(self, name):
        s = self.orig_shape(name)
        return s if s is not None else tuple(int(v) for v in reversed(self.tensors[name].shape.tolist()))

    def raw(self, name) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(self.tensors[name].data)

    def release(self, name):
        t = self.tensors[name]
        mm = getattr(self.reader.data, "_mmap", None)
        if mm is None:
            return
        start = t.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)
        except (AttributeError, OSError, ValueError):
            pass

    def close(self):
        self.reader = None
        self.tensors = {}
