"""Speed switches for a built ``SteadyDancerDiT`` (all opt-in; none changes the state-dict keys).

    from steadydancer_turbo.steadydancer.weights import speed_options as accel
    accel.use_attention(model, "auto")            # cuDNN attention on Hopper, SDPA elsewhere
    accel.use_attention(model, accel.sparse(0.15)) # top-k block-sparse self-attention (turbo path)
    accel.use_fp8(model)                           # fp8 e4m3 weights + fp8 tensor-core matmuls (sm_89+;
                                                   # an fp8 file's stored weights are used as they are)
    accel.compile_blocks(model)                    # torch.compile each transformer block (fuses norms,
                                                   # modulation, RoPE, GELU, residuals; first call compiles)

Measured on one H100 (torch 2.11, bench/perf_notes.md), 832x480x81 + 2 reference frames, one forward:
eager bf16 3.95 s; compiled 3.29 s; fp8 + compiled 2.83 s; fp8 + top-k 0.15 + compiled 1.40 s (0.10: 1.22 s with
the RoPE tables and two-stage fp8 amax of run 6; 4 turbo steps 4.93 s).

``compile_blocks`` also switches RoPE to its real-valued fp32 form (``model.rope_dtype = torch.float32``):
inductor does not generate code for complex tensors, so the official float64-complex rotation would stay
unfused. The blocks then get fp32 (cos, sin) tables (``model.rope_real_tables``, default on), which agree with
the float64 rotation to ~1e-7 relative before the cast to bf16.
"""

from __future__ import annotations

import importlib
import os

import torch
import torch.nn as nn

from ..kernels.attention import get_backend
from ..kernels.backends import sparse_backend
from ..kernels.fp8_linear import convert_linears_to_fp8

__all__ = ["use_attention", "sparse", "use_fp8", "compile_blocks", "uncompile_blocks", "optimize",
           "use_compile_cache", "CACHE_ENV"]

CACHE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
# on-disk cache switches (torch 2.11-2.13) and the env variable each one is read from (a user's choice wins)
_CACHE_FLAGS = (("torch._inductor.config", "fx_graph_cache", "TORCHINDUCTOR_FX_GRAPH_CACHE"),
                ("torch._functorch.config", "enable_autograd_cache", "TORCHINDUCTOR_AUTOGRAD_CACHE"),
                ("torch._inductor.config", "autotune_local_cache", None))
_USER_CACHE_ENV = {k: os.environ.get(k) for k in CACHE_ENV}  # as the pack was imported (torch sets both itself)


def _set_by_torch(key: str, value: str) -> bool:
    """Whether ``value`` of ``key`` is a folder torch puts into ``os.environ`` itself, not a user's choice:
    ``import torch._inductor.config`` (which ComfyUI's start and this pack's own imports do before the snapshot
    above) writes its default ``<temp>/torchinductor_<user>``, and a compile writes Triton's folder under it."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        default = os.path.abspath(default_cache_dir())
    except (ImportError, AttributeError):
        return False
    value = os.path.abspath(value)
    if key == "TORCHINDUCTOR_CACHE_DIR":
        return value == default
    try:
        return os.path.commonpath([value, default]) == default and value != default
    except ValueError:  # another drive (Windows)
        return False


def use_compile_cache(folder: str, user_env: dict | None = None) -> dict:
    """Keep torch.compile's on-disk caches (inductor's FX graph / autograd / autotune caches and the Triton
    kernels it builds) in ``folder``, so a restart reuses them instead of compiling again (28-34 s cold vs 6 s
    warm for the 480p turbo model). Call before the first compile. Process-wide: torch has one cache folder.

    ``user_env``: ``TORCHINDUCTOR_CACHE_DIR`` / ``TRITON_CACHE_DIR`` as the user set them (default: as they were
    when this module was imported, since torch writes both into ``os.environ`` itself); torch's own default
    folders there do not count as the user's (``_set_by_torch``).
    A folder the user set is kept; otherwise inductor's goes to ``folder`` and Triton's follows it
    (``folder/triton/<device>``, torch's own layout). The cache switches are turned on through torch's config,
    except where the user's environment set them. Returns ``{"inductor": path, "triton": path or None}``."""
    user = {k: v for k, v in (_USER_CACHE_ENV if user_env is None else user_env).items()
            if v and not _set_by_torch(k, v)}
    inductor = user.get("TORCHINDUCTOR_CACHE_DIR") or os.path.abspath(folder)
    os.makedirs(inductor, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor
    triton = user.get("TRITON_CACHE_DIR")
    if triton:
        os.environ["TRITON_CACHE_DIR"] = triton
    else:  # a value torch derived from the old inductor folder: drop it so torch derives it from the new one
        os.environ.pop("TRITON_CACHE_DIR", None)
    for module, flag, env in _CACHE_FLAGS:
        if env and env in os.environ:
            continue
        try:
            cfg = importlib.import_module(module)
        except ImportError:
            continue
        if hasattr(cfg, flag):
            setattr(cfg, flag, True)
    return {"inductor": inductor, "triton": triton}


def use_attention(model: nn.Module, backend: str) -> None:
    get_backend(backend)  # unknown / unavailable names fail here, not mid-forward
    model.attention_backend = backend


def sparse(topk: float = 0.15, **kw) -> str:
    """Name of a top-k block-sparse self-attention backend (registered on first use)."""
    return sparse_backend(topk, **kw)


def use_fp8(model: nn.Module, act_scaling: str = "rowwise", fast_accum: bool = False) -> int:
    """fp8 tensor-core matmuls for every Linear in model.blocks (in place). Layers the loader kept in stored
    fp8 e4m3 form (``quant.QuantLinear``, e.g. from an "fp8 scaled" file) switch to the fp8 matmul on their
    stored weights (no re-quantization); plain ``nn.Linear`` layers become ``FP8Linear``. GGUF / e5m2 layers
    are left as they are. Returns how many layers now use the fp8 matmul."""
    from .quant import QuantLinear
    n = 0
    for m in model.get_submodule("blocks").modules():
        if isinstance(m, QuantLinear) and m.fp8_matmul_capable():
            m.fp8_matmul, m.fp8_act_scaling, m.fp8_fast_accum = True, act_scaling, fast_accum
            n += 1
    return n + convert_linears_to_fp8(model, act_scaling=act_scaling, fast_accum=fast_accum)


def compile_blocks(model: nn.Module, fullgraph: bool = True, dynamic: bool | None = False,
                   mode: str | None = None) -> nn.Module:
    """``torch.compile`` every block in place (``nn.Module.compile``). All blocks share one compiled graph per
    input shape (their code is the same and parameters are graph inputs). ``fullgraph=True`` makes any graph
    break an error instead of a silent slowdown. Blocks carrying forward hooks (block swap's weight streaming)
    get only their ``forward`` compiled, so the hooks keep running eagerly around it."""
    if hasattr(model, "rope_dtype"):
        model.rope_dtype = torch.float32
    for blk in model.blocks:
        if blk._forward_pre_hooks or blk._forward_hooks:
            blk.forward = torch.compile(type(blk).forward.__get__(blk), fullgraph=fullgraph, dynamic=dynamic,
                                        mode=mode)
        else:
            blk.compile(fullgraph=fullgraph, dynamic=dynamic, mode=mode)
    return model


def uncompile_blocks(model: nn.Module, rope_dtype: torch.dtype = torch.float64) -> nn.Module:
    for blk in model.blocks:
        blk._compiled_call_impl = None
        blk.__dict__.pop("forward", None)
    if hasattr(model, "rope_dtype"):
        model.rope_dtype = rope_dtype
    return model


def optimize(model: nn.Module, attention: str = "auto", fp8: bool = False, sparse_topk: float | None = None,
             compile: bool = False, fp8_act_scaling: str = "tensor", fp8_fast_accum: bool = True) -> nn.Module:
    """One call for the switches above. ``sparse_topk`` (e.g. 0.1-0.2, turbo path) is the self-attention backend
    instead of ``attention`` (cross-attention stays dense); giving both is an error. fp8 defaults to the fastest mode measured on an H100
    (per-tensor activation scale, fast accumulation: same error as per-token at the FFN shape). fp8 needs
    sm_89+ for the fp8 matmul; elsewhere the layers dequantize (correct, not faster)."""
    if sparse_topk and attention != "auto":
        raise ValueError(f"sparse_topk runs top-k sparse self-attention on its own flex kernel; it cannot be "
                         f"combined with attention={attention!r} (pass one of the two)")
    use_attention(model, sparse(sparse_topk) if sparse_topk else attention)
    if fp8:
        use_fp8(model, act_scaling=fp8_act_scaling, fast_accum=fp8_fast_accum)
    if compile:
        compile_blocks(model)
    return model
