"""Model files: names, public download URLs, and the lookup over candidate folders.

The core never knows ComfyUI's folder registry; the node layer passes the folders to search
(its registered ``dwpose`` model folder first, then comfyui_controlnet_aux's download folders).
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFile:
    name: str
    kind: str  # "detector" | "pose"
    url: str
    note: str = ""


DEFAULT_DETECTOR = "yolox_l.onnx"
DEFAULT_ESTIMATOR = "dw-ll_ucoco_384.onnx"

MODEL_FILES = {
    "yolox_l.onnx": ModelFile(
        "yolox_l.onnx", "detector",
        "https://huggingface.co/yzd-v/DWPose/resolve/main/yolox_l.onnx",
        "YOLOX-L COCO person detector, 640x640, ~217 MB"),
    "dw-ll_ucoco_384.onnx": ModelFile(
        "dw-ll_ucoco_384.onnx", "pose",
        "https://huggingface.co/yzd-v/DWPose/resolve/main/dw-ll_ucoco_384.onnx",
        "DWPose-L whole-body (133 keypoints), 288x384 input, ~134 MB"),
    "dw-ll_ucoco.onnx": ModelFile(
        "dw-ll_ucoco.onnx", "pose",
        "https://huggingface.co/hr16/UnJIT-DWPose/resolve/main/dw-ll_ucoco.onnx",
        "DWPose-L whole-body at 192x256 (smaller, faster, less exact)"),
}

# Folder names, relative to a ComfyUI ``models`` folder / comfyui_controlnet_aux ``ckpts`` folder,
# where these files are commonly kept; the node layer turns them into absolute candidates.
COMFY_MODEL_SUBFOLDER = "dwpose"
CONTROLNET_AUX_SUBFOLDERS = ("yzd-v/DWPose", "hr16/UnJIT-DWPose", "hr16/yolox-onnx")


class ModelNotFoundError(FileNotFoundError):
    """A model file is missing; the message names the file, the folder to put it in and where to get it."""

    # ComfyUI reports ``module + "." + qualname``; a pack under custom_nodes is imported with its folder path as
    # the module name ("/home/me/ComfyUI/custom_nodes/ComfyUI-SteadyDancer-Turbo.dwpose.models..."): name the
    # public place of the class instead.
    __module__ = "steadydancer_turbo.dwpose"


def find_model_file(name: str, folders, target_folder: str | None = None) -> str:
    """Return the path of ``name`` in the first of ``folders`` that holds it.

    ``name`` may also be an existing absolute/relative path (returned as is). Sub-folders named in
    ``CONTROLNET_AUX_SUBFOLDERS`` below each candidate are searched too (comfyui_controlnet_aux keeps its
    downloads in ``ckpts/<hf repo>/``). Raises ``ModelNotFoundError`` naming the file, the folder to put
    it in (``target_folder`` or the first candidate) and the download URL when known.
    """
    if os.path.isfile(name):
        return os.path.abspath(name)
    folders = [f for f in (folders or []) if f]
    searched = []
    for folder in folders:
        for sub in ("",) + CONTROLNET_AUX_SUBFOLDERS:
            cand = os.path.join(folder, sub, name)
            searched.append(os.path.dirname(cand))
            if os.path.isfile(cand):
                return cand
    where = target_folder or (folders[0] if folders else f"ComfyUI/models/{COMFY_MODEL_SUBFOLDER}")
    info = MODEL_FILES.get(os.path.basename(name))
    url = f" Download it from {info.url} ." if info else ""
    looked = "; ".join(dict.fromkeys(searched)) or "(no folders given)"
    raise ModelNotFoundError(
        f"DWPose model file '{name}' not found. Put it in the folder {where}.{url} (searched: {looked})"
    )
