"""SteadyDancer as a native ComfyUI model: a ``MODEL`` that ComfyUI's own memory management loads, partially
loads, offloads, frees and LoRA-patches (the pattern of city96's ComfyUI-GGUF: custom ops under ComfyUI's
``ModelPatcher``, everything else native).

Bridge-side module (it imports ``comfy``; only inside ComfyUI, lazily through ``native()``):

- ``SteadyDancerSupported``: model config (``comfy.supported_models_base.BASE``): Wan2.1 latent format, flow
  sampling with shift 5, ``memory_usage_factor = dim / 2222`` like core Wan.
- ``SteadyDancerBaseModel(comfy.model_base.WAN21)``: ``diffusion_model`` is the pack's ``SteadyDancerDiT``
  (official key names, so LoRA keys are ``diffusion_model.<official>``) with ComfyUI's calling convention
  (``ComfySteadyDancerDiT.forward(x36, t, context=..., clip_fea=..., ...)``) and the DIFFUSION_MODEL wrapper
  point (EasyCache). ``extra_conds`` turns the Conditioning node's entries into model inputs (``c_concat`` =
  mask + image latent, ``pose_latents`` (negative ones for the ``negative_pose`` pass), ``ref_x``, ``ref_c``,
  ``clip_fea``, ``clip_fea_c``).
  Inference dtype: the DiT is told to take float32 inputs (``dtype = float32``): it casts per op to its own
  compute dtype, exactly as the official pipeline feeds fp32 latents into its autocast-bf16 DiT.
- ``SteadyDancerPatcher(comfy.model_patcher.ModelPatcher)``: float Linear/Conv layers are ComfyUI
  ``manual_cast`` ops (offloadable, LoRA as ``LowVramPatch`` when offloaded, interrupt check per op). fp8 and
  GGUF layers keep their stored bytes (``steadydancer/weights/quant.py``), are moved whole when they fit and read from
  RAM per call when not, and get ComfyUI's patches through their ``weight_patch_fn`` (dequantize, then
  ``comfy.lora.calculate_weight``), never merged or re-quantized. On layers that run the fp8 matmul (the Model
  Loader's fp8_matmul option) whose patches are all plain LoRAs, the patches are also given to the layer as
  low-rank side terms (``lora_side_terms``), so the fp8 matmul stays on and adds ``(x @ down) @ up`` instead of
  dequantizing and merging per call; any other patch kind keeps the exact per-call merge for that layer.
  Parameters that ComfyUI's load list skips (``blocks.N.modulation``, ``head.modulation``: owned by modules with
  children) and small non-cast layers left in RAM are patched in place after every load (backed up;
  ``unpatch_model`` restores them).
"""
from __future__ import annotations

import functools
import logging
import os
import types

import torch
import torch.nn as nn

log = logging.getLogger("steadydancer_turbo")

# conds the Conditioning node puts into each CONDITIONING entry (normalized model-space latents)
KEY_Y = "steadydancer_y"                  # [B, 20, T, h, w] = mask(4) + image latent(16)
KEY_POSE = "steadydancer_pose"            # [B, 16, T, h, w] positive pose latents
KEY_POSE_NEG = "steadydancer_pose_neg"    # [B, 16, T, h, w] negative pose latents (pose guidance), optional
KEY_REF_X = "steadydancer_ref_x"          # [B, 36, 1, h, w]
KEY_REF_C = "steadydancer_ref_c"          # [B, 16|36, 1, h, w]
KEY_CLIP_POSE = "clip_vision_output_pose"  # CLIP_VISION_OUTPUT of the first pose frame (reference: clip_vision_output)
NEGATIVE_POSE = "negative_pose"           # the guider's third cond set (prompt + negative poses)
# transformer_options key: how the SAMPLER wants the DiT's timestep rounded ("int" official, "bfloat16" rCM)
TIMESTEP_KEY = "steadydancer_timestep"
# transformer_options key: context-window options (steadydancer.sampling.context_windows.ContextOptions)
CONTEXT_KEY = "steadydancer_context"
# transformer_options key: our SAMPLERs' per-window-pass progress (native_sampling.WindowProgress), optional
PROGRESS_KEY = "steadydancer_window_progress"
# transformer_options key, during one sampling of a Multi-GPU MODEL: the distributed DiT forward (native_multigpu)
MULTIGPU_RUN_KEY = "steadydancer_multigpu_run"
_PLAIN_OPS = ("Linear", "Conv1d", "Conv2d", "Conv3d")


def is_steadydancer(model) -> bool:
    """``model``: a MODEL (ModelPatcher). True when it wraps a SteadyDancer DiT."""
    return getattr(getattr(model, "model", None), "is_steadydancer", False)


def with_context(model, context):
    """A clone of the MODEL whose DiT runs on context windows (``context``: ``ContextOptions``; None: unchanged).
    Any sampler then gets windows: the one-node samplers, SamplerCustomAdvanced with our pieces, KSampler."""
    if context is None:
        return model
    m = model.clone()
    m.model_options["transformer_options"] = {**m.model_options.get("transformer_options", {}), CONTEXT_KEY: context}
    return m


def context_of(model_options: dict):
    """The ``ContextOptions`` a sampler's model_options carry, or None."""
    return (model_options or {}).get("transformer_options", {}).get(CONTEXT_KEY)


def round_timestep(t: torch.Tensor, mode, sigmas=None) -> torch.Tensor:
    """The timestep the DiT sees: ComfyUI passes ``1000 sigma`` in float32. ``"int"``: truncated like the official
    int64 timesteps (``floor(fp32(1000 fp32 sigma))`` equals the official value for every step of 1-80 steps,
    shifts 1-8); ``"bfloat16"``: TurboDiffusion's ``bf16(1000 float64(fp32 sigma))`` (needs ``sigmas``)."""
    if mode == "int":
        return torch.floor(t)
    if mode == "bfloat16" and sigmas is not None:
        from ..turbo.rcm import model_timesteps
        s = sigmas.detach().reshape(-1).to(torch.float64)
        v = model_timesteps(torch.cat([s, s.new_zeros(1)]), "bfloat16")
        return v.to(t.device).expand(t.shape[0]) if v.numel() == 1 else v.to(t.device)
    return t


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


# Diagnostics, off by default (issue 15). STEADYDANCER_TRACE_PASSES=1 logs one line per DiT pass (batch, timesteps,
# float64 sums of the inputs and the output), so two queues that should be identical can be compared pass by pass
# (bench/pass_trace.py). STEADYDANCER_SPLIT_PASSES=1 runs every batched pass (ComfyUI batches cond / uncond /
# pose-uncond into one DiT call) as one DiT forward per item (``batch_split``; not on a sequence-parallel multi-GPU
# run, whose ranks must split alike); without it the DiT does so only where batched kernels cannot be trusted
# (``SteadyDancerDiT.splits_batch``).
_TRACE_PASSES = _env_flag("STEADYDANCER_TRACE_PASSES")
_SPLIT_PASSES = _env_flag("STEADYDANCER_SPLIT_PASSES")


def _trace_pass(t, out, split=False, **inputs):
    def digest(v):
        return "-" if v is None else f"{v.detach().double().sum().item():.17g}"
    fields = " ".join(f"{k}={digest(v)}" for k, v in inputs.items())
    steps = ",".join(f"{v:.6g}" for v in t.detach().float().reshape(-1).tolist())
    log.info("SteadyDancer pass: batch=%d%s t=%s %s out=%s", out.shape[0], " split=1" if split else "", steps,
             fields, digest(out))


@functools.lru_cache(maxsize=None)
def native():
    """The ComfyUI classes (built on first use, inside ComfyUI only)."""
    import comfy.conds
    import comfy.latent_formats
    import comfy.lora
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.patcher_extension as pe
    import comfy.supported_models_base
    import comfy.utils

    from ..steadydancer.model.dit import SteadyDancerDiT
    from ..steadydancer.sampling import context_windows as cw
    from ..steadydancer.weights.quant import _Patched
    from comfy.weight_adapter.lora import LoRAAdapter

    def _window_done(prog, passes):
        if prog is not None:
            prog.window_done(passes)  # our SAMPLERs: the progress bar counts window passes
        comfy.model_management.throw_exception_if_processing_interrupted()  # Cancel: after this window pass

    class SteadyDancerSupported(comfy.supported_models_base.BASE):
        unet_config = {}
        unet_extra_config = {}
        sampling_settings = {"shift": 5.0}
        latent_format = comfy.latent_formats.Wan21
        supported_inference_dtypes = [torch.bfloat16, torch.float32, torch.float16]
        memory_usage_factor = 2.0

        def __init__(self, dim: int):
            super().__init__({"disable_unet_model_creation": True})
            self.memory_usage_factor = dim / 2222  # as core Wan (comfy/supported_models.py WAN21_T2V)

    class ComfySteadyDancerDiT(SteadyDancerDiT):
        """The loaded DiT with ComfyUI's calling convention (class swapped in place: same parameters/keys)."""

        def forward(self, x, timestep, context=None, clip_fea=None, clip_fea_c=None, pose_latents=None,
                    ref_x=None, ref_c=None, control=None, transformer_options={}, **kwargs):
            return pe.WrapperExecutor.new_class_executor(
                self._comfy_forward, self,
                pe.get_all_wrappers(pe.WrappersMP.DIFFUSION_MODEL, transformer_options),
            ).execute(x, timestep, context, clip_fea, clip_fea_c, pose_latents, ref_x, ref_c, transformer_options)

        def _comfy_forward(self, x, timestep, context, clip_fea, clip_fea_c, pose_latents, ref_x, ref_c,
                           transformer_options={}):
            if pose_latents is None or ref_x is None or ref_c is None or clip_fea is None:
                raise ValueError("SteadyDancer: the conditioning has no SteadyDancer inputs; build positive/negative "
                                 "with the SteadyDancer Conditioning node")
            c = self.config.out_dim
            t = round_timestep(timestep, transformer_options.get(TIMESTEP_KEY), transformer_options.get("sigmas"))
            dit = transformer_options.get(MULTIGPU_RUN_KEY)  # Multi-GPU: the forward over all ranks
            if dit is None:
                dit = functools.partial(SteadyDancerDiT.forward, self)
            windows = transformer_options.get(CONTEXT_KEY)
            if cw.plan(windows, x.shape[2]) is not None:
                # the core wrapper: x, y and the pose latents sliced per window, outputs fused (one implementation)
                prog = transformer_options.get(PROGRESS_KEY)
                batch = prog.batch if prog is not None else x.shape[0]  # rows per guidance pass
                dit = cw.ContextWindowModel(dit, windows, x.shape[2], batch, functools.partial(_window_done, prog))
            out = dit(x[:, :c], t, context, clip_fea, clip_fea_c, x[:, c:], pose_latents, ref_x, ref_c)
            if _TRACE_PASSES:
                _trace_pass(t, out, x=x, context=context, clip_fea=clip_fea, clip_fea_c=clip_fea_c,
                            pose=pose_latents, ref_x=ref_x, ref_c=ref_c,
                            split=x.shape[0] > 1 and self.splits_batch(x.device))
            return out

    class SteadyDancerBaseModel(comfy.model_base.WAN21):
        is_steadydancer = True

        def __init__(self, model_config, dit, device=None):
            super(comfy.model_base.WAN21, self).__init__(model_config, comfy.model_base.ModelType.FLOW,
                                                         device=device)
            self.image_to_video = True
            self.diffusion_model = dit
            dit.requires_grad_(False)
            dit.eval()
            comfy.model_management.archive_model_dtypes(dit)

        def memory_required(self, input_shape, cond_shapes={}):
            """Core's Wan estimate, for the activations' real dtype (the compute dtype, not the float32 inputs
            ``get_dtype`` declares) and the two reference frames the DiT appends to the F latent frames."""
            m = super().memory_required(input_shape, cond_shapes)
            mm = comfy.model_management
            if mm.xformers_enabled() or mm.pytorch_attention_flash_attention():
                m *= mm.dtype_size(self.diffusion_model.compute_dtype) / mm.dtype_size(self.get_dtype_inference())
            frames = input_shape[2] if len(input_shape) == 5 else 1
            return m * (frames + 2) / max(1, frames)

        def concat_cond(self, **kwargs):
            y = kwargs.get(KEY_Y)
            if y is None:
                return None
            return comfy.utils.resize_to_batch_size(y, kwargs["noise"].shape[0]).to(kwargs["device"])

        def extra_conds(self, **kwargs):
            out = super().extra_conds(**kwargs)  # c_concat (our y), c_crossattn, clip_fea (reference)
            pose = kwargs.get(KEY_POSE)
            if kwargs.get("prompt_type") == NEGATIVE_POSE:
                from .conditioning_nodes import resolve_latent  # deferred encode (our guider resolves it first)
                pose = resolve_latent(kwargs.get(KEY_POSE_NEG))
                if pose is None:
                    raise ValueError("SteadyDancer: pose guidance needs negative pose frames on the Conditioning node")
            if pose is not None:
                out["pose_latents"] = comfy.conds.CONDNoiseShape(pose)
            for key, name in ((KEY_REF_X, "ref_x"), (KEY_REF_C, "ref_c")):
                if kwargs.get(key) is not None:
                    out[name] = comfy.conds.CONDRegular(kwargs[key])
            clip_pose = kwargs.get(KEY_CLIP_POSE)
            if clip_pose is not None:
                out["clip_fea_c"] = comfy.conds.CONDRegular(clip_pose.penultimate_hidden_states)
            return out

        def resize_cond_for_context_window(self, cond_key, cond_value, window, x_in, device, retain_index_list=[]):
            if cond_key in ("ref_x", "ref_c", "clip_fea", "clip_fea_c", "c_crossattn"):
                return cond_value._copy_with(cond_value.cond.to(device))  # outside the time axis: never sliced
            return super().resize_cond_for_context_window(cond_key, cond_value, window, x_in, device,
                                                          retain_index_list=retain_index_list)

    def _calc(patches, key, weight):
        return comfy.lora.calculate_weight(patches, weight, key, intermediate_dtype=torch.float32)

    class SteadyDancerPatcher(comfy.model_patcher.ModelPatcher):
        """ModelPatcher that also applies the patches core's load list cannot reach (see module doc)."""

        def load(self, *args, **kwargs):
            with self.use_ejected():
                self._attach_quant_patches()  # before the load list: it counts and moves the low-rank terms
            super().load(*args, **kwargs)
            with self.use_ejected():
                self._apply_leftover_patches()

        def model_size(self):
            """The stored weights (measured once, without any patch) plus the low-rank terms this patch set adds
            to fp8-matmul layers, so ComfyUI's memory checks count them (they are buffers of the layers)."""
            base = getattr(self.model, "steadydancer_base_size", None)
            if base is None:
                return super().model_size()
            cached = getattr(self, "_side_terms_bytes", None)
            if cached is None or cached[0] != self.patches_uuid:
                cached = (self.patches_uuid, side_terms_bytes(self.model, self.patches, LoRAAdapter))
                self._side_terms_bytes = cached
            return base + cached[1]

        def _attach_quant_patches(self):
            attach_quant_patches(self.model, self.patches, self.patches_uuid,
                                 lambda patches, key: functools.partial(_calc, patches, key), LoRAAdapter)

        def _apply_leftover_patches(self):
            handled = set(self.backup)
            for _, m in self.model.named_modules():
                for f in list(getattr(m, "weight_function", ())) + list(getattr(m, "bias_function", ())):
                    if getattr(f, "is_lowvram_patch", False):
                        handled.add(f.key)
            for key in list(self.patches):
                if key in handled:
                    continue
                mname, _, attr = key.rpartition(".")
                mod = self.model.get_submodule(mname)
                if isinstance(mod, _Patched) and attr == "weight":
                    continue  # _attach_quant_patches
                w = getattr(mod, attr)
                self.patch_weight_to_device(key, device_to=w.device)

        def unpatch_model(self, device_to=None, unpatch_weights=True):
            if unpatch_weights:
                detach_quant_patches(self.model)
            return super().unpatch_model(device_to, unpatch_weights)

    def to_comfy_ops(dit: nn.Module) -> int:
        """Plain float Linear/Conv layers become ComfyUI manual_cast ops in place (same parameters, same
        math: weight and bias cast to the input's dtype/device per call, as the DiT's apply_cd did)."""
        n = 0
        for m in dit.modules():
            name = type(m).__name__
            if name in _PLAIN_OPS and type(m) is getattr(nn, name):
                m.__class__ = getattr(comfy.ops.manual_cast, name)
                n += 1
        return n

    return types.SimpleNamespace(
        SteadyDancerSupported=SteadyDancerSupported, ComfySteadyDancerDiT=ComfySteadyDancerDiT,
        SteadyDancerBaseModel=SteadyDancerBaseModel, SteadyDancerPatcher=SteadyDancerPatcher,
        to_comfy_ops=to_comfy_ops, mm=comfy.model_management, pe=pe)


def lora_side_terms(patches, weight_shape, lora_cls):
    """ComfyUI's patches of one Linear weight (the entries of ``ModelPatcher.patches[key]``: ``(strength_patch,
    adapter, strength_model, offset, function)``) as low-rank side terms ``[(up, down, scale)]`` for
    ``QuantLinear.set_lowrank_terms``, or None when any entry is not a plain LoRA.

    Plain: an adapter of exactly ``lora_cls`` (``comfy.weight_adapter.lora.LoRAAdapter``) without mid (LoCon /
    Tucker), DoRA scale or reshape, ``up`` [out, r] and ``down`` [r, in] that fit the weight, ``strength_model``
    1, no offset, no function. Then ComfyUI 0.33's ``LoRAAdapter.calculate_weight`` adds
    ``(strength * alpha / r) * up @ down`` (alpha / r = 1 without alpha, r = ``down.shape[0]``) to the weight, and
    ``scale`` is that factor. Anything else (full differences, LoHa / LoKr, nested patches...) gives None: the
    layer keeps the exact dequantize + ``calculate_weight`` path."""
    out_f, in_f = weight_shape
    terms = []
    for p in patches:
        if len(p) != 5:
            return None
        strength, v, strength_model, offset, function = p
        if type(v) is not lora_cls or strength_model != 1.0 or offset is not None or function is not None:
            return None
        w = getattr(v, "weights", None)
        if not isinstance(w, (tuple, list)) or len(w) != 6:
            return None
        up, down, alpha, mid, dora_scale, reshape = w
        if mid is not None or dora_scale is not None or reshape is not None:
            return None
        if not (torch.is_tensor(up) and torch.is_tensor(down)) or up.dim() < 2 or down.dim() < 2:
            return None
        u, d = up.flatten(1), down.flatten(1)
        if u.shape[0] != out_f or d.shape[1] != in_f or u.shape[1] != d.shape[0]:
            return None
        scale = float(strength) * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
        if scale != 0.0:
            terms.append((u, d, scale))
    return terms


def attach_quant_patches(model: nn.Module, patches: dict, patches_uuid, patch_fn, lora_cls) -> None:
    """Give every quantized layer of ``model`` the patches of its weight key (``patches``: a ModelPatcher's
    ``patches``): ``weight_patch_fn = patch_fn(patches[key], key)`` (the exact dequantize + merge per call) and,
    on layers that run the fp8 matmul (``fp8_matmul_eligible``), their low-rank form when all of them are plain
    LoRAs (``lora_side_terms``), so the fp8 matmul stays on. Layers without patches are cleared. Idempotent per
    patch set (``patches_uuid`` changes with every ``add_patches``, strength changes included)."""
    from ..steadydancer.weights.quant import QuantLinear, _Patched
    for name, m in model.named_modules():
        if not isinstance(m, _Patched):
            continue
        key = f"{name}.weight"
        p = patches.get(key)
        tag = (patches_uuid, key) if p else None
        if getattr(m, "_comfy_patch_tag", None) == tag and (tag is None) == (m.weight_patch_fn is None):
            continue
        m.weight_patch_fn = patch_fn(p, key) if p else None
        if isinstance(m, QuantLinear):
            eligible = p and m.fp8_matmul_eligible()
            m.set_lowrank_terms(lora_side_terms(p, m.weight_shape, lora_cls) if eligible else None)
        m._comfy_patch_tag = tag


def side_terms_bytes(model: nn.Module, patches: dict, lora_cls) -> int:
    """Bytes of the low-rank terms ``attach_quant_patches`` would register on ``model`` for ``patches``."""
    from ..steadydancer.weights.quant import QuantLinear
    n = 0
    for name, m in model.named_modules():
        p = patches.get(f"{name}.weight") if isinstance(m, QuantLinear) else None
        if p and m.fp8_matmul_eligible():
            terms = lora_side_terms(p, m.weight_shape, lora_cls)
            if terms:
                r = sum(d.shape[0] for _, d, _ in terms)
                n += r * (m.in_features + m.out_features) * m.compute_dtype.itemsize
    return n


def detach_quant_patches(model: nn.Module) -> None:
    """Undo ``attach_quant_patches``: no per-call patch and no low-rank term left on any quantized layer."""
    from ..steadydancer.weights.quant import QuantLinear, _Patched
    for m in model.modules():
        if isinstance(m, _Patched):
            m.weight_patch_fn = None
            m._comfy_patch_tag = None
            if isinstance(m, QuantLinear):
                m.set_lowrank_terms(None)


def make_model_patcher(dit, loader_fn=None, loader_args=()):
    """Wrap a loaded ``SteadyDancerDiT`` (weights in host RAM) as a ComfyUI MODEL."""
    n = native()
    n.to_comfy_ops(dit)
    dit.__class__ = n.ComfySteadyDancerDiT
    if _SPLIT_PASSES:
        dit.batch_split = True
    dit.dtype = torch.float64 if dit.compute_dtype == torch.float64 else torch.float32  # the input dtype it wants
    cfg = n.SteadyDancerSupported(dit.config.dim)
    cfg.set_inference_dtype(dit.compute_dtype, None)
    base = n.SteadyDancerBaseModel(cfg, dit, device=n.mm.get_torch_device())
    base.steadydancer_base_size = n.mm.module_size(base)  # before any patch (model_size adds the low-rank terms)
    patcher = n.SteadyDancerPatcher(base, load_device=n.mm.get_torch_device(), offload_device=n.mm.unet_offload_device())
    if loader_fn is not None:
        patcher.cached_patcher_init = (loader_fn, tuple(loader_args))
    return patcher


def register_lora_adapter() -> bool:
    """Let core LoRA loading (LoraLoaderModelOnly, LoraLoader, hooks) read lightx2v's ``<block>.diff_m``: an
    adapter class appended to ComfyUI's adapter registry (``comfy.weight_adapter.adapters``; additive, no ComfyUI
    function replaced). For each model key ``diffusion_model.<block>.modulation`` (the generic key map lists it)
    it takes ``diffusion_model.<block>.diff_m`` as a full difference of that parameter. Core itself logs
    "lora key not loaded" for these keys (Comfy-Org/ComfyUI#8922). Idempotent; False outside ComfyUI."""
    try:
        import comfy.model_management
        import comfy.weight_adapter as wa
    except Exception:  # noqa: BLE001 - not inside ComfyUI
        return False
    if any(getattr(a, "steadydancer_diff_m", False) for a in wa.adapters):
        return True

    class ModulationDiffAdapter(wa.WeightAdapterBase):
        """lightx2v ``diff_m``: ``modulation += strength * diff`` (ComfyUI's ``diff`` patch semantics)."""
        name = "diff_m"
        steadydancer_diff_m = True

        def __init__(self, loaded_keys, weights):
            self.loaded_keys = loaded_keys
            self.weights = weights

        @classmethod
        def load(cls, x, lora, alpha=None, dora_scale=None, loaded_keys=None):
            if not x.endswith(".modulation"):
                return None
            key = x[: -len(".modulation")] + ".diff_m"
            if key not in lora:
                return None
            return cls({key}, (lora[key],))

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            diff = comfy.model_management.cast_to_device(self.weights[0], weight.device, intermediate_dtype)
            if diff.numel() != weight.numel():
                log.warning("SteadyDancer: diff_m for %s has shape %s, the weight %s; skipped", key,
                            tuple(diff.shape), tuple(weight.shape))
                return weight
            weight += function((strength * diff.reshape(weight.shape)).type(weight.dtype))
            return weight

    wa.adapters.append(ModulationDiffAdapter)
    return True
