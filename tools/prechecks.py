"""Checks made before anything is queued: the local --image / --video files, and the graph against the
server (node types, combo values, model files, with the folder and download URL of the files the pack knows).

Standard library, plus PIL / PyAV / OpenCV when this Python has them (ComfyUI's has all three).
"""
from __future__ import annotations

import json
import pathlib

import model_files
from comfy_client import RunError

PACK_ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKFLOW_DIR = PACK_ROOT / "example_workflows"
VIDEO_EXTS = {".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif", ".m4v"}
MODEL_EXTS = (".safetensors", ".gguf", ".onnx", ".pt", ".pth", ".ckpt", ".bin", ".sft")


# ------------------------------------------------------------------------------------------- local media
IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))


def check_image(path):
    """Refuse a --image that is not an image before uploading it (the server would only fail mid-run, naming
    its own copy). Uses PIL when this Python has it (what ComfyUI's LoadImage opens files with), else the
    file's magic bytes."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        Image = None
    if Image is not None:
        try:
            with Image.open(path) as im:
                im.verify()
            return
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise RunError(f"--image {path}: not an image file this server can open ({e})", 2)
    with open(path, "rb") as f:
        head = f.read(16)
    if any(head.startswith(m) for m, _ in IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return
    raise RunError(f"--image {path}: not an image file (PNG, JPEG, WEBP, GIF, BMP or TIFF expected)", 2)


def _video_magic(head):
    """Container name from a file's first bytes, or None."""
    if head[4:8] == b"ftyp":
        return "MP4/MOV"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "Matroska/WebM"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "AVI"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def check_video(path):
    """Refuse a --video that is not a readable video before uploading it (ComfyUI's LoadVideo would only fail
    mid-run). Opens the container and decodes the first frame with PyAV (what ComfyUI reads videos with), else
    OpenCV, else checks the container's magic bytes."""
    path = pathlib.Path(path)
    if path.suffix.lower() not in VIDEO_EXTS:
        raise RunError(f"--video {path}: not a video file ({', '.join(sorted(VIDEO_EXTS))})", 2)
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        try:
            with av.open(str(path)) as c:
                if not c.streams.video:
                    kinds = sorted({s.type for s in c.streams}) or ["none"]
                    raise RunError(f"--video {path}: the file has no video stream (streams: {', '.join(kinds)}); "
                                   f"it may be cut short (an MP4 whose index never got written) or audio only", 2)
                for _ in c.decode(video=0):
                    return
            raise RunError(f"--video {path}: no frame could be decoded (empty or truncated video)", 2)
        except av.FFmpegError as e:
            why = getattr(e, "strerror", None) or str(e)          # without PyAV's "[Errno -1094995529]"
            raise RunError(f"--video {path}: not a video file this command can read ({why})", 2) from None
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        cap = cv2.VideoCapture(str(path))
        try:
            ok = cap.isOpened() and cap.read()[0]
        finally:
            cap.release()
        if not ok:
            raise RunError(f"--video {path}: not a video file OpenCV can read (no frame decoded)", 2)
        return
    with open(path, "rb") as f:
        head = f.read(16)
    if _video_magic(head) is None:
        raise RunError(f"--video {path}: not a video file (no MP4/MOV, WebM/MKV, AVI or GIF header)", 2)


# ----------------------------------------------------------------------------------- the graph vs the server
def _combo_options(spec):
    """Options of a combo input spec from /object_info (V1 ``[[...]]`` or V3 ``["COMBO", {"options": [...]}]``)."""
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        return spec[1].get("options")
    return None


def models_from_ui_workflow(ui_path):
    """{file name: {"url", "directory"}} from the UI workflow's ``properties.models`` entries."""
    out = {}
    try:
        wf = json.loads(pathlib.Path(ui_path).read_text())
    except (OSError, json.JSONDecodeError):
        return out
    for node in wf.get("nodes", []):
        for m in (node.get("properties") or {}).get("models", []) or []:
            if isinstance(m, dict) and m.get("name"):
                out[m["name"]] = m
    for m in wf.get("models", []) or []:
        if isinstance(m, dict) and m.get("name"):
            out.setdefault(m["name"], m)
    return out


def reachable(prompt, object_info):
    """Ids of the nodes ComfyUI will validate and run: output nodes and everything they depend on."""
    todo = [nid for nid, n in prompt.items()
            if object_info.get(n["class_type"], {}).get("output_node") or n["class_type"] not in object_info]
    seen = set()
    while todo:
        nid = todo.pop()
        if nid in seen or nid not in prompt:
            continue
        seen.add(nid)
        for v in prompt[nid].get("inputs", {}).values():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int)) and isinstance(v[1], int):
                todo.append(str(v[0]))
    return seen


# ComfyUI model folder of the file inputs of the usual loaders: (node class, input) first, then the input name.
LOADER_FOLDERS = {
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("SteadyDancerModelLoader", "model_name"): "diffusion_models",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("SteadyDancerLoraLoader", "lora_name"): "loras",
    ("VAELoader", "vae_name"): "vae",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("SteadyDancerPoseExtract", "detector"): "dwpose",
    ("SteadyDancerPoseExtract", "estimator"): "dwpose",
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
}
INPUT_FOLDERS = {"unet_name": "diffusion_models", "lora_name": "loras", "vae_name": "vae",
                 "ckpt_name": "checkpoints", "control_net_name": "controlnet", "clip_name1": "text_encoders",
                 "clip_name2": "text_encoders", "upscale_model": "upscale_models"}
# Folders whose combos list the default file names even when the file is absent (our pose node does, so the
# node can answer a missing file with its download link): their real content is asked of GET /models/<folder>.
ALWAYS_LISTED_FOLDERS = ("dwpose",)


def model_folder(class_type, input_name, hint=None):
    """ComfyUI model folder (``diffusion_models``, ``loras`` ...) a file input reads from, or None."""
    if hint and hint.get("directory"):
        return hint["directory"]
    return LOADER_FOLDERS.get((class_type, input_name)) or INPUT_FOLDERS.get(input_name)


def known_models():
    """{file name: {"name", "url", "directory"}} of every file the pack knows: the shipped UI workflows'
    ``properties.models``, the sharded folders of tools/model_files.py (the official ``SteadyDancer-14B``, which
    the Model Loader lists as one entry; its URL is the repository, --fetch-missing fetches all its files) and the
    DWPose table (dwpose/models.py, the pack's one list of those URLs)."""
    out = {}
    for ui in sorted(WORKFLOW_DIR.glob("*.json")):
        for name, m in models_from_ui_workflow(ui).items():
            out.setdefault(name, m)
    for f in model_files.known_folders():
        out.setdefault(f.name, f.entry())
    mod = model_files.dwpose_table()
    for name, f in mod.MODEL_FILES.items():
        out.setdefault(name, {"name": name, "url": f.url, "directory": mod.COMFY_MODEL_SUBFOLDER})
    return out


def _present(value, files):
    """Whether a file name is among a folder listing (sub-folder entries match by base name, as the pose
    node also finds comfyui_controlnet_aux's ``ckpts/<repo>/`` downloads)."""
    base = value.replace("\\", "/").rsplit("/", 1)[-1]
    return any(f == value or f.replace("\\", "/").rsplit("/", 1)[-1] == base for f in files)


def find_inputs(prompt, object_info, model_hints=None, folder_files=None):
    """(problems, missing) before queueing: unknown node types / values, and the model files that are not on
    the server, one dict per file: ``{"name", "directory", "url", "users": ["node 2 (UNETLoader).unet_name"]}``
    (``directory``, ``url`` None when unknown).

    Only nodes that will run are checked (like the server, which ignores nodes no output depends on).
    ``folder_files(folder)`` -> the file names the server has in a model folder, or None when unknown
    (GET /models/<folder>); it is asked about ``ALWAYS_LISTED_FOLDERS`` only."""
    model_hints = model_hints or {}
    problems, missing = [], {}      # (file, folder, url) -> entry, one per file
    live = reachable(prompt, object_info)
    for nid, node in prompt.items():
        if nid not in live:
            continue
        info = object_info.get(node["class_type"])
        if info is None:
            problems.append(f"node {nid}: node type {node['class_type']!r} is not installed on the server "
                            f"(is the SteadyDancer Turbo pack in custom_nodes and did it import without errors?)")
            continue
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name, value in node.get("inputs", {}).items():
            if not isinstance(value, str):
                continue
            opts = _combo_options(specs.get(name))
            if opts is None:
                continue
            hint = model_hints.get(value) or model_hints.get(value.replace("\\", "/").rsplit("/", 1)[-1]) or {}
            folder = model_folder(node["class_type"], name, hint)
            if value in opts:
                files = folder_files(folder) if folder_files and folder in ALWAYS_LISTED_FOLDERS else None
                if files is None or _present(value, files):
                    continue
            elif not (value.lower().endswith(MODEL_EXTS) or hint.get("directory")):  # a known folder is a model too
                problems.append(f"node {nid} ({node['class_type']}).{name}: {value!r} is not one of the allowed "
                                f"values {opts[:8]}{'...' if len(opts) > 8 else ''}")
                continue
            entry = missing.setdefault((value, folder, hint.get("url")), {
                "name": value, "directory": folder, "url": hint.get("url"), "users": []})
            entry["users"].append(f"node {nid} ({node['class_type']}).{name}")
    return problems, list(missing.values())


def describe_missing(entry):
    where = f"models/{entry['directory']}/" if entry["directory"] else "the matching models/ folder"
    return (f"  {entry['name']!r} is not in {where} (needed by {', '.join(entry['users'])})"
            + (f"\n      download: {entry['url']}" if entry["url"] else ""))


def check_inputs(prompt, object_info, model_hints=None, folder_files=None):
    """(problems, missing model lines) as printed by the run command; see ``find_inputs``."""
    problems, missing = find_inputs(prompt, object_info, model_hints, folder_files)
    return problems, [describe_missing(m) for m in missing]
