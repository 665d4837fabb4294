"""Shared helpers for the loader tests: a tiny SteadyDancer, its inputs, and checkpoint writers that use
the real libraries (safetensors.torch.save_file, gguf.GGUFWriter, torch.save) with the official key names.

The tiny model has width 256 (two 128-wide heads, as every Wan DiT; the config reader derives heads from
width / 128) so that every Linear row is a whole number of 256-element K-quant super-blocks.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

from steadydancer_turbo.steadydancer.model.config import SteadyDancerConfig
from steadydancer_turbo.steadydancer.model.dit import SteadyDancerDiT

CFG = dict(dim=256, num_heads=2, ffn_dim=512, num_layers=3, text_dim=64, freq_dim=32, clip_dim=64,
           align_hidden=32)  # align_heads stays 8: heads are not recoverable from shapes (official: 8)


def tiny_config():
    return SteadyDancerConfig.tiny(**CFG)


def reference_model(seed=0):
    """fp32 model with random weights (norm weights and modulation perturbed so they matter)."""
    torch.manual_seed(seed)
    m = SteadyDancerDiT(tiny_config()).float().eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("modulation") or ("norm" in n and p.dim() == 1):
                p.add_(torch.randn_like(p) * 0.1)
    return m


def inputs(seed=1, b=1, f=2, h=4, w=4):
    cfg = tiny_config()
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(x=r(b, 16, f, h, w), timestep=torch.tensor([700] * b), context=r(b, 7, cfg.text_dim),
                clip_fea=r(b, 257, cfg.clip_dim), clip_fea_c=r(b, 257, cfg.clip_dim), y=r(b, 20, f, h, w),
                cond=r(b, 16, f, h, w), ref_x=r(b, 36, 1, h, w), ref_c=r(b, 36, 1, h, w))


@torch.no_grad()
def run(model, inp=None):
    return model(**(inp or inputs()))


def rel_err(a, b):
    return (a.double() - b.double()).norm().item() / b.double().norm().item()


def state_dict(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def model_from_state(sd):
    """fp32 reference model with exactly these (already dequantized) weights."""
    m = SteadyDancerDiT(tiny_config()).float().eval()
    m.load_state_dict({k: v.float() for k, v in sd.items()})
    return m


def is_block_linear_weight(k, v):
    return k.startswith("blocks.") and k.endswith(".weight") and v.dim() == 2


# ------------------------------------------------------------------------------ safetensors writers
def write_safetensors(sd, path, dtype=None, prefix="", metadata=None):
    out = {prefix + k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
           for k, v in sd.items()}
    save_file(out, str(path), metadata=metadata)
    return path


def fp8_quantize(w, dtype):
    fmax = torch.finfo(dtype).max
    scale = (w.abs().amax().float() / fmax).clamp(min=1e-12)
    return (w.float() / scale).to(dtype), scale.reshape(1)


def write_fp8(sd, path, layout="kijai", fp8=torch.float8_e4m3fn, prefix=""):
    """Block Linear weights in fp8, everything else bf16. Returns the dequantized state dict (fp32).

    layout: 'kijai' (``.scale_weight`` + ``scaled_fp8`` marker), 'comfy' (``.weight_scale`` +
    ``.comfy_quant`` JSON blob per layer), 'comfy_meta' (``.weight_scale`` + ``_quantization_metadata``),
    'plain' (fp8 cast, no scale).
    """
    out, deq, layers = {}, {}, {}
    for k, v in sd.items():
        if is_block_linear_weight(k, v):
            base = k[: -len(".weight")]
            if layout == "plain":
                q = v.to(fp8)
                out[prefix + k] = q
                deq[k] = q.float()
                continue
            q, s = fp8_quantize(v, fp8)
            out[prefix + k] = q
            deq[k] = q.float() * s
            if layout == "kijai":
                out[prefix + base + ".scale_weight"] = s
            else:
                out[prefix + base + ".weight_scale"] = s.reshape(())
                fmt = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}[fp8]
                if layout == "comfy":
                    out[prefix + base + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()),
                                                                       dtype=torch.uint8)
                layers[prefix + base] = {"format": fmt}
        else:
            b = v.to(torch.bfloat16)
            out[prefix + k] = b
            deq[k] = b.float()
    if layout == "kijai":
        out[prefix + "scaled_fp8"] = torch.empty(0, dtype=fp8)
    md = None
    if layout == "comfy_meta":
        md = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_file(out, str(path), metadata=md)
    return deq


def write_sharded(sd, folder, dtype=torch.bfloat16, n_shards=3):
    os.makedirs(folder, exist_ok=True)
    keys = list(sd)
    weight_map = {}
    for i in range(n_shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: sd[k].to(dtype).contiguous() for k in keys[i::n_shards]}
        save_file(part, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "WanModel", "dim": CFG["dim"], "in_dim": 36, "model_type": "i2v"}, f)
    return folder


def write_hub_sharded(sd, folder, dtype=torch.float32, max_shard_size="1MB"):
    """The official release's layout (MCG-NJU/SteadyDancer-14B: fp32 shards) written by huggingface_hub's own
    sharder (``save_torch_state_dict``: safetensors shards ``diffusion_pytorch_model-0000N-of-0000M.safetensors``
    and the ``.safetensors.index.json`` with ``metadata.total_size`` and ``weight_map``, as diffusers writes them)."""
    from huggingface_hub import save_torch_state_dict
    os.makedirs(folder, exist_ok=True)
    save_torch_state_dict({k: v.to(dtype).contiguous() for k, v in sd.items()}, folder,
                          filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size=max_shard_size)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"_class_name": "WanModel", "dim": CFG["dim"], "in_dim": 36, "model_type": "i2v"}, f)
    return folder


# ------------------------------------------------------------------------------ GGUF writer
def random_k_blocks(qtype, rows, cols, rng):
    """Valid K-quant (or legacy) blocks with random payload and finite fp16 scales (gguf-py can't quantize K)."""
    import gguf
    Q = gguf.GGMLQuantizationType
    f16_fields = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
                  Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * cols // block_size
    raw = rng.integers(0, 256, size=(n, type_size), dtype=np.uint8)
    for off in f16_fields[qtype]:
        raw[:, off:off + 2] = (rng.standard_normal(n) * 0.002).astype(np.float16).view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, cols // block_size * type_size)


def write_gguf(sd, path, qtype, five_d="fix", seed=0, prefix=""):
    """city96-style GGUF: block Linear weights in ``qtype`` (a list: cycled over the layers, a mixed-type
    file like llama.cpp's *_K_M), 1-D and small tensors F32, others F16.

    five_d='fix': 5-D Conv3d weights appended as F32 with 5 dims (what fix_5d_tensors.py writes);
    five_d='orig_shape': 5-D weights flattened to (n/256, 256), the patch embeddings quantized as Q8_0,
    with ``comfy.gguf.orig_shape.<name>`` metadata. Returns the dequantized state dict (gguf's reference
    dequantizer), i.e. exactly the weights the file holds.
    """
    import gguf
    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch="wan")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    deq = {}
    qtypes = list(qtype) if isinstance(qtype, (list, tuple)) else [qtype]
    n_linear = 0
    for k, v in sd.items():
        a = v.float().numpy()
        name = prefix + k
        if a.ndim == 5:
            if five_d == "fix" or a.size % 256:
                w.add_tensor(name, a.astype(np.float32))
                deq[k] = torch.from_numpy(a.copy())
            else:
                flat = a.reshape(-1, 256)
                t = Q.Q8_0 if k.startswith("patch_embedding") else Q.F32
                data = gguf.quants.quantize(flat, t) if t != Q.F32 else flat
                w.add_tensor(name, data, raw_dtype=t)
                w.add_array(f"comfy.gguf.orig_shape.{name}", list(a.shape))
                deq[k] = torch.from_numpy(gguf.quants.dequantize(data, t).reshape(a.shape).copy()) \
                    if t != Q.F32 else torch.from_numpy(a.copy())
        elif is_block_linear_weight(k, v) and qtypes != [Q.F32]:
            qtype = qtypes[n_linear % len(qtypes)]
            n_linear += 1
            can_quantize = qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.BF16, Q.F16)
            data = gguf.quants.quantize(a, qtype) if can_quantize else random_k_blocks(qtype, *a.shape, rng)
            w.add_tensor(name, data, raw_dtype=qtype)
            deq[k] = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(a.shape).copy())
        elif a.ndim == 1 or a.size <= 1024 or k.endswith("modulation"):
            w.add_tensor(name, a.astype(np.float32))
            deq[k] = torch.from_numpy(a.copy())
        else:
            h = a.astype(np.float16)
            w.add_tensor(name, h)
            deq[k] = torch.from_numpy(h.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return deq


def offline_model_loader(monkeypatch, tmp_path):
    """The Model Loader node as ComfyUI would run it on the CPU, with an empty model file and the file reader
    replaced by a recorder: for tests of what the node refuses before it reads anything. Returns (node, file,
    reads): ``reads`` lists every call that reached the reader."""
    from steadydancer_turbo.nodes import comfy_bridge as cb
    from steadydancer_turbo.nodes import model_nodes as mn

    f = tmp_path / "m.safetensors"
    f.write_bytes(b"")
    monkeypatch.setattr(cb, "need_comfy", lambda what: None)
    monkeypatch.setattr(cb, "torch_device", lambda: torch.device("cpu"))
    reads = []
    monkeypatch.setattr("steadydancer_turbo.steadydancer.weights.loader.load_steadydancer",
                        lambda *a, **k: reads.append(a))
    return mn.SteadyDancerModelLoader(), f, reads
