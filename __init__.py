"""SteadyDancer Turbo: a ComfyUI node pack for SteadyDancer-14B pose-driven video.

ComfyUI imports this folder as a package; only relative imports are used inside the pack,
because ComfyUI has its own top-level ``nodes`` module and other packs ship ``steadydancer`` folders.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
