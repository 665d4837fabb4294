"""One .safetensors file: header parsing and validation, memory map, one tensor at a time, pages
released after each tensor.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import warnings

import torch

from .tensor_info import SAFETENSORS_DTYPES, TRUNCATED, CheckpointError



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


# ---------------------------------------------------------------------------------------------
# low-level parts: each gives tensors (zero-copy views of a memory map) by file key
# ---------------------------------------------------------------------------------------------
class _SafetensorsFile:
    def __init__(self, path):
        self.path = str(path)
        # header only (see safetensors_header above): never maps the file, so a file larger than RAM opens
        self.entries, self.metadata, self.base = safetensors_header(self.path)
        self._f = None
        self._mm = None

    def _map(self):
        if self._mm is None:
            self._f = open(self.path, "rb")
            # read-only shared mapping: no commit charge for a 33 GB file (a private writable map would
            # need it under strict overcommit); tensors over it are only ever read and copied
            self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def shape(self, key):
        return tuple(self.entries[key]["shape"])

    def dtype(self, key):
        dt = self.entries[key]["dtype"]
        if dt not in SAFETENSORS_DTYPES:
            raise CheckpointError(self.path, f"tensor {key!r} has unsupported dtype {dt}")
        return SAFETENSORS_DTYPES[dt]

    def tensor(self, key) -> torch.Tensor:
        e = self.entries[key]
        dt = self.dtype(key)
        a, b = e["data_offsets"]
        count = (b - a) // dt.itemsize
        if count == 0:
            return torch.empty(tuple(e["shape"]), dtype=dt)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            t = torch.frombuffer(self._map(), dtype=dt, count=count, offset=self.base + a)
        return t.view(tuple(e["shape"]))

    def release(self, key):
        """Drop the pages of ``key`` from this process's resident set (the page cache keeps them)."""
        if self._mm is None:
            return
        a, b = self.entries[key]["data_offsets"]
        start = (self.base + a) // mmap.PAGESIZE * mmap.PAGESIZE
        end = self.base + b
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (AttributeError, OSError, ValueError):
            pass

    def close(self):
        # tensors handed out are copied before close; views into the map must not outlive it
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a view is still alive somewhere; the map closes when it is collected
            self._f.close()
        self._mm = self._f = None
