"""Node layer without ComfyUI: import, INPUT_TYPES shape, the bridge, frame/size/fps helpers."""
from __future__ import annotations

import importlib
import inspect
import math
import re
import sys

import pytest
import torch

pack = importlib.import_module("steadydancer_turbo")
from steadydancer_turbo.nodes import comfy_bridge as cb  # noqa: E402
from steadydancer_turbo.nodes import frames as common  # noqa: E402

WIDGET = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
KNOWN_SOCKETS = {"IMAGE", "MASK", "LATENT", "CONDITIONING", "VAE", "CLIP_VISION_OUTPUT", "POSE_KEYPOINT",
                 "MODEL", "SIGMAS", "GUIDER", "SAMPLER", "STEADYDANCER_CONTEXT"}


def test_pack_imports_without_comfyui_and_registers_all_nodes():
    assert not cb.HAVE_COMFY
    for name in ("comfy", "folder_paths", "server", "latent_preview"):
        assert name not in sys.modules, name
    m = pack.NODE_CLASS_MAPPINGS
    assert set(m) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert len(m) == 18
    for node_id in m:
        assert node_id.startswith("SteadyDancer")


@pytest.mark.parametrize("node_id", sorted(pack.NODE_CLASS_MAPPINGS))
def test_input_types_well_formed(node_id):
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and "required" in spec
    assert cls.CATEGORY.split("/")[0] == "SteadyDancer"
    assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    assert len(getattr(cls, "OUTPUT_TOOLTIPS", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
    assert isinstance(cls.DESCRIPTION, str) and cls.DESCRIPTION
    fn = getattr(cls, cls.FUNCTION)
    params = inspect.signature(fn).parameters
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, (name, entry)
            typ = entry[0]
            opts = entry[1] if len(entry) == 2 else {}
            assert isinstance(opts, dict)
            assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
            assert name in params, f"{node_id}.{cls.FUNCTION} does not take {name}"
            if section == "optional":
                assert params[name].default is None or params[name].default is not inspect.Parameter.empty
            if isinstance(typ, list):
                assert all(isinstance(v, str) for v in typ)
                if "default" in opts:
                    assert opts["default"] in typ
            else:
                assert typ in WIDGET | KNOWN_SOCKETS, (name, typ)
                if typ in ("INT", "FLOAT") and "default" in opts:
                    assert opts.get("min", -math.inf) <= opts["default"] <= opts.get("max", math.inf)
                if typ == "BOOLEAN":
                    assert isinstance(opts.get("default"), bool)
    for name in spec.get("hidden", {}):
        assert name in params
    # every required parameter of the function is an input
    names = {n for s in spec.values() for n in s}
    for p in list(params.values())[1:]:
        if p.default is inspect.Parameter.empty:
            assert p.name in names, p.name


def test_bridge_outside_comfyui():
    assert cb.get_filename_list(cb.DIFFUSION_FOLDER) == []
    assert cb.get_folder_paths(cb.DWPOSE_FOLDER) == []
    with pytest.raises(cb.ComfyUnavailable, match="needs ComfyUI"):
        cb.get_full_path(cb.LORA_FOLDER, "missing.safetensors")
    cb.check_interrupt()
    p = cb.Progress(3)
    p.update(2)
    p.update(5)
    assert p.current == 3
    cb.register_model_folders()
    cb.node_message(None, "a message")


def test_get_full_path_accepts_absolute_files(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"x")
    assert cb.get_full_path(cb.DIFFUSION_FOLDER, str(f)) == str(f)


@pytest.mark.parametrize("n,expect", [(81, 81), (82, 81), (84, 81), (85, 85), (1, 1), (4, 1), (5, 5), (49, 49), (50, 49)])
def test_adjust_length(n, expect):
    got, msg = common.adjust_length(n)
    assert got == expect and (got - 1) % 4 == 0
    assert (msg is None) == (n == expect)


def test_adjust_length_rejects_zero():
    with pytest.raises(ValueError):
        common.adjust_length(0)


@pytest.mark.parametrize("wh,expect", [((480, 832), (480, 832)), ((481, 830), (480, 832)), ((1080, 1920), (1088, 1920)),
                                       ((5, 5), (16, 16))])
def test_adjust_size(wh, expect):
    w, h, msg = common.adjust_size(*wh)
    assert (w, h) == expect and w % 16 == 0 and h % 16 == 0
    assert (msg is None) == (tuple(wh) == expect)


def test_resample_indices_by_hand():
    # 30 fps, 1 s -> 16 fps: frame i shows source floor(i*30/16)
    assert common.resample_indices(30, 30.0, 16.0) == [0, 1, 3, 5, 7, 9, 11, 13, 15, 16, 18, 20, 22, 24, 26, 28]
    assert common.resample_indices(10, 16.0, 16.0) == list(range(10))
    assert common.resample_indices(8, 8.0, 16.0) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    assert common.resample_indices(300, 30.0, 16.0, max_frames=81)[-1] == math.floor(80 * 30 / 16)


def test_resample_node_keeps_speed_and_makes_4n_plus_1():
    node = pack.NODE_CLASS_MAPPINGS["SteadyDancerResampleFrames"]()
    frames = torch.arange(60, dtype=torch.float32).view(60, 1, 1, 1).expand(60, 2, 2, 3) / 60
    out, fps, n = node.resample(frames, 30.0, 16.0, 0, True)
    assert fps == 16.0 and n == 29 and out.shape[0] == 29  # 2 s at 16 fps = 32 -> 29 (4n+1)
    idx = (out[:, 0, 0, 0] * 60).round().long().tolist()
    assert idx == [math.floor(i * 30 / 16) for i in range(29)]


def test_resize_images_crop_pad_stretch_geometry():
    img = torch.zeros(1, 16, 32, 3)
    img[:, :, 8:24] = 1.0  # a white center square in a 2:1 image
    crop = common.resize_images(img, 16, 16, "crop")
    assert crop.shape == (1, 16, 16, 3) and torch.allclose(crop, torch.ones_like(crop), atol=1e-6)
    pad = common.resize_images(img, 32, 32, "pad")
    assert pad.shape == (1, 32, 32, 3)
    assert pad[0, :8].abs().max() == 0 and pad[0, 24:].abs().max() == 0  # black bars above and below
    assert torch.allclose(pad[0, 12:20, 14:18], torch.ones(8, 4, 3), atol=1e-6)
    st = common.resize_images(img, 16, 32, "stretch")
    assert st.shape == (1, 32, 16, 3)
    same = common.resize_images(img, 32, 16, "crop")
    assert torch.equal(same, img)


def test_dwpose_model_choices_list_standard_names_and_found_files(monkeypatch):
    from steadydancer_turbo.nodes import pose_nodes

    found = ["yzd-v/DWPose/yolox_l.onnx", "hr16/yolox-onnx/yolox_s.onnx", "my/rtmw-l_384.onnx", "depth_anything.onnx"]
    monkeypatch.setattr(cb, "get_filename_list", lambda kind: found if kind == cb.DWPOSE_FOLDER else [])
    det = pose_nodes._model_choices("detector")
    est = pose_nodes._model_choices("pose")
    assert det[0] == "yolox_l.onnx" and det.count("yolox_l.onnx") == 1 and "yolox_s.onnx" in det
    assert est[:2] == ["dw-ll_ucoco_384.onnx", "dw-ll_ucoco.onnx"] and "rtmw-l_384.onnx" in est
    assert "depth_anything.onnx" not in det + est


def test_no_model_management_patching_and_no_model_cache():
    """ComfyUI's model management owns the model now: the pack assigns nothing into comfy modules and keeps no
    model of its own (the loader returns a MODEL; ComfyUI's node cache holds it)."""
    import pathlib
    root = pathlib.Path(pack.__file__).parent
    for f in list((root / "nodes").glob("*.py")):
        src = f.read_text()
        assert "install_memory_hooks" not in src, f
        assert not re.search(r"\b(_mm|mm|model_management)\.\w+\s*=[^=]", src), f
    from steadydancer_turbo.nodes import model_nodes
    assert not hasattr(model_nodes, "_CACHE") and not hasattr(model_nodes, "_ModelCache")


def test_native_model_nodes_say_comfyui_is_needed(tmp_path):
    """Outside ComfyUI the loader / LoRA / sampler pieces fail with a message naming what is missing."""
    from steadydancer_turbo.nodes import model_nodes
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(RuntimeError, match="needs ComfyUI"):
        model_nodes.SteadyDancerModelLoader().load(str(f), "auto", "bf16", "sdpa", 0.15, False, False)
    with pytest.raises(ValueError, match="SteadyDancer Model Loader"):
        model_nodes.SteadyDancerLoraLoader().apply(object(), "x.safetensors", 1.0)
