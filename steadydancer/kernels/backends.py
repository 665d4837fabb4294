"""The attention backends beyond plain ``"sdpa"``, registered into ``attention.py``'s registry by
:func:`register_builtin_backends` (called once by the ``kernels`` package on import; safe to call again).

- ``"flash_attn"``: FlashAttention 3 if importable, else 2; ``"sage"``: SageAttention 2 (``sageattention``
  package: INT8 Q/K and FP8 P/V, lossy) for self-attention, cross-attention dense. Both are available only when
  their package imports, and are used only when chosen (never a silent fallback: ``sage_problem`` says why
  sage cannot run). Top-k sparse attention is not combined with sage: the sageattention package has no entry
  point for our top-k block lists (block-sparse Sage kernels are the separate SpargeAttn project), so ``"sage"``
  and ``"flex_sparse*"`` are two choices of the one self-attention backend; ``"int8_sparse*"`` is our own 8-bit
  kernel for the top-k blocks.
- ``"sdpa_cudnn"``: PyTorch's cuDNN fused attention called directly (``aten._scaled_dot_product_cudnn_attention``;
  direct, so it also works inside ``torch.compile`` regions without an ``sdpa_kernel`` context). On an H100 with
  torch 2.11, head dim 128, it runs self-attention over 35,880 tokens in 45 ms against 72 ms for the flash
  kernel that plain ``"sdpa"`` picks (bench/dit_forward.py, micro section). Falls back to ``"sdpa"`` off CUDA,
  for other dtypes/head dims, or if cuDNN refuses the shape.
- ``"auto"``: ``"sdpa_cudnn"`` on Hopper (sm_90, where it was measured faster), ``"sdpa"`` elsewhere.
- ``"flex_sparse"`` (top-k 0.15) and ``sparse_backend(topk, ...)`` for other settings: training-free top-k
  block-sparse *self*-attention (``sparse_attention.py``). Calls whose query and key lengths differ (the
  cross-attention to text / CLIP tokens) stay dense, through ``"auto"``.
- ``"int8_sparse"`` (top-k 0.15) and ``sparse_backend(topk, ..., kernel="int8")``: the same block selection,
  run by our own Triton kernel with int8 Q/K (``int8_sparse.py``; SageAttention 2's idea on our block lists,
  lossy like ``"sage"``); CUDA compute capability 8.9+ with triton only (``int8_sparse_problem`` says why not).
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from .attention import is_registered, register_backend, sdpa

__all__ = ["register_builtin_backends", "sparse_backend", "sparse_settings", "cudnn_attention_usable",
           "sage_problem", "int8_sparse_problem", "SPARSE_FAMILIES"]

_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------- optional packages: flash, sage
def _importable(mod: str) -> Callable[[], bool]:
    state = {}

    def probe() -> bool:
        if "ok" not in state:
            try:
                importlib.import_module(mod)
                state["ok"] = True
            except Exception:
                state["ok"] = False
        return state["ok"]

    return probe


# one probe per module, made once: attention() checks availability on every call, so the result must be cached
_has_flash3 = _importable("flash_attn_interface")
_has_flash2 = _importable("flash_attn")


def _flash_available() -> bool:
    return _has_flash3() or _has_flash2()


def _flash(q, k, v):
    dtype = q.dtype
    if dtype not in _HALF:  # FlashAttention needs half inputs (official code casts to bf16 the same way)
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    if _has_flash3():
        import flash_attn_interface  # FlashAttention 3 (Hopper)
        out = flash_attn_interface.flash_attn_func(q, k, v)
        out = out[0] if isinstance(out, tuple) else out
    else:
        import flash_attn
        out = flash_attn.flash_attn_func(q, k, v)
    return out.to(dtype)


SAGE_INSTALL = ("install SageAttention 2 into ComfyUI's Python (pip install sageattention, or build it from "
                "github.com/thu-ml/SageAttention) and restart ComfyUI, or choose attention auto / sdpa")
SAGE_MAX_HEAD_DIM = 128  # sageattn pads head dims up to 64 / 128 and refuses larger ones


def sage_problem(device: torch.device | str | None = None) -> str | None:
    """Why ``"sage"`` cannot run on ``device`` (None: it can). SageAttention 2's kernels are CUDA-only, for
    compute capability 8.0 and newer (Ampere, Ada, Hopper, Blackwell); its ``sageattn`` picks the kernel by
    the GPU's architecture."""
    if not _has_sage():
        return f"attention 'sage' needs the sageattention package, which is not importable here: {SAGE_INSTALL}"
    dev = torch.device(device) if device is not None else None
    if (dev is not None and dev.type != "cuda") or not torch.cuda.is_available():
        return f"attention 'sage' needs an NVIDIA GPU (SageAttention has CUDA kernels only); this runs on {dev}"
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 8:
        return (f"attention 'sage' needs an NVIDIA GPU of compute capability 8.0 or newer (RTX 30xx / A100 and "
                f"later); this one is sm{major}{minor}: choose attention auto / sdpa")
    return None


def _sage_device_check(q: torch.Tensor) -> None:
    if q.device.type != "cuda":
        raise RuntimeError(f"attention 'sage' needs CUDA tensors, got {q.device}: SageAttention has CUDA kernels only")


@torch.compiler.disable
def _sageattn_nhd(q, k, v):
    """The sageattn call, kept out of torch.compile graphs (compiled blocks break the graph around it, as
    SageAttention supports: its Python dispatch and CUDA extension calls are not traced)."""
    import sageattention
    return sageattention.sageattn(q, k, v, tensor_layout="NHD", is_causal=False)


def _sage(q, k, v):
    """SageAttention 2 (INT8 Q/K, FP8 P/V on Ada/Hopper) on self-attention: ``sageattn`` in its "NHD" layout,
    which is ours ([B, L, H, D]), non-causal, default 1/sqrt(D) scale; half inputs (fp32 is cast to bf16, as
    for FlashAttention) with a contiguous last dimension. Cross-attention (query and key lengths differ: the
    512 text / 257 CLIP tokens, a small part of the cost) stays dense, as for the sparse backends."""
    if q.shape[1] != k.shape[1]:
        return _auto(q, k, v)
    _sage_device_check(q)
    if q.shape[-1] > SAGE_MAX_HEAD_DIM:
        raise RuntimeError(f"attention 'sage' supports head dims up to {SAGE_MAX_HEAD_DIM}, got {q.shape[-1]}")
    dtype = q.dtype
    if dtype not in _HALF:
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    try:
        out = _sageattn_nhd(q, k, v)
    except ValueError as e:  # e.g. "Unsupported CUDA architecture": say which option caused it
        raise RuntimeError(f"attention 'sage' (SageAttention) cannot run here: {e}; choose attention auto / sdpa") \
            from e
    return out.to(dtype)


_has_sage = _importable("sageattention")


# ---------------------------------------------------------------------- cuDNN, auto, top-k sparse
def cudnn_attention_usable(q: torch.Tensor, k: torch.Tensor) -> bool:
    return (q.is_cuda and q.dtype in _HALF and k.dtype == q.dtype and q.shape[-1] <= 128
            and q.shape[-1] % 8 == 0 and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"))


_cudnn_failed = False


def _sdpa_cudnn(q, k, v):
    global _cudnn_failed
    if not _cudnn_failed and cudnn_attention_usable(q, k):
        try:
            out = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, False)[0]
            return out.transpose(1, 2)
        except RuntimeError:  # cuDNN too old / shape unsupported: use PyTorch's own choice from now on
            if torch.compiler.is_compiling():
                raise
            _cudnn_failed = True
    return sdpa(q, k, v)


def _is_hopper(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] == 9


def _auto(q, k, v):
    return _sdpa_cudnn(q, k, v) if _is_hopper(q) else sdpa(q, k, v)


def _flex_available() -> bool:
    try:  # torch >= 2.5
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
        return True
    except Exception:
        return False


# the sparse backend families: Model Loader choice (and name prefix) -> the kernel that runs the kept blocks
SPARSE_FAMILIES = {"flex_sparse": "flex", "int8_sparse": "int8"}
_FAMILY_OF_KERNEL = {kernel: family for family, kernel in SPARSE_FAMILIES.items()}


def sparse_backend(topk: float = 0.15, block_q: int = 128, block_k: int = 128, keep_tail_tokens: int = 0,
                   force_diagonal: bool = True, kernel: str = "flex") -> str:
    """Register (once) and return the name of a top-k block-sparse self-attention backend: the blocks are chosen
    by ``select_kv_blocks`` and run by ``kernel``: ``"flex"`` (flex_attention, exact on the kept blocks; names
    ``flex_sparse:<topk>...``) or ``"int8"`` (our Triton kernel with int8 Q/K, ``int8_sparse.py``; names
    ``int8_sparse:<topk>...``, CUDA sm_89+ only: ``int8_sparse_problem``)."""
    if kernel not in _FAMILY_OF_KERNEL:
        raise ValueError(f"unknown sparse attention kernel {kernel!r}; one of {sorted(_FAMILY_OF_KERNEL)}")
    name = f"{_FAMILY_OF_KERNEL[kernel]}:{topk:g}"
    if (block_q, block_k) != (128, 128):
        name += f":b{block_q}x{block_k}"
    if keep_tail_tokens:
        name += f":tail{keep_tail_tokens}"
    if not force_diagonal:
        name += ":nodiag"
    if not is_registered(name):
        cfg = dict(topk=topk, block_q=block_q, block_k=block_k, force_diagonal=force_diagonal,
                   keep_tail_tokens=keep_tail_tokens)
        run, available = {"flex": (_flex_sparse, _flex_available), "int8": (_int8_sparse, _int8_available)}[kernel]

        def fn(q, k, v, _cfg=cfg, _run=run):
            if q.shape[1] != k.shape[1]:  # cross-attention: dense
                return _auto(q, k, v)
            return _run(q, k, v, _cfg)

        _SPARSE_FNS[name] = fn
        _SPARSE_SETTINGS[name] = dict(cfg, kernel=kernel)
        register_backend(name, fn, available, doc=f"top-k block-sparse self-attention ({kernel} kernel) {cfg}")
    return name


_SPARSE_FNS = {}
_SPARSE_SETTINGS = {}


def _flex_sparse(q, k, v, cfg: dict):
    """Top-k block selection, then exact attention on the kept blocks through flex_attention."""
    from .sparse_attention import SparseAttentionConfig, sparse_attention  # needs flex (torch >= 2.5)

    return sparse_attention(q, k, v, SparseAttentionConfig(**cfg))


def sparse_settings(name: str):
    """The ``sparse_backend`` keyword arguments that registered backend ``name`` (None for other backends): how
    another process registers the same backend (steadydancer/parallel/replica.py)."""
    s = _SPARSE_SETTINGS.get(name)
    return dict(s) if s is not None else None


# ---------------------------------------------------------------------- int8 top-k sparse (our Triton kernel)
INT8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper and newer: the GPUs it was written and measured for


_INT8_STATE: dict = {}


def _int8_probe() -> str | None:
    """Why our Triton kernel module cannot be imported (None: it can); tried once."""
    if "problem" not in _INT8_STATE:
        try:
            _INT8_STATE["module"] = importlib.import_module(".int8_sparse", __package__)
            _INT8_STATE["problem"] = None
        except Exception as e:  # no triton, a torch without torch.library.custom_op (< 2.4), a broken triton
            _INT8_STATE["problem"] = f"{type(e).__name__}: {e}"  # install: say what it was, never crash a probe
    return _INT8_STATE["problem"]


def int8_sparse_problem(device: torch.device | str | None = None) -> str | None:
    """Why ``"int8_sparse"`` cannot run on ``device`` (None: it can): it needs triton (it ships with PyTorch's
    Linux CUDA wheels) with ``torch.library.custom_op`` (torch >= 2.4), and an NVIDIA GPU of compute capability 8.9 or newer. Under Triton's
    CPU interpreter (``TRITON_INTERPRET=1``, tests only: very slow) CPU tensors are accepted."""
    err = _int8_probe()
    if err is not None:
        return (f"attention 'int8_sparse' needs the triton package and PyTorch 2.4 or newer ({err}): triton "
                f"comes with PyTorch's CUDA builds on Linux (pip install triton otherwise); or choose flex_sparse")
    if _INT8_STATE["module"].interpreting():
        return None
    dev = torch.device(device) if device is not None else None
    if (dev is not None and dev.type != "cuda") or not torch.cuda.is_available():
        return (f"attention 'int8_sparse' needs an NVIDIA GPU (its Triton kernel runs on CUDA); this runs on "
                f"{dev or 'cpu'}: choose flex_sparse")
    major, minor = torch.cuda.get_device_capability(dev)
    if (major, minor) < INT8_MIN_CAPABILITY:
        return (f"attention 'int8_sparse' needs an NVIDIA GPU of compute capability 8.9 or newer (RTX 40xx, L40, "
                f"H100/H200 and later); this one is sm{major}{minor}: choose flex_sparse")
    return None


def _int8_available() -> bool:
    return int8_sparse_problem() is None


def _int8_sparse(q, k, v, cfg: dict):
    """Top-k block selection (``select_kv_blocks``, as for flex_sparse), then our int8 kernel on the kept blocks
    (self-attention; the registered backend sends cross-attention to dense before this)."""
    mod = _INT8_STATE.get("module")
    if mod is None:  # get_backend checked availability, so only a direct call gets here
        raise RuntimeError(int8_sparse_problem(q.device))
    if q.device.type != "cuda" and not mod.interpreting():
        raise RuntimeError(f"attention 'int8_sparse' needs CUDA tensors, got {q.device}: its Triton kernel runs on "
                           f"CUDA; choose flex_sparse")
    from .sparse_attention import SparseAttentionConfig, select_kv_blocks

    sc = SparseAttentionConfig(**cfg)
    idx = select_kv_blocks(q, k, sc)
    return mod.int8_sparse_attention(q, k, v, idx, sc.block_q, sc.block_k)


def register_builtin_backends() -> None:
    """Register this module's backends (each once; a second call changes nothing)."""
    builtin = [
        ("flash_attn", _flash, _flash_available, "FlashAttention 3 if importable, else 2"),
        ("sage", _sage, lambda: _has_sage(), "SageAttention 2 self-attention (INT8 QK, FP8 PV: lossy); cross dense"),
        ("sdpa_cudnn", _sdpa_cudnn, lambda: True, "cuDNN fused attention (direct aten call), sdpa fallback"),
        ("auto", _auto, lambda: True, "sdpa_cudnn on Hopper, sdpa elsewhere"),
    ]
    for name, fn, available, doc in builtin:
        if not is_registered(name):
            register_backend(name, fn, available, doc=doc)
    default_sparse = sparse_backend(0.15)  # registers "flex_sparse:0.15"; "flex_sparse" is the same function
    if not is_registered("flex_sparse"):
        register_backend("flex_sparse", _SPARSE_FNS[default_sparse], _flex_available,
                         doc="top-k (0.15) block-sparse self-attention via flex_attention; cross-attention dense")
    default_int8 = sparse_backend(0.15, kernel="int8")
    if not is_registered("int8_sparse"):
        register_backend("int8_sparse", _SPARSE_FNS[default_int8], _int8_available,
                         doc="top-k (0.15) block-sparse self-attention, int8 Q/K Triton kernel; cross-attention dense")
