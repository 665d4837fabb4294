"""The model files SteadyDancer Turbo downloads: the one table of repositories, file names (and the sharded
official folder), ComfyUI folders and where each name was checked. Plain data + URL parsing, standard library only; ``tools/fetch_models.py`` loads it,
and tests/test_fetch_models.py checks the shipped workflows' ``properties.models`` and the README against it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import re
import sys
import urllib.parse

PACK_ROOT = pathlib.Path(__file__).resolve().parents[1]
HUB = "https://huggingface.co"
FOLDERS = ("diffusion_models", "loras", "text_encoders", "clip_vision", "vae", "dwpose")


class FetchError(Exception):
    """A download problem, with a message meant for the user (no traceback needed)."""


class NotFound(FetchError):
    """The repository has no such file (404)."""


class BadChoice(FetchError):
    """A variant / quant that does not exist (a usage error: exit code 2)."""


@dataclasses.dataclass(frozen=True)
class HubFile:
    """One file on the hub and the ComfyUI models/ subfolder it belongs in. ``source`` says where the repository
    and file name were checked (model card, the repository's file list, or the commit that added it)."""
    repo: str
    path: str
    directory: str
    source: str
    revision: str = "main"

    @property
    def name(self):
        return self.path.rsplit("/", 1)[-1]

    @property
    def url(self):
        return f"{HUB}/{self.repo}/resolve/{self.revision}/{self.path}"

    def entry(self):
        """The ``properties.models`` form of this file (what ComfyUI's missing-model dialog reads)."""
        return {"name": self.name, "url": self.url, "directory": self.directory}


@dataclasses.dataclass(frozen=True)
class HubFolder:
    """A sharded checkpoint on the hub (a diffusers-style ``*.safetensors.index.json`` + shards + config.json),
    fetched into one folder ``models/<directory>/<name>/``; the Model Loader lists that folder as one entry named
    ``name`` (nodes/comfy_bridge.py ``get_model_list``). Its files are read from the repository's file list at run
    time by ``tools/fetch_models.py --variant <variant>``, which is also what ``--fetch-missing`` runs for it."""
    repo: str
    name: str
    directory: str
    variant: str
    source: str
    revision: str = "main"

    @property
    def url(self):
        return f"{HUB}/{self.repo}/tree/{self.revision}"

    def entry(self):
        """The pre-check's hint for this folder (no single download URL: the shards come from the file list)."""
        return {"name": self.name, "url": self.url, "directory": self.directory}


# ------------------------------------------------------------------------------------------- the file table
# The one list of download locations. The shipped workflows' properties.models and the README's model table
# must agree with it (tests/test_fetch_models.py checks the workflows). The DWPose files come from the core's own
# table (dwpose/models.py) so their URLs exist in one place only.
DIT_FP8 = HubFile(
    "Kijai/WanVideo_comfy_fp8_scaled", "SteadyDancer/Wan21_SteadyDancer_fp8_e4m3fn_scaled_KJ.safetensors",
    "diffusion_models", "https://huggingface.co/Kijai/WanVideo_comfy_fp8_scaled/tree/main/SteadyDancer (16.4 GB)")
TURBO_LORA = HubFile(
    "Kijai/WanVideo_comfy", "Lightx2v/lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors", "loras",
    "https://huggingface.co/Kijai/WanVideo_comfy/tree/main/Lightx2v (738 MB, sha256 85c4a61c...)")
ENCODERS = (
    HubFile("Comfy-Org/Wan_2.1_ComfyUI_repackaged", "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
            "text_encoders",
            "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/tree/main/split_files/text_encoders (6.74 GB)"),
    HubFile("Comfy-Org/Wan_2.1_ComfyUI_repackaged", "split_files/clip_vision/clip_vision_h.safetensors", "clip_vision",
            "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged (split_files/clip_vision)"),
    HubFile("Comfy-Org/Wan_2.1_ComfyUI_repackaged", "split_files/vae/wan_2.1_vae.safetensors", "vae",
            "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/tree/main/split_files/vae (254 MB)"),
)
DWPOSE_SOURCE = ("https://huggingface.co/yzd-v/DWPose/commit/f7c16a3d45ad3783db41471848c80fbc281cabac "
                 "(adds yolox_l.onnx and dw-ll_ucoco_384.onnx)")
DWPOSE_DEFAULTS = ("yolox_l.onnx", "dw-ll_ucoco_384.onnx")

# DiT variants whose file is found in the repository's file list at run time (renamed or added files still
# resolve; nothing here is a guessed name, each has its source):
# - fp16: Kijai/WanVideo_comfy, folder SteadyDancer/, the *fp16.safetensors file there; its name has been
#   Wan21_I2V_SteadyDancer_fp16.safetensors (https://huggingface.co/Kijai/WanVideo_comfy/discussions/110; the
#   official README's GGUF note links https://huggingface.co/Kijai/WanVideo_comfy/tree/main/SteadyDancer).
# - bf16 (the CLI name; the bytes are fp32): the official release https://huggingface.co/MCG-NJU/SteadyDancer-14B,
#   diffusers-style diffusion_pytorch_model-0000N-of-00007.safetensors shards + index + config.json, in the folder
#   diffusion_models/SteadyDancer-14B/ (DIT_OFFICIAL below), which the Model Loader lists as one entry.
#   Stored dtype, checked 2026-12-01: the model has 16,396,718,736 parameters (our SteadyDancerConfig.full_14b(),
#   built on the meta device), so fp32 is 65.59 GB and bf16 32.79 GB. The hub's shard pages
#   (https://huggingface.co/MCG-NJU/SteadyDancer-14B/blob/main/diffusion_pytorch_model-00002-of-00007.safetensors:
#   9.8 GB; .../diffusion_pytorch_model-00007-of-00007.safetensors: 6.08 GB) show seven ~10 GB shards, the layout
#   of the fp32 Wan2.1-I2V-14B release (shards 9.95, 9.8, 9.98, 9.98, 9.9, 9.9, 6.08 GB = 65.59 GB, 4.0 bytes per
#   parameter); 32.79 GB of bf16 would be four shards. The official loader also casts after reading
#   (MCG-NJU/SteadyDancer wan/image2video_dancer.py: WanModel.from_pretrained(...) then .to(torch.bfloat16)).
#   So: about 65.6 GB of fp32 on disk; our loader casts every float tensor to the compute dtype (bf16 by default)
#   while it reads, one tensor at a time (tests/test_node_validation.py checks this on fp32 shards).
# - gguf[:QUANT]: https://huggingface.co/MCG-NJU/SteadyDancer-GGUF (official README, 2025-12-04: "converted from
#   Kijai weight by ComfyUI-GGUF"); names seen in use: Wan21_I2V_SteadyDancer_fp16-Q6_K_fix_5d_tensor_from_
#   fp8_e4m3fn_scaled_KJ.gguf and an older Wan21_I2V_SteadyDancer_fp16-Q5_K_M_fix_5d_tensor.gguf, which is why the
#   quant is matched against the file list rather than spelled here.
FP16_REPO, FP16_FOLDER, FP16_KNOWN = "Kijai/WanVideo_comfy", "SteadyDancer", "Wan21_I2V_SteadyDancer_fp16.safetensors"
OFFICIAL_REPO, OFFICIAL_FOLDER = "MCG-NJU/SteadyDancer-14B", "SteadyDancer-14B"
GGUF_REPO, GGUF_DEFAULT_QUANT = "MCG-NJU/SteadyDancer-GGUF", "Q4_K_M"
VARIANTS = ("fp8", "fp16", "bf16", "gguf")
DIT_OFFICIAL = HubFolder(
    OFFICIAL_REPO, OFFICIAL_FOLDER, "diffusion_models", "bf16",
    "https://huggingface.co/MCG-NJU/SteadyDancer-14B (7 fp32 shards, about 65.6 GB; see the note above)")
QUANT_RE = re.compile(r"(?<![A-Za-z0-9])(BF16|F16|F32|Q\d_K(?:_[SML])?|Q\d_[01]|Q\d_K|IQ\d_[A-Z]+)(?![A-Za-z0-9])",
                       re.IGNORECASE)


def dwpose_table():
    """The core's DWPose table (dwpose/models.py, plain Python: ``MODEL_FILES``, ``COMFY_MODEL_SUBFOLDER``), loaded
    by file so that no package import (and no ComfyUI node layer) is needed."""
    name = "_steadydancer_dwpose_models"
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, PACK_ROOT / "dwpose" / "models.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod     # its dataclass looks the module up while the file executes
        spec.loader.exec_module(mod)
    return mod


def dwpose_files():
    """The default DWPose detector and estimator, from the core's table (``dwpose_table``)."""
    mod = dwpose_table()
    out = []
    for name in DWPOSE_DEFAULTS:
        repo, revision, path = parse_hf_url(mod.MODEL_FILES[name].url)
        out.append(HubFile(repo, path, mod.COMFY_MODEL_SUBFOLDER, DWPOSE_SOURCE, revision))
    return tuple(out)


def known_files():
    """Every fixed file of the table (the DiT variants resolved at run time are not in it)."""
    return (DIT_FP8, TURBO_LORA) + ENCODERS + dwpose_files()


def known_folders():
    """The sharded checkpoint folders the pack can fetch (the Model Loader lists each as one entry)."""
    return (DIT_OFFICIAL,)


def parse_hf_url(url):
    """``https://huggingface.co/<owner>/<repo>/resolve/<rev>/<path>`` -> (repo, revision, path)."""
    u = urllib.parse.urlparse(url)
    parts = [urllib.parse.unquote(p) for p in u.path.strip("/").split("/")]
    hosts = {"huggingface.co", "www.huggingface.co", "hf.co",
             urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or HUB).hostname}
    if u.scheme not in ("http", "https") or u.hostname not in hosts or len(parts) < 5 or parts[2] != "resolve":
        raise FetchError(f"not a Hugging Face file URL (https://huggingface.co/<repo>/resolve/<rev>/<file>): {url}")
    return "/".join(parts[:2]), parts[3], "/".join(parts[4:])
