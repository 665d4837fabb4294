"""Model loader and LoRA nodes.

STEADYDANCER_MODEL is a ``SteadyDancerModelHandle``: a recipe (file, load options, LoRA list) plus the loaded
module, kept in a one-slot process cache so a second run, or a LoRA change, does not always re-read 16-33 GB
(a changed/removed LoRA or strength is undone in place where exact: see ``_ModelCache._switch_loras``).
The loader node loads eagerly (a missing/broken file fails on the loader node); LoRA nodes only add to the recipe
(chainable, never mutate the loaded module in place); the sampler materializes the recipe.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading

import torch

from ..steadydancer.weights.loader import COMPUTE_DTYPES as LOADER_DTYPES, STORAGE_MODES
from . import comfy_bridge as cb
from . import validation
from .frames import CATEGORY, MODEL_TYPE, tooltip

log = logging.getLogger("steadydancer_turbo")

WEIGHT_STORAGE = list(STORAGE_MODES)
COMPUTE_DTYPES = list(LOADER_DTYPES)  # the names the loader maps to torch dtypes
# CPU RAM allowed for copies of the float weights a LoRA is merged into, so a LoRA change can be undone without
# re-reading the model file. fp8/GGUF models: only biases, norms, modulations and non-block layers are merged
# (well under this); a bf16 model with a LoRA on every block Linear would need ~28 GB: it reloads instead.
LORA_UNDO_RAM_BYTES = 2 << 30


def attention_choices() -> list:
    """auto / sdpa / flex_sparse (when this torch has flex attention), plus flash_attn / sage when importable."""
    from ..steadydancer.kernels.attention import available_backends
    avail = available_backends()
    out = ["auto", "sdpa"]
    out += [n for n in ("flex_sparse", "flash_attn", "sage") if n in avail]
    return out


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    weight_storage: str = "auto"
    compute_dtype: str = "bf16"
    attention: str = "auto"
    block_swap: int = 0
    vram_budget_gb: float = 0.0
    offload_after: bool = True
    sparse_topk: float = 0.15
    fp8_matmul: bool = False
    compile: bool = False

    def load_key(self) -> tuple:
        """The options that need a fresh load; attention / sparse_topk / compile are switched on the loaded module."""
        return (self.weight_storage, self.compute_dtype, self.block_swap, self.vram_budget_gb, self.fp8_matmul)

    def attention_backend(self) -> str:
        if self.attention == "flex_sparse":
            from ..steadydancer.weights import speed_options as accel
            return accel.sparse(float(self.sparse_topk))
        return self.attention


def apply_speed_options(module, o: LoadOptions) -> None:
    """Attention backend (self-attention; cross-attention stays dense) and per-block torch.compile."""
    from ..steadydancer.weights import speed_options as accel
    accel.use_attention(module, o.attention_backend())
    if o.compile and not getattr(module, "_sd_compiled", False):
        accel.compile_blocks(module, fullgraph=False)  # a graph break is a slowdown here, never a failed run
        module._sd_compiled = True
    elif not o.compile and getattr(module, "_sd_compiled", False):
        accel.uncompile_blocks(module)
        module._sd_compiled = False


@dataclasses.dataclass(frozen=True)
class SteadyDancerModelHandle:
    path: str
    options: LoadOptions
    loras: tuple = ()  # ((path, strength), ...)
    multi_gpu: tuple = ()  # (gpus, layout) from the Multi-GPU node: the samplers run on a worker pool

    def with_lora(self, path: str, strength: float) -> "SteadyDancerModelHandle":
        return dataclasses.replace(self, loras=self.loras + ((path, float(strength)),))

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def materialize(self, device=None):
        """The loaded module with exactly this handle's LoRAs applied (re-reading the base file if needed)."""
        return _CACHE.get(self, device)


class _ModelCache:
    """One loaded DiT at a time (a 14B model does not leave room for two)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.key = None
        self.loras = ()
        self.module = None
        self.busy = 0  # > 0 while loading or sampling: ComfyUI must not move the model then
        self.on_clear = []  # callbacks when the cached model goes (the multi-GPU pool shuts its workers down)

    def clear(self):
        for f in self.on_clear:
            try:
                f()
            except Exception as e:  # noqa: BLE001 - never keep a model alive because a hook failed
                log.warning("SteadyDancer: %s", e)
        self.key, self.loras, self.module = None, (), None
        cb.soft_empty_cache()

    # ComfyUI memory-management hooks (see comfy_bridge.install_memory_hooks)
    def on_comfy_free(self, memory_required, device) -> None:
        """ComfyUI needs room on ``device``: move our idle model off it."""
        m = self.module
        if m is None or self.busy or torch.device(device).type == "cpu":
            return
        if any(p.device == torch.device(device) for p in m.parameters()):
            log.info("SteadyDancer: moving the model to %s so ComfyUI can load another model", cb.offload_device())
            offload(m)

    def on_comfy_unload_all(self) -> None:
        """'Unload models' / POST /free: forget the cached model (frees its RAM/VRAM)."""
        if self.module is not None and not self.busy:
            log.info("SteadyDancer: unloading the cached model")
            self.clear()

    def get(self, handle: SteadyDancerModelHandle, device=None):
        from ..steadydancer.weights import loader  # core; imported lazily so the pack imports without it
        key = (handle.path, handle.options.load_key())
        with self.lock, self.using():
            if self.module is not None and self.key == key:
                if self.loras != handle.loras:
                    self._switch_loras(handle.loras)
                if self.module is not None:  # None: the LoRA change needs a fresh load
                    apply_speed_options(self.module, handle.options)
                    return self.module
            self.clear()  # different file/options, or a LoRA change that cannot be undone exactly
            o = handle.options
            device = device or cb.torch_device()
            cb.free_memory(_expected_bytes(handle.path, o), device)
            module = loader.load_steadydancer(
                handle.path,
                compute_dtype=o.compute_dtype,
                storage=o.weight_storage,
                device=device,
                offload_device=cb.offload_device(),
                block_swap=int(o.block_swap),
                vram_budget_gb=float(o.vram_budget_gb) or None,
                fp8_matmul=bool(o.fp8_matmul),
                attention=o.attention_backend(),
            )
            # cached before the LoRAs: a bad LoRA file then costs no reload once it is fixed
            self.key, self.loras, self.module = key, (), module
            if handle.loras:
                self._apply_loras(handle.loras)
            apply_speed_options(module, o)
            return module

    def _switch_loras(self, loras: tuple) -> None:
        """Bring the cached module from ``self.loras`` to ``loras`` without re-reading the base file when
        possible: LoRAs added at the end are just applied; any other change removes all LoRAs (runtime
        patches dropped, merged float weights restored from their recorded originals) and applies the new
        list. Where merged float weights were not recorded (too large), the cache is cleared: fresh load."""
        from ..steadydancer.weights import lora
        n = len(self.loras)
        if loras[:n] == self.loras:
            self._apply_loras(loras[n:])
        elif lora.can_remove_loras(self.module):
            lora.remove_loras(self.module)
            self.loras = ()
            if loras:
                self._apply_loras(loras)
            log.info("SteadyDancer: LoRAs changed: re-applied on the loaded model (no reload), %d LoRA(s)",
                     len(loras))
        else:
            log.info("SteadyDancer: LoRA list changed and the old LoRAs were merged into float weights; "
                     "reloading the model")
            self.clear()

    def _apply_loras(self, extra: tuple) -> None:
        """Apply ``extra`` on top of ``self.loras``. On failure the module is left with no half-applied recipe:
        a bad file is refused before anything changes; any later error removes all LoRAs (or, where that is
        not exact, drops the cached module so the next run reloads)."""
        from ..steadydancer.weights import loader, lora
        from ..steadydancer.checkpoints import CheckpointError
        try:
            loader.apply_loras(self.module, list(extra), undo_limit_bytes=LORA_UNDO_RAM_BYTES)
        except CheckpointError:
            raise  # validation: raised before the module was changed, self.loras still describes it
        except BaseException:
            if lora.can_remove_loras(self.module):
                lora.remove_loras(self.module)
                self.loras = ()
            else:
                self.clear()
            raise
        self.loras = self.loras + tuple(extra)

    @contextlib.contextmanager
    def using(self):
        """Marks the model busy (loading or sampling) for the duration of the block."""
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1


_CACHE = _ModelCache()
cb.install_memory_hooks(_CACHE.on_comfy_free, _CACHE.on_comfy_unload_all)


def _expected_bytes(path: str, o: LoadOptions) -> float:
    """Rough GPU bytes the DiT will take, for asking ComfyUI to free room first."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return 0.0
    if o.vram_budget_gb:
        return o.vram_budget_gb * (1 << 30)
    if o.block_swap:
        return size * max(0.1, 1.0 - o.block_swap / 40.0)
    return float(size)


def on_device(module, device=None) -> None:
    """Put the (possibly block-swapped) model back on its compute device after an offload."""
    from ..steadydancer.weights import loader
    loader.ensure_on_device(module)


def offload(module) -> None:
    """Everything to the offload device (CPU RAM), device cache released."""
    from ..steadydancer.weights import loader
    loader.offload_model(module, cb.offload_device())
    cb.soft_empty_cache()


class SteadyDancerModelLoader:
    DESCRIPTION = ("Loads a SteadyDancer-14B diffusion model (.safetensors bf16/fp16/fp8-scaled or .gguf) from "
                   "models/diffusion_models. Options trade speed for VRAM.")
    CATEGORY = f"{CATEGORY}/model"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The SteadyDancer model, for the LoRA and sampler nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (cb.get_filename_list(cb.DIFFUSION_FOLDER), tooltip(
                    "SteadyDancer weights in models/diffusion_models (e.g. "
                    "Wan21_SteadyDancer_fp8_e4m3fn_scaled_KJ.safetensors, or a .gguf).")),
                "weight_storage": (WEIGHT_STORAGE, tooltip(
                    "How weights are kept in memory. auto = as stored (fp8 stays fp8, GGUF stays quantized and is "
                    "dequantized layer by layer); dequantize = all to compute dtype at load (fastest, most memory); "
                    "fp8_e4m3fn / fp8_e5m2 = quantize a bf16/fp16 file's block weights at load (half the VRAM).",
                    default="auto")),
                "compute_dtype": (COMPUTE_DTYPES, tooltip(
                    "Precision of the matmuls. bf16 is what the official code uses; fp16 for GPUs without "
                    "bf16.", default="bf16")),
                "attention": (attention_choices(), tooltip(
                    "Attention kernel. auto = cuDNN fused attention on Hopper (H100/H200), PyTorch SDPA elsewhere "
                    "(exact). sdpa = PyTorch's own choice. flex_sparse = top-k block-sparse self-attention (turbo "
                    "path: self-attention ~1.5-2x faster per step at 480p-720p, small error vs dense; see sparse_topk). flash_attn / sage "
                    "appear when those packages are installed (sage is lossy). Cross-attention always stays dense.",
                    default="auto")),
                "sparse_topk": ("FLOAT", tooltip(
                    "flex_sparse only: fraction of key blocks each query block attends to. Turbo-path option: "
                    "0.15 measured ~2% relative error vs dense attention (random weights, worst case), 0.10 is "
                    "faster with a bit more error, 0.3 is closer to dense. Ignored by the other attention "
                    "choices.", default=0.15, min=0.1, max=0.3, step=0.01)),
                "fp8_matmul": ("BOOLEAN", tooltip(
                    "Run the transformer-block matmuls on fp8 tensor cores (NVIDIA Ada / Hopper or newer, "
                    "e.g. RTX 40xx, L40, H100): ~1.5x faster matmuls, ~5% relative error vs bf16. An fp8 e4m3 "
                    "file is used as stored; a bf16/fp16 file is quantized to fp8 at load (weight_storage auto). "
                    "Ignored, with a note on the node, on other GPUs, with dequantize/fp8_e5m2 storage and for "
                    "GGUF layers.", default=False)),
                "compile": ("BOOLEAN", tooltip(
                    "torch.compile each transformer block (fuses norms, modulation, RoPE, GELU): ~15-20% faster "
                    "steps after the first, which compiles (tens of seconds, longer for a new resolution). Needs "
                    "a working Triton (Linux + NVIDIA).", default=False)),
                "block_swap": ("INT", tooltip(
                    "Number of the 40 transformer blocks kept in CPU RAM and streamed to the GPU each step. "
                    "More = less VRAM, slower.", default=0, min=0, max=40, step=1)),
                "vram_budget_gb": ("FLOAT", tooltip(
                    "If > 0, choose the block swap automatically to keep the model weights under this many GB of "
                    "VRAM (activations not included); block_swap then counts as the minimum.",
                    default=0.0, min=0.0, max=256.0, step=0.5)),
                "offload_after": ("BOOLEAN", tooltip(
                    "Move the model to CPU RAM after sampling so the VAE decode and other models have room.",
                    default=True)),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        return validation.validate_file(cb.DIFFUSION_FOLDER, model_name, "model")  # header only, before any node runs

    def load(self, model_name, weight_storage, compute_dtype, attention, sparse_topk, fp8_matmul, compile,
             block_swap, vram_budget_gb, offload_after, unique_id=None):
        path = cb.get_full_path(cb.DIFFUSION_FOLDER, model_name)
        opts = LoadOptions(weight_storage, compute_dtype, attention, int(block_swap), float(vram_budget_gb),
                           bool(offload_after), float(sparse_topk), bool(fp8_matmul), bool(compile))
        handle = SteadyDancerModelHandle(path, opts)
        try:
            module = handle.materialize()
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
            raise RuntimeError(f"SteadyDancer: could not load {validation.load_error(model_name, path, e)}") from e
        notes = list(getattr(module, "load_info", {}).get("notes", ()))
        if notes:
            cb.node_message(unique_id, "; ".join(notes))
        if offload_after:
            offload(module)
        return (handle,)


class SteadyDancerLoraLoader:
    DESCRIPTION = ("Adds a Wan2.1-I2V-14B LoRA (e.g. the lightx2v step-distill LoRA) to a SteadyDancer model. "
                   "Chain several; they are applied in order when the sampler runs.")
    CATEGORY = f"{CATEGORY}/model"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with this LoRA added.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL_TYPE, tooltip("A SteadyDancer model from the loader (or another LoRA node).")),
                "lora_name": (cb.get_filename_list(cb.LORA_FOLDER), tooltip(
                    "LoRA file in models/loras, e.g. lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors.")),
                "strength": ("FLOAT", tooltip(
                    "LoRA strength (1.0 = as trained; 0 = off).", default=1.0, min=-10.0, max=10.0, step=0.01)),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, lora_name):
        return validation.validate_file(cb.LORA_FOLDER, lora_name, "lora")

    def apply(self, model, lora_name, strength, unique_id=None):
        if strength == 0:
            return (model,)
        path = cb.get_full_path(cb.LORA_FOLDER, lora_name)
        validation.check_lora(unique_id, lora_name, path, model.path)  # keys/shapes vs the model's header, here
        return (model.with_lora(path, strength),)
