"""The checkpoint format from a file's first bytes (never from its name).
"""
from __future__ import annotations

import os
import struct

from .tensor_info import CheckpointError

#: what makes a folder one sharded checkpoint (diffusers / transformers ``save_pretrained``, huggingface_hub's
#: ``save_torch_state_dict``): an index ``<stem>.safetensors.index.json`` whose ``weight_map`` names the shards
SHARD_INDEX_SUFFIX = ".safetensors.index.json"


def shard_indexes(folder) -> list:
    """Names of the shard indexes in ``folder`` (sorted); [] for a file or a missing folder."""
    try:
        return sorted(n for n in os.listdir(str(folder)) if n.endswith(SHARD_INDEX_SUFFIX))
    except (NotADirectoryError, FileNotFoundError, PermissionError):
        return []


def is_sharded_folder(path) -> bool:
    """True for a folder holding a ``*.safetensors.index.json`` (read with its shards as one checkpoint)."""
    return os.path.isdir(str(path)) and bool(shard_indexes(path))


# ---------------------------------------------------------------------------------------------
def sniff_format(path) -> str:
    """'gguf' | 'safetensors' | 'pth' | 'folder' from the file's content."""
    p = str(path)
    if os.path.isdir(p):
        return "folder"
    if not os.path.isfile(p):
        raise CheckpointError(p, "no such file or folder")
    with open(p, "rb") as f:
        head = f.read(16)
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:4] == b"PK\x03\x04":
        return "pth"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n < (1 << 32) and head[8:9] in (b"{", b" "):
            return "safetensors"
    if head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        raise CheckpointError(p, "legacy pickled checkpoint: refusing to unpickle it; convert it to safetensors")
    if len(head) < 9:
        raise CheckpointError(p, "file is too short to be a checkpoint (empty or truncated)")
    raise CheckpointError(p, "unknown file format (not safetensors, GGUF or a torch zip .pth)")
