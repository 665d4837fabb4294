"""Bad files: a clear CheckpointError naming the file and the problem, and no half-loaded model left behind."""
import gc

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import _loader_util as U
from steadydancer_turbo.steadydancer.checkpoints import CheckpointError
from steadydancer_turbo.steadydancer.weights.loader import load_steadydancer
from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def sd():
    return U.state_dict(U.reference_model())


def n_models():
    gc.collect()
    return sum(type(o) is SteadyDancerDiT for o in gc.get_objects())


def expect_error(path, *patterns, **kw):
    before = n_models()
    with pytest.raises(CheckpointError) as e:
        load_steadydancer(path, device="cpu", **kw)
    msg = str(e.value)
    assert str(path) in msg
    for p in patterns:
        assert p.lower() in msg.lower(), msg
    assert n_models() == before  # nothing half-loaded survives the error
    return msg


def truncate(path, keep=0.6):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def test_truncated_safetensors(tmp_path, sd):
    p = U.write_safetensors(sd, tmp_path / "m.safetensors", dtype=torch.bfloat16)
    truncate(p)
    expect_error(p, "truncated")


def test_truncated_sharded_folder(tmp_path, sd):
    folder = U.write_sharded(sd, tmp_path / "dir")
    truncate(folder / "diffusion_pytorch_model-00002-of-00003.safetensors")
    msg = expect_error(folder / "diffusion_pytorch_model-00002-of-00003.safetensors", "truncated")
    with pytest.raises(CheckpointError, match="00002-of-00003.*truncated"):
        load_steadydancer(folder, device="cpu")
    assert msg


def test_truncated_gguf(tmp_path, sd):
    p = tmp_path / "m.gguf"
    U.write_gguf(sd, p, gguf.GGMLQuantizationType.Q8_0)
    truncate(p, 0.7)
    expect_error(p, "truncated")


def test_gguf_unsupported_quant_type(tmp_path, sd):
    p = tmp_path / "iq.gguf"
    U.write_gguf(sd, p, gguf.GGMLQuantizationType.Q8_0)
    w = gguf.GGUFWriter(str(p), arch="wan")
    for k, v in sd.items():
        a = v.float().numpy()
        if U.is_block_linear_weight(k, v):
            bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL]
            raw = np.zeros((a.shape[0], a.shape[1] // bs * ts), dtype=np.uint8)
            w.add_tensor(k, raw, raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
        else:
            w.add_tensor(k, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expect_error(p, "IQ4_NL", "does not support")


def _wan_like(sd, drop=(), shapes=None):
    out = {k: v for k, v in sd.items() if not k.startswith(drop)}
    for k, s in (shapes or {}).items():
        out[k] = torch.zeros(s)
    return out


def test_wan_t2v_checkpoint(tmp_path, sd):
    t2v = _wan_like(sd, drop=("patch_embedding_", "condition_embedding", "img_emb.", "patch_embedding."),
                    shapes={"patch_embedding.weight": (256, 16, 1, 2, 2), "patch_embedding.bias": (256,)})
    t2v = {k: v for k, v in t2v.items() if "k_img" not in k and "v_img" not in k}
    p = U.write_safetensors(t2v, tmp_path / "wan_t2v.safetensors", prefix="model.diffusion_model.")
    expect_error(p, "text-to-video")


def test_wan22_checkpoint(tmp_path, sd):
    # Wan2.2-I2V-A14B style: 36 input channels but no CLIP image branch
    a14b = {k: v for k, v in _wan_like(sd, drop=("patch_embedding_", "condition_embedding", "img_emb.")).items()
            if "k_img" not in k and "v_img" not in k}
    p = U.write_safetensors(a14b, tmp_path / "wan22_a14b.safetensors")
    expect_error(p, "Wan2.2")
    # Wan2.2-TI2V-5B style: 48-channel VAE latents
    ti2v = _wan_like(sd, drop=("patch_embedding_", "condition_embedding", "img_emb.", "patch_embedding.", "head.head"),
                     shapes={"patch_embedding.weight": (256, 48, 1, 2, 2), "patch_embedding.bias": (256,),
                             "head.head.weight": (192, 256), "head.head.bias": (192,)})
    ti2v = {k: v for k, v in ti2v.items() if "k_img" not in k and "v_img" not in k}
    p = U.write_safetensors(ti2v, tmp_path / "wan22_ti2v.safetensors")
    expect_error(p, "Wan2.2")


def test_plain_wan21_i2v_is_not_steadydancer(tmp_path, sd):
    i2v = _wan_like(sd, drop=("patch_embedding_", "condition_embedding"))
    p = U.write_safetensors(i2v, tmp_path / "wan21_i2v.safetensors")
    expect_error(p, "plain Wan2.1 image-to-video")


def test_sdxl_checkpoint(tmp_path):
    sdxl = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "model.diffusion_model.input_blocks.0.0.bias": torch.zeros(320),
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(1280, 2816),
            "model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3),
            "first_stage_model.decoder.conv_in.weight": torch.zeros(512, 4, 3, 3),
            "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": torch.zeros(1, 77)}
    p = tmp_path / "sdxl.safetensors"
    save_file(sdxl, str(p))
    expect_error(p, "Stable Diffusion UNet")


def test_not_a_checkpoint_and_pickles(tmp_path):
    p = tmp_path / "notes.safetensors"
    p.write_text("hello, I am not a model, but a long enough text file")
    expect_error(p, "unknown file format")
    p2 = tmp_path / "old.ckpt"
    p2.write_bytes(b"\x80\x02" + b"\x00" * 64)
    expect_error(p2, "refusing to unpickle")
    expect_error(tmp_path / "missing.safetensors", "no such file")


class NotAllowed:
    """An arbitrary class: unpickling it would mean running code, weights_only refuses it."""


def test_pth_with_code_is_refused(tmp_path, sd):
    p = tmp_path / "evil.pth"
    torch.save({"state_dict": sd, "cfg": NotAllowed()}, p)
    msg = expect_error(p, "pickled", "NotAllowed", "never executed")
    assert "weights_only=False" not in msg


def test_missing_tensors(tmp_path, sd):
    part = {k: v for k, v in sd.items() if not k.startswith("blocks.1.ffn")}
    p = U.write_safetensors(part, tmp_path / "m.safetensors")
    expect_error(p, "missing", "blocks.1.ffn")


def test_failure_mid_load_releases_the_weights_already_loaded(tmp_path, sd, monkeypatch):
    # a read error (or out-of-memory) half-way through the stream: the weights placed so far must be freed
    # before the error propagates, although the caller (ComfyUI, pytest.raises) still holds the exception and
    # so the loader's frame through its traceback
    from steadydancer_turbo.steadydancer import checkpoints as checkpoint
    from steadydancer_turbo.steadydancer.weights.quant import QuantLinear

    p = U.write_safetensors(sd, tmp_path / "m.safetensors")
    real_read, calls = checkpoint.CheckpointReader.read, []

    def failing_read(self, key):
        calls.append(key)
        if len(calls) > len(sd) // 2:
            raise CheckpointError(self.path, "simulated read error")
        return real_read(self, key)

    def n_quant():
        gc.collect()
        return sum(type(o) is QuantLinear for o in gc.get_objects())

    monkeypatch.setattr(checkpoint.CheckpointReader, "read", failing_read)
    before = (n_models(), n_quant())
    with pytest.raises(CheckpointError, match="simulated") as err:
        load_steadydancer(p, device="cpu", storage="fp8_e4m3fn")
    assert (n_models(), n_quant()) == before
    assert err.value.__traceback__ is not None  # the error (with its traceback) was alive for the checks above
