"""The Model Loader's and LoRA node's VALIDATE_INPUTS and the LoRA node's fit check, with ComfyUI's folder lookups
stubbed (the real-ComfyUI path is tests/integration/test_comfyui_validation.py). Real files from the real writers."""
import pytest
import torch

import _loader_util as U
import steadydancer_turbo as pack
from test_loader_lora import lora_tensors, write_lora
from steadydancer_turbo.nodes import comfy_bridge as cb
from steadydancer_turbo.nodes import validation
from steadydancer_turbo.steadydancer.checkpoints import CheckpointError

Loader = pack.NODE_CLASS_MAPPINGS["SteadyDancerModelLoader"]
Lora = pack.NODE_CLASS_MAPPINGS["SteadyDancerLoraLoader"]


@pytest.fixture
def folders(tmp_path, monkeypatch):
    """models/<folder>/<name> lookups as ComfyUI's folder_paths answers them: get_filename_list (files with a model
    extension, recursively, a sub-folder's files named '<folder>/<file>'), get_folder_paths, get_full_path."""
    root = tmp_path / "models"
    for f in (cb.DIFFUSION_FOLDER, cb.LORA_FOLDER):
        (root / f).mkdir(parents=True)
    monkeypatch.setattr(cb, "HAVE_COMFY", True)
    monkeypatch.setattr(cb, "get_folder_paths", lambda kind: [str(root / kind)])
    monkeypatch.setattr(cb, "get_filename_list", lambda kind: sorted(
        str(p.relative_to(root / kind)) for p in (root / kind).rglob("*")
        if p.is_file() and p.suffix in (".safetensors", ".gguf")))

    def full_path(kind, name):
        p = root / kind / name
        if not p.is_file():
            raise FileNotFoundError(f"Model file {name!r} not found")
        return str(p)

    monkeypatch.setattr(cb, "get_full_path", full_path)
    return root


def test_loader_validate_inputs(folders):
    sd = U.state_dict(U.reference_model())
    U.write_safetensors(sd, folders / cb.DIFFUSION_FOLDER / "good.safetensors", dtype=torch.bfloat16)
    data = (folders / cb.DIFFUSION_FOLDER / "good.safetensors").read_bytes()
    (folders / cb.DIFFUSION_FOLDER / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert Loader.VALIDATE_INPUTS("good.safetensors") is True
    msg = Loader.VALIDATE_INPUTS("cut.safetensors")
    assert isinstance(msg, str) and msg.startswith("cut.safetensors: ") and "truncated" in msg, msg
    assert str(folders) not in msg                                   # the name once, not the path again
    assert "Value not in list" in Loader.VALIDATE_INPUTS("missing.safetensors")
    assert Loader.VALIDATE_INPUTS(["12", 0]) is True                 # a linked input is checked when it runs


def test_lora_validate_inputs_and_fit_on_the_lora_node(folders, monkeypatch):
    sd = U.state_dict(U.reference_model())
    dit = U.write_safetensors(sd, folders / cb.DIFFUSION_FOLDER / "dit.safetensors")
    write_lora(folders / cb.LORA_FOLDER / "good.safetensors", lora_tensors(), "kijai")
    U.write_safetensors(sd, folders / cb.LORA_FOLDER / "a_model.safetensors")
    big = {"blocks.0.self_attn.q.weight": ("lowrank", (torch.zeros(5120, 4), torch.zeros(4, 5120)), 4.0)}
    write_lora(folders / cb.LORA_FOLDER / "for_14b.safetensors", big, "kijai")
    assert Lora.VALIDATE_INPUTS("good.safetensors") is True
    assert "full model" in Lora.VALIDATE_INPUTS("a_model.safetensors")
    assert Lora.VALIDATE_INPUTS("for_14b.safetensors") is True      # a valid LoRA file: the fit is the node's job
    # the LoRA node on a native MODEL: a stand-in ModelPatcher around the loaded DiT (ComfyUI's own patching is
    # tested in tests/integration); the fit check runs before any file is read as a LoRA
    from safetensors.torch import load_file
    from steadydancer_turbo.steadydancer.weights import loader
    import types
    dit_module = loader.load_steadydancer(str(dit), compute_dtype="fp32", device="cpu")
    handle = types.SimpleNamespace(model=types.SimpleNamespace(is_steadydancer=True, diffusion_model=dit_module))
    patched = []
    monkeypatch.setattr(cb, "load_torch_file", lambda p: load_file(p))
    monkeypatch.setattr(cb, "add_lora_patches", lambda m, sd, st: patched.append((m, sorted(sd), st)) or "patched")
    (out,) = Lora().apply(handle, "good.safetensors", 1.0, unique_id="3")
    assert out == "patched" and patched[0][0] is handle and patched[0][2] == 1.0
    assert patched[0][1] and all(k.startswith("diffusion_model.") for k in patched[0][1])
    with pytest.raises(CheckpointError) as e:
        Lora().apply(handle, "for_14b.safetensors", 1.0, unique_id="3")
    assert str(e.value).startswith("for_14b.safetensors: LoRA does not fit") and "dit.safetensors" in str(e.value)
    assert str(folders) not in str(e.value)
    # keys that match nothing are shown on the node
    extra = dict(lora_tensors())
    extra["blocks.7.self_attn.q.weight"] = ("lowrank", (torch.zeros(U.CFG["dim"], 4), torch.zeros(4, U.CFG["dim"])), None)
    write_lora(folders / cb.LORA_FOLDER / "part.safetensors", extra, "kijai")
    msgs = []
    monkeypatch.setattr(cb, "node_message", lambda nid, t: msgs.append((nid, t)))
    Lora().apply(handle, "part.safetensors", 1.0, unique_id="4")
    assert msgs and msgs[0][0] == "4" and "2 LoRA keys match no weight" in msgs[0][1], msgs


def test_load_error_names_the_file_once():
    e = CheckpointError("/models/diffusion_models/x.gguf", "the file is truncated")
    assert validation.load_error("x.gguf", "/models/diffusion_models/x.gguf", e) == "x.gguf: the file is truncated"
    shard = CheckpointError("/m/dir/part-2.safetensors", "truncated")          # a shard of the folder asked for
    assert validation.load_error("dir", "/m/dir", shard) == "dir: part-2.safetensors: truncated"
    other = CheckpointError("/m/base.safetensors", "truncated")                # another file than the one asked
    assert validation.load_error("dir", "/m/dir", other) == "dir: /m/base.safetensors: truncated"


def _load_on_cpu(path, o):
    """The node's load_model without ComfyUI's ModelPatcher (the real one runs in tests/integration)."""
    from steadydancer_turbo.steadydancer.weights import loader
    m = loader.load_steadydancer(path, compute_dtype=o.compute_dtype, storage=o.weight_storage, device="cpu")
    return m, m


LOAD_ARGS = dict(weight_storage="auto", compute_dtype="bf16", attention="sdpa", sparse_topk=0.15, fp8_matmul=False,
                 compile=False)


def test_official_sharded_folder_is_one_loader_entry_loaded_as_bf16(folders, monkeypatch):
    """What `fetch_models.py --variant bf16` writes: the official layout, fp32 shards + index + config.json
    (huggingface_hub's sharder), in diffusion_models/SteadyDancer-14B/."""
    from steadydancer_turbo.nodes import model_nodes
    models = folders / cb.DIFFUSION_FOLDER
    sd = U.state_dict(U.reference_model())
    folder = U.write_hub_sharded(sd, models / "SteadyDancer-14B", dtype=torch.float32, max_shard_size="5MB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) >= 3
    U.write_safetensors(sd, models / "single.safetensors", dtype=torch.bfloat16)
    # the combo: the folder once, its shards not (a shard alone is no model), single files as before
    names = Loader.INPUT_TYPES()["required"]["model_name"][0]
    assert names == ["SteadyDancer-14B", "single.safetensors"]
    assert cb.get_model_path(cb.DIFFUSION_FOLDER, "SteadyDancer-14B") == str(folder)
    assert Loader.VALIDATE_INPUTS("SteadyDancer-14B") is True
    assert "Value not in list" in Loader.VALIDATE_INPUTS(f"SteadyDancer-14B/{shards[0]}")
    # loaded through the node: the fp32 shards are cast to the compute dtype at load, value for value
    monkeypatch.setattr(model_nodes, "load_model", _load_on_cpu)
    (m,) = Loader().load("SteadyDancer-14B", **LOAD_ARGS)
    assert m.load_info["format"] == "sharded"
    loaded = m.state_dict()
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert loaded[k].dtype == torch.bfloat16, k
        assert torch.equal(loaded[k], v.to(torch.bfloat16)), k     # round-to-nearest-even of the stored fp32


def test_sharded_folder_with_a_missing_or_truncated_shard_is_refused_by_name(folders, monkeypatch):
    from steadydancer_turbo.nodes import model_nodes
    models = folders / cb.DIFFUSION_FOLDER
    sd = U.state_dict(U.reference_model())
    folder = U.write_hub_sharded(sd, models / "SteadyDancer-14B", max_shard_size="5MB")
    shards = sorted(folder.glob("*.safetensors"))
    index = "diffusion_pytorch_model.safetensors.index.json"
    # a shard cut short (an interrupted copy): named, with what is wrong, once; no path
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) // 2])
    msg = Loader.VALIDATE_INPUTS("SteadyDancer-14B")
    assert msg.startswith(f"SteadyDancer-14B: {shards[1].name}: ") and "truncated" in msg, msg
    assert str(models) not in msg
    monkeypatch.setattr(model_nodes, "load_model", _load_on_cpu)
    with pytest.raises(RuntimeError) as e:
        Loader().load("SteadyDancer-14B", **LOAD_ARGS)
    assert str(e.value).startswith(f"SteadyDancer: could not load SteadyDancer-14B: {shards[1].name}: ")
    # a shard the index lists is gone (an unfinished download)
    shards[1].unlink()
    assert "SteadyDancer-14B" in Loader.INPUT_TYPES()["required"]["model_name"][0]
    msg = Loader.VALIDATE_INPUTS("SteadyDancer-14B")
    assert msg == (f"SteadyDancer-14B: 1 of the {len(shards)} shards listed in {index} are missing: "
                   f"['{shards[1].name}'] (an unfinished download? fetch the missing files again)"), msg
    with pytest.raises(RuntimeError, match="shards listed in .* are missing"):
        Loader().load("SteadyDancer-14B", **LOAD_ARGS)
    # no index (shards alone, e.g. a fetch stopped before its last file): no folder entry, only files
    (folder / index).unlink()
    names = Loader.INPUT_TYPES()["required"]["model_name"][0]
    assert "SteadyDancer-14B" not in names and all(n.startswith("SteadyDancer-14B") for n in names)
    assert "Value not in list" in Loader.VALIDATE_INPUTS("SteadyDancer-14B")
