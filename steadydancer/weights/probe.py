"""Check a DiT or LoRA file before anything runs: format, header, model type, LoRA fit. No weight is read.

- :func:`probe_model`: the file's format and header (truncation included), that it is a SteadyDancer DiT
  (:meth:`.config.SteadyDancerConfig.from_state_dict_shapes`) and that every tensor the model needs is there
  with the right shape (:func:`check_tensors`, the same check :func:`.loader.load_steadydancer` makes). Returns a
  one-line description.
- :func:`probe_lora`: a safetensors / ``.pth`` file whose keys are LoRA keys (a full model put in the LoRA
  folder, or a file of another kind, is named as such).
- :func:`check_lora_fits`: a LoRA's keys and shapes against a base model's header shapes (the matching and
  shape rules of :func:`.lora.apply_loras`); returns the keys that match no weight.

Results are cached per (file, size, modification time): ComfyUI validates every queued prompt.
"""
from __future__ import annotations

import functools
import os
import threading

import torch

from ..model import keymap
from ..checkpoints import CheckpointError, CheckpointReader, sniff_format
from ..checkpoints.pth_file import torch_load_weights_only
from ..checkpoints.safetensors_file import safetensors_header

_cache: dict = {}
_lock = threading.Lock()


def _stamp(path) -> tuple:
    p = str(path)
    if os.path.isdir(p):
        entries = sorted(os.scandir(p), key=lambda e: e.name)
        return (os.path.realpath(p),) + tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries)
    st = os.stat(p)
    return os.path.realpath(p), st.st_size, st.st_mtime_ns


def _cached(kind, fn, *paths):
    try:
        key = (kind,) + tuple(_stamp(p) for p in paths)
    except OSError:
        return fn()  # missing: fn raises the clear error
    with _lock:
        if key in _cache:
            ok, value = _cache[key]
            if ok:
                return value
            raise value
    try:
        value = fn()
    except CheckpointError as e:
        with _lock:
            _cache[key] = (False, e)
        raise
    with _lock:
        if len(_cache) > 64:
            _cache.clear()
        _cache[key] = (True, value)
    return value


# ---------------------------------------------------------------------------------------------- DiT
def check_tensors(path, reader, shapes) -> list:
    """Every tensor of the model built from the file's config (``shapes``: key -> shape) is in the file with its
    shape (size-1 dims may differ: the reader's shape is then set to the model's). Returns the file's tensors the
    model does not use."""
    expected = set(shapes)
    present = set(reader.infos)
    missing = sorted(expected - present)
    if missing:
        raise CheckpointError(path, f"{len(missing)} tensors of the SteadyDancer model are missing from the "
                                    f"file, e.g. {missing[:5]}")
    for k in expected:
        want, got = tuple(shapes[k]), reader.infos[k].shape
        if want != got and tuple(d for d in want if d != 1) == tuple(d for d in got if d != 1):
            reader.infos[k].shape = want  # same data with size-1 dims dropped/added (e.g. a 4-D patch embed)
        if want != reader.infos[k].shape:
            raise CheckpointError(path, f"tensor {k!r} has shape {reader.infos[k].shape}, the model built "
                                        f"from this file's config expects {want}")
    return sorted(present - expected)


def config_of(path, reader):
    from ..model.config import SteadyDancerConfig
    try:
        return SteadyDancerConfig.from_state_dict_shapes(reader.shapes())
    except ValueError as e:  # NotSteadyDancerError and shape inconsistencies
        raise CheckpointError(path, str(e)) from None


@functools.lru_cache(maxsize=4)
def expected_shapes(cfg) -> dict:
    """Official key -> shape of every tensor of the model ``cfg`` describes (built once on the meta device)."""
    from ..model.dit import build_meta
    return {k: torch.Size(v.shape) for k, v in build_meta(cfg, "sdpa").state_dict().items()}


def _probe_model(path) -> str:
    reader = CheckpointReader(path)
    try:
        cfg = config_of(path, reader)
        check_tensors(path, reader, expected_shapes(cfg))
        kinds = ", ".join(f"{n} x{c}" for n, c in sorted(reader.kinds().items(), key=lambda kv: -kv[1]))
        what = "folder" if os.path.isdir(str(path)) else "file"
        return f"SteadyDancer DiT, dim {cfg.dim}, {cfg.num_layers} blocks; {reader.format} {what} ({kinds})"
    finally:
        reader.close()


def probe_model(path) -> str:
    """Raise :class:`CheckpointError` unless ``path`` is a complete SteadyDancer DiT; else describe it."""
    return _cached("model", lambda: _probe_model(path), path)


def model_shapes(path) -> dict:
    """Official key -> logical shape of a DiT checkpoint, from its header."""
    def read():
        reader = CheckpointReader(path)
        try:
            return reader.shapes()
        finally:
            reader.close()
    return _cached("shapes", read, path)


# ---------------------------------------------------------------------------------------------- LoRA
def lora_shapes(path) -> dict:
    """File key -> shape of a LoRA file (safetensors header, or a ``.pth`` read lazily), no weight read."""
    def read():
        if not os.path.isfile(str(path)):
            raise CheckpointError(path, "no such LoRA file")
        fmt = sniff_format(path)
        if fmt == "safetensors":
            entries, _, _ = safetensors_header(path)
            return {k: tuple(e["shape"]) for k, e in entries.items()}
        if fmt == "pth":
            sd = torch_load_weights_only(path, mmap=True)
            return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}
        raise CheckpointError(path, f"a LoRA must be a safetensors (or .pth) file, this is {fmt}")
    return _cached("lora_shapes", read, path)


def probe_lora(path) -> str:
    """Raise :class:`CheckpointError` unless ``path`` is a readable file of LoRA keys; else describe it."""
    def probe():
        shapes = lora_shapes(path)
        parsed = [keymap.split_lora_key(k) for k in shapes]
        n = sum(p is not None for p in parsed)
        if n == 0:
            official = keymap.strip_prefix(dict.fromkeys(shapes))
            if "blocks.0.self_attn.q.weight" in official or "patch_embedding.weight" in official:
                what = "a full model's weights, not a LoRA (models go in models/diffusion_models)"
            else:
                what = f"not a LoRA: no LoRA keys (lora_down/lora_up, lora_A/lora_B, diff) among {len(shapes)} tensors"
            raise CheckpointError(path, f"{what}, e.g. {sorted(shapes)[:3]}")
        return f"LoRA with {n} LoRA tensors"
    return _cached("lora", probe, path)


def check_lora_fits(lora_path, model_path) -> list:
    """Check a LoRA's keys and shapes against the base model's header (:func:`.lora.apply_loras`'s rules), reading
    no weight. Raises :class:`CheckpointError` naming the LoRA when it does not fit; returns unmatched keys."""
    from . import lora

    def check():
        probe_lora(lora_path)
        base = model_shapes(model_path)
        targets = {k: lora.shape_target(k, s) for k, s in base.items()}
        modules = {k.rpartition(".")[0] for k in base}
        module_names = sorted({".".join(m.split(".")[:i + 1]) for m in modules if m for i in range(m.count(".") + 1)})
        sd = {k: torch.empty(s, device="meta") for k, s in lora_shapes(lora_path).items()}
        _, unmatched = lora.plan_lora(lora_path, 1.0, targets, module_names, sd)
        return sorted(unmatched)
    return _cached("fit", check, lora_path, model_path)
