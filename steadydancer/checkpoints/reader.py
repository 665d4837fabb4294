"""Checkpoint readers: safetensors files, diffusers-style sharded folders, GGUF and ``.pth``.

Every reader answers, before any weight is read, with the *logical* shape, storage kind and dtype
of every tensor under its official key name (see :mod:`.keymap`), so the model type can be checked
and the model built without touching the weights. Weights are then read one tensor at a time from a
memory map (:meth:`CheckpointReader.read`) and the pages of that tensor are dropped from this
process's resident set afterwards (:meth:`CheckpointReader.release`), so a load holds the file's
bytes at most once plus one tensor in transit.

Formats are recognized from the file's first bytes, never from its name:

- GGUF: the magic ``GGUF``.
- safetensors: 8-byte little-endian header length followed by a JSON object.
- ``.pth`` (torch zip archive ``PK\x03\x04``): only through ``torch.load(weights_only=True, mmap=True)``.
- a folder: ``*.safetensors.index.json`` (diffusers/transformers sharding) or a single
  ``*.safetensors`` in it; ``config.json`` is informative only.

Storage kinds:

- ``float``: fp32/fp16/bf16 (also GGUF F32/F16/BF16).
- ``fp8``: ``float8_e4m3fn`` / ``float8_e5m2`` weights, plain (scale 1) or scaled: Kijai's per-tensor
  ``<layer>.scale_weight``, or ComfyUI's ``<layer>.weight_scale`` (declared per layer by a
  ``<layer>.comfy_quant`` JSON blob or by the ``_quantization_metadata`` safetensors metadata entry;
  dequantized = ``weight.to(dtype) * scale``).
- ``gguf``: packed GGML blocks (``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``, ``Q2_K`` .. ``Q6_K``);
  logical shapes are GGUF's reversed ``ne`` dims, or ``comfy.gguf.orig_shape.<name>`` when present.
  city96's ``fix_5d_tensors.py`` appends the 5-D Conv3d weights (which its converter leaves out) as
  plain F32 tensors with their 5 dims stored directly; both layouts read the same here.
"""
from __future__ import annotations

import json
import os

import torch

from ..model import keymap
from .gguf_types import GGUF_QUANT_TYPES
from .tensor_info import CheckpointError
from .tensor_info import FLOAT_DTYPES, TensorInfo
from .safetensors_file import _SafetensorsFile
from .gguf_file import _GGUFFile
from .pth_file import _PthFile
from .detect import shard_indexes, sniff_format


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


COMFY_FP8_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


class CheckpointReader:
    """Tensor directory of one checkpoint (file or sharded folder), keyed by official names.

    ``infos``: official key -> :class:`TensorInfo`; ``format``; ``metadata`` (safetensors metadata /
    selected GGUF fields); ``parts``: the files it reads.
    """

    def __init__(self, path):
        self.path = str(path)
        self.format = sniff_format(self.path)
        self.parts = []
        self.metadata = {}
        self.config = None
        self.infos: dict[str, TensorInfo] = {}
        self.extra_keys: list[str] = []  # file entries that are not tensors of the model (scales, markers)
        try:
            if self.format == "gguf":
                self._open_gguf()
            elif self.format == "safetensors":
                self._open_safetensors_files([self.path])
            elif self.format == "pth":
                self._open_pth()
            else:
                self._open_folder()
            if keymap.DIFFUSERS_MARKER_KEY in self.infos:
                # diffusers' WanTransformer3DModel names for the base blocks -> official names
                infos = {}
                for i in self.infos.values():
                    i.key = keymap.diffusers_to_official_key(i.key)
                    infos[i.key] = i
                self.infos = infos
        except BaseException:
            self.close()
            raise

    # -- openers ---------------------------------------------------------------------------
    def _open_folder(self):
        names = sorted(os.listdir(self.path))
        cfg = os.path.join(self.path, "config.json")
        if os.path.isfile(cfg):
            try:
                with open(cfg) as f:
                    self.config = json.load(f)
            except ValueError as e:
                raise CheckpointError(cfg, f"config.json is not valid JSON ({e})") from None
        index = shard_indexes(self.path)
        if len(index) > 1:
            raise CheckpointError(self.path, f"several shard indexes in one folder: {index}")
        if index:
            ipath = os.path.join(self.path, index[0])
            try:
                with open(ipath) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(ipath, f"not a valid shard index ({e})") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(self.path, s))]
            if missing:
                raise CheckpointError(self.path, f"{len(missing)} of the {len(shards)} shards listed in {index[0]} "
                                                 f"are missing: {missing} (an unfinished download? fetch the "
                                                 f"missing files again)")
            self._open_safetensors_files([os.path.join(self.path, s) for s in shards], weight_map=weight_map)
            self.format = "sharded"
            return
        st = [n for n in names if n.endswith(".safetensors")]
        if len(st) == 1:
            self._open_safetensors_files([os.path.join(self.path, st[0])])
            self.format = "folder"
            return
        raise CheckpointError(self.path, "folder has no *.safetensors.index.json and not exactly one "
                                         "*.safetensors file")

    def _open_safetensors_files(self, paths, weight_map=None):
        files = []
        for p in paths:
            if sniff_format(p) != "safetensors":
                raise CheckpointError(p, "expected a safetensors shard")
            files.append(_SafetensorsFile(p))
            self.parts.append(files[-1])
        raw = {}
        for f in files:
            for k in f.entries:
                if k in raw:
                    raise CheckpointError(f.path, f"tensor {k!r} appears in two shards")
                raw[k] = f
        if weight_map is not None:
            lost = [k for k, s in weight_map.items() if k not in raw]
            if lost:
                raise CheckpointError(self.path, f"{len(lost)} tensors named in the index are in no shard, "
                                                 f"e.g. {lost[:3]}")
        md = {}
        for f in files:
            md.update(f.metadata)
        self.metadata = md
        self._index_tensors({k: (f, f.shape(k), f.dtype(k)) for k, f in raw.items()})

    def _open_pth(self):
        f = _PthFile(self.path)
        self.parts.append(f)
        self._index_tensors({k: (f, f.shape(k), f.dtype(k)) for k in f.sd})

    def _open_gguf(self):
        f = _GGUFFile(self.path)
        self.parts.append(f)
        self.metadata = f.metadata
        gguf = f.gguf
        Q = gguf.GGMLQuantizationType
        float_q = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
        prefix = keymap.common_prefix(f.tensors)
        for name, t in f.tensors.items():
            key = keymap.normalize_key(name, prefix)
            qt = Q(int(t.tensor_type))
            shape = f.shape(name)
            if qt in float_q:
                info = TensorInfo(key, name, shape, "float", float_q[qt], qtype=int(qt), source=f,
                                  stored_shape=tuple(t.data.shape))
            elif qt in GGUF_QUANT_TYPES:
                info = TensorInfo(key, name, shape, "gguf", None, qtype=int(qt), source=f,
                                  stored_shape=tuple(t.data.shape))
            else:
                raise CheckpointError(self.path, f"tensor {name!r} uses GGUF quantization type {qt.name}, which "
                                                 f"this loader does not support (supported: F32, F16, BF16, "
                                                 f"{', '.join(q.name for q in GGUF_QUANT_TYPES)})")
            info.shape = shape = self._patch_embed_shape(key, name, shape)
            n = 1
            for d in shape:
                n *= d
            if n != int(t.n_elements):
                raise CheckpointError(self.path, f"shape metadata {shape} of {name!r} does not match its "
                                                 f"{int(t.n_elements)} elements")
            self._add(info)

    def _index_tensors(self, raw):
        """raw: file key -> (part, shape, dtype) for safetensors/pth; sorts weights from scales."""
        prefix = keymap.common_prefix(raw)
        quant_layers = self._comfy_quant_layers(raw, prefix)
        for fk, (part, shape, dt) in raw.items():
            key = keymap.normalize_key(fk, prefix)
            if keymap.is_ignored(key) or key.endswith((".scale_weight", ".weight_scale", ".weight_scale_2")):
                self.extra_keys.append(fk)
                continue
            if dt in FP8_DTYPES:
                layer = key[: -len(".weight")] if key.endswith(".weight") else key
                scale_key = scale_source = None
                for cand in (fk[: -len(".weight")] + ".scale_weight", fk[: -len(".weight")] + ".weight_scale"):
                    if fk.endswith(".weight") and cand in raw:
                        scale_key, scale_source = cand, raw[cand][0]
                q = quant_layers.get(layer)
                if q is not None and q not in COMFY_FP8_FORMATS:
                    raise CheckpointError(self.path, f"layer {layer!r} uses ComfyUI quantization format {q!r}; "
                                                     "only float8_e4m3fn / float8_e5m2 are supported")
                info = TensorInfo(key, fk, shape, "fp8", dt, scale_key=scale_key, scale_source=scale_source,
                                  source=part, stored_shape=shape)
            elif dt in FLOAT_DTYPES:
                info = TensorInfo(key, fk, shape, "float", dt, source=part, stored_shape=shape)
            else:
                layer = key[: -len(".weight")]
                if layer in quant_layers:
                    raise CheckpointError(self.path, f"layer {layer!r} uses ComfyUI quantization format "
                                                     f"{quant_layers[layer]!r}; only float8_e4m3fn / float8_e5m2 "
                                                     "are supported")
                info = TensorInfo(key, fk, shape, "other", dt, source=part, stored_shape=shape)
            info.shape = self._patch_embed_shape(key, fk, info.shape)
            self._add(info)

    def _patch_embed_shape(self, key, fk, shape):
        """Conv3d patch-embedding weights stored with fewer dims -> (dim, C, 1, 2, 2).

        TurboDiffusion stores them as a Linear over flattened (c, kt, kh, kw) patches (2-D); some GGUF
        converters drop the size-1 temporal kernel dim (4-D). The patch is (1, 2, 2) for every Wan2.1 model.
        """
        if key not in keymap.PATCH_EMBED_KEYS or len(shape) not in (2, 4):
            return shape
        if len(shape) == 4:
            return (shape[0], shape[1], 1, shape[2], shape[3])
        if shape[1] % 4:
            raise CheckpointError(self.path, f"2-D {fk!r} of shape {shape} is not a (1,2,2) patch embedding")
        return (shape[0], shape[1] // 4, 1, 2, 2)

    def _comfy_quant_layers(self, raw, prefix):
        layers = {}
        md = self.metadata.get("_quantization_metadata")
        if md:
            try:
                for name, conf in json.loads(md).get("layers", {}).items():
                    layers[keymap.normalize_key(name, prefix)] = conf.get("format")
            except (ValueError, AttributeError) as e:
                raise CheckpointError(self.path, f"_quantization_metadata is not valid JSON ({e})") from None
        for fk, (part, shape, dt) in raw.items():
            if fk.endswith(".comfy_quant"):
                try:
                    conf = json.loads(bytes(part.tensor(fk).to(torch.uint8).tolist()))
                except ValueError as e:
                    raise CheckpointError(self.path, f"{fk!r} is not a JSON quantization config ({e})") from None
                layers[keymap.normalize_key(fk[: -len(".comfy_quant")], prefix)] = conf.get("format")
        return layers

    def _add(self, info):
        if info.key in self.infos:
            raise CheckpointError(self.path, f"two tensors map to the same key {info.key!r} "
                                             f"({self.infos[info.key].file_key!r}, {info.file_key!r})")
        self.infos[info.key] = info

    # -- access ----------------------------------------------------------------------------
    def shapes(self) -> dict:
        return {k: i.shape for k, i in self.infos.items()}

    def kinds(self) -> dict:
        out = {}
        for i in self.infos.values():
            if i.kind == "gguf":
                import gguf
                name = gguf.GGMLQuantizationType(i.qtype).name
            elif i.dtype is not None:
                name = str(i.dtype).replace("torch.", "")
            else:
                name = i.kind
            out[name] = out.get(name, 0) + 1
        return out

    def read(self, key):
        """The stored tensor of ``key``: a zero-copy view of the memory map (copy it before
        :meth:`release`/:meth:`close`). float: tensor in the file dtype with the logical shape;
        fp8: ``(fp8 tensor, float32 scale tensor or None)``; gguf: packed ``uint8`` tensor."""
        i = self.infos[key]
        if i.kind == "gguf":
            return i.source.raw(i.file_key)
        if isinstance(i.source, _GGUFFile):
            t = i.source.raw(i.file_key)
            if i.dtype == torch.bfloat16:
                t = t.view(torch.bfloat16)
            return t.reshape(i.shape)
        t = i.source.tensor(i.file_key)
        if tuple(t.shape) != i.shape:
            t = t.reshape(i.shape)
        if i.kind == "fp8":
            scale = None
            if i.scale_key is not None:
                scale = i.scale_source.tensor(i.scale_key).to(torch.float32).clone()
            return t, scale
        return t

    def release(self, key):
        i = self.infos[key]
        i.source.release(i.file_key)

    def close(self):
        for p in self.parts:
            p.close()
        self.parts = []


def open_checkpoint(path) -> CheckpointReader:
    return CheckpointReader(path)
