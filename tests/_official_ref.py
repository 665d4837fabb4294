"""Running the official SteadyDancer code (MCG-NJU/SteadyDancer) from a checkout outside this repository.

Used by tests/data/make_official_reference.py (which writes the committed reference numbers) and by the live
parity tests when STEADYDANCER_OFFICIAL_PATH is set. Nothing of the official code is stored here.

The official modules are loaded from ``<checkout>/wan/modules`` into a private package name with two
adaptations, both needed to run them on a CPU in float32:

- ``.attention.flash_attention`` (CUDA-only flash-attn) is replaced by PyTorch SDPA with the same casts
  (q/k cast to v's dtype, output in q's dtype);
- the hard-coded ``x = x.to(torch.bfloat16)`` after self-attention becomes ``x = x.type_as(v)``, which is the
  same thing in the official bf16 run (v is bf16 there) and keeps a float32 run in float32.
Nothing else of the official code is touched; its CUDA-only autocast decorators are inactive on CPU.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys
import types

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

PKG = "_steadydancer_official_ref"


def _official_flash_attention(q, k, v, q_lens=None, k_lens=None, window_size=(-1, -1), **_):
    out_dtype = q.dtype
    q, k = q.to(v.dtype), k.to(v.dtype)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).type(out_dtype)


def load_official_modules(checkout) -> types.SimpleNamespace:
    """-> namespace(model_dancer=..., small_archs=..., mobilenetv2_dcd=...) from an official checkout."""
    root = pathlib.Path(checkout) / "wan" / "modules"
    if not (root / "model_dancer.py").is_file():
        raise FileNotFoundError(f"{checkout} has no wan/modules/model_dancer.py (not a MCG-NJU/SteadyDancer checkout)")
    cudnn_det = torch.backends.cudnn.deterministic          # the official module sets it on import
    pkg = types.ModuleType(PKG)
    pkg.__path__ = []
    sys.modules[PKG] = pkg
    att = types.ModuleType(PKG + ".attention")
    att.flash_attention = _official_flash_attention
    sys.modules[PKG + ".attention"] = att

    def load(name, patch=None):
        path = root / f"{name}.py"
        src = path.read_text()
        if patch:
            old, new = patch
            assert src.count(old) == 1, f"official {name}.py changed: cannot find {old!r}"
            src = src.replace(old, new)
        mod = types.ModuleType(f"{PKG}.{name}")
        mod.__file__ = str(path)
        mod.__package__ = PKG
        sys.modules[mod.__name__] = mod
        exec(compile(src, str(path), "exec"), mod.__dict__)
        return mod

    try:
        sa = load("small_archs")
        dcd = load("mobilenetv2_dcd")
        md = load("model_dancer", ("x = x.to(torch.bfloat16)", "x = x.type_as(v)"))
    finally:
        torch.backends.cudnn.deterministic = cudnn_det
    return types.SimpleNamespace(model_dancer=md, small_archs=sa, mobilenetv2_dcd=dcd)


def unload_official_modules() -> None:
    for name in [n for n in sys.modules if n == PKG or n.startswith(PKG + ".")]:
        del sys.modules[name]


def load_official_scheduler(checkout):
    """The official ``FlowUniPCMultistepScheduler`` class (wan/utils/fm_solvers_unipc.py)."""
    path = pathlib.Path(checkout) / "wan" / "utils" / "fm_solvers_unipc.py"
    spec = importlib.util.spec_from_file_location("_official_fm_solvers_unipc", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.FlowUniPCMultistepScheduler


def official_model(md, cfg, device=None):
    """The official WanModel for one of our SteadyDancerConfig's (eval mode).

    The official constructor hard-codes the CLIP width (MLPProj(1280, dim)); when cfg.clip_dim differs, img_emb
    is rebuilt with the official MLPProj class at that width (same structure, smaller input)."""
    kw = dict(model_type="i2v", patch_size=cfg.patch_size, text_len=cfg.text_len, in_dim=cfg.in_dim,
              in_dim_c=cfg.in_dim_c, dim=cfg.dim, ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim,
              out_dim=cfg.out_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers, qk_norm=True,
              cross_attn_norm=True, eps=cfg.eps)
    if device == "meta":
        with torch.device("meta"):
            return md.WanModel(**kw)
    m = md.WanModel(**kw)
    if cfg.clip_dim != 1280:
        m.img_emb = md.MLPProj(cfg.clip_dim, cfg.dim)
    return m.eval()


def randomize_official(module, seed):
    """Give every tensor non-trivial values (the official init zeroes the head; norms get weights near 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.3 if p.dim() == 1 or name.endswith(("norm1.weight", "norm2.weight")) else \
                1.0 / max(p[0].numel(), 1) ** 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "norm" in name and "weight" in name else 0.0))
    return module


# ---------------------------------------------------------------------- bf16: the official run's casts
def _cast_floats(dt, args, kwargs):
    cast = lambda a: a.to(dt) if isinstance(a, torch.Tensor) and a.dtype in (  # noqa: E731
        torch.float16, torch.bfloat16, torch.float32) else a
    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


class CudaAutocastBF16(TorchDispatchMode):
    """CPU stand-in for the official pipeline's ``torch.cuda.amp.autocast(dtype=bfloat16)``.

    At the aten level, casts the inputs of the CUDA autocast "lower precision" ops (matmuls, convolutions) to
    bf16 and of its "float32" ops used here (layer_norm, group_norm, softmax, rsqrt, pow, exp) to fp32;
    float64 tensors are not eligible, as in autocast. Everything else runs in the dtype it gets.
    """

    _LOWER = {"mm", "addmm", "bmm", "baddbmm", "convolution", "mv", "addmv"}
    _FP32 = {"native_layer_norm", "native_group_norm", "_softmax", "rsqrt", "pow", "exp"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        dt = torch.bfloat16 if name in self._LOWER else torch.float32 if name in self._FP32 else None
        if dt is not None:
            args, kwargs = _cast_floats(dt, args, kwargs)
        return func(*args, **kwargs)


class AutocastConvEntry(TorchFunctionMode):
    """CPU conv2d checks input/bias dtypes before reaching aten.convolution; cast at the entry, as autocast."""

    _CONV = {F.conv1d, F.conv2d, F.conv3d}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._CONV:
            args, kwargs = _cast_floats(torch.bfloat16, args, kwargs)
        return func(*args, **kwargs)


class ExactLowPrecisionMatmuls(TorchDispatchMode):
    """bf16 / fp16 matmuls, convolutions and attention computed exactly (in float64) and rounded once to their
    dtype, instead of by the CPU's own low-precision kernels, whose results depend on the instruction set
    (AVX512-BF16 vs AVX2 differ by ~1 bf16 ulp in places, which a tiny DiT turns into ~5e-3 relative).
    Used on *both* sides of a stored bf16 comparison, so the data made on one machine hold on any CPU;
    the casts between ops (what the comparison is about) are untouched.
    """

    _MM = {"mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "convolution", "_scaled_dot_product_flash_attention_for_cpu"}
    _LOW = (torch.bfloat16, torch.float16)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        low = [a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype in self._LOW]
        if name not in self._MM or not low or (name.startswith("_scaled_dot") and (
                kwargs.get("attn_mask") is not None or (len(args) > 4 and args[4]) or kwargs.get("is_causal"))):
            return func(*args, **kwargs)
        dt = low[0]
        up = lambda a: a.double() if isinstance(a, torch.Tensor) and a.dtype in self._LOW else a  # noqa: E731
        if name == "_scaled_dot_product_flash_attention_for_cpu":
            q, k, v = (up(a) for a in args[:3])
            scale = kwargs.get("scale") or 1.0 / q.shape[-1] ** 0.5
            p = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
            out = (p @ v).to(dt)
            lse = torch.logsumexp((q @ k.transpose(-1, -2)) * scale, dim=-1).float()
            return out, lse
        out = func(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
        return out.to(dt)
