"""GGUF dequantization: our per-layer dequantizer (diffusers' torch block decoders run in float32)
must be bit-identical to gguf-py's numpy reference ``gguf.quants.dequantize`` for every type we accept.

gguf-py cannot *quantize* K-quants, so their blocks are built by hand: random payload bytes with
valid (finite, fp16) super-block scales at the byte offsets of ggml's block structs.
"""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from steadydancer_turbo.steadydancer.checkpoints.gguf_types import GGUF_QUANT_TYPES  # noqa: E402
from steadydancer_turbo.steadydancer.weights.quant import dequantize_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
# byte offsets of the fp16 scale fields inside one block (ggml-common.h block_* structs)
F16_FIELDS = {
    Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}


def random_blocks(qtype, rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = rows * cols // block_size
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        vals = (rng.standard_normal(n_blocks) * 0.02).astype(np.float16)
        raw[:, off:off + 2] = vals.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(rows, cols // block_size * type_size)


def test_every_listed_type_is_accepted():
    assert set(F16_FIELDS) == set(GGUF_QUANT_TYPES)


@pytest.mark.parametrize("qtype", list(F16_FIELDS), ids=lambda q: q.name)
def test_random_blocks_bit_identical_to_gguf_reference(qtype):
    raw = random_blocks(qtype, 8, 512)
    ref = gguf.quants.dequantize(raw, qtype)
    assert ref.shape == (8, 512)
    ours = dequantize_gguf(torch.from_numpy(raw), int(qtype), (8, 512))
    assert ours.dtype == torch.float32
    assert torch.equal(ours, torch.from_numpy(ref.astype(np.float32)))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda q: q.name)
def test_gguf_quantized_weights_bit_identical(qtype):
    w = np.random.default_rng(1).standard_normal((16, 256)).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    ref = gguf.quants.dequantize(raw, qtype)
    ours = dequantize_gguf(torch.from_numpy(raw), int(qtype), (16, 256))
    assert torch.equal(ours, torch.from_numpy(ref))
    # and the quantization is a real approximation of w (guards against comparing garbage to garbage):
    # at most one quantization step, ~amax/127 (8 bit), amax/15 (5 bit), amax/7 (4 bit), amax ~ 3.5 here
    bound = {Q.Q8_0: 0.03, Q.Q5_0: 0.25, Q.Q5_1: 0.25, Q.Q4_0: 0.5, Q.Q4_1: 0.5}[qtype]
    assert np.abs(ref - w).max() < bound
