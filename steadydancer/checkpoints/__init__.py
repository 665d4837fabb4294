"""Reading checkpoint files (safetensors, GGUF, .pth, shards): format detection, validation, raw tensors.
May import: model/ (key names) and kernels/; never weights/, sampling/, turbo/ or nodes/.
"""
from .tensor_info import CheckpointError, TensorInfo  # noqa: F401
from .detect import is_sharded_folder, sniff_format  # noqa: F401
from .reader import CheckpointReader, open_checkpoint  # noqa: F401

__all__ = ["CheckpointError", "TensorInfo", "sniff_format", "is_sharded_folder", "CheckpointReader", "open_checkpoint"]
