"""The one place in the pack that touches ComfyUI (``comfy``, ``folder_paths``, ``server``),
besides the two bridge-side modules that subclass ComfyUI's classes and import ``comfy`` lazily, only inside
ComfyUI: ``native_model.py`` (the MODEL: BaseModel / ModelPatcher / config, the diff_m LoRA adapter) and
``native_sampling.py`` (GUIDER / SAMPLER classes over the core sampling loops).

Everything here also works when ComfyUI is absent (CI, scripts): file lists come back empty, progress bars and
interrupt checks become no-ops, devices fall back to plain torch, and a function that truly needs ComfyUI (such as
resolving a model file name) raises ``ComfyUnavailable`` with a message that says what is missing.

Model folders registered here (inside ComfyUI):
- ``dwpose``: ``models/dwpose`` (the default, created when missing so users see where the files go), plus comfyui_controlnet_aux's download folders when that pack is
  installed (``custom_nodes/comfyui_controlnet_aux/ckpts``), so files it already fetched are reused.
  Extensions: ``.onnx``.
- ``steadydancer_diffusion_models``: the very same folder list as ``diffusion_models`` (shared list object, so
  ``extra_model_paths.yaml`` entries show up too) with ``.gguf`` added to the usual extensions. The Model Loader
  lists it through ``get_model_list``: sharded checkpoint folders (index + shards) appear as one entry each.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("steadydancer_turbo")

try:  # ComfyUI is importable only inside a running server (or a checkout on sys.path).
    import folder_paths  # type: ignore
    import comfy.model_management as _mm  # type: ignore
    import comfy.utils as _cu  # type: ignore
    HAVE_COMFY = True
except Exception:  # noqa: BLE001 - any failure means "not inside ComfyUI"
    folder_paths = None
    _mm = None
    _cu = None
    HAVE_COMFY = False

DWPOSE_FOLDER = "dwpose"
DIFFUSION_FOLDER = "steadydancer_diffusion_models"
LORA_FOLDER = "loras"
DWPOSE_EXTENSIONS = {".onnx"}


class ComfyUnavailable(RuntimeError):
    """Raised when a function that needs a running ComfyUI is called outside of it."""


def _need(what: str):
    if not HAVE_COMFY:
        raise ComfyUnavailable(
            f"{what} needs ComfyUI (the 'folder_paths' and 'comfy' modules), which is not importable here. "
            "Run this node inside ComfyUI, or call the core functions in steadydancer_turbo.steadydancer / "
            "dwpose / turbo directly with file paths."
        )


# ---------------------------------------------------------------------------------------------- folders
def _controlnet_aux_ckpt_dirs() -> list[str]:
    """comfyui_controlnet_aux keeps its downloads in <pack>/ckpts/<hf-user>/<repo>/...; reuse them if present."""
    out = []
    try:
        roots = folder_paths.get_folder_paths("custom_nodes")
    except Exception:  # noqa: BLE001
        roots = [os.path.join(os.path.dirname(folder_paths.__file__), "custom_nodes")]
    for root in roots:
        if not os.path.isdir(root):
            continue
        for name in os.listdir(root):
            if name.lower().replace("-", "_") in ("comfyui_controlnet_aux",):
                ckpts = os.path.join(root, name, "ckpts")
                if os.path.isdir(ckpts):
                    out.append(ckpts)
    return out


def _make_model_folder(path: str) -> None:
    """Create ComfyUI's ``models/<kind>`` folder so users see where the files go; only inside an existing
    models folder, and a read-only install is fine (the node's error names the folder anyway)."""
    if not os.path.isdir(os.path.dirname(path)):
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        log.debug("SteadyDancer: cannot create %s: %s", path, e)


def register_model_folders() -> None:
    """Register our model kinds with ComfyUI (no-op outside ComfyUI). Safe to call more than once."""
    if not HAVE_COMFY:
        return
    fnp = folder_paths.folder_names_and_paths
    default = os.path.join(folder_paths.models_dir, DWPOSE_FOLDER)
    if DWPOSE_FOLDER not in fnp:
        fnp[DWPOSE_FOLDER] = ([default], set(DWPOSE_EXTENSIONS))
    else:
        fnp[DWPOSE_FOLDER][1].update(DWPOSE_EXTENSIONS)
    if default in fnp[DWPOSE_FOLDER][0]:
        _make_model_folder(default)
    for d in _controlnet_aux_ckpt_dirs():
        if d not in fnp[DWPOSE_FOLDER][0]:
            fnp[DWPOSE_FOLDER][0].append(d)
    if DIFFUSION_FOLDER not in fnp:
        dirs = fnp["diffusion_models"][0]  # same list object: later additions (extra_model_paths) show up too
        fnp[DIFFUSION_FOLDER] = (dirs, set(folder_paths.supported_pt_extensions) | {".gguf"})


def get_filename_list(kind: str) -> list[str]:
    """File names for a combo. Empty outside ComfyUI (INPUT_TYPES must still work there)."""
    if not HAVE_COMFY:
        return []
    try:
        return list(folder_paths.get_filename_list(kind))
    except Exception as e:  # noqa: BLE001 - an unknown kind must not break /object_info
        log.warning("SteadyDancer: cannot list model folder %r: %s", kind, e)
        return []


def get_full_path(kind: str, name: str) -> str:
    """Absolute path of a model file, or a clear error naming the folders that were searched."""
    if name and os.path.isabs(name) and os.path.isfile(name):
        return name
    _need(f"Finding the model file {name!r}")
    path = folder_paths.get_full_path(kind, name)
    if path is None or not os.path.isfile(path):
        dirs = folder_paths.get_folder_paths(kind) if kind in folder_paths.folder_names_and_paths else []
        raise FileNotFoundError(
            f"Model file {name!r} not found in ComfyUI's '{kind}' folders: {dirs}. "
            "Download it (see the pack README's model table) and refresh the page."
        )
    return path


def sharded_folders(kind: str, files=None) -> dict:
    """{entry name: absolute path} of the sharded checkpoint folders (a ``*.safetensors.index.json`` with its
    shards, e.g. the official MCG-NJU/SteadyDancer-14B release fetched by ``tools/fetch_models.py --variant bf16``)
    in ComfyUI's ``kind`` folders. The entry name is the folder's path under the models folder, as ComfyUI names
    the files in it. Candidates are the folders of the files ComfyUI already lists (its cached listing), so a
    combo refresh walks nothing."""
    from ..steadydancer.checkpoints import is_sharded_folder
    files = get_filename_list(kind) if files is None else files
    out = {}
    for rel in sorted({os.path.dirname(f) for f in files} - {""}):
        for root in get_folder_paths(kind):
            p = os.path.join(root, rel)
            if is_sharded_folder(p):
                out[rel] = p
                break
    return out


def get_model_list(kind: str) -> list[str]:
    """The Model Loader's combo: ComfyUI's file list of ``kind`` with each sharded checkpoint folder as one entry
    (the folder name) in place of its shard files, which are no model on their own."""
    files = get_filename_list(kind)
    folders = sharded_folders(kind, files)
    return sorted([f for f in files if os.path.dirname(f) not in folders] + list(folders))


def get_model_path(kind: str, name: str) -> str:
    """Absolute path of a Model Loader entry: a sharded checkpoint folder (see ``sharded_folders``) or a file
    (``get_full_path``, with its clear error)."""
    from ..steadydancer.checkpoints import is_sharded_folder
    if name and os.path.isabs(name) and is_sharded_folder(name):
        return name
    if name and not os.path.isabs(name):
        for root in get_folder_paths(kind):
            p = os.path.join(root, name)
            if is_sharded_folder(p):
                return p
    return get_full_path(kind, name)


# ---------------------------------------------------------------------------------------------- devices
def torch_device() -> torch.device:
    if HAVE_COMFY:
        return _mm.get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def offload_device() -> torch.device:
    if HAVE_COMFY:
        return _mm.unet_offload_device()
    return torch.device("cpu")


def intermediate_device() -> torch.device:
    if HAVE_COMFY:
        return _mm.intermediate_device()
    return torch.device("cpu")


def soft_empty_cache() -> None:
    if HAVE_COMFY:
        _mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- progress
def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel / POST /interrupt."""
    if HAVE_COMFY:
        _mm.throw_exception_if_processing_interrupted()


class Progress:
    """comfy.utils.ProgressBar when inside ComfyUI, else a silent counter."""

    def __init__(self, total: int):
        self.total = int(total)
        self.current = 0
        self._bar = _cu.ProgressBar(self.total) if HAVE_COMFY else None

    def update(self, n: int = 1, preview=None):
        self.update_absolute(self.current + n, preview=preview)

    def update_absolute(self, value: int, preview=None):
        self.current = min(int(value), self.total)
        if self._bar is not None:
            self._bar.update_absolute(self.current, self.total, preview)


def node_message(node_id, text: str) -> None:
    """Show a short text on the node in the UI (frontend 'progress text') and in the server log."""
    log.warning("SteadyDancer: %s", text)
    if not HAVE_COMFY or node_id is None:
        return
    try:
        from server import PromptServer  # type: ignore
        PromptServer.instance.send_progress_text(text, str(node_id))
    except Exception as e:  # noqa: BLE001 - the message is already in the log
        log.debug("SteadyDancer: could not send node text: %s", e)


COMPILE_CACHE_SUBDIR = ("steadydancer", "torch_compile_cache")


def compile_cache_folder() -> str | None:
    """<ComfyUI user directory>/steadydancer/torch_compile_cache (``--user-directory`` moves it with the rest of
    the user folder; ComfyUI's temp folder is emptied on every start, so it is not used). None outside ComfyUI."""
    if not HAVE_COMFY:
        return None
    return os.path.join(folder_paths.get_user_directory(), *COMPILE_CACHE_SUBDIR)


def get_folder_paths(kind: str) -> list[str]:
    """Folders registered for a model kind (empty outside ComfyUI)."""
    if not HAVE_COMFY:
        return []
    try:
        return list(folder_paths.get_folder_paths(kind))
    except Exception:  # noqa: BLE001
        return []


def need_comfy(what: str) -> None:
    """Raise ComfyUnavailable naming ``what`` when ComfyUI is not importable."""
    _need(what)


def load_torch_file(path: str) -> dict:
    """A LoRA / weights file as ComfyUI reads it (safetensors or torch with weights_only)."""
    _need("Reading a LoRA file")
    return _cu.load_torch_file(path, safe_load=True)


def add_lora_patches(model, lora_sd: dict, strength: float):
    """A clone of MODEL ``model`` with the LoRA ``lora_sd`` (ComfyUI key layout) added as ComfyUI patches, exactly
    as core LoraLoaderModelOnly does (comfy.sd.load_lora_for_models; unmatched keys are logged by ComfyUI)."""
    _need("Applying a LoRA")
    import comfy.sd  # type: ignore
    new_model, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, strength, 0)
    return new_model
