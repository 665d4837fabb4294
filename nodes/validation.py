"""Model files checked when a prompt is queued (ComfyUI's ``VALIDATE_INPUTS``) and LoRA fit at the LoRA node.

The checks are :mod:`..steadydancer.weights.probe` (headers only, no weight read, cached per file version). ComfyUI skips its
own "value not in list" check for an input that ``VALIDATE_INPUTS`` takes, so that check is made here too.
"""
from __future__ import annotations

import logging
import os

from . import comfy_bridge as cb

log = logging.getLogger("steadydancer_turbo")


def _problem(e: Exception, path=None) -> str:
    """The error's text without the path repeated (CheckpointError carries the file name itself)."""
    from ..steadydancer.checkpoints import CheckpointError
    if isinstance(e, CheckpointError):
        if path is None:
            return str(e)
        where, asked = os.path.realpath(e.path), os.path.realpath(str(path))
        if where == asked:
            return e.problem
        if os.path.dirname(where) == asked:        # a shard of the sharded folder asked for: its name only
            return f"{os.path.basename(where)}: {e.problem}"
        return str(e)
    return str(e)


def load_error(name: str, path, e: Exception) -> str:
    """Message of a failed load: the file's name once, then the problem."""
    return f"{name}: {_problem(e, path)}"


def validate_file(folder: str, name, kind: str):
    """``VALIDATE_INPUTS`` body: True, or what is wrong with the file ``name`` of ``folder`` (kind: model / lora)."""
    from ..steadydancer.weights import probe
    from ..steadydancer.checkpoints import CheckpointError
    if not isinstance(name, str):
        return True  # a linked input: checked when the node runs
    model = kind == "model"
    if cb.HAVE_COMFY and not (os.path.isabs(name) and os.path.exists(name)):
        names = cb.get_model_list(folder) if model else cb.get_filename_list(folder)
        if name not in names:
            return (f"Value not in list: {name!r} is not in ComfyUI's '{folder}' folders "
                    f"({len(names)} files listed); put the file there and refresh the page")
    try:
        path = cb.get_model_path(folder, name) if model else cb.get_full_path(folder, name)
        (probe.probe_model if kind == "model" else probe.probe_lora)(path)
    except FileNotFoundError as e:
        return str(e)
    except CheckpointError as e:
        return load_error(name, path, e)
    except Exception as e:  # noqa: BLE001 - a slip in the check must not block the prompt: the node reports
        log.warning("SteadyDancer: could not check %s before running (%s: %s)", name, type(e).__name__, e)
    return True


def check_lora(unique_id, lora_name: str, lora_path: str, model_path: str) -> None:
    """The LoRA's keys and shapes against the base model's header; raises on the LoRA node when it does not fit,
    shows unmatched keys on it."""
    from ..steadydancer.weights import probe
    from ..steadydancer.checkpoints import CheckpointError
    try:
        unmatched = probe.check_lora_fits(lora_path, model_path)
    except CheckpointError as e:
        raise CheckpointError(lora_name, f"{_problem(e, lora_path)} (base model: {os.path.basename(model_path)})") \
            from None
    if unmatched:
        cb.node_message(unique_id, f"{lora_name}: {len(unmatched)} LoRA keys match no weight of the model and are "
                                   f"ignored, e.g. {unmatched[:3]}")
