"""Reading checkpoint files (safetensors, GGUF, .pth, shards): format detection, validation, raw tensors.
May import: model/ (key names) and kernels/; never weights/, sampling/, turbo/ or nodes/.
"""
