"""Test-only ComfyUI node pack: stand-ins for the heavy encoders, used by tests/integration only.

The real workflows encode text with umt5-xxl (11 GB) and images with clip_vision_h (1.2 GB). These nodes give
outputs of the same ComfyUI types, shapes and semantics without any weights, so the pack's own nodes can be
driven end to end on a CPU. The semantics follow what ComfyUI 0.33's own code produces (checked against
``comfy.sd1_clip``/``comfy.text_encoders.wan``/``comfy.clip_vision``; see the integration README):

* ``SDTestTextEncode`` -> CONDITIONING ``[[cond [1, 512, 4096], {"pooled_output": None}]]`` where rows
  ``0..n-1`` are the "real tokens" (one per word plus the end token) and rows ``n..511`` are exactly zero,
  as umt5 with ``zero_out_masked`` gives.
* ``SDTestClipVisionEncode`` -> a ``comfy.clip_vision.Output`` with ``penultimate_hidden_states`` and
  ``last_hidden_state`` ``[B, 257, 1280]``, ``image_embeds`` ``[B, 1024]``, ``image_sizes`` and
  ``mm_projected`` None, derived deterministically from the pixels (so different images differ).
* ``SDTestSlowModel`` passes any model through (a torch module, a patcher, or a lazy handle with
  ``materialize()``) and makes every forward of its torch module sleep, logging the start time of each call
  to a file (the ``/interrupt`` test measures how many calls start after it).
"""
import copy
import hashlib
import json
import time

import torch

TEXT_DIM, TEXT_LEN = 4096, 512
CLIP_TOKENS, CLIP_DIM, CLIP_PROJ = 257, 1280, 1024


def _generator(*parts):
    h = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little"))


class SDTestTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "SteadyDancer/testing"

    def encode(self, text):
        n = len(text.split()) + 1                     # words + the end token
        n = min(n, TEXT_LEN)
        cond = torch.zeros(1, max(TEXT_LEN, n), TEXT_DIM)
        cond[0, :n] = torch.randn(n, TEXT_DIM, generator=_generator("text", text)) * 0.2
        return ([[cond, {"pooled_output": None}]],)


class SDTestClipVisionEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "crop": (["center", "none"],)}}

    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "encode"
    CATEGORY = "SteadyDancer/testing"

    def encode(self, image, crop):
        import comfy.clip_vision

        b = image.shape[0]
        img = image[..., :3].movedim(-1, 1).float()
        pooled = torch.nn.functional.adaptive_avg_pool2d(img, (16, 16)).reshape(b, -1)        # [B, 768]
        g = _generator("clip", crop)
        w_tok = torch.randn(pooled.shape[1], CLIP_TOKENS * 8, generator=g) / pooled.shape[1] ** 0.5
        w_dim = torch.randn(8, CLIP_DIM, generator=g)
        tokens = (pooled @ w_tok).reshape(b, CLIP_TOKENS, 8) @ w_dim                          # [B, 257, 1280]
        out = comfy.clip_vision.Output()
        out["last_hidden_state"] = tokens * 0.9
        out["penultimate_hidden_states"] = tokens
        out["image_embeds"] = tokens[:, 0, :CLIP_PROJ].clone()
        out["image_sizes"] = [torch.Size([3, 224, 224])] * b
        out["mm_projected"] = None
        return (out,)


def _torch_module(obj, depth=0):
    if isinstance(obj, torch.nn.Module):
        dm = getattr(obj, "diffusion_model", None)        # a ComfyUI BaseModel: its DiT is what runs
        return dm if isinstance(dm, torch.nn.Module) else obj
    if depth > 3:
        return None
    for name in ("diffusion_model", "model", "dit", "module"):
        sub = getattr(obj, name, None)
        if sub is not None:
            m = _torch_module(sub, depth + 1)
            if m is not None:
                return m
    return None


class SDTestSlowModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("*",), "seconds_per_call": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 10.0}),
                             "log_file": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("*",)
    FUNCTION = "wrap"
    CATEGORY = "SteadyDancer/testing"

    @classmethod
    def VALIDATE_INPUTS(cls, input_types=None, **kw):
        return True

    @classmethod
    def IS_CHANGED(cls, **kw):
        return time.time()

    def wrap(self, model, seconds_per_call, log_file):
        def pre_hook(mod, args, kwargs=None):
            if log_file:
                with open(log_file, "a") as f:
                    f.write(f"{time.time():.6f}\n")
            time.sleep(seconds_per_call)

        def hook_module(module):
            for h in getattr(module, "_sdtest_hooks", []):
                h.remove()
            module._sdtest_hooks = [module.register_forward_pre_hook(pre_hook)]
            return module

        module = _torch_module(model)
        if module is not None:
            hook_module(module)
            return (model,)
        if callable(getattr(model, "materialize", None)):
            # a lazy model handle (the module is loaded by the sampler): hook what materialize() returns
            base = type(model)

            class SlowHandle(base):
                def materialize(self, *a, **kw):
                    return hook_module(base.materialize(self, *a, **kw))

            SlowHandle.__name__ = SlowHandle.__qualname__ = base.__name__
            slow = copy.copy(model)
            object.__setattr__(slow, "__class__", SlowHandle)      # works for frozen dataclasses too
            return (slow,)
        raise RuntimeError(f"SDTestSlowModel: no torch module found in {type(model).__name__}")


class SDTestMemoryProbe:
    """Live SteadyDancer DiT objects in the server process, its RSS after glibc returned freed pages
    (malloc_trim) and, on a GPU, torch's allocated/reserved CUDA memory, as a JSON string (for the "Unload
    models" test)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tag": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("STRING",)
    FUNCTION = "probe"
    CATEGORY = "SteadyDancer/testing"
    OUTPUT_NODE = True

    @classmethod
    def IS_CHANGED(cls, **kw):
        return time.time()

    def probe(self, tag):
        import ctypes
        import gc
        gc.collect()
        live = sum(1 for o in gc.get_objects() if type(o).__name__ in ("SteadyDancerDiT", "ComfySteadyDancerDiT"))
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        with open("/proc/self/status") as f:
            rss = next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS:"))
        info = {"tag": tag, "live_dits": live, "rss_mb": rss}
        import torch
        if torch.cuda.is_available():   # the GPU run (COMFYUI_TEST_GPU=1): what the DiT holds on the card
            torch.cuda.synchronize()
            info["cuda_allocated_mb"] = torch.cuda.memory_allocated() / 2 ** 20
            info["cuda_reserved_mb"] = torch.cuda.memory_reserved() / 2 ** 20
        text = json.dumps(info)
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {
    "SDTestMemoryProbe": SDTestMemoryProbe,
    "SDTestTextEncode": SDTestTextEncode,
    "SDTestClipVisionEncode": SDTestClipVisionEncode,
    "SDTestSlowModel": SDTestSlowModel,
}
NODE_DISPLAY_NAME_MAPPINGS = {k: k for k in NODE_CLASS_MAPPINGS}
