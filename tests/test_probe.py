"""probe: DiT and LoRA files checked from their headers only (what the Model Loader's and LoRA node's
VALIDATE_INPUTS run): the real-sized 14B layout as a sparse file larger than RAM (no weight can be read), real
files from the real writers (safetensors, gguf), wrong / truncated / unsupported files, and a LoRA's fit to the
base model decided from the two headers exactly as applying it to the loaded model decides.
"""
import json
import os
import struct
import warnings

import pytest
import torch
from safetensors.torch import save_file

import _loader_util as U
from test_loader_lora import lora_tensors, write_lora
from steadydancer_turbo.steadydancer.weights import probe
from steadydancer_turbo.steadydancer.checkpoints import CheckpointError, CheckpointReader
from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
from steadydancer_turbo.steadydancer.weights.loader import apply_loras, load_steadydancer

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def sd():
    return U.state_dict(U.reference_model())


def _sparse_bf16_safetensors(path, shapes, prefix="model.diffusion_model."):
    """A header for ``shapes`` (bf16) and a hole where the data would be: the real file's size, no disk."""
    entries, off = {}, 0
    for k in sorted(shapes):
        n = 2
        for d in shapes[k]:
            n *= d
        entries[prefix + k] = {"dtype": "BF16", "shape": list(shapes[k]), "data_offsets": [off, off + n]}
        off += n
    js = json.dumps(entries, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(js)) + js)
        f.truncate(8 + len(js) + off)
    return off


def test_full_size_14b_file_larger_than_ram_probes_from_its_header(tmp_path, monkeypatch):
    cfg = SteadyDancerConfig.full_14b()
    shapes = {k: tuple(v) for k, v in probe.expected_shapes(cfg).items()}   # the model's own layout
    p = tmp_path / "Wan21_SteadyDancer_bf16.safetensors"
    nbytes = _sparse_bf16_safetensors(p, shapes)
    assert 32e9 < nbytes < 34e9                                           # the 32.8 GB bf16 release
    if os.stat(p).st_blocks * 512 > (64 << 20):
        pytest.skip("this filesystem has no sparse files")
    monkeypatch.setattr(CheckpointReader, "read", lambda *a: pytest.fail("probe read a weight"))
    desc = probe.probe_model(p)
    assert "dim 5120, 40 blocks" in desc and "bfloat16 x" in desc, desc
    # one tensor of the SteadyDancer pose modules with a wrong shape: refused, named
    bad = dict(shapes)
    bad["condition_embedding_align.proj_p.weight"] = (64,) + shapes["condition_embedding_align.proj_p.weight"][1:]
    p2 = tmp_path / "bad.safetensors"
    _sparse_bf16_safetensors(p2, bad)
    with pytest.raises(CheckpointError, match="condition_embedding_align"):
        probe.probe_model(p2)
    p.unlink()
    p2.unlink()


def test_real_tiny_files_probe_ok_in_every_format(tmp_path, sd):
    files = [U.write_safetensors(sd, tmp_path / "bf16.safetensors", dtype=torch.bfloat16),
             tmp_path / "fp8.safetensors"]
    U.write_fp8(sd, files[1])
    U.write_gguf(sd, tmp_path / "q8.gguf", gguf.GGMLQuantizationType.Q8_0)
    files.append(tmp_path / "q8.gguf")
    for p in files:
        desc = probe.probe_model(p)
        assert f"dim {U.CFG['dim']}, {U.CFG['num_layers']} blocks" in desc, (p, desc)
    assert "Q8_0" in probe.probe_model(tmp_path / "q8.gguf")
    assert "float8_e4m3fn" in probe.probe_model(files[1])


def test_bad_dit_files_are_refused_with_the_loaders_words(tmp_path, sd):
    t2v = {k: v for k, v in sd.items() if not k.startswith(("patch_embedding_", "condition_embedding", "img_emb."))
           and "k_img" not in k and "v_img" not in k}
    t2v["patch_embedding.weight"] = torch.zeros(U.CFG["dim"], 16, 1, 2, 2)
    cases = {"t2v.safetensors": (U.write_safetensors(t2v, tmp_path / "t2v.safetensors"), "text-to-video"),
             "part.safetensors": (U.write_safetensors({k: v for k, v in sd.items() if "blocks.1.ffn" not in k},
                                                      tmp_path / "part.safetensors"), "missing")}
    p = U.write_safetensors(sd, tmp_path / "cut.safetensors")
    os.truncate(p, os.path.getsize(p) * 3 // 4)
    cases["cut"] = (p, "truncated")
    g = tmp_path / "cut.gguf"
    U.write_gguf(sd, g, gguf.GGMLQuantizationType.Q4_0)
    os.truncate(g, os.path.getsize(g) // 2)
    cases["cut.gguf"] = (g, "truncated")
    txt = tmp_path / "notes.safetensors"
    txt.write_text("this is a text file, long enough to be sniffed")
    cases["text"] = (txt, "unknown file format")
    for name, (path, words) in cases.items():
        with pytest.raises(CheckpointError, match=words) as e:
            probe.probe_model(path)
        with pytest.raises(CheckpointError) as e2:                      # the loader says the same
            load_steadydancer(path, device="cpu")
        assert e.value.problem == e2.value.problem, name


def test_probe_sees_a_file_replaced_in_place(tmp_path, sd):
    p = U.write_safetensors(sd, tmp_path / "m.safetensors")
    probe.probe_model(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])                                # same name, now truncated
    with pytest.raises(CheckpointError, match="truncated"):
        probe.probe_model(p)


def test_probe_lora(tmp_path, sd):
    good = write_lora(tmp_path / "good.safetensors", lora_tensors(), "kijai")
    assert probe.probe_lora(good).startswith("LoRA with")
    model = U.write_safetensors(sd, tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="full model"):
        probe.probe_lora(model)
    other = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(4, 4)}, str(other))
    with pytest.raises(CheckpointError, match="not a LoRA"):
        probe.probe_lora(other)
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 9])
    with pytest.raises(CheckpointError, match="truncated"):
        probe.probe_lora(cut)
    g = tmp_path / "lora.gguf"
    U.write_gguf({"blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 256)}, g, gguf.GGMLQuantizationType.F32)
    with pytest.raises(CheckpointError, match="safetensors"):
        probe.probe_lora(g)


def _fit_and_apply(lora, dit):
    """(header verdict, verdict of applying the LoRA to the loaded model): both None or both an error text."""
    try:
        probe.check_lora_fits(lora, dit)
        fit = None
    except CheckpointError as e:
        fit = e.problem
    model = load_steadydancer(dit, device="cpu", compute_dtype=torch.float32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            apply_loras(model, [(lora, 1.0)])
        applied = None
    except CheckpointError as e:
        applied = e.problem
    return fit, applied


def test_lora_fit_from_headers_decides_as_applying_it(tmp_path, sd):
    dit = U.write_safetensors(sd, tmp_path / "dit.safetensors")
    q4 = tmp_path / "q4.gguf"
    U.write_gguf(sd, q4, gguf.GGMLQuantizationType.Q4_K)
    fits = write_lora(tmp_path / "fits.safetensors", lora_tensors(), "kohya")
    # rank-4 deltas for a 5120-wide model (the 14B's width): every shape is wrong for this model
    big = {"blocks.0.self_attn.q.weight": ("lowrank", (torch.zeros(5120, 4), torch.zeros(4, 5120)), 4.0),
           "blocks.1.cross_attn.o.bias": ("diff_b", (torch.zeros(5120),), None)}
    wrong = write_lora(tmp_path / "14b.safetensors", big, "kijai")
    # keys of another model entirely (an SDXL LoRA): matches nothing
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 4)}, str(sdxl))
    for base in (dit, q4):
        assert _fit_and_apply(fits, base) == (None, None)
        fit, applied = _fit_and_apply(wrong, base)
        assert fit is not None and fit == applied and "does not fit" in fit, (fit, applied)
        fit, applied = _fit_and_apply(sdxl, base)
        assert fit is not None and fit == applied and "matches no weight" in fit, (fit, applied)
    # unmatched keys are returned (the node shows them), as the loader's warning lists them
    extra = dict(lora_tensors())
    extra["blocks.9.self_attn.q.weight"] = ("lowrank", (torch.zeros(U.CFG["dim"], 4), torch.zeros(4, U.CFG["dim"])), None)
    part = write_lora(tmp_path / "part.safetensors", extra, "kijai")
    assert probe.check_lora_fits(part, dit) == ["diffusion_model.blocks.9.self_attn.q.lora_down.weight",
                                                "diffusion_model.blocks.9.self_attn.q.lora_up.weight"]
