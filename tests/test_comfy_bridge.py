"""nodes/comfy_bridge.register_model_folders against a stand-in for ComfyUI's ``folder_paths`` module (its
attributes as ComfyUI 0.33 defines them: models_dir, folder_names_and_paths, supported_pt_extensions)."""
import importlib
import os
import types

import pytest

cb = importlib.import_module("steadydancer_turbo.nodes.comfy_bridge")


def _folder_paths(models_dir):
    fp = types.SimpleNamespace(models_dir=str(models_dir), supported_pt_extensions={".safetensors", ".pt"})
    fp.folder_names_and_paths = {"diffusion_models": ([str(models_dir / "diffusion_models")], {".safetensors"}),
                                 "custom_nodes": ([str(models_dir.parent / "custom_nodes")], set())}
    fp.get_folder_paths = lambda kind: fp.folder_names_and_paths[kind][0]
    return fp


@pytest.fixture
def comfy(monkeypatch, tmp_path):
    def install(models_dir):
        fp = _folder_paths(models_dir)
        monkeypatch.setattr(cb, "HAVE_COMFY", True)
        monkeypatch.setattr(cb, "folder_paths", fp)
        return fp
    return install


def test_registering_creates_models_dwpose(comfy, tmp_path):
    (tmp_path / "models").mkdir()
    fp = comfy(tmp_path / "models")
    cb.register_model_folders()
    assert fp.folder_names_and_paths["dwpose"][0][0] == str(tmp_path / "models" / "dwpose")
    assert (tmp_path / "models" / "dwpose").is_dir()          # users see where the .onnx files go
    cb.register_model_folders()                               # again: no error, nothing else created
    assert sorted(os.listdir(tmp_path / "models")) == ["dwpose"]


def test_registering_never_creates_outside_an_existing_models_dir_nor_fails(comfy, tmp_path, monkeypatch):
    comfy(tmp_path / "no_models_here")
    cb.register_model_folders()
    assert not (tmp_path / "no_models_here").exists()
    (tmp_path / "ro_models").mkdir()
    comfy(tmp_path / "ro_models")

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "makedirs", refuse)               # a read-only install
    cb.register_model_folders()
    assert "dwpose" in cb.folder_paths.folder_names_and_paths
