"""Model loader and LoRA nodes.

The loader returns a native ComfyUI ``MODEL`` (nodes/native_model.py): ComfyUI's model management loads it to the
GPU when a sampler needs it, partially (lowvram) when it does not fit, moves it back to RAM for other models,
and frees it on "Unload models" (POST /free); no cache or memory hook of our own. ComfyUI's node cache keeps the
loaded model while the loader's inputs stay the same. LoRAs are ComfyUI patches on a clone of the MODEL (core
``LoraLoaderModelOnly`` or our LoRA node), so a strength change never re-reads the base file.
"""
from __future__ import annotations

import dataclasses
import logging

from ..steadydancer.kernels.backends import SPARSE_FAMILIES
from ..steadydancer.weights.loader import COMPUTE_DTYPES as LOADER_DTYPES, STORAGE_MODES
# imported with the pack, as ComfyUI starts: it notes the user's compile-cache environment before torch sets it
from ..steadydancer.weights import speed_options as accel
from . import comfy_bridge as cb
from . import validation
from .frames import CATEGORY, MODEL_TYPE, tooltip

log = logging.getLogger("steadydancer_turbo")

WEIGHT_STORAGE = list(STORAGE_MODES)
COMPUTE_DTYPES = list(LOADER_DTYPES)  # the names the loader maps to torch dtypes


# listed always (a workflow saved with one opens everywhere); where one cannot run, the loader says why
ALWAYS_LISTED = ("int8_sparse", "sage")


def attention_choices() -> list:
    """auto / sdpa / flex_sparse (when this torch has flex attention), flash_attn when importable, and
    int8_sparse and sage always: a workflow saved with them opens everywhere, and where a package is missing (or
    the GPU is too old) the loader fails with what to do (``attention_problem``) instead of ComfyUI's bare
    "value not in list"."""
    from ..steadydancer.kernels.attention import available_backends
    avail = available_backends()
    out = ["auto", "sdpa"]
    out += [n for n in ("flex_sparse", "flash_attn") if n in avail]
    return out + list(ALWAYS_LISTED)


def attention_problem(attention: str, device) -> str | None:
    """Why this attention choice cannot run on ``device`` (None: it can)."""
    from ..steadydancer.kernels import backends
    if attention == "sage":
        return backends.sage_problem(device)
    if attention == "int8_sparse":
        return backends.int8_sparse_problem(device)
    return None


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """The loader's options. Memory placement is ComfyUI's (full / partial load by free VRAM, --lowvram,
    --novram, --reserve-vram): the former block_swap / vram_budget_gb / offload_after options are gone."""
    weight_storage: str = "auto"
    compute_dtype: str = "bf16"
    attention: str = "auto"
    sparse_topk: float = 0.15
    fp8_matmul: bool = False
    compile: bool = False

    def attention_backend(self) -> str:
        kernel = SPARSE_FAMILIES.get(self.attention)
        if kernel is not None:  # flex_sparse / int8_sparse: the top-k backend of sparse_topk
            return accel.sparse(float(self.sparse_topk), kernel=kernel)
        return self.attention


def compiles(o: LoadOptions) -> bool:
    """Whether these options compile kernels that the compile cache keeps: the blocks (compile), the fp8
    activation quantizer (fp8_matmul, compiled on CUDA), the flex_attention kernel of flex_sparse or the Triton
    kernels of int8_sparse."""
    return bool(o.compile or o.fp8_matmul or o.attention.startswith(tuple(SPARSE_FAMILIES)))


_compile_cache: dict = {}


def use_compile_cache() -> dict | None:
    """Point torch.compile's on-disk caches at ComfyUI's user folder (comfy_bridge.compile_cache_folder), once
    per process and before the first compile, unless TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR were set by the
    user (speed_options.use_compile_cache). Outside ComfyUI torch's own defaults stay. A folder that cannot be
    made leaves torch's default, with a warning."""
    folder = cb.compile_cache_folder()
    if folder is None:
        return None
    if not _compile_cache:
        try:
            _compile_cache.update(accel.use_compile_cache(folder))
            log.info("SteadyDancer: torch.compile cache in %s", _compile_cache["inductor"])
        except OSError as e:
            log.warning("SteadyDancer: cannot use %s for the torch.compile cache (%s); torch's default folder "
                        "is used (compiles again after a restart when it is in a cleared temp folder)", folder, e)
            return None
    return dict(_compile_cache)


def apply_speed_options(module, o: LoadOptions) -> None:
    """Attention backend (self-attention; cross-attention stays dense) and per-block torch.compile; the compile
    cache folder first when anything compiles."""
    if compiles(o):
        use_compile_cache()
    accel.use_attention(module, o.attention_backend())
    if o.compile and not getattr(module, "_sd_compiled", False):
        accel.compile_blocks(module, fullgraph=False)  # a graph break is a slowdown here, never a failed run
        module._sd_compiled = True
    elif not o.compile and getattr(module, "_sd_compiled", False):
        accel.uncompile_blocks(module)
        module._sd_compiled = False


def load_model(path: str, o: "LoadOptions"):
    """Read a SteadyDancer file into host RAM (the offload device) and wrap it as a ComfyUI MODEL."""
    from ..steadydancer.weights import loader
    from . import native_model

    cb.need_comfy("The SteadyDancer Model Loader")
    problem = attention_problem(o.attention, cb.torch_device())
    if problem:
        raise ValueError(problem)
    module = loader.load_steadydancer(
        path, compute_dtype=o.compute_dtype, storage=o.weight_storage, device=cb.offload_device(),
        offload_device=cb.offload_device(), fp8_matmul=bool(o.fp8_matmul), attention=o.attention_backend(),
        compute_device=cb.torch_device())
    apply_speed_options(module, o)
    return native_model.make_model_patcher(module), module


class SteadyDancerModelLoader:
    DESCRIPTION = ("Loads a SteadyDancer-14B diffusion model (.safetensors bf16/fp16/fp8-scaled, .gguf, or the "
                   "official sharded folder) from models/diffusion_models. Options trade speed for VRAM.")
    CATEGORY = f"{CATEGORY}/model"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The SteadyDancer model, for the LoRA and sampler nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (cb.get_model_list(cb.DIFFUSION_FOLDER), tooltip(
                    "SteadyDancer weights in models/diffusion_models (e.g. "
                    "Wan21_SteadyDancer_fp8_e4m3fn_scaled_KJ.safetensors, or a .gguf), or a sharded folder such "
                    "as SteadyDancer-14B (the official release: index + shards, listed as one entry).")),
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
                    "path: self-attention ~1.5-2x faster per step at 480p-720p, small error vs dense; see sparse_topk). "
                    "flash_attn appears when installed. sage = SageAttention 2 (8-bit; needs the sageattention "
                    "package and an RTX 30xx / A100 or newer GPU; the loader says how to install it "
                    "otherwise): self-attention ~1.4x faster than cuDNN on an H200, lossy (3.9% error on random "
                    "q/k/v vs 0.2% for cuDNN); not combined with flex_sparse. int8_sparse = the top-k blocks of "
                    "flex_sparse run by our own 8-bit Triton kernel (int8 Q/K, bf16 P/V; RTX 40xx / L40 / H100 / "
                    "H200 or newer; lossy like sage, see the README; uses sparse_topk). Cross-attention always "
                    "stays dense.",
                    default="auto")),
                "sparse_topk": ("FLOAT", tooltip(
                    "flex_sparse / int8_sparse only: fraction of key blocks each query block attends to. "
                    "Turbo-path option: "
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
                    "steps after the first, which compiles (tens of seconds, longer for a new resolution; a "
                    "few seconds after a restart: the compile cache is kept in ComfyUI's user folder, "
                    "user/steadydancer/torch_compile_cache). Needs a working Triton (Linux + NVIDIA).",
                    default=False)),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model_name):
        # model_name only: ComfyUI repeats the message for every input this takes (sage is checked at load)
        return validation.validate_file(cb.DIFFUSION_FOLDER, model_name, "model")  # header only, before any node runs

    def load(self, model_name, weight_storage, compute_dtype, attention, sparse_topk, fp8_matmul, compile,
             unique_id=None):
        path = cb.get_model_path(cb.DIFFUSION_FOLDER, model_name)
        opts = LoadOptions(weight_storage, compute_dtype, attention, float(sparse_topk), bool(fp8_matmul),
                           bool(compile))
        try:
            model, module = load_model(path, opts)
        except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
            raise RuntimeError(f"SteadyDancer: could not load {validation.load_error(model_name, path, e)}") from e
        notes = list(getattr(module, "load_info", {}).get("notes", ()))
        if notes:
            cb.node_message(unique_id, "; ".join(notes))
        return (model,)


class SteadyDancerLoraLoader:
    DESCRIPTION = ("Adds a Wan2.1-I2V-14B LoRA (e.g. the lightx2v step-distill LoRA) to a SteadyDancer MODEL through "
                   "ComfyUI's own LoRA patches, like LoraLoaderModelOnly, and also reads what core does not: "
                   "lightx2v modulation deltas (diff_m), PEFT/diffusers/kohya spellings of our module names.")
    CATEGORY = f"{CATEGORY}/model"
    RETURN_TYPES = (MODEL_TYPE,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with this LoRA added (the loaded weights are shared, never re-read).",)
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
        from ..steadydancer.weights import lora as sdl
        from . import native_model

        if not native_model.is_steadydancer(model):
            raise ValueError("model: connect a SteadyDancer Model Loader output (or a LoRA node after it)")
        if strength == 0:
            return (model,)
        path = cb.get_full_path(cb.LORA_FOLDER, lora_name)
        dit = model.model.diffusion_model
        model_path = getattr(dit, "load_info", {}).get("path")
        if model_path:
            validation.check_lora(unique_id, lora_name, path, model_path)  # keys/shapes vs the model's header, here
        sd = cb.load_torch_file(path)
        std, unknown = sdl.standard_layout(sd, [n for n, _ in dit.named_modules() if n])
        if not std:
            raise ValueError(f"LoRA {lora_name!r} matches no SteadyDancer/Wan module ({len(sd)} keys, e.g. "
                             f"{sorted(sd)[:3]})")
        if unknown:
            log.warning("SteadyDancer LoRA %s: %d keys with no LoRA meaning ignored: %s", lora_name, len(unknown),
                        unknown[:5])
        return (cb.add_lora_patches(model, std, float(strength)),)
