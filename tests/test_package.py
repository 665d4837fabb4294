import importlib
import sys


def test_pack_imports_without_comfyui():
    pack = importlib.import_module("steadydancer_turbo")
    assert isinstance(pack.NODE_CLASS_MAPPINGS, dict)
    assert isinstance(pack.NODE_DISPLAY_NAME_MAPPINGS, dict)
    # the core must never pull ComfyUI in
    for name in ("comfy", "folder_paths", "server"):
        assert name not in sys.modules, name
