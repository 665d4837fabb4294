"""One torch .pth zip archive, only through torch.load(weights_only=True, mmap=True); a refused file gets the
reason without torch's advice to set weights_only=False (torch_load_weights_only).
"""
from __future__ import annotations

import re

import torch

from .tensor_info import CheckpointError




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

class _PthFile:
    SUBKEYS = ("state_dict", "model", "module", "net", "ema")

    def __init__(self, path):
        self.path = str(path)
        sd = torch_load_weights_only(self.path, mmap=True)
        for _ in range(2):
            if isinstance(sd, dict):
                for k in self.SUBKEYS:
                    if k in sd and isinstance(sd[k], dict) and len(sd[k]) > len(sd) // 2:
                        sd = sd[k]
                        break
        if not isinstance(sd, dict):
            raise CheckpointError(path, "the .pth file holds no state dict")
        self.sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        self.metadata = {}

    def shape(self, key):
        return tuple(self.sd[key].shape)

    def dtype(self, key):
        return self.sd[key].dtype

    def tensor(self, key):
        return self.sd[key]

    def release(self, key):
        pass

    def close(self):
        self.sd = {}
