"""Headers read without mapping the weights: a valid safetensors file larger than this machine's RAM opens (a
sparse file, no disk used), truncated GGUF files say "truncated" at every cut point (checked against gguf-py's
own reader of the intact file), and a pickled .pth is refused without torch's weights_only=False advice.
"""
import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import _loader_util as U
from steadydancer_turbo.steadydancer.checkpoints import CheckpointError, CheckpointReader
from steadydancer_turbo.steadydancer.checkpoints.gguf_file import gguf_check_length
from steadydancer_turbo.steadydancer.checkpoints.safetensors_file import safetensors_header
from steadydancer_turbo.steadydancer.weights.loader import load_steadydancer

gguf = pytest.importorskip("gguf")


def _st_header(entries, metadata=None):
    """safetensors header bytes laid out as the format specifies: u64 length + JSON padded with spaces to 8."""
    h = ({"__metadata__": metadata} if metadata else {}) | entries
    js = json.dumps(h, separators=(",", ":")).encode()
    js += b" " * (-len(js) % 8)
    return struct.pack("<Q", len(js)) + js


def test_hand_built_header_is_what_the_safetensors_writer_writes(tmp_path):
    # the writer of the huge file below, checked byte for byte against safetensors' own writer
    t = {"a.weight": torch.arange(4, dtype=torch.float32), "b.weight": torch.ones(3, dtype=torch.bfloat16)}
    save_file(t, str(tmp_path / "real.safetensors"), metadata={"format": "pt"})
    real = (tmp_path / "real.safetensors").read_bytes()
    ours = _st_header({"a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                       "b.weight": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}}, {"format": "pt"})
    assert real[:len(ours)] == ours
    entries, md, base = safetensors_header(tmp_path / "real.safetensors")
    assert base == len(ours) and md == {"format": "pt"} and entries["b.weight"]["shape"] == [3]


def test_valid_safetensors_larger_than_ram_opens_and_reads(tmp_path):
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    n_big = (ram + (8 << 30)) // 2                    # a bf16 tensor of RAM + 8 GiB
    head = {"a.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "big.weight": {"dtype": "BF16", "shape": [n_big], "data_offsets": [16, 16 + 2 * n_big]},
            "z.weight": {"dtype": "F32", "shape": [4], "data_offsets": [16 + 2 * n_big, 32 + 2 * n_big]}}
    hdr = _st_header(head, {"format": "pt"})
    p = tmp_path / "huge.safetensors"
    first, last = np.array([1.5, -2, 3, 4], np.float32), np.array([7, 8, -9.25, 10], np.float32)
    with open(p, "wb") as f:
        f.write(hdr + first.tobytes())
        f.seek(len(hdr) + 16 + 2 * n_big)
        f.write(last.tobytes())
    try:
        st = os.stat(p)
        if st.st_blocks * 512 > (64 << 20):
            pytest.skip("this filesystem has no sparse files")
        assert st.st_size > ram
        r = CheckpointReader(p)
        try:
            assert r.infos["big.weight"].shape == (n_big,)
            assert torch.equal(r.read("a.weight"), torch.from_numpy(first))
            assert torch.equal(r.read("z.weight"), torch.from_numpy(last))
            assert r.read("big.weight")[-3:].tolist() == [0.0, 0.0, 0.0]   # the hole reads as zeros
        finally:
            r.close()
        # the same file one byte short is a truncated file, said so
        os.truncate(p, st.st_size - 1)
        with pytest.raises(CheckpointError, match="truncated"):
            CheckpointReader(p)
    finally:
        p.unlink()


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("gguf") / "m.gguf"
    U.write_gguf(U.state_dict(U.reference_model()), p, gguf.GGMLQuantizationType.Q8_0)
    return p


def test_gguf_length_matches_gguf_readers_tensor_table(gguf_file):
    r = gguf.GGUFReader(str(gguf_file))
    want = max(int(t.data_offset) + int(t.n_bytes) for t in r.tensors)
    assert gguf_check_length(gguf_file) == want
    assert want <= os.path.getsize(gguf_file)


def test_truncated_gguf_says_truncated_wherever_it_is_cut(gguf_file, tmp_path):
    r = gguf.GGUFReader(str(gguf_file))
    data = gguf_file.read_bytes()
    kv_mid = r.fields["general.architecture"].offset + 10           # inside the key/value section
    last = max(r.tensors, key=lambda t: t.data_offset)
    cuts = {"magic": 3, "counts": 12, "kv": kv_mid, "tensor table": r.data_offset - 5,
            "first tensor": r.tensors[0].data_offset + 1, "middle": len(data) * 2 // 3,
            "last byte": int(last.data_offset + last.n_bytes) - 1}
    for where, n in cuts.items():
        p = tmp_path / f"cut_{where.replace(' ', '_')}.gguf"
        p.write_bytes(data[:n])
        with pytest.raises(CheckpointError) as e:
            load_steadydancer(p, device="cpu")
        msg = e.value.problem
        assert "truncated" in msg, (where, msg)
        for numpy_text in ("reshape", "index", "out of bounds", "mmap"):
            assert numpy_text not in msg.lower(), (where, msg)
    assert gguf_check_length(gguf_file)  # the intact file passes


class NotAllowed:
    """An arbitrary class: unpickling it would run code; weights_only refuses it."""


def test_pickled_pth_is_refused_without_the_weights_only_false_advice(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "cfg": NotAllowed()}, p)
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(p)
    msg = str(e.value)
    assert "pickled" in msg and "NotAllowed" in msg, msg
    assert "weights_only" not in msg and "arbitrary code" not in msg, msg


def test_official_sampler_names_the_diffusers_it_needs(monkeypatch):
    """diffusers < 0.37 has UniPC's set_timesteps(num_inference_steps, device, mu) only (0.36.0's signature): a
    clear ImportError naming the minimum instead of a TypeError from inside the sampler."""
    import diffusers
    from steadydancer_turbo.steadydancer.sampling import official as sampling

    def set_timesteps_036(self, num_inference_steps, device=None, mu=None):
        raise AssertionError("must not be called")

    monkeypatch.setattr(diffusers.UniPCMultistepScheduler, "set_timesteps", set_timesteps_036)
    with pytest.raises(ImportError, match=r"diffusers >= 0\.37"):
        sampling.make_unipc_scheduler(np.linspace(1.0, 0.25, 4))
